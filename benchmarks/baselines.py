"""Baseline report: bundled models zero-shot and k-shot on every bundled benchmark.

Run one configuration (resumable; results under --runs):
  PYTHONPATH=src python benchmarks/baselines.py run --model smollm2-135m --shots 0
Write reports/baselines.md and .json over the first --limit examples of each subsample (a cell that
is still running is reported with the number of those examples finished so far):
  PYTHONPATH=src python benchmarks/baselines.py report --limit 20 --open-limit 10

Subsample: the fixed sha256-ordered subsample of `--limit` examples per option benchmark and
`--open-limit` per open-ended one (medmoe.eval.benchmarks.subsample). Rule: `letter` (one forward
pass per question; docs/evaluation.md). CMB-Clin has no train/dev split and is zero-shot only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import traceback
from collections import Counter
from pathlib import Path

REPORT = Path("reports/baselines")
DEFAULT_RUNS = Path("runs/baselines")
BENCHMARKS = ("pubmedqa", "medmcqa", "dental", "cmmlu-med", "cmexam", "cmb-clin")
RULE = "letter"


def run(args: argparse.Namespace) -> None:
    import torch

    from medmoe.eval.benchmarks import load_benchmark
    from medmoe.eval.model import load_eval_model
    from medmoe.eval.runner import check_settings, claim_folder, run_benchmark
    from medmoe.paths import atomic_write_json

    torch.set_num_threads(args.threads)
    folder = args.runs / f"{args.model}-{args.shots}shot"
    claim_folder(folder)
    # The subsample is nested (the first N of a fixed order), so a cell may be extended to a larger N.
    check_settings(folder, {"model": args.model, "rule": RULE, "shots": args.shots})
    settings = json.loads((folder / "run.json").read_text())
    atomic_write_json(folder / "run.json", settings | {"limit": max(args.limit, settings.get("limit", 0)),
                                                       "open_limit": max(args.open_limit, settings.get("open_limit", 0))})
    model = load_eval_model(args.model)
    for name in args.benchmarks.split(","):
        if name == "cmb-clin" and args.shots:
            continue  # no train/dev split: reported from the zero-shot run
        limit = args.open_limit if name == "cmb-clin" else args.limit
        try:
            bench = load_benchmark(name, limit)
            run_benchmark(model, bench, folder / name / "predictions.jsonl", RULE, args.shots, batch_size=1)
        except Exception:  # one broken benchmark must not stop the others; the report shows it missing
            traceback.print_exc()
            print(f"FAILED: {args.model} {args.shots}-shot {name}", file=sys.stderr, flush=True)


def report(args: argparse.Namespace) -> None:
    from medmoe.eval.benchmarks import load_benchmark
    from medmoe.eval.report import headline, secondary_metrics, summarize_rows
    from medmoe.eval.runner import read_done

    cells, lines = {}, []
    for config in sorted(p for p in args.runs.iterdir() if p.is_dir()):
        settings = json.loads((config / "run.json").read_text())
        for name in BENCHMARKS:
            planned = args.open_limit if name == "cmb-clin" else args.limit
            done = read_done(config / name / "predictions.jsonl")
            rows = [done[r.id] for r in load_benchmark(name, planned).records if r.id in done]  # the first `planned` only
            if not rows:
                continue
            summary = summarize_rows(rows) | {"planned": planned, "shots": settings["shots"], "model": settings["model"]}
            if "accuracy" in summary:  # letter bias: a model that always answers "A" scores the share of A's
                top, count = Counter(r["prediction"] for r in rows).most_common(1)[0]
                summary["most_frequent_prediction"] = {"letter": top, "share": count / len(rows)}
            cells[f"{config.name}/{name}"] = summary
    header = "| model | shots | benchmark | n (planned) | metric | value [95% CI] | also |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    for key, s in cells.items():
        metric, value, ci = headline(s)
        also = secondary_metrics(s)
        also.append(f"p50 {s['latency_p50_ms']:.0f} ms")
        lines.append(f"| {s['model']} | {s['shots']} | {key.split('/')[1]} | {s['examples']} ({s['planned']}) | {metric} | "
                     f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | {'; '.join(also)} |")
    import torch

    meta = {
        "command": "PYTHONPATH=src python benchmarks/baselines.py run --model M --shots K --limit N --open-limit M --threads 1 "
                   f"(per model and K), then report --limit {args.limit} --open-limit {args.open_limit}",
        "limit": args.limit,
        "open_limit": args.open_limit,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.platform()}, 2 shared CPU cores, torch {torch.__version__}, CPU",
        "rule": RULE,
    }
    REPORT.parent.mkdir(exist_ok=True)
    (REPORT.with_suffix(".json")).write_text(json.dumps(meta | {"cells": cells}, indent=2, ensure_ascii=False) + "\n")
    text = (Path(__file__).with_name("baselines_header.md").read_text().format(limit=args.limit, open_limit=args.open_limit) + "\n" + "\n".join(lines) + "\n\n"
            + "![baselines](baselines.png)\n\n" + f"Generated {meta['date']} on {meta['machine']}.\n")
    REPORT.with_suffix(".md").write_text(text)
    plot(cells, REPORT.with_suffix(".png"))
    print(text)


def plot(cells: dict, path: Path) -> None:
    """Grouped bars: headline metric per benchmark, one bar per model and shot count, 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medmoe.eval.report import headline

    configs = sorted({key.split("/")[0] for key in cells})
    width = 0.8 / max(len(configs), 1)
    fig, ax = plt.subplots(figsize=(10, 3.8))
    for i, config in enumerate(configs):
        xs, values, low, high = [], [], [], []
        for j, name in enumerate(BENCHMARKS):
            if f"{config}/{name}" in cells:
                _, value, ci = headline(cells[f"{config}/{name}"])
                xs.append(j + i * width)
                values.append(value)
                low.append(value - ci[0])
                high.append(ci[1] - value)
        ax.bar(xs, values, width, yerr=[low, high], capsize=2, label=config)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(BENCHMARKS))],
                  [f"{n}\n({'ROUGE-L' if n == 'cmb-clin' else 'accuracy'})" for n in BENCHMARKS], fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=len(configs))
    ax.set_title("Baselines (fixed subsample; bars: 95% bootstrap intervals)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("--model", required=True)
    p.add_argument("--shots", type=int, default=0)
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--open-limit", type=int, default=20)
    p.add_argument("--benchmarks", default=",".join(BENCHMARKS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=Path, default=DEFAULT_RUNS)
    r = sub.add_parser("report")
    r.add_argument("--runs", type=Path, default=DEFAULT_RUNS)
    r.add_argument("--limit", type=int, default=20, help="report the first N of each option benchmark's subsample")
    r.add_argument("--open-limit", type=int, default=10)
    args = parser.parse_args()
    run(args) if args.command == "run" else report(args)


if __name__ == "__main__":
    main()

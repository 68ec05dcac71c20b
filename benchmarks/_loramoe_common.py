"""Shared bits of the LoRA-MoE benchmarks: machine description, timing, report writing."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPORTS = Path(__file__).resolve().parent.parent / "reports"


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores_visible": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(fns: dict, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time each callable in turn (A B C A B C ...) after warm-up; seconds per call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for round_ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn))
        print(f"  round {round_ + 1}/{repeats}: " + ", ".join(f"{n} {t[-1]:.3f}s" for n, t in times.items()), flush=True)
    return times


def ratio_summary(times: dict[str, list[float]], numerator: str, denominator: str) -> dict:
    """Ratio of medians, and the median of the per-round ratios (each round is one A B pass)."""
    per_round = [a / b for a, b in zip(times[numerator], times[denominator])]
    return {
        "ratio_of_medians": statistics.median(times[numerator]) / statistics.median(times[denominator]),
        "median_round_ratio": statistics.median(per_round),
    }


def write_report(name: str, title: str, markdown_body: str, data: dict) -> Path:
    REPORTS.mkdir(exist_ok=True)
    command = "python " + " ".join([str(Path(sys.argv[0]).as_posix())] + sys.argv[1:])
    info = machine()
    header = (
        f"# {title}\n\n"
        f"Command: `PYTHONPATH=src {command}`  \n"
        f"Machine: {info['cpu']}, {info['cores_visible']} cores visible, {info['torch_threads']} torch threads, "
        f"{info['device']}, torch {info['torch']}, Python {info['python']}  \n"
        f"Date: {info['date_utc']}\n\n"
    )
    (REPORTS / f"{name}.md").write_text(header + markdown_body.rstrip() + "\n", encoding="utf-8")
    (REPORTS / f"{name}.json").write_text(json.dumps({"command": command, "machine": info, **data}, indent=2) + "\n", encoding="utf-8")
    return REPORTS / f"{name}.md"

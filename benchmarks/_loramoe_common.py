"""Helpers of the LoRA-MoE benchmarks: timing, and the constant-answer baseline of a test set
(reports are written by benchmarks/common.py)."""

from __future__ import annotations

import statistics
import time

from common import write_report  # noqa: F401  (re-exported: one report writer for all benchmarks)


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


def constant_answer(spec: str) -> tuple[float, float] | None:
    """(accuracy, macro-F1) of always giving the most frequent gold answer of the subsample that
    `medmoe eval` scores (NAME:LIMIT): what a model that learned only the answer format and a label
    prior scores. None for open-ended sets."""
    from collections import Counter

    from medmoe.eval.benchmarks import load_benchmark
    from medmoe.eval.metrics import macro_f1

    name, _, limit = spec.partition(":")
    records = load_benchmark(name, int(limit) if limit and int(limit) > 0 else None).records
    gold = [r.answer for r in records if r.options]
    if len(gold) != len(records):
        return None
    most = Counter(gold).most_common(1)[0][0]
    return gold.count(most) / len(gold), macro_f1(gold, [most] * len(gold))

"""Metrics with 95% bootstrap intervals: accuracy, macro-F1, latency percentiles."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

BOOTSTRAP_SEED = 0
BOOTSTRAP_SAMPLES = 1000


def accuracy(gold: Sequence[str], pred: Sequence[str]) -> float:
    return float(np.mean([g == p for g, p in zip(gold, pred)])) if gold else 0.0


def macro_f1(gold: Sequence[str], pred: Sequence[str], labels: Sequence[str] | None = None) -> float:
    """Unweighted mean of per-label F1 over the gold labels (as PubMedQA's official evaluation)."""
    labels = sorted(set(gold)) if labels is None else list(labels)
    scores = []
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(gold, pred))
        fp = sum(g != label and p == label for g, p in zip(gold, pred))
        fn = sum(g == label and p != label for g, p in zip(gold, pred))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return float(np.mean(scores)) if scores else 0.0


def bootstrap_interval(
    metric: Callable[[Sequence[str], Sequence[str]], float], gold: Sequence[str], pred: Sequence[str]
) -> tuple[float, float]:
    """95% percentile-bootstrap interval of `metric` over examples (fixed seed: reproducible)."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    n = len(gold)
    values = []
    for _ in range(BOOTSTRAP_SAMPLES):
        idx = rng.integers(0, n, n)
        values.append(metric([gold[i] for i in idx], [pred[i] for i in idx]))
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else 0.0


def bootstrap_mean(values: Sequence[float]) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of per-example `values` (fixed seed)."""
    if not len(values):
        return 0.0, 0.0
    data = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    idx = rng.integers(0, len(data), (BOOTSTRAP_SAMPLES, len(data)))  # (S, n) resampled example indices
    low, high = np.percentile(data[idx].mean(axis=1), [2.5, 97.5])
    return float(low), float(high)


def bootstrap_macro(values: Sequence[float], groups: Sequence[str]) -> tuple[float, float]:
    """95% bootstrap interval of the macro mean (mean over groups of the group means).

    Resampling is stratified by group (each group resampled within itself), so every replicate has
    every group and the macro mean is always defined.
    """
    data = np.asarray(values, dtype=np.float64)
    labels = np.asarray(groups)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    per_group = []
    for g in sorted(set(groups)):
        member = data[labels == g]
        idx = rng.integers(0, len(member), (BOOTSTRAP_SAMPLES, len(member)))
        per_group.append(member[idx].mean(axis=1))  # (S,)
    low, high = np.percentile(np.mean(per_group, axis=0), [2.5, 97.5])
    return float(low), float(high)


def best_constant(gold: Sequence[str]) -> tuple[str, float]:
    """(answer, accuracy) of the best constant answer on these gold answers: the most common one
    (ties: the alphabetically first), the floor every system is compared against."""
    counts: dict[str, int] = {}
    for g in gold:
        counts[g] = counts.get(g, 0) + 1
    answer = min(counts, key=lambda a: (-counts[a], a))
    return answer, counts[answer] / len(gold)


def paired_difference(correct_a: Sequence[float], correct_b: Sequence[float]) -> tuple[float, tuple[float, float]]:
    """(mean of a - b, its 95% paired-bootstrap interval) for per-example 0/1 correctness on the same examples."""
    diff = [float(a) - float(b) for a, b in zip(correct_a, correct_b, strict=True)]
    return sum(diff) / len(diff), bootstrap_mean(diff)

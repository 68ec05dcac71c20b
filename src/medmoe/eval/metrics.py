"""Metrics with 95% bootstrap intervals: accuracy, macro-F1, latency percentiles."""

from __future__ import annotations

from typing import Callable, Sequence

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

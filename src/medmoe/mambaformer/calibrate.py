"""Pick the gate threshold tau for a user's latency budget on a dev set.

Decisions are d = 1[p_M > tau]. Every distinct routing of the dev set is reached by one of the
candidate thresholds {0} U {distinct p_M} U {1}; for each we measure accuracy and the latency
statistic (p50, mean or p95 of the routed per-query latency, plus the gate's own cost), keep those
within the budget, and choose the most accurate (ties: lower latency, then the larger tau). The
returned tau is the midpoint between the chosen candidate and the next larger score, which routes
the dev set identically but leaves a margin on both sides for unseen queries.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medmoe.errors import MedmoeError
from medmoe.mambaformer.metrics import RoutingMetrics, evaluate
from medmoe.mambaformer.results import ExpertResults

STATISTICS = {"p50": "p50_ms", "mean": "mean_ms", "p95": "p95_ms"}


@dataclass(frozen=True)
class Calibration:
    tau: float
    budget_ms: float
    statistic: str
    metrics: RoutingMetrics

    def to_dict(self) -> dict:
        return {"tau": self.tau, "budget_ms": self.budget_ms, "statistic": self.statistic,
                "metrics": self.metrics.to_dict()}


def candidate_thresholds(scores: np.ndarray) -> np.ndarray:
    """Sorted thresholds giving every distinct routing d = 1[p_M > tau]: {0} U unique(p_M) U {1}."""
    return np.unique(np.concatenate([[0.0], np.asarray(scores, dtype=np.float64), [1.0]]))


def threshold_sweep(scores: np.ndarray, table: ExpertResults, costs: np.ndarray | None = None,
                    gate_ms: float = 0.0) -> list[tuple[float, RoutingMetrics]]:
    """(tau, metrics) for every candidate threshold, tau ascending (share routed to E_M descending)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(table),):
        raise MedmoeError(f"calibration: {scores.shape[0] if scores.ndim else 0} scores for a table of {len(table)}")
    return [(float(tau), evaluate(table, scores > tau, costs, gate_ms)) for tau in candidate_thresholds(scores)]


def calibrate_tau(scores: np.ndarray, table: ExpertResults, budget_ms: float, statistic: str = "p50",
                  costs: np.ndarray | None = None, gate_ms: float = 0.0) -> Calibration:
    """The tau whose routing of the dev `table` is most accurate with latency `statistic` <= budget_ms."""
    if statistic not in STATISTICS:
        raise MedmoeError(f"calibration: statistic must be one of {sorted(STATISTICS)}, got {statistic!r}")
    if budget_ms <= 0:
        raise MedmoeError(f"calibration: the latency budget must be positive, got {budget_ms} ms")
    sweep = threshold_sweep(scores, table, costs, gate_ms)
    field = STATISTICS[statistic]
    feasible = [(i, m) for i, (_, m) in enumerate(sweep) if getattr(m, field) <= budget_ms]
    if not feasible:
        fastest = min(getattr(m, field) for _, m in sweep)
        raise MedmoeError(f"calibration: no threshold meets a {statistic} latency budget of {budget_ms:g} ms "
                          f"on this dev set; the fastest routing takes {fastest:.1f} ms")
    best_index, best = max(feasible, key=lambda im: (im[1].accuracy, -getattr(im[1], field), im[0]))
    tau = sweep[best_index][0]
    upper = sweep[best_index + 1][0] if best_index + 1 < len(sweep) else 1.0
    return Calibration(tau=(tau + upper) / 2 if upper > tau else tau, budget_ms=budget_ms,
                       statistic=statistic, metrics=best)

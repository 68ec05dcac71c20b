"""Pick the gate threshold tau on a dev set: the one calibration of MambaFormer.

Decisions are d = 1[p_M > tau]. Every distinct routing of the dev set is reached by one of the
candidate thresholds {0} U {distinct p_M} U {1}; for each we measure accuracy and the latency
statistic (p50, mean or p95 of the routed per-query latency *plus the gate's own cost* `gate_ms`,
RouterCheckpoint.gate_ms: the same cost a served query pays). Then one of two rules:
  budget     (a latency budget is given) keep the routings whose statistic is within the budget and
             choose the most accurate (ties: lower latency, then the larger tau);
  tolerance  (no budget) the fastest routing whose accuracy is within `tolerance` (default 1 point)
             of E_T's dev accuracy (ties: more accurate, then the larger tau); when none is, the most
             accurate routing.
The returned tau is the midpoint between the chosen candidate and the next larger score, which routes
the dev set identically but leaves a margin on both sides for unseen queries.

Every caller goes through `calibrate_tau`: the pipeline (`medmoe run`, through `fit.fit_gate`),
`medmoe mambaformer gate train` (`fit.train_router`), and `medmoe mambaformer gate calibrate` / `medmoe mambaformer calibrate`
(`fit.recalibrate`), each with the checkpoint's measured gate cost, so all pick the same tau on the
same dev results.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medmoe.errors import MedmoeError
from medmoe.mambaformer.metrics import RoutingMetrics, evaluate
from medmoe.mambaformer.results import ExpertResults

STATISTICS = {"p50": "p50_ms", "mean": "mean_ms", "p95": "p95_ms"}
DEFAULT_TOLERANCE = 0.01  # the tolerance rule: within 1 accuracy point of E_T on dev


@dataclass(frozen=True)
class Calibration:
    """tau and what it achieves on dev. rule: "budget" (budget_ms set) or "tolerance"; gate_ms: the gate's
    cost per query that the latencies include."""

    tau: float
    budget_ms: float | None
    statistic: str
    metrics: RoutingMetrics
    rule: str = "budget"
    tolerance: float | None = None
    gate_ms: float = 0.0

    def to_dict(self) -> dict:
        return {"tau": self.tau, "rule": self.rule, "budget_ms": self.budget_ms, "tolerance": self.tolerance,
                "statistic": self.statistic, "gate_ms": self.gate_ms, "metrics": self.metrics.to_dict()}


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


def calibrate_tau(scores: np.ndarray, table: ExpertResults, budget_ms: float | None = None, statistic: str = "p50",
                  costs: np.ndarray | None = None, gate_ms: float = 0.0,
                  tolerance: float = DEFAULT_TOLERANCE) -> Calibration:
    """tau for the dev `table` (its gate scores p_M, `scores` (N,)) by the budget rule when `budget_ms`
    is given, else the tolerance rule (module docstring). `gate_ms`: the gate's own cost per query,
    added to every routed latency; pass the checkpoint's (RouterCheckpoint.gate_ms)."""
    if statistic not in STATISTICS:
        raise MedmoeError(f"calibration: statistic must be one of {sorted(STATISTICS)}, got {statistic!r}")
    if budget_ms is not None and budget_ms <= 0:
        raise MedmoeError(f"calibration: the latency budget must be positive, got {budget_ms} ms")
    if gate_ms < 0 or not np.isfinite(gate_ms):
        raise MedmoeError(f"calibration: the gate's cost must be a non-negative number of ms, got {gate_ms}")
    sweep = threshold_sweep(scores, table, costs, gate_ms)
    field = STATISTICS[statistic]
    indexed = list(enumerate(m for _, m in sweep))
    if budget_ms is not None:
        feasible = [(i, m) for i, m in indexed if getattr(m, field) <= budget_ms]
        if not feasible:
            fastest = min(getattr(m, field) for _, m in sweep)
            raise MedmoeError(f"calibration: no threshold meets a {statistic} latency budget of {budget_ms:g} ms "
                              f"on this dev set; the fastest routing takes {fastest:.1f} ms (gate {gate_ms:.2f} ms included)")
        best_index, best = max(feasible, key=lambda im: (im[1].accuracy, -getattr(im[1], field), im[0]))
    else:
        target = float(table.transformer.correct.mean()) - tolerance
        close = [(i, m) for i, m in indexed if m.accuracy >= target - 1e-12]
        if close:
            best_index, best = min(close, key=lambda im: (getattr(im[1], field), -im[1].accuracy, -im[0]))
        else:  # no routing that close to E_T (a tolerance < 0): the most accurate one
            best_index, best = max(indexed, key=lambda im: (im[1].accuracy, -getattr(im[1], field), im[0]))
    tau = sweep[best_index][0]
    upper = sweep[best_index + 1][0] if best_index + 1 < len(sweep) else 1.0
    return Calibration(tau=(tau + upper) / 2 if upper > tau else tau, budget_ms=budget_ms, statistic=statistic,
                       metrics=best, rule="budget" if budget_ms is not None else "tolerance",
                       tolerance=None if budget_ms is not None else tolerance, gate_ms=float(gate_ms))

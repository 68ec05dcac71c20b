"""What a routing decision achieves on an `ExpertResults` table: accuracy, latency, mix, utility.

decisions: (N,) bool, True = E_M (mamba), False = E_T (transformer).
costs:     (N, 2) latency in ms, column 0 = E_T, column 1 = E_M; by default the measured latencies
           in the table (`table.stacked("latency_ms")`), or C_e(n) from a latency model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from medmoe.errors import MedmoeError
from medmoe.mambaformer.results import ExpertResults


@dataclass(frozen=True)
class RoutingMetrics:
    """Accuracy and latency of one routing of one table (latency per query, in ms)."""

    n: int
    accuracy: float
    p50_ms: float
    p95_ms: float
    mean_ms: float
    share_mamba: float
    mean_loss: float

    def to_dict(self) -> dict:
        return asdict(self)


def check_decisions(table: ExpertResults, decisions: np.ndarray) -> np.ndarray:
    decisions = np.asarray(decisions)
    if decisions.shape != (len(table),):
        raise MedmoeError(f"routing decisions have shape {decisions.shape}, expected ({len(table)},)")
    return decisions.astype(bool)


def routed(values: np.ndarray, decisions: np.ndarray) -> np.ndarray:
    """Pick column 1 (E_M) where decisions is True, else column 0 (E_T). values: (N, 2) -> (N,)."""
    return np.where(decisions, values[:, 1], values[:, 0])


def evaluate(table: ExpertResults, decisions: np.ndarray, costs: np.ndarray | None = None,
             gate_ms: float = 0.0) -> RoutingMetrics:
    """Metrics of routing `table` by `decisions`; `gate_ms` (the gate's own cost) is added per query."""
    d = check_decisions(table, decisions)
    costs = table.stacked("latency_ms") if costs is None else np.asarray(costs, dtype=np.float64)
    latency = routed(costs, d) + gate_ms                                    # (N,)
    return RoutingMetrics(
        n=len(table),
        accuracy=float(routed(table.stacked("correct"), d).mean()),
        p50_ms=float(np.percentile(latency, 50)),
        p95_ms=float(np.percentile(latency, 95)),
        mean_ms=float(latency.mean()),
        share_mamba=float(d.mean()),
        mean_loss=float(routed(table.stacked("loss"), d).mean()),
    )


def utilities(table: ExpertResults, beta: float, c_ref: float, costs: np.ndarray | None = None) -> np.ndarray:
    """U_e(x) = -l_e(x) - beta * C_e(n) / C_ref for both experts: (N, 2), column 0 = E_T."""
    if c_ref <= 0:
        raise MedmoeError(f"C_ref must be positive, got {c_ref}")
    costs = table.stacked("latency_ms") if costs is None else np.asarray(costs, dtype=np.float64)
    return -table.stacked("loss") - beta * costs / c_ref


def total_utility(table: ExpertResults, decisions: np.ndarray, beta: float, c_ref: float,
                  costs: np.ndarray | None = None) -> float:
    """Mean utility of the chosen experts, E[U_{e(x)}(x)]."""
    return float(routed(utilities(table, beta, c_ref, costs), check_decisions(table, decisions)).mean())


def default_c_ref(costs: np.ndarray) -> float:
    """C_ref: the mean latency of E_T over the table (our documented normaliser)."""
    return float(np.mean(costs[:, 0]))

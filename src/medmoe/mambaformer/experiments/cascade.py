"""Cascade routing on E_M's confidence: E_M answers every query first; an escalation score read off its
answer decides whether E_T runs too, and then E_T's answer is the one given.

The token gate decides before either expert runs, from the query's tokens alone, so it cannot see
where E_M is wrong. A cascade pays E_M's pass on every query (about a tenth of E_T's) and in return
reads E_M's own output: how sure its head is, and of what.

Shapes, for N queries with K option slots:
  p       (N, K)  E_M's head probabilities (0 on absent options)
  x       (N, F)  escalation features: max_k p, the margin p_(1) - p_(2) between the top two, the
                  entropy H(p) / log K' (K' options present), p itself (K columns), and the query's
                  global features log n and n / 1000 (n = its prompt tokens, known once E_M has run)
  g       (N,)    the gain of escalating, g = c_T - c_M in {-1, 0, 1} (c_e = 1 if expert e is right)
Escalation model (`EscalationModel`): a logistic regression on standardised features x~,
  y = (1 + g) / 2 in {0, 1/2, 1}      BCE(sigmoid(w . x~ + b), y) + lambda ||w||^2      (convex, L-BFGS)
so 2 sigmoid(z) - 1 estimates E[c_T - c_M | x]. The keep score is k = 1 - sigmoid(z) in (0, 1).

Routing: keep (answer with E_M) iff k > tau, escalate otherwise. This is a routing of the same
`ExpertResults` table (decision True = E_M's answer) with the cascade's costs
  costs (N, 2): column 0 (escalated) t_M + t_T, column 1 (kept) t_M;   plus r, the router's cost,
so accuracy, latency, the tau calibration (`calibrate.calibrate_tau`: the fastest dev routing within
`tolerance` of E_T's dev accuracy, the token gate's rule), the sweep, the Pareto front and the targets
are the routing ones with `costs`. The model trains on the train folds' out-of-fold tables (no head
that saw the question) and tau is chosen on the dev folds; test chooses nothing.

Random routing at the same mix: escalating a random share e gives expected correctness
r_i = (1 - e) c_M,i + e c_T,i (`targets.random_same_mix` with share 1 - e kept at E_M) and latency
t_M + t_T when escalated, t_M when not.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from medmoe.errors import MedmoeError
from medmoe.mambaformer.calibrate import DEFAULT_TOLERANCE, Calibration, calibrate_tau, candidate_thresholds
from medmoe.mambaformer.experiments.baselines import OracleRouter, RandomRouter
from medmoe.mambaformer.experiments.pareto import OperatingPoint, pareto_report
from medmoe.mambaformer.metrics import RoutingMetrics, evaluate
from medmoe.mambaformer.results import ExpertResults

FEATURES = ("max_prob", "margin", "entropy")  # then p_1..p_K, then the global ones
GLOBAL = ("log_tokens", "tokens_per_1000")
L2 = 1e-2  # lambda, on standardised features (fixed, not tuned)
Key = TypeVar("Key")


def features_of(probs: np.ndarray, n_tokens: np.ndarray) -> np.ndarray:
    """(N, 3 + K + 2) escalation features x of E_M's probabilities p (N, K) and prompt lengths n (N,)."""
    p = np.asarray(probs, dtype=np.float64)
    top = -np.sort(-p, axis=1)                                                   # (N, K) descending
    present = np.maximum((p > 0).sum(1), 2)                                      # K' (at least 2)
    entropy = -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(1) / np.log(present)     # H(p) / log K'
    n = np.asarray(n_tokens, dtype=np.float64)
    return np.column_stack([top[:, 0], top[:, 0] - top[:, 1], entropy, p, np.log(n), n / 1000.0])


def escalation_features(table: ExpertResults) -> np.ndarray:
    """(N, F) features of a table's E_M answers (its `label_probs`) and query lengths."""
    if table.mamba.label_probs is None:
        raise MedmoeError("cascade: the table has no E_M option probabilities (label_probs) to read confidence from")
    return features_of(table.mamba.label_probs, table.n_tokens)


def gain(table: ExpertResults) -> np.ndarray:
    """(N,) g = c_T - c_M: +1 where escalating fixes E_M's answer, -1 where it breaks a right one."""
    return table.transformer.correct.astype(np.float64) - table.mamba.correct.astype(np.float64)


def cascade_costs(table: ExpertResults) -> np.ndarray:
    """(N, 2) latency of each decision: column 0 escalated (t_M + t_T), column 1 kept (t_M)."""
    t_m = table.mamba.latency_ms
    return np.stack([t_m + table.transformer.latency_ms, t_m], axis=1)


@dataclass
class EscalationModel:
    """The logistic of the module docstring: mean, std (F,) of the training features, w (F,), b."""

    mean: np.ndarray
    std: np.ndarray
    w: np.ndarray
    b: float

    @classmethod
    def fit(cls, x: np.ndarray, g: np.ndarray, l2: float = L2, steps: int = 200) -> EscalationModel:
        """Minimise BCE(sigmoid(w . x~ + b), (1 + g) / 2) + l2 ||w||^2 on features x (N, F), gains g (N,)."""
        x, g = np.asarray(x, dtype=np.float64), np.asarray(g, dtype=np.float64)
        if x.ndim != 2 or g.shape != (x.shape[0],) or not len(g):
            raise MedmoeError(f"cascade: features {x.shape} and gains {g.shape} do not describe the same queries")
        mean, std = x.mean(0), np.maximum(x.std(0), 1e-6)
        z = torch.from_numpy((x - mean) / std)
        y = torch.from_numpy((1.0 + g) / 2.0)
        w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, tolerance_grad=1e-9, tolerance_change=1e-12,
                                      line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * w.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        return cls(mean, std, w.detach().numpy().copy(), float(b.detach()))

    def expected_gain(self, x: np.ndarray) -> np.ndarray:
        """(N,) the estimate 2 sigmoid(z) - 1 of E[c_T - c_M | x]."""
        return 2.0 * self._sigmoid(x) - 1.0

    def keep_score(self, x: np.ndarray) -> np.ndarray:
        """(N,) k = 1 - sigmoid(z): keep E_M's answer iff k > tau."""
        return 1.0 - self._sigmoid(x)

    def _sigmoid(self, x: np.ndarray) -> np.ndarray:
        z = ((np.asarray(x, dtype=np.float64) - self.mean) / self.std) @ self.w + self.b
        return 1.0 / (1.0 + np.exp(-z))

    def to_dict(self, names: Sequence[str]) -> dict:
        return {"weights": dict(zip(names, self.w.tolist())), "bias": self.b}


def feature_names(letters: int) -> list[str]:
    return [*FEATURES, *(f"p_{k}" for k in range(letters)), *GLOBAL]


def router_cost_ms(model: EscalationModel, table: ExpertResults, passes: int = 5) -> float:
    """The router's own cost per query in ms: features of one query's E_M answer and its score, one
    query at a time over the table (median of `passes` medians), as a served cascade computes it."""
    probs, n = table.mamba.label_probs, table.n_tokens
    if probs is None:
        raise MedmoeError("cascade: the table has no E_M option probabilities (label_probs)")
    medians = []
    for _ in range(passes):
        ms = []
        for i in range(len(table)):
            start = time.perf_counter()
            model.keep_score(features_of(probs[i : i + 1], n[i : i + 1]))
            ms.append((time.perf_counter() - start) * 1000)
        medians.append(statistics.median(ms))
    return float(statistics.median(medians))


@dataclass
class Cascade:
    """A fitted cascade: the escalation model, tau (calibrated on dev), the router's cost per query."""

    model: EscalationModel
    tau: float
    router_ms: float
    calibration: Calibration

    def keep_scores(self, table: ExpertResults) -> np.ndarray:
        return self.model.keep_score(escalation_features(table))

    def decisions(self, table: ExpertResults) -> np.ndarray:
        """(N,) bool, True = keep E_M's answer, False = escalate to E_T."""
        return self.keep_scores(table) > self.tau

    def metrics(self, table: ExpertResults) -> RoutingMetrics:
        """Accuracy and latency of the cascade on `table` (its costs, router cost included)."""
        return evaluate(table, self.decisions(table), cascade_costs(table), self.router_ms)


def fit_cascade(train: ExpertResults, dev: ExpertResults, tolerance: float = DEFAULT_TOLERANCE, l2: float = L2,
                router_ms: float | None = None) -> Cascade:
    """The escalation model trained on `train`, its router cost measured on `dev` (unless given) and tau
    calibrated on `dev` by the token gate's tolerance rule with the cascade's costs (module docstring)."""
    model = EscalationModel.fit(escalation_features(train), gain(train), l2)
    cost = router_cost_ms(model, dev) if router_ms is None else router_ms
    calibration = calibrate_tau(model.keep_score(escalation_features(dev)), dev, costs=cascade_costs(dev), gate_ms=cost,
                                tolerance=tolerance)
    return Cascade(model, calibration.tau, cost, calibration)


def sweep(table: ExpertResults, keep_scores: np.ndarray, router_ms: float) -> list[OperatingPoint]:
    """An operating point for every distinct tau of the keep scores (latency: p50, router cost included)."""
    costs = cascade_costs(table)
    points = []
    for tau in candidate_thresholds(keep_scores):
        m = evaluate(table, keep_scores > tau, costs, router_ms)
        points.append(OperatingPoint(f"cascade(tau={tau:.4f})", m.accuracy, m.p50_ms, m.mean_ms, m.share_mamba, "gate",
                                     float(tau)))
    return points


def baselines(table: ExpertResults, kept_share: float) -> list[OperatingPoint]:
    """Each expert alone (its own latency), random escalation at the cascade's mix and the accuracy
    oracle (both paying the cascade's costs: E_M always runs first)."""
    costs = cascade_costs(table)
    points = []
    for name, keep in (("transformer-only", np.zeros(len(table), dtype=bool)), ("mamba-only", np.ones(len(table), dtype=bool))):
        m = evaluate(table, keep)
        points.append(OperatingPoint(name, m.accuracy, m.p50_ms, m.mean_ms, m.share_mamba, "baseline"))
    for router in (RandomRouter(kept_share), OracleRouter(costs=costs, objective="accuracy")):
        m = evaluate(table, router.route(table), costs)
        points.append(OperatingPoint(f"cascade {router.name}", m.accuracy, m.p50_ms, m.mean_ms, m.share_mamba, "baseline"))
    return points


def cascade_report(test: ExpertResults, cascade: Cascade, extra_points: Sequence[OperatingPoint] = ()) -> dict:
    """The Pareto report of the cascade on `test` (`pareto.pareto_report`: front, APGR between the
    experts alone), with the deployed tau's routing and the sweep's baselines."""
    scores = cascade.keep_scores(test)
    base = baselines(test, float((scores > cascade.tau).mean())) + list(extra_points)
    report = pareto_report(sweep(test, scores, cascade.router_ms), base, base[0], base[1])
    report.update({"tau": cascade.tau, "router_ms": cascade.router_ms, "calibration": cascade.calibration.to_dict(),
                   "at_tau": cascade.metrics(test).to_dict()})
    return report


def choose_router(dev_metrics: Mapping[Key, RoutingMetrics], et_dev_accuracy: float,
                  tolerance: float = DEFAULT_TOLERANCE) -> Key:
    """Which calibrated router to deploy (a router name, or a setting such as E_M's distillation alpha),
    from dev metrics alone: the fastest (p50) within `tolerance` of E_T's dev accuracy (the calibration's
    own rule), else the most accurate; ties go to the one listed first."""
    if not dev_metrics:
        raise MedmoeError("choosing a router: no routers to choose from")
    keys = list(dev_metrics)
    close = [k for k in keys if dev_metrics[k].accuracy >= et_dev_accuracy - tolerance - 1e-12]
    if close:
        return min(close, key=lambda k: (dev_metrics[k].p50_ms, -dev_metrics[k].accuracy, keys.index(k)))
    return max(keys, key=lambda k: (dev_metrics[k].accuracy, -dev_metrics[k].p50_ms, -keys.index(k)))

"""Routers as plug-ins: one method, `route(table) -> decisions` ((N,) bool, True = E_M), plus a registry.

Baselines of docs/methods.md 1.4: E_T only, E_M only, random routing at a given mix (seeded), a length
threshold fitted on dev, and the oracle router (best utility per query, an upper bound that reads the
answers). `ScoreRouter` wraps a trained gate's p_M scores with the threshold tau. `baseline_routers`:
the set every routing report compares against.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol, cast

import numpy as np

from medmoe.errors import MedmoeError
from medmoe.mambaformer.metrics import default_c_ref, routed, utilities
from medmoe.mambaformer.results import ExpertResults


class Router(Protocol):
    name: str

    def route(self, table: ExpertResults) -> np.ndarray:
        """(N,) bool decisions for the table's examples, True = E_M."""
        ...


class AlwaysTransformer:
    name = "transformer-only"

    def route(self, table: ExpertResults) -> np.ndarray:
        return np.zeros(len(table), dtype=bool)


class AlwaysMamba:
    name = "mamba-only"

    def route(self, table: ExpertResults) -> np.ndarray:
        return np.ones(len(table), dtype=bool)


class RandomRouter:
    """Sends each query to E_M with probability `mix`, from a seeded generator (same seed, same routes)."""

    def __init__(self, mix: float, seed: int = 0):
        if not 0.0 <= mix <= 1.0:
            raise MedmoeError(f"random router: mix must be in [0, 1], got {mix}")
        self.mix, self.seed = mix, seed
        self.name = f"random({mix:.2f})"

    def route(self, table: ExpertResults) -> np.ndarray:
        return np.random.default_rng(self.seed).random(len(table)) < self.mix


class LengthThreshold:
    """Long queries (n_tokens > threshold) to E_M, short to E_T (or the reverse with long_to_mamba=False).

    `fit(dev)` picks the threshold and direction that maximise dev accuracy (objective="accuracy") or
    mean dev utility U_e = -l_e - beta C_e / C_ref (objective="utility"); ties go to the lower mean latency.
    """

    def __init__(self, threshold: float = float("inf"), long_to_mamba: bool = True):
        self.threshold, self.long_to_mamba = threshold, long_to_mamba
        self.name = "length-threshold"

    def route(self, table: ExpertResults) -> np.ndarray:
        long = table.n_tokens > self.threshold
        return long if self.long_to_mamba else ~long

    def fit(self, dev: ExpertResults, objective: str = "accuracy", beta: float = 0.0,
            c_ref: float | None = None, costs: np.ndarray | None = None) -> LengthThreshold:
        costs = dev.stacked("latency_ms") if costs is None else costs
        if objective == "accuracy":
            u = dev.stacked("correct").astype(np.float64)                       # (N, 2)
        elif objective == "utility":
            u = utilities(dev, beta, default_c_ref(costs) if c_ref is None else c_ref, costs)
        else:
            raise MedmoeError(f"length threshold: objective must be 'accuracy' or 'utility', got {objective!r}")
        lat = costs
        candidates = np.concatenate([[-np.inf], np.unique(dev.n_tokens).astype(float)])
        best: tuple[tuple[float, float], float, bool] | None = None
        for threshold in candidates:
            for long_to_mamba in (True, False):
                long = dev.n_tokens > threshold
                d = long if long_to_mamba else ~long
                key = (routed(u, d).mean(), -routed(lat, d).mean())
                if best is None or key > best[0]:
                    best = (key, threshold, long_to_mamba)
        _, self.threshold, self.long_to_mamba = cast(tuple[tuple[float, float], float, bool], best)  # set: candidates is never empty
        return self


class OracleRouter:
    """Per query, the expert of highest utility U_e = -l_e - beta C_e / C_ref (reads the gold results).

    objective="accuracy" instead picks the expert with the higher `correct` (a correct one when one
    exists; the higher quality q in the generative setting, `generative_routing`), the cheaper one on ties.
    """

    def __init__(self, beta: float = 0.0, c_ref: float | None = None, costs: np.ndarray | None = None,
                 objective: str = "utility"):
        if objective not in ("utility", "accuracy"):
            raise MedmoeError(f"oracle router: objective must be 'utility' or 'accuracy', got {objective!r}")
        self.beta, self.c_ref, self.costs, self.objective = beta, c_ref, costs, objective
        self.name = "oracle" if objective == "utility" else "oracle-accuracy"

    def route(self, table: ExpertResults) -> np.ndarray:
        costs = table.stacked("latency_ms") if self.costs is None else self.costs
        if self.objective == "accuracy":
            correct = table.stacked("correct")                                  # (N, 2) 0/1 or q in [0, 1]
            cheaper_m = costs[:, 1] < costs[:, 0]
            return np.where(correct[:, 0] == correct[:, 1], cheaper_m, correct[:, 1] > correct[:, 0])
        c_ref = default_c_ref(costs) if self.c_ref is None else self.c_ref
        u = utilities(table, self.beta, c_ref, costs)
        return u[:, 1] > u[:, 0]


class ScoreRouter:
    """A trained gate's decisions: E_M where p_M > tau, from p_M scores keyed by example id."""

    def __init__(self, scores: Mapping[str, float], tau: float = 0.5, name: str = "mambaformer-gate"):
        self.scores, self.tau, self.name = dict(scores), tau, name

    def route(self, table: ExpertResults) -> np.ndarray:
        missing = [i for i in table.ids if i not in self.scores]
        if missing:
            raise MedmoeError(f"{self.name}: no gate score for {len(missing)} examples, e.g. {missing[:3]}")
        return np.array([self.scores[i] for i in table.ids]) > self.tau


ROUTERS: dict[str, Callable[..., Router]] = {
    "transformer-only": AlwaysTransformer,
    "mamba-only": AlwaysMamba,
    "random": RandomRouter,
    "length-threshold": LengthThreshold,
    "oracle": OracleRouter,
    "score": ScoreRouter,
}


def make_router(name: str, **kwargs) -> Router:
    """Build a registered router by name."""
    if name not in ROUTERS:
        raise MedmoeError(f"unknown router {name!r}; registered: {', '.join(sorted(ROUTERS))}")
    return ROUTERS[name](**kwargs)


def baseline_routers(test: ExpertResults, mix: float, dev: ExpertResults | None = None, seed: int = 0,
                     oracle_beta: float = 1.0) -> list[Router]:
    """Every baseline of a routing report, in this order: E_T only, E_M only, random at `mix`, the length
    threshold fitted on `dev` (on `test` when no dev is given, and named so), the utility oracle
    (argmax_e U_e with `oracle_beta`) and the accuracy oracle."""
    length = LengthThreshold().fit(dev if dev is not None else test)
    if dev is None:
        length.name = "length-threshold (fit on test)"
    utility_oracle = OracleRouter(beta=oracle_beta)
    utility_oracle.name = f"oracle(beta={oracle_beta:g})"
    return [AlwaysTransformer(), AlwaysMamba(), RandomRouter(mix, seed), length, utility_oracle,
            OracleRouter(objective="accuracy")]

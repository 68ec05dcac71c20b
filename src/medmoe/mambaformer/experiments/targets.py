"""The issue's routing targets as one JSON object (`report["targets"]`), read off one test table.

Layout (accuracies in [0, 1], latencies = p50 ms per query, every "ci95" a 95% paired-bootstrap
interval [lo, hi] over test examples, `medmoe.eval.metrics.paired_difference`):

    floor_accuracy, floor_answer       the floor: the best constant answer (`best_constant` of the gold
                                       answers), or the `Floor` given (the generative setting's best
                                       constant text, `generative_routing.constant_text_floor`)
    et, em                             {accuracy, p50_ms, diff_vs_floor_ci95}: each expert alone
    deployed                           {accuracy, p50_ms, share_to_mamba, speedup_vs_et,
                                        diff_vs_random_same_mix_ci95, random_same_mix_accuracy,
                                        diff_vs_et_ci95}: the calibrated gate, gate cost included
    apgr                               report["apgr"] (None when undefined)
    fastest_within_1pt                 the fastest Pareto-optimal gate point with accuracy >= E_T - 1 point
                                       {name, accuracy, p50_ms, speedup_vs_et}, or None
    best_speedup_vs_big                the fastest Pareto-optimal gate point at the big Transformer's
                                       accuracy or better {name, accuracy, p50_ms, speedup_vs_big}, or None
    holds, thresholds                  which targets are met, and the thresholds used

"Accuracy" is the mean of the table's `correct`: 0/1 for option scoring, the quality q in [0, 1] of a
generation in the generative setting (`generative_routing`), where "1 point" is 0.01 of that metric.

Random routing at the same mix: with s = the deployed share to E_M, a random router's expected
correctness on example i is r_i = s c_M,i + (1 - s) c_T,i (c_e,i in {0, 1}, or a quality in [0, 1]).
The deployed gate is compared with that expectation, mean_i(g_i - r_i) with g_i its correctness, rather than with one
seeded random draw: the routing randomness is integrated out exactly, and the bootstrap over
examples is the only noise left.

`costs` (N, 2), optional: the latency of each decision when it is not the chosen expert's own (a
cascade, `experiments.cascade`: E_M always runs, so escalating costs t_M + t_T); it applies to the
deployed router only, each expert alone keeps its own latency.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medmoe.errors import MedmoeError
from medmoe.eval.metrics import best_constant, paired_difference
from medmoe.mambaformer.metrics import evaluate, routed
from medmoe.mambaformer.results import ExpertResults

THRESHOLDS: dict[str, Any] = {"speedup_vs_et": 3.0, "within_of_et": 0.01, "share_to_mamba": [0.2, 0.95],
                              "apgr": 0.5}
TARGET_TEXT = {
    "speedup_3x_within_1pt_of_et_above_floor":
        "a gate setting >= 3x faster than E_T (p50) within 1 point of it, E_T above the floor by a paired CI",
    "deployed_mixes": "the deployed gate mixes (share to E_M between 0.2 and 0.95)",
    "deployed_beats_random_same_mix": "the deployed gate beats random routing at its mix (paired CI above 0)",
    "apgr_at_least_0.5": "APGR >= 0.5",
}
_EPS = 1e-9  # float slack in "within 1 point" / "at its accuracy or better"


@dataclass(frozen=True)
class Floor:
    """The best constant output and what it scores on each test example: `answer` (a label, or a text
    in the generative setting) and `correct` (N,) in [0, 1]."""

    answer: str
    correct: np.ndarray


def _ci(correct_a: np.ndarray, correct_b: np.ndarray) -> list[float]:
    """[lo, hi] of the 95% paired-bootstrap interval of mean(a - b); a, b: (N,) correctness in [0, 1]."""
    return list(paired_difference(np.asarray(correct_a, dtype=np.float64).tolist(),
                                  np.asarray(correct_b, dtype=np.float64).tolist())[1])


def _expert(table: ExpertResults, to_mamba: bool, floor_correct: np.ndarray) -> dict[str, Any]:
    """One expert alone: accuracy, p50 (no gate) and its paired CI against the floor."""
    m = evaluate(table, np.full(len(table), to_mamba))
    correct = table.mamba.correct if to_mamba else table.transformer.correct
    return {"accuracy": m.accuracy, "p50_ms": m.p50_ms, "diff_vs_floor_ci95": _ci(correct, floor_correct)}


def random_same_mix(table: ExpertResults, share: float) -> np.ndarray:
    """(N,) expected correctness of random routing with share `share` to E_M: s c_M + (1 - s) c_T."""
    c = table.stacked("correct").astype(np.float64)                                 # (N, 2)
    return share * c[:, 1] + (1.0 - share) * c[:, 0]


def _deployed(table: ExpertResults, decisions: np.ndarray, gate_ms: float, et: dict[str, Any],
              costs: np.ndarray | None = None) -> dict[str, Any]:
    m = evaluate(table, decisions, costs, gate_ms)
    correct = routed(table.stacked("correct").astype(np.float64), decisions)        # (N,) g_i
    random = random_same_mix(table, m.share_mamba)
    return {"accuracy": m.accuracy, "p50_ms": m.p50_ms, "share_to_mamba": m.share_mamba,
            "speedup_vs_et": et["p50_ms"] / m.p50_ms, "diff_vs_random_same_mix_ci95": _ci(correct, random),
            "random_same_mix_accuracy": float(random.mean()),
            "diff_vs_et_ci95": _ci(correct, table.transformer.correct)}


def _fastest_at_least(front: list[dict], accuracy: float, reference_ms: float, key: str) -> dict[str, Any] | None:
    """The fastest front point with accuracy >= `accuracy`, with its speedup reference_ms / p50, or None."""
    near = [p for p in front if p["accuracy"] >= accuracy - _EPS]
    if not near:
        return None
    best = min(near, key=lambda p: p["latency_ms"])
    return {"name": best["name"], "accuracy": best["accuracy"], "p50_ms": best["latency_ms"],
            key: reference_ms / best["latency_ms"]}


def _holds(et: dict, deployed: dict, fastest: dict | None, apgr: float | None) -> dict[str, bool]:
    low, high = THRESHOLDS["share_to_mamba"]
    return {
        "speedup_3x_within_1pt_of_et_above_floor": bool(
            fastest is not None and fastest["speedup_vs_et"] >= THRESHOLDS["speedup_vs_et"]
            and et["diff_vs_floor_ci95"][0] > 0),
        "deployed_mixes": bool(low <= deployed["share_to_mamba"] <= high),
        "deployed_beats_random_same_mix": bool(deployed["diff_vs_random_same_mix_ci95"][0] > 0),
        "apgr_at_least_0.5": bool(apgr is not None and apgr >= THRESHOLDS["apgr"]),
    }


def routing_targets(test: ExpertResults, gold: Sequence[str] | Floor, deployed: np.ndarray, gate_ms: float,
                    report: dict, costs: np.ndarray | None = None) -> dict[str, Any]:
    """The targets object of the module docstring for the deployed decisions ((N,) bool, True = E_M) on
    `test`, its gold answers (the floor is their best constant answer) or the `Floor` itself, the gate's
    cost per query and the Pareto report (`pareto_run`, with "big"); `costs`: the deployed router's (N, 2)
    latencies when not the experts' own (module docstring)."""
    if isinstance(gold, Floor):
        if len(gold.correct) != len(test):
            raise MedmoeError(f"routing targets: the floor scores {len(gold.correct)} examples, the test table has {len(test)}")
        answer, floor_correct = gold.answer, np.asarray(gold.correct, dtype=np.float64)
        floor = float(floor_correct.mean())
    else:
        if len(gold) != len(test):
            raise MedmoeError(f"routing targets: {len(gold)} gold answers for {len(test)} test examples")
        answer, floor = best_constant(gold)
        floor_correct = np.array([g == answer for g in gold], dtype=np.float64)
    et, em = _expert(test, False, floor_correct), _expert(test, True, floor_correct)
    chosen = _deployed(test, np.asarray(deployed, dtype=bool), gate_ms, et, costs)
    front = [p for p in report["gate_points"] if p["pareto"]]
    fastest = _fastest_at_least(front, et["accuracy"] - THRESHOLDS["within_of_et"], et["p50_ms"], "speedup_vs_et")
    big = report.get("big")
    vs_big = _fastest_at_least(front, big["accuracy"], big["latency_ms"], "speedup_vs_big") if big else None
    return {"floor_accuracy": floor, "floor_answer": answer, "et": et, "em": em, "deployed": chosen,
            "apgr": report.get("apgr"), "fastest_within_1pt": fastest, "best_speedup_vs_big": vs_big,
            "holds": _holds(et, chosen, fastest, report.get("apgr")), "thresholds": THRESHOLDS}

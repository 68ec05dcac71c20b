"""Calibration meets a latency budget on synthetic latencies, and is the most accurate that does."""

import numpy as np
import pytest

from medmoe.errors import MedmoeError
from medmoe.mambaformer.calibrate import calibrate_tau, candidate_thresholds
from medmoe.mambaformer.metrics import evaluate
from router_helpers import length_table


def gate_like_scores(table, seed=0):
    """Noisy scores that rise with length (a plausible gate)."""
    rng = np.random.default_rng(seed)
    z = (table.n_tokens - 500) / 200 + rng.normal(0, 1.0, len(table))
    return 1 / (1 + np.exp(-z))


@pytest.mark.parametrize("statistic", ["p50", "mean", "p95"])
def test_calibration_meets_the_budget_and_is_best_within_it(statistic):
    table = length_table(400, seed=1)
    dev = table.take(range(200))
    scores = gate_like_scores(table)
    dev_scores = scores[:200]
    all_t = evaluate(dev, np.zeros(200, bool))
    field = {"p50": "p50_ms", "mean": "mean_ms", "p95": "p95_ms"}[statistic]
    for fraction in (0.5, 0.7, 0.9):
        budget = fraction * getattr(all_t, field)
        cal = calibrate_tau(dev_scores, dev, budget, statistic, gate_ms=0.5)
        routed_dev = evaluate(dev, dev_scores > cal.tau, gate_ms=0.5)
        assert getattr(routed_dev, field) <= budget
        assert routed_dev == cal.metrics
        # Brute force over a fine grid of thresholds: nothing feasible is more accurate.
        for tau in np.linspace(0, 1, 501):
            m = evaluate(dev, dev_scores > tau, gate_ms=0.5)
            if getattr(m, field) <= budget:
                assert m.accuracy <= cal.metrics.accuracy + 1e-12
    # A looser budget never gives lower dev accuracy.
    accs = [calibrate_tau(dev_scores, dev, f * getattr(all_t, field), statistic).metrics.accuracy
            for f in (0.4, 0.6, 0.8, 1.0)]
    assert accs == sorted(accs)


def test_infeasible_budget_names_the_fastest_routing():
    table = length_table(100)
    with pytest.raises(MedmoeError, match="fastest routing"):
        calibrate_tau(gate_like_scores(table), table, budget_ms=1.0)
    with pytest.raises(MedmoeError, match="statistic"):
        calibrate_tau(gate_like_scores(table), table, budget_ms=100.0, statistic="p99")


def test_candidates_cover_every_routing():
    scores = np.array([0.3, 0.1, 0.3, 0.8])
    taus = candidate_thresholds(scores)
    routings = {tuple(scores > t) for t in taus}
    assert routings == {tuple(scores > t) for t in np.linspace(-0.01, 1.0, 1000)}


@pytest.mark.parametrize("tolerance", [0.0, 0.01, 0.05])
def test_without_a_budget_the_fastest_routing_within_tolerance_of_the_transformer(tolerance):
    """The pipeline's rule, now the one calibration's: fastest dev routing whose accuracy is within
    `tolerance` of E_T alone, its tau a midpoint (the same dev routing with a margin)."""
    dev = length_table(200, seed=2)
    scores = gate_like_scores(dev, seed=3)
    cal = calibrate_tau(scores, dev, gate_ms=0.5, tolerance=tolerance)
    assert cal.rule == "tolerance" and cal.budget_ms is None and cal.tolerance == tolerance
    target = dev.transformer.correct.mean() - tolerance
    assert cal.metrics == evaluate(dev, scores > cal.tau, gate_ms=0.5) and cal.metrics.accuracy >= target - 1e-12
    for tau in np.linspace(0, 1, 501):
        m = evaluate(dev, scores > tau, gate_ms=0.5)
        if m.accuracy >= target - 1e-12:
            assert m.p50_ms >= cal.metrics.p50_ms
    assert cal.tau not in set(scores.tolist())  # a midpoint, not a score


def test_the_gate_cost_counts_against_the_budget():
    """A budget met by a routing's expert latencies alone is not met once the gate's own cost is added:
    the calibration that counts it picks another routing, and records the cost it counted."""
    dev = length_table(200, seed=4)
    scores = gate_like_scores(dev, seed=5)
    budget = 0.7 * evaluate(dev, np.zeros(200, bool)).p50_ms
    free = calibrate_tau(scores, dev, budget)
    gate_ms = budget - free.metrics.p50_ms + 1.0  # pushes that routing just over the budget
    counted = calibrate_tau(scores, dev, budget, gate_ms=gate_ms)
    assert free.metrics.p50_ms <= budget < free.metrics.p50_ms + gate_ms
    assert counted.metrics.p50_ms <= budget and counted.tau != free.tau
    assert counted.gate_ms == gate_ms and counted.to_dict()["gate_ms"] == gate_ms
    with pytest.raises(MedmoeError, match="gate's cost"):
        calibrate_tau(scores, dev, budget, gate_ms=-1.0)

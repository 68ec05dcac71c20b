"""The cascade router (`mambaformer.experiments.cascade`) on synthetic tables where the answer is known:
E_M is confident and right on some queries, unsure and mostly wrong on the others."""

from __future__ import annotations

import numpy as np
import pytest

from medmoe.errors import MedmoeError
from medmoe.mambaformer.calibrate import calibrate_tau
from medmoe.mambaformer.experiments.cascade import (
    EscalationModel,
    cascade_costs,
    cascade_report,
    choose_router,
    escalation_features,
    feature_names,
    features_of,
    fit_cascade,
    gain,
    router_cost_ms,
)
from medmoe.mambaformer.experiments.targets import random_same_mix, routing_targets
from medmoe.mambaformer.metrics import RoutingMetrics, evaluate
from medmoe.mambaformer.results import ExpertOutcome, ExpertResults

T_M, T_T = 100.0, 1000.0


def make_table(n: int, seed: int, confident_share: float = 0.5) -> tuple[ExpertResults, list[str]]:
    """(table, gold letters) of 3-option questions, gold drawn at random. E_M: confident and right on `confident_share` of them
    (p = 0.9 on gold), unsure (p about 0.4 / 0.35 / 0.25) and 80% wrong on the rest. E_T right 75%,
    independently."""
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, 3, n)
    confident = rng.random(n) < confident_share
    probs, et_probs = np.empty((n, 3)), np.empty((n, 3))
    et_right = rng.random(n) < 0.75
    for i in range(n):
        if confident[i]:
            p = np.array([0.9, 0.06, 0.04])  # slot 0 = the gold option, rolled into place below
        else:
            top = 0 if rng.random() < 0.2 else int(rng.integers(1, 3))
            p = np.full(3, 0.25)
            p[top], p[(top + 1) % 3] = 0.4, 0.35
            p = p + rng.uniform(-0.01, 0.01, 3)
        probs[i] = np.roll(p / p.sum(), gold[i])
        et_probs[i] = np.roll([0.7, 0.2, 0.1] if et_right[i] else [0.2, 0.7, 0.1], gold[i])
    experts = {}
    for name, p, ms in (("transformer", et_probs, T_T), ("mamba", probs, T_M)):
        pred = p.argmax(1)
        experts[name] = ExpertOutcome(-np.log(p[np.arange(n), gold]), pred == gold, ["ABC"[k] for k in pred],
                                      np.full(n, ms) * rng.uniform(0.9, 1.1, n), p)
    return ExpertResults([f"q{seed}-{i}" for i in range(n)], rng.integers(20, 400, n), experts), ["ABC"[k] for k in gold]


@pytest.fixture(scope="module")
def splits() -> dict[str, ExpertResults]:
    return {"train": make_table(400, 0)[0], "dev": make_table(300, 1)[0], "test": make_table(500, 2)[0]}


def test_features_are_the_confidence_of_e_m_and_the_query_length():
    x = features_of(np.array([[0.7, 0.2, 0.1, 0.0]]), np.array([100]))
    names = feature_names(4)
    assert x.shape == (1, len(names)) and names[:3] == ["max_prob", "margin", "entropy"]
    entropy = -(0.7 * np.log(0.7) + 0.2 * np.log(0.2) + 0.1 * np.log(0.1)) / np.log(3)  # 3 options present
    np.testing.assert_allclose(x[0], [0.7, 0.5, entropy, 0.7, 0.2, 0.1, 0.0, np.log(100), 0.1])


def test_latency_accounting_kept_pays_t_m_escalated_pays_both(splits):
    t = splits["test"]
    costs = cascade_costs(t)
    np.testing.assert_allclose(costs[:, 1], t.mamba.latency_ms)
    np.testing.assert_allclose(costs[:, 0], t.mamba.latency_ms + t.transformer.latency_ms)
    keep = np.arange(len(t)) % 3 != 0  # a third escalated
    m = evaluate(t, keep, costs, gate_ms=0.05)
    latency = np.where(keep, t.mamba.latency_ms, t.mamba.latency_ms + t.transformer.latency_ms) + 0.05
    assert m.p50_ms == pytest.approx(np.percentile(latency, 50)) and m.mean_ms == pytest.approx(latency.mean())
    assert m.share_mamba == pytest.approx(keep.mean())
    np.testing.assert_array_equal(gain(t), t.transformer.correct.astype(float) - t.mamba.correct.astype(float))


def test_the_escalation_model_learns_that_unsure_answers_gain_from_e_t(splits):
    train = splits["train"]
    model = EscalationModel.fit(escalation_features(train), gain(train))
    g = model.expected_gain(escalation_features(train))
    confident = train.mamba.label_probs.max(1) > 0.8
    assert g[~confident].mean() > 0.3 > g[confident].mean()  # about +0.59 and -0.25 in truth
    assert np.all((model.keep_score(escalation_features(train)) > 0) & (model.keep_score(escalation_features(train)) < 1))
    with pytest.raises(MedmoeError, match="same queries"):
        EscalationModel.fit(escalation_features(train), gain(train)[:-1])


def test_the_cascade_beats_random_escalation_at_its_mix(splits):
    cascade = fit_cascade(splits["train"], splits["dev"], router_ms=0.03)
    test = splits["test"]
    keep = cascade.decisions(test)
    confident = test.mamba.label_probs.max(1) > 0.8
    assert keep[confident].all() and 0.5 < keep.mean() < 0.95  # the confident half, then as many as E_T's accuracy allows
    report = cascade_report(test, cascade)
    gold = make_table(500, 2)[1]  # the test table's gold letters (same seed)
    t = routing_targets(test, gold, keep, cascade.router_ms, report, costs=cascade_costs(test))
    d = t["deployed"]
    assert d["random_same_mix_accuracy"] == pytest.approx(random_same_mix(test, keep.mean()).mean())
    assert d["diff_vs_random_same_mix_ci95"][0] > 0 and t["holds"]["deployed_beats_random_same_mix"]
    assert t["holds"]["deployed_mixes"]
    # the deployed latency is the cascade's (t_M always, t_T when escalated), not the chosen expert's alone
    cost = np.where(keep, test.mamba.latency_ms, test.mamba.latency_ms + test.transformer.latency_ms) + cascade.router_ms
    assert d["p50_ms"] == pytest.approx(np.percentile(cost, 50))
    assert t["et"]["p50_ms"] == pytest.approx(np.percentile(test.transformer.latency_ms, 50))  # E_T alone: its own
    assert report["apgr"] is not None and report["apgr"] > 0.5
    assert d["accuracy"] > d["random_same_mix_accuracy"] + 0.05


def test_tau_is_chosen_on_dev_alone(splits):
    cascade = fit_cascade(splits["train"], splits["dev"], router_ms=0.03)
    dev = splits["dev"]
    again = calibrate_tau(cascade.model.keep_score(escalation_features(dev)), dev, costs=cascade_costs(dev), gate_ms=0.03)
    assert cascade.tau == again.tau
    assert cascade.calibration.metrics == evaluate(dev, cascade.decisions(dev), cascade_costs(dev), 0.03)
    assert cascade.metrics(dev) == cascade.calibration.metrics
    # the tolerance rule on dev: within 1 point of E_T's dev accuracy, the fastest such routing
    assert cascade.calibration.metrics.accuracy >= dev.transformer.correct.mean() - 0.01 - 1e-12
    # another dev set moves tau; the test table never enters (fit_cascade does not take one)
    other = fit_cascade(splits["train"], make_table(300, 7, confident_share=0.2)[0], router_ms=0.03)
    assert other.tau != cascade.tau


def test_the_router_costs_microseconds(splits):
    model = EscalationModel.fit(escalation_features(splits["train"]), gain(splits["train"]))
    ms = router_cost_ms(model, splits["dev"].take(np.arange(50)), passes=2)
    assert 0 < ms < 5.0
    cascade = fit_cascade(splits["train"], splits["dev"])  # measured when not given
    assert 0 < cascade.router_ms < 5.0


def metrics(accuracy: float, p50: float) -> RoutingMetrics:
    return RoutingMetrics(n=100, accuracy=accuracy, p50_ms=p50, p95_ms=p50, mean_ms=p50, share_mamba=0.5, mean_loss=1.0)


def test_choose_router_is_the_calibration_rule_on_dev_metrics():
    dev = {"token_gate": metrics(0.62, 3000.0), "cascade": metrics(0.625, 2500.0), "fast": metrics(0.55, 300.0)}
    assert choose_router(dev, 0.63) == "cascade"          # the fastest within 1 point of E_T's 0.63
    assert choose_router(dev, 0.70) == "cascade"          # none within: the most accurate
    assert choose_router({0.0: metrics(0.62, 900.0), 0.5: metrics(0.62, 900.0)}, 0.62) == 0.0  # ties: listed first
    with pytest.raises(MedmoeError, match="no routers"):
        choose_router({}, 0.5)

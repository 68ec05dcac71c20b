"""Training the gate on cached expert results: it learns a planted rule; dual ascent; table I/O."""

import numpy as np
import pytest
import torch

from medmoe.errors import DataError, MedmoeError
from medmoe.mambaformer.features import GateFeatures
from medmoe.mambaformer.latency import LatencyModel
from medmoe.mambaformer.loss import LossConfig
from medmoe.mambaformer.metrics import evaluate
from medmoe.mambaformer.results import ExpertResults
from medmoe.mambaformer.train import TrainConfig, expert_costs, gate_scores, train_gate
from router_helpers import length_table


def train_for_betas(betas, features, table, costs, loss_config, eval_features, train_config=None):
    """The beta half of the Pareto sweep: one gate per beta, p_M on `eval_features` per beta (what
    `medmoe router pareto` gets from one checkpoint per beta)."""
    scores = {}
    for beta in betas:
        config = LossConfig.from_dict({**loss_config.to_dict(), "beta": float(beta)})
        gate, _ = train_gate(features, table, costs, config, train_config)
        scores[float(beta)] = gate_scores(gate, eval_features)
    return scores


def planted(n=128, seed=0):
    """E_M has the lower loss exactly on queries whose mean 'domain' feature is high."""
    g = torch.Generator().manual_seed(seed)
    T = 16
    token = torch.rand(n, T, 4, generator=g)
    domain_rate = torch.rand(n, generator=g)
    token[..., 3] = (torch.rand(n, T, generator=g) < domain_rate[:, None]).float()
    mask = torch.ones(n, T, dtype=torch.bool)
    feats = GateFeatures(token, mask, torch.full((n, 2), 0.5), torch.full((n,), T))
    table = length_table(n, seed)
    better_m = (token[..., 3].mean(1) > 0.5).numpy()
    table.transformer.loss = np.where(better_m, 1.5, 0.2)
    table.mamba.loss = np.where(better_m, 0.2, 1.5)
    return feats, table, better_m


@pytest.mark.parametrize("mode", ["soft", "st"])
def test_gate_learns_a_planted_routing_rule(mode):
    feats, table, better_m = planted()
    costs = np.full((len(table), 2), 10.0)
    config = LossConfig(cost=0.0, util=0.5, reg=1e-5, c_ref=10.0)
    gate, history = train_gate(feats, table, costs, config, TrainConfig(epochs=25, lr=2e-2, batch_size=32, mode=mode))
    agreement = ((gate_scores(gate, feats) > 0.5) == better_m).mean()
    assert agreement > 0.9
    assert history[-1]["task"] < history[0]["task"]


def test_cost_term_and_dual_ascent_move_traffic_to_the_cheaper_expert():
    feats, table, _ = planted()
    costs = np.stack([np.full(len(table), 100.0), np.full(len(table), 10.0)], 1)   # E_M 10x cheaper
    base = LossConfig(cost=0.0, util=0.0, reg=0.0, c_ref=100.0)
    _, free = train_gate(feats, table, costs, base, TrainConfig(epochs=15, lr=2e-2, mode="soft"))
    _, dual = train_gate(feats, table, costs, base, TrainConfig(epochs=15, lr=2e-2, mode="soft",
                                                                latency_budget_ms=20.0, dual_eta=2.0))
    assert dual[-1]["lambda_cost"] > 0
    assert dual[-1]["expected_cost_ms"] < free[-1]["expected_cost_ms"]
    assert dual[-1]["share_mamba"] > free[-1]["share_mamba"]


def test_beta_sweep_hook_and_latency_costs():
    feats, table, _ = planted(n=64)
    models = {"transformer": LatencyModel(0, 1.0, 0), "mamba": LatencyModel(0, 0.5, 0)}
    costs = expert_costs(table, models)
    np.testing.assert_allclose(costs, np.stack([table.n_tokens, table.n_tokens * 0.5], 1))
    scores = train_for_betas([0.0, 5.0], feats, table, costs, LossConfig(c_ref=float(costs[:, 0].mean())), feats,
                             TrainConfig(epochs=3))
    assert set(scores) == {0.0, 5.0} and all(s.shape == (64,) for s in scores.values())
    with pytest.raises(MedmoeError):
        expert_costs(table, {"transformer": models["transformer"]})


def test_results_table_round_trip_and_errors(tmp_path):
    table = length_table(20)
    path = tmp_path / "results.jsonl"
    table.save_jsonl(path)
    again = ExpertResults.load_jsonl(path)
    assert again.ids == table.ids
    np.testing.assert_allclose(again.stacked("loss"), table.stacked("loss"))
    np.testing.assert_allclose(again.mamba.label_probs, table.mamba.label_probs)
    d = np.arange(20) % 2 == 0
    assert evaluate(again, d) == evaluate(table, d)
    assert again.select(["x3", "x1"]).ids == ["x3", "x1"]
    path.write_text('{"id": "a", "n_tokens": 3}\n')
    with pytest.raises(DataError, match="transformer"):
        ExpertResults.load_jsonl(path)
    with pytest.raises(MedmoeError, match="unique"):
        ExpertResults(["a", "a"], np.array([1, 2]), {e: table.take([0, 1]).experts[e] for e in table.experts})

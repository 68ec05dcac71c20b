"""The gate: hard decisions equal 1[p_M > tau], straight-through gradients flow, size, explanations,
and the checkpoint round trip."""

import json

import pytest
import torch

from medmoe.errors import MedmoeError
from medmoe.mambaformer.checkpoint import RouterCheckpoint
from medmoe.mambaformer.features import FeatureConfig, GateFeatures, GateFeaturizer, VocabInfo
from medmoe.mambaformer.gate import GateConfig, TokenGate, parameter_count, torch_threads
from medmoe.mambaformer.latency import LatencyModel


def random_features(B=16, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    token = torch.rand(B, T, 4, generator=g) * mask[..., None]
    global_ = torch.stack([lengths / T, lengths.float().log()], -1)
    return GateFeatures(token, mask, global_, lengths)


def test_hard_decision_is_p_greater_than_tau():
    gate = TokenGate()
    out = gate(random_features())
    for tau in (0.1, 0.5, float(out.p_mamba.detach().median()), 0.9):
        hard = gate.decide(out, "hard", tau=tau)
        assert torch.equal(hard.bool(), out.p_mamba > tau)
    assert torch.equal(gate.decide(out, "soft"), out.p_mamba)
    with pytest.raises(MedmoeError, match="RouterCheckpoint.tau"):  # the gate keeps no threshold of its own
        gate.decide(out, "hard")


def test_straight_through_is_hard_forward_with_gradients():
    gate = TokenGate()
    out = gate(random_features())
    d = gate.decide(out, "st", generator=torch.Generator().manual_seed(0))
    assert set(d.detach().unique().tolist()) <= {0.0, 1.0}
    (d * torch.linspace(-1, 1, d.shape[0])).sum().backward()
    grads = [p.grad for p in gate.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    # A very low temperature makes the sample follow the logit's sign for large |logit|.
    sure = type(out)(out.token_scores, torch.tensor([-50.0, 50.0]), torch.sigmoid(torch.tensor([-50.0, 50.0])))
    assert gate.decide(sure, "st", temperature=0.1).tolist() == [0.0, 1.0]
    with pytest.raises(MedmoeError):
        gate.decide(out, "sometimes")


def test_padding_does_not_change_the_decision():
    gate = TokenGate()
    feats = random_features(B=1, T=5)
    padded = GateFeatures(torch.cat([feats.token, torch.randn(1, 7, 4)], 1),
                          torch.cat([feats.mask, torch.zeros(1, 7, dtype=torch.bool)], 1), feats.global_, feats.n_tokens)
    torch.testing.assert_close(gate(feats).p_mamba, gate(padded).p_mamba)
    assert (gate(padded).token_scores[0, 5:] == 0).all()


def test_parameter_budget_and_explanations():
    gate = TokenGate()
    assert parameter_count(gate) <= 50_000
    assert parameter_count(TokenGate(GateConfig(phi_dim=128, hidden=128))) <= 50_000
    feats = random_features(B=3)
    reports = gate.explain(feats, tau=0.5, top_tokens=2)
    assert len(reports) == 3
    for b, r in enumerate(reports):
        assert r["expert"] == ("mamba" if r["p_mamba"] > 0.5 else "transformer")
        assert len(r["token_scores"]) == int(feats.mask[b].sum())
        names = [name for name, _ in r["top_features"]]
        assert sorted(names) == sorted(["complexity", "rarity", "fragmentation", "domain", "length", "log_length"])
        values = [abs(v) for _, v in r["top_features"]]
        assert values == sorted(values, reverse=True)


def test_checkpoint_round_trip(tmp_path):
    V = 30
    vocab = VocabInfo.from_tokens([f"Ġw{i}" for i in range(V)])
    featurizer = GateFeaturizer.build(torch.randn(V, 6), vocab, [[1, 2, 3, 3]], FeatureConfig(embed_dim=4))
    gate = TokenGate()
    with torch.no_grad():
        for p in gate.parameters():
            p.add_(torch.randn_like(p))
    models = {"transformer": LatencyModel(1e-3, 0.5, 3.0, "transformer"), "mamba": LatencyModel(0.0, 0.2, 9.0, "mamba")}
    ckpt = RouterCheckpoint(gate, featurizer, 0.37, models, "lexicon.json", {"loss_config": {"beta": 2.0}},
                            experts={"transformer": "smollm2-135m", "mamba": "runs/mamba"}, gate_ms=1.25)
    ckpt.save(tmp_path / "router")
    again = RouterCheckpoint.load(tmp_path / "router")
    assert again.experts == {"transformer": "smollm2-135m", "mamba": "runs/mamba"} and again.gate_ms == 1.25
    ids = torch.randint(0, V, (4, 9))
    p1, d1 = ckpt.route(ids)
    p2, d2 = again.route(ids)
    torch.testing.assert_close(p1, p2)
    assert torch.equal(d2, p2 > 0.37)
    assert "tau" not in json.loads((tmp_path / "router" / "router.json").read_text())["gate_config"]  # tau once
    assert again.tau == 0.37 and again.latency_models["mamba"].b == 0.2 and again.info["loss_config"]["beta"] == 2.0
    assert not list((tmp_path / "router").glob("*.tmp"))
    reports = again.explain(ids)
    assert [r["expert"] == "mamba" for r in reports] == d2.tolist()


def test_torch_threads_restores_the_setting():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError):
        with torch_threads(1):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before

"""Distillation of a tiny Llama teacher into a Mamba hybrid: the loss, learning, and exact resume."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from medmoe.mamba.distill import DistillConfig, distill, kl_loss, latest_checkpoint, perplexity
from medmoe.mamba.transfer import build_hybrid, load_hybrid


@pytest.fixture()
def setup():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    teacher = LlamaForCausalLM(cfg).eval()
    blocks = torch.randint(0, 50, (12, 16), generator=torch.Generator().manual_seed(1))
    return teacher, blocks


def test_kl_loss_matches_definition():
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    p, log_q = t.softmax(-1), s.log_softmax(-1)
    expected = (p * (p.log() - log_q)).sum(-1).mean()
    torch.testing.assert_close(kl_loss(s, t), expected)
    assert kl_loss(t, t).abs() < 1e-6


def test_distillation_reduces_kl(setup, tmp_path):
    teacher, blocks = setup
    student, spec = build_hybrid(teacher, layers=[0, 2])
    cfg = DistillConfig(batch_size=12, lr=3e-3, max_steps=15, save_every=100)
    result = distill(teacher, student, spec, blocks, tmp_path, cfg)
    kls = [h["kl"] for h in result["history"]]
    assert kls[-1] < 0.7 * kls[0]
    assert perplexity(result["student"], blocks) > 1.0


def test_interrupted_run_resumes_exactly(setup, tmp_path):
    teacher, blocks = setup
    cfg = DistillConfig(batch_size=4, lr=1e-3, max_steps=6, save_every=2)
    torch.manual_seed(0)
    student, spec = build_hybrid(teacher)
    straight = distill(teacher, student, spec, blocks, tmp_path / "straight", cfg)

    torch.manual_seed(0)
    student, spec = build_hybrid(teacher)
    first = distill(teacher, student, spec, blocks, tmp_path / "resumed", DistillConfig(**{**vars(cfg), "max_steps": 3}))
    assert first["step"] == 3
    assert json.loads((tmp_path / "resumed" / "latest.json").read_text())["step"] == 3
    fresh, _ = build_hybrid(teacher)  # a new process would start from scratch; resume must ignore it
    resumed = distill(teacher, fresh, spec, blocks, tmp_path / "resumed", cfg)
    assert resumed["step"] == 6
    assert [h["kl"] for h in resumed["history"]] == [h["kl"] for h in straight["history"]]
    a, _, _ = load_hybrid(latest_checkpoint(tmp_path / "straight"))
    b, _, _ = load_hybrid(latest_checkpoint(tmp_path / "resumed"))
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, msg=name)
    assert len(list((tmp_path / "resumed").glob("ckpt-*"))) == 1  # older checkpoints are removed

"""Transfer of a Llama-family Transformer into a Mamba hybrid (medmoe.mamba.transfer)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from medmoe.errors import ModelError
from medmoe.mamba.transfer import AttentionMamba, build_hybrid, evenly_spaced, load_hybrid, save_hybrid


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def test_mixer_is_linear_attention_when_decay_is_off(teacher):
    """With A = 0 and delta = 1 the mixer must equal causal linear attention of the teacher's q, k, v, o."""
    attn = teacher.model.layers[1].self_attn
    mixer = AttentionMamba.from_attention(attn, teacher.config)
    with torch.no_grad():
        mixer.A_log.fill_(-30.0)                              # A = -exp(-30) ~ 0: no decay
        mixer.dt_proj.weight.zero_()
        mixer.dt_proj.bias.fill_(20.0)                        # softplus(20) = 20 (to 1e-9)
    u = torch.randn(2, 9, 32)
    q = attn.q_proj(u).view(2, 9, 4, 8)
    k = attn.k_proj(u).view(2, 9, 2, 8).repeat_interleave(2, dim=2)
    v = attn.v_proj(u).view(2, 9, 2, 8).repeat_interleave(2, dim=2)
    scores = torch.einsum("bthp,bshp->bhts", q, k) / 8 ** 0.5 * torch.ones(9, 9).tril()
    expected = attn.o_proj(20.0 * torch.einsum("bhts,bshp->bthp", scores, v).reshape(2, 9, 32))
    with torch.no_grad():
        got, none = mixer(u)
    assert none is None
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_hybrid_copies_everything_but_attention(teacher):
    student, spec = build_hybrid(teacher, layers=[0, 2, 3], attention_layers=[2])
    kinds = [type(layer.self_attn).__name__ for layer in student.model.layers]
    assert kinds == ["AttentionMamba", "LlamaAttention", "AttentionMamba"]
    assert student.config.num_hidden_layers == 3
    for new, old in zip(student.model.layers, spec.layers):
        t = teacher.model.layers[old]
        assert torch.equal(new.mlp.down_proj.weight, t.mlp.down_proj.weight)
        assert torch.equal(new.input_layernorm.weight, t.input_layernorm.weight)
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert type(teacher.model.layers[0].self_attn).__name__ == "LlamaAttention"  # teacher untouched
    ids = torch.randint(0, 64, (2, 11))
    logits = student(ids).logits
    assert logits.shape == (2, 11, 64) and torch.isfinite(logits).all()


def test_save_and_load_roundtrip(teacher, tmp_path):
    student, spec = build_hybrid(teacher, layers=[1, 3], attention_layers=[3])
    save_hybrid(student, spec, tmp_path)
    again, _, spec2 = load_hybrid(tmp_path)
    assert spec2 == spec
    ids = torch.randint(0, 64, (1, 13))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, student(ids).logits)


def test_bad_layer_choices_are_clear_errors(teacher):
    with pytest.raises(ModelError, match="out of range"):
        build_hybrid(teacher, layers=[0, 9])
    with pytest.raises(ModelError, match="not among the kept layers"):
        build_hybrid(teacher, layers=[0, 1], attention_layers=[3])


def test_evenly_spaced():
    assert evenly_spaced(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert evenly_spaced(30, 30) == list(range(30))

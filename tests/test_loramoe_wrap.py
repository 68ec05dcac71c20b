"""Wrapping stock transformers models (one tiny random model per architecture) in place."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loramoe_tiny_models import model_inputs, tiny_model
from medmoe.errors import ModelError
from medmoe.loramoe import LoraMoeConfig, LoraMoeLinear, LoraMoeModel

ARCHS = ["llama", "gemma3", "qwen2", "qwen3", "t5", "bert"]
EXPECTED_LEAVES = {
    "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "gemma3": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "qwen2": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "qwen3": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "t5": {"q", "k", "v", "o", "wi", "wo"},
    "bert": {"query", "key", "value", "dense"},
}


def _outputs(model, inputs):
    out = model(**inputs)
    return out.logits


@pytest.mark.parametrize("arch", ARCHS)
def test_fresh_adapter_leaves_outputs_unchanged_and_trains(arch):
    model, kind = tiny_model(arch)
    model.eval()
    inputs = model_inputs(kind)
    with torch.no_grad():
        reference = _outputs(model, inputs).clone()
    n_linear_before = sum(isinstance(m, nn.Linear) for m in model.modules())

    wrapped = LoraMoeModel(model, LoraMoeConfig(num_experts=4, top_k=2, rank=4, router_dim=8, queue_size=32))
    layers = wrapped.moe_layers()
    assert {name.rsplit(".", 1)[-1] for name in layers} == EXPECTED_LEAVES[arch]
    # output heads stay plain linears (lm_head; BERT's pooler and classifier); every other linear is wrapped
    n_heads = 2 if arch == "bert" else 1
    assert sum(isinstance(m, LoraMoeLinear) for m in model.modules()) == len(layers) == n_linear_before - n_heads
    wrapped.eval()
    with torch.no_grad():
        assert torch.equal(_outputs(wrapped, inputs), reference)  # B = 0: exactly the base model

    wrapped.train()
    out = wrapped(**inputs)
    assert set(wrapped.last_aux_losses) == {"balance", "z", "contrastive"}
    out.loss.backward()
    for name, layer in layers.items():
        assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0, name
        assert layer.router.w_q.grad is not None, name
        assert layer.base_layer.weight.grad is None, name  # base stays frozen
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n) or (".router." in n) for n in trainable)

    with torch.no_grad():  # non-zero B changes the outputs
        for layer in layers.values():
            layer.lora_B.normal_(std=0.5)
    wrapped.eval()
    with torch.no_grad():
        assert not torch.allclose(_outputs(wrapped, inputs), reference)


def test_target_modules_list_and_unknown_name():
    model, _ = tiny_model("llama")
    wrapped = LoraMoeModel(model, LoraMoeConfig(target_modules=["q_proj", "mlp.down_proj"], router_dim=8))
    assert {n.rsplit(".", 1)[-1] for n in wrapped.moe_layers()} == {"q_proj", "down_proj"}
    with pytest.raises(ModelError, match="no nn.Linear"):
        LoraMoeModel(tiny_model("llama")[0], LoraMoeConfig(target_modules=["nonexistent"]))


def test_padding_tokens_are_excluded_from_routing_statistics():
    model, kind = tiny_model("llama")
    wrapped = LoraMoeModel(model, LoraMoeConfig(num_experts=4, top_k=2, rank=4, router_dim=8))
    inputs = model_inputs(kind, batch=2, length=12)  # 3 padding tokens
    wrapped.eval()
    with torch.no_grad(), wrapped.track_routing():
        wrapped(**inputs)
    loads = wrapped.expert_load()
    assert all(sum(v) == (24 - 3) * 2 for v in loads.values())  # real tokens x top_k

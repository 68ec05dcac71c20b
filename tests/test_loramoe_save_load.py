"""Adapter save/load reproduces logits exactly; generation with the KV cache works."""

from __future__ import annotations

import json

import pytest
import torch

from loramoe_tiny_models import model_inputs, tiny_model
from medmoe.errors import ModelError
from medmoe.loramoe import LoraMoeConfig, LoraMoeModel
from medmoe.loramoe.model import WEIGHTS_NAME, adapter_info


def _trained_adapter(arch: str, steps: int = 3):
    model, kind = tiny_model(arch)
    wrapped = LoraMoeModel(model, LoraMoeConfig(num_experts=4, top_k=2, rank=4, router_dim=8, queue_size=16))
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    wrapped.train()
    for step in range(steps):
        loss = wrapped(**model_inputs(kind, seed=step)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    wrapped.eval()
    return wrapped, kind


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_loading_onto_a_fresh_base_reproduces_logits_exactly(arch, tmp_path):
    wrapped, kind = _trained_adapter(arch)
    inputs = model_inputs(kind, seed=99)
    with torch.no_grad():
        expected = wrapped(**inputs).logits
    wrapped.save_adapter(tmp_path)
    assert (tmp_path / WEIGHTS_NAME).is_file() and (tmp_path / "adapter_config.json").is_file()
    assert adapter_info(tmp_path)["metadata"]["model_class"] == type(wrapped.model).__name__

    fresh, _ = tiny_model(arch)  # same seed: the same base weights
    with torch.no_grad():
        base_logits = fresh(**inputs).logits
    assert not torch.allclose(base_logits, expected)  # the adapter matters
    loaded = LoraMoeModel.from_pretrained(fresh, tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, expected)


def test_saved_config_is_json(tmp_path):
    wrapped, _ = _trained_adapter("llama", steps=0)
    wrapped.save_adapter(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["num_experts"] == 4 and data["r"] == 4


def test_loading_onto_another_architecture_fails_clearly(tmp_path):
    wrapped, _ = _trained_adapter("llama", steps=0)
    wrapped.save_adapter(tmp_path)
    with pytest.raises(ModelError, match="does not fit this model"):
        LoraMoeModel.from_pretrained(tiny_model("t5")[0], tmp_path)
    with pytest.raises(ModelError, match="no LoRA-MoE adapter config"):
        LoraMoeModel.from_pretrained(tiny_model("llama")[0], tmp_path / "missing")


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen3"])
def test_greedy_generation_with_kv_cache_equals_without(arch):
    wrapped, _ = _trained_adapter(arch)
    prompt = torch.randint(1, 100, (1, 6), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = wrapped.generate(input_ids=prompt, use_cache=True, **kw)
        uncached = wrapped.generate(input_ids=prompt, use_cache=False, **kw)
    assert cached.shape == (1, 14)
    assert torch.equal(cached, uncached)


def test_seq2seq_generation_with_kv_cache():
    wrapped, _ = _trained_adapter("t5")
    inputs = torch.randint(1, 100, (1, 7), generator=torch.Generator().manual_seed(4))
    kw = dict(max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        assert torch.equal(wrapped.generate(input_ids=inputs, use_cache=True, **kw),
                           wrapped.generate(input_ids=inputs, use_cache=False, **kw))


def test_save_pretrained_saves_the_adapter_only(tmp_path):
    wrapped, _ = _trained_adapter("llama", steps=0)
    wrapped.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]

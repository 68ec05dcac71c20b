"""Model zoo: local paths, hub-id shape, clear errors, atomic caching; real bundled models marked."""

from __future__ import annotations

import os

import pytest
import torch

from medmoe.errors import ModelError
from medmoe.models import info, load_causal_lm, resolve
from medmoe.paths import atomic_dir


def test_local_folder_loads_the_same_weights(tiny_lm, tiny_lm_dir):
    model, _ = tiny_lm
    loaded, tokenizer = load_causal_lm(str(tiny_lm_dir))
    ids = torch.tensor([[1, 5, 9, 3]])
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert tokenizer.pad_token is not None


def test_info_reads_a_local_folder_without_loading_weights(tiny_lm_dir):
    details = info(str(tiny_lm_dir))
    assert details.architecture == "LlamaForCausalLM"
    assert details.layers == 2 and details.hidden_size == 32
    assert details.parameters == sum(p.numel() for p in load_causal_lm(str(tiny_lm_dir))[0].parameters())


def test_unknown_name_is_explained():
    with pytest.raises(ModelError, match="neither a bundled model .* nor a Hugging Face hub id"):
        resolve("not-a-model")


def test_hub_ids_pass_through_unresolved():
    assert resolve("google/flan-t5-base") == "google/flan-t5-base"


def test_corrupt_checkpoint_names_the_folder(tiny_lm_dir):
    weights = tiny_lm_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelError, match=f"cannot load model from '{tiny_lm_dir}'"):
        load_causal_lm(str(tiny_lm_dir))


def test_atomic_dir_keeps_the_old_folder_when_writing_fails(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("crash while writing")
    assert (target / "weights").read_text() == "v1"
    assert os.listdir(tmp_path) == ["model"]  # no temporary folder left behind


@pytest.mark.real_model
def test_bundled_smollm2_loads_from_cache_and_matches_its_config():
    model, tokenizer = load_causal_lm("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.encode("yes") != tokenizer.encode(" yes")  # the tokenization pitfall in docs/models.md
    assert info("smollm2-135m").cached

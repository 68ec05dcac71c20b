"""Parity with transformers' MambaForCausalLM on one tiny random checkpoint saved to disk."""

import pytest
import torch
from transformers import MambaConfig as HFMambaConfig, MambaForCausalLM

from medmoe.errors import ModelError
from medmoe.mamba import cpu_kernel
from medmoe.mamba.hf import load_mamba, save_mamba


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = HFMambaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=3, state_size=8, expand=2,
                        conv_kernel=4, time_step_rank=4, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    ref = MambaForCausalLM(cfg).eval()
    with torch.no_grad():  # spread the parameters so that every term of the recurrence matters
        for layer in ref.backbone.layers:
            layer.mixer.A_log.add_(torch.randn_like(layer.mixer.A_log) * 0.5)
            layer.mixer.D.normal_()
            layer.norm.weight.normal_(1.0, 0.2)
    folder = tmp_path_factory.mktemp("tiny_mamba")
    ref.save_pretrained(folder)
    ours, _ = load_mamba(folder)
    return ref, ours, folder


def _ids(b=2, l=45, seed=1):
    return torch.randint(3, 97, (b, l), generator=torch.Generator().manual_seed(seed))


BACKENDS = ["chunked", "reference"] + (["cpu"] if cpu_kernel.available() else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_logits_match(checkpoint, backend):
    ref, ours, _ = checkpoint
    ours.set_scan_backend(backend)
    ids = _ids()
    with torch.no_grad():
        expected = ref(ids, use_cache=False).logits
        got = ours(ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_greedy_generation_matches_for_32_tokens(checkpoint):
    ref, ours, _ = checkpoint
    ours.set_scan_backend("auto")
    ids = _ids(b=1, l=12, seed=3)
    expected = ref.generate(ids, max_new_tokens=32, do_sample=False, min_new_tokens=32)[:, ids.shape[1]:]
    got = ours.generate(ids, max_new_tokens=32)
    assert got.shape == (1, 32)
    assert torch.equal(got, expected)


def test_step_logits_match_full_forward(checkpoint):
    _, ours, _ = checkpoint
    ids = _ids(b=2, l=20, seed=4)
    with torch.no_grad():
        full = ours(ids)
        cache = ours.new_cache(2)
        ours(ids[:, :8], cache)
        stepped = torch.stack([ours.step(ids[:, t], cache) for t in range(8, 20)], dim=1)
    torch.testing.assert_close(stepped, full[:, 8:], rtol=1e-4, atol=1e-4)


def test_gradients_match(checkpoint):
    ref, ours, _ = checkpoint
    ours.set_scan_backend("auto")
    ids = _ids(b=2, l=30, seed=5)
    ref.zero_grad()
    ours.zero_grad()
    torch.nn.functional.cross_entropy(ref(ids, use_cache=False).logits.flatten(0, 1), ids.flatten()).backward()
    torch.nn.functional.cross_entropy(ours(ids).flatten(0, 1), ids.flatten()).backward()
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        expected = ref_params[name.replace("backbone.embeddings", "backbone.embeddings")].grad
        rel = (p.grad - expected).norm() / expected.norm().clamp_min(1e-12)
        assert rel < 1e-4, f"{name}: relative gradient difference {rel:.2e}"


def test_save_roundtrip_loads_in_transformers(checkpoint, tmp_path):
    ref, ours, _ = checkpoint
    save_mamba(ours, tmp_path)
    again = MambaForCausalLM.from_pretrained(tmp_path).eval()
    ids = _ids(b=1, l=10)
    with torch.no_grad():
        torch.testing.assert_close(again(ids, use_cache=False).logits, ref(ids, use_cache=False).logits)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="config.json"):
        load_mamba(tmp_path)
    with pytest.raises(ModelError, match="no such folder"):
        load_mamba(tmp_path / "nope" / "deeper")

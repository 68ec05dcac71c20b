"""Scoring over cached lower-block states (medmoe.train.top_blocks.last_position_logits,
medmoe.train.top_blocks_scoring): the top-blocks path's last-position logits equal the full model's with no
adapter, PEFT LoRA and LoRA-MoE on the top blocks; `medmoe eval`'s letter rows come out the same (the
multi-answer CMExam questions included); the cache key does not depend on the adapters; adapters on the
lower blocks and prompts missing from the cache are refused. The models are test_top_blocks.py's."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers as tf

from medmoe.errors import MedmoeError
from medmoe.eval.benchmarks import load_benchmark
from medmoe.eval.model import HFEvalModel
from medmoe.eval.runner import run_benchmark
from medmoe.train.finetune import FinetuneConfig, prepare_model
from medmoe.train.top_blocks import ActivationCache, cache_key, last_position_logits, lower_activations
from medmoe.train.top_blocks_scoring import TopBlocksEvalModel, prompt_features
from test_top_blocks import MOE, N_TOP, adapted, build, padded_batch


def _with_adapter(arch: str, method: str | None):
    return (build(arch) if method is None else adapted(arch, method)).eval()


@pytest.mark.parametrize("method", [None, "lora", "loramoe"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_last_position_logits_equal_the_full_models(arch, method):
    """Right-padded rows of 7, 10 and 7 tokens: each row's logits after its last token, as the full model
    (base + the same adapter) gives them for that row alone."""
    model = _with_adapter(arch, method)
    batch = padded_batch()
    mask = batch["attention_mask"]
    with torch.no_grad():
        states = lower_activations(model, batch["input_ids"], mask, N_TOP)  # (B, T, D)
        got = last_position_logits(model, states, mask, N_TOP)  # (B, V)
        for row in range(len(mask)):
            ids = batch["input_ids"][row, : int(mask[row].sum())][None]  # (1, T_i): no padding at all
            want = model(input_ids=ids).logits[0, -1]
            torch.testing.assert_close(got[row], want, rtol=1e-5, atol=1e-5)


def test_adapters_on_the_lower_blocks_are_refused_and_change_the_cache_key():
    features = [{"input_ids": [5, 6, 7, 8], "labels": [-100] * 4}]
    keys = {name: cache_key(model, features, N_TOP, "model") for name, model in (
        ("base", build("llama")), ("lora", adapted("llama", "lora")), ("loramoe", adapted("llama", "loramoe")))}
    assert keys["base"] == keys["lora"] == keys["loramoe"]  # the lower blocks' fingerprint skips the top blocks
    everywhere = prepare_model(build("llama"), FinetuneConfig(method="lora", lora_rank=2))  # adapters on all 4 blocks
    assert cache_key(everywhere, features, N_TOP, "model")["weights_sha256"] != keys["base"]["weights_sha256"]
    with pytest.raises(MedmoeError, match=r"--top-blocks 2: the lower blocks hold adapter weights \(e.g. .*lora_"):
        last_position_logits(everywhere, torch.zeros(1, 4, 32), torch.ones(1, 4, dtype=torch.long), N_TOP)


def tiny_qwen(vocab: int, seed: int = 0):
    """A 4-block Qwen2 with a window long enough for CMExam prompts in the tiny byte-level tokenizer."""
    torch.manual_seed(seed)
    return tf.Qwen2ForCausalLM(tf.Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)).eval()


def cmexam_sample():
    """Six CMExam test questions, two of them multi-answer (gold 'BCDE', 'BCE')."""
    bench = load_benchmark("cmexam")
    multi = [r for r in bench.records if len(r.answer) > 1][:2]
    return dataclasses.replace(bench, records=bench.records[:4] + multi)


@pytest.mark.parametrize("method", [None, "loramoe", "lora"])
def test_rows_over_the_cache_are_medmoe_evals_rows(tmp_path, tiny_tokenizer, method):
    model = tiny_qwen(len(tiny_tokenizer))
    if method is not None:
        model = prepare_model(model, FinetuneConfig(method=method, top_blocks=N_TOP, loramoe=MOE, lora_rank=2)).eval()
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)
    bench = cmexam_sample()
    features = prompt_features(model, tiny_tokenizer, bench)
    assert len(features) == 6 and bench.multi
    built = ActivationCache.build_or_open(tmp_path / "cache", model, features, N_TOP, pad_id=tiny_tokenizer.pad_token_id,
                                          batch_size=3)
    assert built.computed == 6
    cache = ActivationCache.open(tmp_path / "cache", model, features, N_TOP)
    top = TopBlocksEvalModel(model, tiny_tokenizer, cache, features, N_TOP)
    want = run_benchmark(HFEvalModel(model, tiny_tokenizer), bench, tmp_path / "full.jsonl", rule="letter")
    got = run_benchmark(top, bench, tmp_path / "top.jsonl", rule="letter", batch_size=4)  # padded batches of the cache
    for a, b in zip(want, got, strict=True):
        assert (a["id"], a["prediction"], a["gold"], a["correct"]) == (b["id"], b["prediction"], b["gold"], b["correct"])
        assert a["scores"].keys() == b["scores"].keys() == set("ABCDE")
        for letter, value in a["scores"].items():
            assert b["scores"][letter] == pytest.approx(value, abs=1e-5)
            assert b["probs"][letter] == pytest.approx(a["probs"][letter], abs=1e-5)
    assert [r["correct"] for r in got[4:]] == [False, False]  # one letter never equals a multi-answer gold


def test_a_prompt_missing_from_the_cache_or_an_incomplete_cache_is_refused(tmp_path, tiny_tokenizer):
    model = tiny_qwen(len(tiny_tokenizer))
    bench = cmexam_sample()
    features = prompt_features(model, tiny_tokenizer, bench)
    with pytest.raises(MedmoeError, match="no top-blocks cache here"):
        ActivationCache.open(tmp_path / "cache", model, features, N_TOP)
    ActivationCache.build_or_open(tmp_path / "cache", model, features[:3], N_TOP, pad_id=0)
    cache = ActivationCache.open(tmp_path / "cache", model, features[:3], N_TOP)
    with pytest.raises(MedmoeError, match=r"this top-blocks cache was made with other settings, model or data "
                                          r"\(examples: 3 -> 6; .*or run it again"):
        ActivationCache.open(tmp_path / "cache", model, features, N_TOP, otherwise="run it again")
    top = TopBlocksEvalModel(model, tiny_tokenizer, cache, features[:3], N_TOP)
    with pytest.raises(MedmoeError, match=r"is not in this top-blocks cache"):
        run_benchmark(top, bench, tmp_path / "top.jsonl", rule="letter")
    with pytest.raises(MedmoeError, match="scores options only"):
        top.generate("a", 4)
    manifest = tmp_path / "cache" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"complete": true', '"complete": false'))
    with pytest.raises(MedmoeError, match=r"the top-blocks cache is incomplete \(3 of 3 examples\); finish building it"):
        ActivationCache.open(tmp_path / "cache", model, features[:3], N_TOP)

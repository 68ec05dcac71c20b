"""Adapters on the top blocks over cached activations of the frozen lower blocks (medmoe.train.top_blocks):
the same loss and adapter gradients as the full model with the same adapters (Llama, Qwen2, Gemma-3 with
sliding and global layers; PEFT LoRA and LoRA-MoE), a finetune run that saves an adapter loading onto the
full model, the cache reused on resume and refused when made otherwise, and unsupported models refused."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as tf
from typer.testing import CliRunner

from loramoe_tiny_models import VOCAB, CharTokenizer, arithmetic_examples, train_log
from medmoe.errors import MedmoeError
from medmoe.loramoe import LoraMoeModel
from medmoe.train import top_blocks
from medmoe.train.data import collate
from medmoe.train.finetune import FinetuneConfig, finetune, prepare_model
from medmoe.train.loss import completion_loss, hf_model
from medmoe.train.top_blocks import CACHE_FOLDER, ActivationCache, lower_activations, only_blocks, top_blocks_loss

COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
# Gemma-3's top two blocks are global then sliding: run at positions 0 and 1 (a plain swap of the layer
# list) they would take the first two types (sliding, sliding) and be wrong; the window (3) is shorter
# than the rows, so the type matters.
GEMMA_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
MOE = {"num_experts": 4, "top_k": 2, "rank": 2, "router_dim": 4, "contrastive_tokens": 8, "queue_size": 16}
N_TOP = 2


def build(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    if arch == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**COMMON))
    if arch == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**COMMON))
    if arch == "gemma3":
        return tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**COMMON, head_dim=8, sliding_window=3, layer_types=GEMMA_TYPES,
                                                        final_logit_softcapping=0.1))
    raise ValueError(arch)


def padded_batch() -> dict:
    """Three right-padded rows: prompts of 5, 9 and 3 tokens, completions of 2, 1 and 4."""
    g = torch.Generator().manual_seed(1)
    features = []
    for prompt, completion in [(5, 2), (9, 1), (3, 4)]:
        ids = torch.randint(3, VOCAB, (prompt + completion,), generator=g).tolist()
        features.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return collate(features, pad_id=0)


def adapted(arch: str, method: str):
    """The model of `medmoe finetune --method METHOD --top-blocks 2`, with B non-zero (so every gradient is)."""
    model = prepare_model(build(arch), FinetuneConfig(method=method, top_blocks=N_TOP, loramoe=MOE))
    for name, p in model.named_parameters():
        if p.requires_grad and "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


def loss_and_grads(model, fn):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # LoRA-MoE samples its contrastive anchors: the same draw on both paths
    loss, _ = fn(model)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["lora", "loramoe"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_top_blocks_give_the_full_models_loss_and_adapter_gradients(arch, method):
    batch = padded_batch()
    model = adapted(arch, method)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".layers.2." in n or ".layers.3." in n for n in trainable)  # adapters on the top 2 only
    twin = copy.deepcopy(model)  # LoRA-MoE's queue moves with every training forward: each path gets its own
    want, want_grads = loss_and_grads(model, lambda m: completion_loss(m, **batch))
    states = lower_activations(twin, batch["input_ids"], batch["attention_mask"], N_TOP)  # (B, T, D)
    assert states.shape == (*batch["input_ids"].shape, COMMON["hidden_size"]) and not states.requires_grad
    got, got_grads = loss_and_grads(twin, lambda m: top_blocks_loss(m, states, batch["attention_mask"], batch["labels"], N_TOP))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert set(got_grads) == set(want_grads)
    for name, grad in want_grads.items():
        assert grad is not None and got_grads[name] is not None, name
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    if isinstance(model, LoraMoeModel):  # the aux losses (padding left out of the routing statistics) alike
        assert set(twin.last_aux_losses) == {"balance", "z", "contrastive"}
        for term, value in model.last_aux_losses.items():
            torch.testing.assert_close(twin.last_aux_losses[term], value, rtol=1e-5, atol=1e-6)
    assert [type(b).__name__ for b in hf_model(twin).model.layers] == [type(b).__name__ for b in hf_model(model).model.layers]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_lower_activations_are_the_states_entering_the_first_top_block(arch):
    """Equal to the model's own hidden_states[L - n] (hidden_states[0] is the embedding, Gemma-3's scaled)."""
    model = build(arch).eval()
    batch = padded_batch()
    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True).hidden_states
    for n_top in (1, 2, 3):
        torch.testing.assert_close(lower_activations(model, batch["input_ids"], batch["attention_mask"], n_top), hidden[4 - n_top])
    if arch == "gemma3":  # the embedding scale is inside the embedding module: inputs_embeds skips exactly it
        embedded = model.model.embed_tokens(batch["input_ids"])
        torch.testing.assert_close(embedded, torch.nn.functional.embedding(batch["input_ids"], model.model.embed_tokens.weight)
                                   * COMMON["hidden_size"] ** 0.5)
        torch.testing.assert_close(hidden[0], embedded)


def test_gemma3_top_blocks_keep_their_own_layer_types():
    """The kept blocks run at their original indices; the same blocks moved to the front of the list (a
    plain swap) would take the first blocks' layer types and differ, so the comparison above is sharp."""
    model = build("gemma3").eval()
    batch = padded_batch()
    states = lower_activations(model, batch["input_ids"], batch["attention_mask"], N_TOP)
    full = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    with torch.no_grad(), only_blocks(model, range(2, 4)) as inner:
        ours = inner(inputs_embeds=states, attention_mask=batch["attention_mask"]).last_hidden_state
    torch.testing.assert_close(ours, full)
    layers = model.model.layers
    try:
        model.model.layers = torch.nn.ModuleList(list(layers)[2:])
        with torch.no_grad():
            swapped = model.model(inputs_embeds=states, attention_mask=batch["attention_mask"]).last_hidden_state
    finally:
        model.model.layers = layers
    assert (swapped - full).abs().max() > 1e-3
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in build("gemma3").named_parameters()]  # nothing renamed


def test_the_cache_holds_the_lower_states_and_pads_rows_like_collate(tmp_path, monkeypatch):
    monkeypatch.setattr(top_blocks, "EXAMPLES_PER_FILE", 2)
    model = adapted("gemma3", "loramoe")
    batch = padded_batch()
    features = [{"input_ids": ids[m.bool()].tolist(), "labels": lab[m.bool()].tolist()}
                for ids, lab, m in zip(batch["input_ids"], batch["labels"], batch["attention_mask"])]
    cache = ActivationCache.build_or_open(tmp_path / "c", model, features, N_TOP, pad_id=0, batch_size=2)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["complete"] and [f["count"] for f in manifest["files"]] == [2, 1]
    assert manifest["key"]["tokens"] == 7 + 10 + 7 and manifest["key"]["storage_dtype"] == "float32"
    want = lower_activations(model, batch["input_ids"], batch["attention_mask"], N_TOP)
    got = cache.states([0, 1, 2], batch["input_ids"].shape[1])
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        torch.testing.assert_close(got[row, :n], want[row, :n], rtol=1e-5, atol=1e-5)
        assert torch.equal(got[row, n:], got[row, n - 1].expand_as(got[row, n:]))  # padding repeats the last real state
    half = ActivationCache.build_or_open(tmp_path / "h", model, features, N_TOP, pad_id=0, storage="bfloat16")
    assert half.states([1], 10).dtype == torch.float32 and half.manifest["key"]["storage_dtype"] == "bfloat16"
    torch.testing.assert_close(half.states([1], 10), got[1:2], rtol=1e-2, atol=1e-2)
    sizes = {d: sum(f.stat().st_size for f in (tmp_path / d).glob("*.safetensors")) for d in ("c", "h")}
    assert sizes["h"] < 0.6 * sizes["c"]


# ---- finetune with --top-blocks -------------------------------------------------------------------

def _cfg(tmp_path, method="loramoe", name="run", **kw):
    base = dict(method=method, output=str(tmp_path / name), steps=4, batch_size=2, lr=5e-3, warmup_steps=1, eval_every=2,
                eval_examples=4, save_every=2, progress=False, loramoe=MOE, seed=2, top_blocks=N_TOP, lora_rank=2)
    return FinetuneConfig(**{**base, **kw})


class Killed(Exception):
    pass


def _kill_at(step):
    def on_step(done, loss):
        if done == step:
            raise Killed()
    return on_step


class Counting:
    """lower_activations, counting the examples it computes."""

    def __init__(self):
        self.examples = 0

    def __call__(self, model, input_ids, attention_mask, n_top):
        self.examples += input_ids.shape[0]
        return lower_activations(model, input_ids, attention_mask, n_top)


def _run(cfg, arch="llama", seed=0, **kw):
    return finetune(cfg, build(arch, seed), CharTokenizer(), train_examples=arithmetic_examples(16), **kw)


@pytest.mark.parametrize("method", ["lora", "loramoe"])
def test_a_top_blocks_run_trains_and_saves_an_adapter_that_loads_onto_the_full_model(tmp_path, method, tiny_tokenizer):
    from medmoe.models import load_causal_lm

    base = tmp_path / "base"
    build("llama").save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    lower = Counting()
    result = _run(_cfg(tmp_path, method), lower_fn=lower)
    assert lower.examples == 16 and len(result["losses"]) == 4 and set(result["eval"]) == {2, 4}
    assert all(torch.isfinite(torch.tensor(v)) for v in [*result["losses"].values(), *result["eval"].values()])
    assert not (tmp_path / "run" / CACHE_FOLDER).exists()  # deleted once the result is written
    trained = result["model"].eval()
    moved = [n for n, p in trained.named_parameters() if p.requires_grad and "lora_B" in n and p.abs().max() > 0]
    assert moved and all(".layers.2." in n or ".layers.3." in n for n in moved)
    loaded, _ = load_causal_lm(str(base), adapter=result["adapter"])
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained(input_ids=ids).logits)
    provenance = json.loads((result["adapter"] / "medmoe_training.json").read_text())
    assert provenance["top_blocks"] == N_TOP


def test_the_cache_is_reused_on_resume_and_the_run_equals_an_uninterrupted_one(tmp_path):
    whole = _run(_cfg(tmp_path, name="whole"))
    lower = Counting()
    with pytest.raises(Killed):
        _run(_cfg(tmp_path), on_step=_kill_at(3), lower_fn=lower)  # checkpoint at step 2
    assert lower.examples == 16 and (tmp_path / "run" / CACHE_FOLDER / "manifest.json").is_file()
    resumed_lower = Counting()
    resumed = _run(_cfg(tmp_path), lower_fn=resumed_lower)
    assert resumed_lower.examples == 0 and resumed["start_step"] == 2  # read from the run folder, not recomputed
    assert resumed["losses"] == {k: v for k, v in whole["losses"].items() if k > 2} and resumed["eval"] == {4: whole["eval"][4]}
    for (name, a), (_, b) in zip(whole["model"].named_parameters(), resumed["model"].named_parameters()):
        assert torch.equal(a, b), name


def test_a_cache_interrupted_while_building_is_completed_not_redone(tmp_path, monkeypatch):
    monkeypatch.setattr(top_blocks, "EXAMPLES_PER_FILE", 4)

    class Dies(Counting):
        def __call__(self, *args):
            if self.examples >= 8:
                raise Killed()
            return super().__call__(*args)

    with pytest.raises(Killed):
        _run(_cfg(tmp_path), lower_fn=Dies())  # two files of 4 written, then killed
    manifest = json.loads((tmp_path / "run" / CACHE_FOLDER / "manifest.json").read_text())
    assert not manifest["complete"] and len(manifest["files"]) == 2
    lower = Counting()
    _run(_cfg(tmp_path), lower_fn=lower)
    assert lower.examples == 16 - 8  # 12 training + 4 held out, minus the 8 already written


def test_resume_with_another_top_blocks_is_refused(tmp_path):
    with pytest.raises(Killed):
        _run(_cfg(tmp_path), on_step=_kill_at(3))
    with pytest.raises(MedmoeError, match="top_blocks: 2 -> 1"):
        _run(_cfg(tmp_path, top_blocks=1))
    with pytest.raises(MedmoeError, match="top_blocks_cache_dtype: 'model' -> 'bfloat16'"):
        _run(_cfg(tmp_path, top_blocks_cache_dtype="bfloat16"))
    with pytest.raises(MedmoeError, match=r"top_blocks: 2 -> '\(not set\)'"):
        _run(_cfg(tmp_path, top_blocks=0))


def test_a_run_without_top_blocks_records_no_top_blocks_settings(tmp_path):
    """So run folders from before --top-blocks resume unchanged; adding it on resume is refused."""
    with pytest.raises(Killed):
        _run(_cfg(tmp_path, top_blocks=0), on_step=_kill_at(3))
    settings = json.loads((tmp_path / "run" / "finetune_config.json").read_text())
    assert "top_layers" in settings and not any(key.startswith("top_blocks") for key in settings)
    with pytest.raises(MedmoeError, match=r"top_blocks: '\(not set\)' -> 2"):
        _run(_cfg(tmp_path))


def test_a_cache_made_with_another_model_is_refused(tmp_path):
    with pytest.raises(Killed):
        _run(_cfg(tmp_path), on_step=_kill_at(3))
    with pytest.raises(MedmoeError, match=r"top_blocks_cache/manifest.json: this top-blocks cache was made with other "
                                          r"settings, model or data \(weights_sha256: "):
        _run(_cfg(tmp_path), seed=1)  # the same settings (base "" both times), other lower-block weights


def test_unsupported_models_and_methods_are_refused(tmp_path):
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=64))
    with pytest.raises(MedmoeError, match=r"--top-blocks: GPT2LMHeadModel \(model type 'gpt2'\) is not supported; it needs "
                                          r"a decoder-only Hugging Face model with model.layers"):
        finetune(_cfg(tmp_path), gpt2, CharTokenizer(), train_examples=arithmetic_examples(16))
    assert not (tmp_path / "run").exists()  # refused before the run folder is made
    with pytest.raises(MedmoeError, match=r"--top-blocks 4: LlamaForCausalLM has 4 decoder blocks; give 1..3"):
        _run(_cfg(tmp_path, top_blocks=4))
    with pytest.raises(MedmoeError, match="--top-blocks is for --method lora and loramoe"):
        _cfg(tmp_path, method="full")


def test_the_cli_flag_reaches_the_config_and_full_is_refused(tmp_path):
    from medmoe.cli import app

    result = CliRunner().invoke(app, ["finetune", "--data", "pubmedqa", "--method", "full", "--top-blocks", "2",
                                      "-o", str(tmp_path / "o")], terminal_width=200)
    assert result.exit_code != 0 and "--top-blocks is for --method lora and loramoe" in result.output
    shown = CliRunner().invoke(app, ["finetune", "--help"], terminal_width=200)
    assert "--top-blocks" in shown.output and "--top-blocks-cache-dtype" in shown.output


def test_runs_given_one_top_blocks_cache_share_it_and_keep_it(tmp_path):
    """LoRA-MoE, then PEFT LoRA at the same settings with --top-blocks-cache DIR: the second computes nothing
    (the key does not see the adapters), DIR stays after both, and neither run folder records it as a setting."""
    shared = tmp_path / "shared"
    first_lower, second_lower = Counting(), Counting()
    first = _run(_cfg(tmp_path, "loramoe", name="moe", top_blocks_cache=str(shared)), lower_fn=first_lower)
    second = _run(_cfg(tmp_path, "lora", name="lora", top_blocks_cache=str(shared)), lower_fn=second_lower)
    assert first_lower.examples == 16 and second_lower.examples == 0
    assert first["adapter"].is_dir() and second["adapter"].is_dir() and len(second["losses"]) == 4
    assert json.loads((shared / "manifest.json").read_text())["complete"]  # kept for the next run
    for name in ("moe", "lora"):
        assert not (tmp_path / name / CACHE_FOLDER).exists()
        assert "top_blocks_cache" not in json.loads((tmp_path / name / "finetune_config.json").read_text())
        assert all(r["seconds"] >= 0 for r in train_log(tmp_path / name))  # each step's wall seconds
    note = json.loads((tmp_path / "moe" / "top_blocks_cache.json").read_text())  # the one-time cost, kept
    assert note["folder"] == str(shared) and note["examples"] == 16 and [b["computed_examples"] for b in note["builds"]] == [16]
    assert not (tmp_path / "lora" / "top_blocks_cache.json").exists()  # computed nothing
    with pytest.raises(MedmoeError, match=r"shared/manifest.json: this top-blocks cache was made with other settings, model "
                                          r"or data \(.*\); delete .*shared to build it again, or give another --top-blocks-cache"):
        _run(_cfg(tmp_path, "lora", name="other", top_blocks_cache=str(shared), max_length=8))
    with pytest.raises(MedmoeError, match="--top-blocks-cache is for --top-blocks N"):
        _cfg(tmp_path, top_blocks=0, top_blocks_cache=str(shared))


def test_the_top_blocks_cache_folder_may_change_on_resume(tmp_path):
    """Where the cache lives is not a run setting: a killed run resumes with another --top-blocks-cache."""
    with pytest.raises(Killed):
        _run(_cfg(tmp_path), on_step=_kill_at(3))
    lower = Counting()
    resumed = _run(_cfg(tmp_path, top_blocks_cache=str(tmp_path / "elsewhere")), lower_fn=lower)
    assert resumed["start_step"] == 2 and lower.examples == 16  # a new folder: built there
    assert (tmp_path / "elsewhere" / "manifest.json").is_file()


def test_the_cli_passes_the_cache_folder(tmp_path, monkeypatch):
    from medmoe.cli import app, finetune as cli_finetune

    seen = {}
    monkeypatch.setattr(cli_finetune, "run_finetune", lambda model, data, *, fields, **kw: seen.update(fields))
    result = CliRunner().invoke(app, ["finetune", "--data", "cmexam", "--top-blocks", "2", "--top-blocks-cache",
                                      str(tmp_path / "c"), "-o", str(tmp_path / "o")], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert seen["top_blocks_cache"] == str(tmp_path / "c") and seen["top_blocks"] == 2
    shown = CliRunner().invoke(app, ["finetune", "--help"], env={"COLUMNS": "400"})  # rich reads the width from COLUMNS
    assert "--top-blocks-cache " in shown.output and "pip install 'medmoe[tensorboard]'" in shown.output

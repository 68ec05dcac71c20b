"""Adapters in PEFT's file layout (issue 19, item 2): LoRA-MoE saves adapter_config.json (peft_type
MEDMOE_LORAMOE) + adapter_model.safetensors + a README.md model card; medmoe loads it, the older
layout, plain PEFT LoRA and hub ids; stock PEFT and transformers refuse a LoRA-MoE folder loudly;
`medmoe export` converts and `--merge` merges a plain LoRA (and refuses LoRA-MoE)."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from typer.testing import CliRunner

from loramoe_tiny_models import CharTokenizer, arithmetic_examples, tiny_model
from medmoe.cli import app
from medmoe.errors import ModelError
from medmoe.loramoe import LoraMoeConfig, LoraMoeModel
from medmoe.loramoe.config import ADAPTER_FORMAT, PEFT_TYPE
from medmoe.loramoe.model import LEGACY_WEIGHTS_NAME, WEIGHTS_NAME
from medmoe.models import load_causal_lm

torch.set_num_threads(1)
runner = CliRunner()
MOE = dict(num_experts=4, top_k=2, rank=4, router_dim=8, queue_size=16)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny Llama saved as a local folder (model + tokenizer): the base every adapter here names."""
    from test_loramoe_cli import _save_tiny_base

    folder = tmp_path_factory.mktemp("base")
    _save_tiny_base(folder)
    return folder


def _fresh_base():
    return tiny_model("llama")[0].eval()  # seed 0: the weights saved in `base`


def _moe(seed: int = 1) -> LoraMoeModel:
    """A LoRA-MoE adapter whose experts matter (B != 0)."""
    wrapped = LoraMoeModel(_fresh_base(), LoraMoeConfig(**MOE))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return wrapped.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(5))


def _save_legacy(wrapped: LoraMoeModel, folder, base_name: str):
    """The layout medmoe wrote before adapter_config.json: loramoe_config.json + loramoe_adapter.safetensors."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "loramoe_config.json").write_text(wrapped.config.to_json() + "\n")
    tensors = {k: v.detach().contiguous() for k, v in wrapped.adapter_state_dict().items()}
    save_file(tensors, str(folder / LEGACY_WEIGHTS_NAME),
              metadata={"format": "pt", "base_model": base_name, "model_class": type(wrapped.model).__name__})
    return folder


# ---- the layout and the round trip ------------------------------------------------------------

def test_save_writes_peft_layout_and_loads_back_exactly(base, tmp_path):
    wrapped = _moe()
    wrapped.save_adapter(tmp_path / "ad", base_model=str(base))
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["README.md", "adapter_config.json", WEIGHTS_NAME]
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["peft_type"] == PEFT_TYPE and config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == str(base) and config["medmoe_format"] == ADAPTER_FORMAT
    assert config["r"] == 4 and config["lora_alpha"] == 16.0 and config["target_modules"] == "all-linear"
    assert config["num_experts"] == 4 and config["top_k"] == 2 and config["router_kind"] == "prototype"
    assert config["router_dim"] == 8 and "medmoe_version" in config
    assert "rank" not in config and "alpha" not in config  # PEFT's names only, once each
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ad" / WEIGHTS_NAME), framework="pt") as f:
        assert set(f.keys()) == set(wrapped.adapter_state_dict())
        assert "model.layers.0.self_attn.q_proj.lora_A" in f.keys() and f.get_slice("model.layers.0.self_attn.q_proj.lora_A").get_shape() == [4, 4, 32]
    expected = _logits(wrapped, IDS)
    for model, _ in (load_causal_lm(str(base), adapter=tmp_path / "ad"), load_causal_lm(adapter=str(tmp_path / "ad"))):
        assert isinstance(model, LoraMoeModel)
        assert torch.equal(_logits(model, IDS), expected)  # the base named in adapter_config.json when none is given
    assert LoraMoeConfig.load(tmp_path / "ad") == wrapped.config


def test_seq2seq_adapter_records_its_task_type(tmp_path):
    LoraMoeModel(tiny_model("t5")[0], LoraMoeConfig(**MOE)).save_adapter(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"


def test_the_older_layout_still_loads_with_a_notice(base, tmp_path, caplog):
    wrapped = _moe()
    legacy = _save_legacy(wrapped, tmp_path / "old", str(base))
    with caplog.at_level(logging.WARNING, logger="medmoe.models.adapters"):
        model, _ = load_causal_lm(str(base), adapter=legacy)
    assert torch.equal(_logits(model, IDS), _logits(wrapped, IDS))
    notices = [r.getMessage() for r in caplog.records if "notice" in r.getMessage()]
    assert len(notices) == 1 and "medmoe export" in notices[0] and "\n" not in notices[0]
    model, _ = load_causal_lm(adapter=legacy)  # its base from the weights' metadata
    assert torch.equal(_logits(model, IDS), _logits(wrapped, IDS))


def test_export_converts_the_older_layout(base, tmp_path):
    wrapped = _moe()
    legacy = _save_legacy(wrapped, tmp_path / "old", str(base))
    (legacy / "tokenizer.json").write_text((base / "tokenizer.json").read_text())  # other files travel along
    result = runner.invoke(app, ["export", str(legacy), "-o", str(tmp_path / "new")])
    assert result.exit_code == 0, result.output
    new = tmp_path / "new"
    assert sorted(p.name for p in new.iterdir()) == ["README.md", "adapter_config.json", WEIGHTS_NAME, "tokenizer.json"]
    from safetensors.torch import load_file

    old_t, new_t = load_file(str(legacy / LEGACY_WEIGHTS_NAME)), load_file(str(new / WEIGHTS_NAME))
    assert old_t.keys() == new_t.keys() and all(torch.equal(old_t[k], new_t[k]) for k in old_t)
    assert json.loads((new / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    model, _ = load_causal_lm(adapter=new)
    assert torch.equal(_logits(model, IDS), _logits(wrapped, IDS))
    again = runner.invoke(app, ["export", str(legacy), "-o", str(new)])  # never into a folder that holds files
    assert again.exit_code != 0 and "not empty" in str(again.exception)


# ---- stock loaders refuse it loudly ---------------------------------------------------------------

def test_stock_peft_and_transformers_refuse_a_loramoe_folder(base, tmp_path):
    """PEFT has no LoRA-MoE type: the custom peft_type makes every stock path fail, never load a plain LoRA."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    _moe().save_adapter(tmp_path, base_model=str(base))
    with pytest.raises(KeyError, match=PEFT_TYPE):
        PeftConfig.from_pretrained(str(tmp_path))
    with pytest.raises(KeyError, match=PEFT_TYPE):
        PeftModel.from_pretrained(_fresh_base(), str(tmp_path))
    with pytest.raises(KeyError, match=PEFT_TYPE):  # transformers loads the named base, then PEFT refuses the adapter
        AutoModelForCausalLM.from_pretrained(str(tmp_path))


# ---- the model card --------------------------------------------------------------------------------

def test_finetune_writes_the_layout_and_a_card_of_its_run(base, tmp_path):
    from medmoe.train.finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(method="loramoe", output=str(tmp_path / "run"), steps=3, batch_size=2, lr=5e-3, warmup_steps=1,
                         eval_every=3, eval_examples=4, save_every=2, progress=False, seed=1, base=str(base),
                         data="arithmetic.jsonl", loramoe={**MOE, "contrastive_tokens": 8})
    finetune(cfg, tiny_model("llama")[0], CharTokenizer(), train_examples=arithmetic_examples())
    run, adapter = tmp_path / "run", tmp_path / "run" / "adapter"
    assert {p.name for p in adapter.iterdir()} == {"README.md", "adapter_config.json", WEIGHTS_NAME, "medmoe_training.json"}
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2.json", "step-2.safetensors", "step-3.json", "step-3.safetensors"]
    from safetensors import safe_open

    with safe_open(str(run / "checkpoints" / "step-3.safetensors"), framework="pt") as f:  # the resume format, unchanged
        assert any(k.startswith("model.") for k in f.keys()) and any(k.startswith("optimizer.state.") for k in f.keys())
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    card = (adapter / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: medmoe" in front and "- loramoe" in front and "- medical" in front
    assert "base_model:" not in front  # a local folder is no hub id
    assert f"medmoe eval --model {base} --adapter ADAPTER" in card and "load_causal_lm(" in card
    assert "| data | arithmetic.jsonl |" in card and "| steps | 3 |" in card and "| method | loramoe |" in card
    assert f"| eval loss (step 3, 4 held-out training examples) | {log[-1]['eval_loss']:.4f} | train_log.jsonl |" in card
    assert f"| training loss, last step (3) | {log[-1]['loss']:.4f} |" in card
    model, _ = load_causal_lm(adapter=str(adapter))  # no base given: the run's --model
    assert isinstance(model, LoraMoeModel)

    summary = {"settings": {"model": str(base), "adapter": str(adapter), "rule": "letter", "shots": 0},
               "benchmarks": {"dental": {"examples": 20, "accuracy": 0.35, "accuracy_ci": [0.15, 0.55]}}}
    (run / "eval-dental").mkdir()
    (run / "eval-dental" / "summary.json").write_text(json.dumps(summary))
    result = runner.invoke(app, ["export", str(adapter), "-o", str(tmp_path / "exported")])
    assert result.exit_code == 0, result.output
    card = (tmp_path / "exported" / "README.md").read_text()
    assert "| dental accuracy (20 examples, rule letter, 0-shot) | 0.350 [0.150, 0.550] |" in card
    assert "eval loss (step 3" in card  # the run folder of the source adapter


def test_a_card_without_results_says_so_and_a_bundled_base_gets_its_hub_id(tmp_path):
    from medmoe.models.adapters import write_model_card

    wrapped = LoraMoeModel(_fresh_base(), LoraMoeConfig(**MOE))
    wrapped.save_adapter(tmp_path, base_model="smollm2-135m")
    card = write_model_card(tmp_path).read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "No measured results" in card and "| eval loss" not in card
    other = tmp_path / "other-summary.json"
    other.write_text(json.dumps({"settings": {"adapter": "runs/elsewhere/adapter"}, "benchmarks": {}}))
    with pytest.raises(ModelError, match="these results are not of"):
        write_model_card(tmp_path, summaries=[other])


# ---- merge --------------------------------------------------------------------------------------------

def test_merge_of_a_plain_lora_equals_base_plus_adapter(base, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from medmoe.models import load_tokenizer

    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                          LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    result = runner.invoke(app, ["export", "--merge", str(tmp_path / "lora"), "-o", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    merged_dir = tmp_path / "merged"
    assert (merged_dir / "config.json").is_file() and (merged_dir / "model.safetensors").is_file()
    assert not (merged_dir / "adapter_config.json").exists() and (merged_dir / "tokenizer.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()  # stock transformers
    assert type(merged).__name__ == "LlamaForCausalLM"
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "lora").eval()
    base_logits = _logits(_fresh_base(), IDS)
    assert not torch.allclose(_logits(reference, IDS), base_logits, atol=1e-3)  # the adapter matters
    torch.testing.assert_close(_logits(merged, IDS), _logits(reference, IDS), atol=1e-5, rtol=1e-5)
    assert load_tokenizer(str(merged_dir)).get_vocab() == load_tokenizer(str(base)).get_vocab()


def test_merge_refuses_a_loramoe_adapter_and_says_why(base, tmp_path):
    _moe().save_adapter(tmp_path / "ad", base_model=str(base))
    result = runner.invoke(app, ["export", "--merge", str(tmp_path / "ad"), "-o", str(tmp_path / "m")])
    assert result.exit_code != 0
    message = str(result.exception)
    assert "cannot be merged" in message and "depends on the input" in message
    assert not (tmp_path / "m").exists()


# ---- hub ids, without the network -------------------------------------------------------------------

def test_a_hub_id_is_downloaded_only_when_no_local_path_has_that_name(base, tmp_path, monkeypatch):
    import huggingface_hub

    wrapped = _moe()
    wrapped.save_adapter(tmp_path / "snapshot", base_model=str(base))
    asked = []

    def fake_download(repo_id, **kwargs):
        asked.append(repo_id)
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.chdir(tmp_path)
    model, _ = load_causal_lm(adapter="someone/pubmedqa-moe")
    assert asked == ["someone/pubmedqa-moe"] and torch.equal(_logits(model, IDS), _logits(wrapped, IDS))

    (tmp_path / "someone" / "local-moe").parent.mkdir()
    shutil.copytree(tmp_path / "snapshot", tmp_path / "someone" / "local-moe")
    load_causal_lm(adapter="someone/local-moe")  # a local folder of that name wins: no download
    assert asked == ["someone/pubmedqa-moe"]
    with pytest.raises(ModelError, match="does not exist"):
        load_causal_lm(adapter="./missing/adapter")
    assert asked == ["someone/pubmedqa-moe"]

    def offline(repo_id, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelError, match="someone/other.*hub.*no network"):
        load_causal_lm(adapter="someone/other")


# ---- damaged or mismatched files fail naming the file ----------------------------------------------

def test_damaged_and_mismatched_adapters_fail_naming_the_file(base, tmp_path):
    from safetensors.torch import load_file, save_file

    wrapped = _moe()
    good = tmp_path / "good"
    wrapped.save_adapter(good, base_model=str(base))

    cut = tmp_path / "cut"
    shutil.copytree(good, cut)
    data = (cut / WEIGHTS_NAME).read_bytes()
    (cut / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=f"{cut / WEIGHTS_NAME}: truncated"):
        load_causal_lm(adapter=cut)

    missing = tmp_path / "missing"
    shutil.copytree(good, missing)
    tensors = load_file(str(missing / WEIGHTS_NAME))
    del tensors["model.layers.1.mlp.down_proj.lora_B"]
    save_file(tensors, str(missing / WEIGHTS_NAME))
    with pytest.raises(ModelError, match=f"{missing / WEIGHTS_NAME}: adapter does not fit.*1 missing tensors.*down_proj"):
        load_causal_lm(adapter=missing)

    wider = tmp_path / "wider"  # same module names, other shapes: another base
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=64)).save_pretrained(wider)
    for tokenizer_file in base.glob("tokenizer*.json"):
        shutil.copy(tokenizer_file, wider / tokenizer_file.name)
    with pytest.raises(ModelError, match=f"{good / WEIGHTS_NAME}: .* has shape .*model expects.*another base.*names its base"):
        load_causal_lm(str(wider), adapter=good)

    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    (broken / "adapter_config.json").write_text('{"peft_type": "MEDMOE_LORAMOE", ')
    with pytest.raises(ModelError, match=f"{broken / 'adapter_config.json'}: not valid JSON"):
        load_causal_lm(adapter=broken)
    config = json.loads((good / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**config, "num_expert": 3}))
    with pytest.raises(ModelError, match="adapter_config.json: unknown LoRA-MoE config keys \\['num_expert'\\]"):
        load_causal_lm(adapter=broken)
    (broken / "adapter_config.json").write_text(json.dumps({**config, "medmoe_format": "medmoe-loramoe-adapter/9"}))
    with pytest.raises(ModelError, match="medmoe_format .*adapter/9"):
        load_causal_lm(adapter=broken)


def test_a_peft_adapter_missing_tensors_fails_naming_the_file(base, tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    del tensors[sorted(tensors)[0]]
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ModelError, match="adapter_model.safetensors: the adapter lacks tensors"):
        load_causal_lm(adapter=tmp_path)


def test_eval_without_model_uses_the_base_the_adapter_names(base, tmp_path):
    _moe().save_adapter(tmp_path / "ad", base_model=str(base))
    result = runner.invoke(app, ["eval", "--adapter", str(tmp_path / "ad"), "--benchmarks", "dental", "--limit", "1",
                                 "-o", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    settings = json.loads((tmp_path / "eval" / "summary.json").read_text())["settings"]
    assert settings["model"] == f"{base}+ad" and settings["adapter"] == str(tmp_path / "ad")

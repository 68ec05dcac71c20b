"""`medmoe finetune` end to end on a tiny model saved to disk: train, save, load the adapter."""

from __future__ import annotations

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from loramoe_tiny_models import arithmetic_examples, tiny_model
from medmoe.cli.finetune import register
from medmoe.loramoe import LoraMoeModel

# The command on its own app (a callback keeps typer from collapsing a one-command app).
app = typer.Typer()
app.callback()(lambda: None)
register(app)


def _save_tiny_base(folder):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for ex in arithmetic_examples() for w in (ex.prompt + ex.completion).split()})
    vocab = {w: i for i, w in enumerate(["<pad>", "[UNK]", "</s>"] + words)}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="[UNK]").save_pretrained(folder)
    model, _ = tiny_model("llama")
    model.save_pretrained(folder)
    return model


@pytest.fixture()
def run_files(tmp_path):
    base = tmp_path / "base"
    _save_tiny_base(base)
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"question": ex.prompt.split("Question: ")[1].split("\n")[0], "answer": ex.completion.strip()})
                              for ex in arithmetic_examples()) + "\n")
    return base, data


def test_finetune_command_trains_saves_and_the_adapter_loads(tmp_path, run_files):
    base, data = run_files
    out = tmp_path / "run"
    args = ["finetune", "--model", str(base), "--data", str(data), "--output", str(out), "--steps", "3", "--batch-size", "4",
            "--lr", "0.01", "--experts", "4", "--rank", "4", "--save-every", "2", "--eval-every", "2", "--eval-examples", "4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "done: step 3" in result.output
    assert (out / "checkpoints" / "step-2.safetensors").is_file() and (out / "checkpoints" / "step-3.json").is_file()
    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["num_experts"] == 4 and config["r"] == 4 and config["compute"] == "auto"

    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[3, 4, 5, 6, 7]])
    fresh = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        base_logits = fresh(ids).logits
        tuned = LoraMoeModel.from_pretrained(fresh, adapter).eval()
        assert not torch.allclose(tuned(input_ids=ids).logits, base_logits)


def test_finetune_command_rejects_unknown_method(tmp_path, run_files):
    base, data = run_files
    result = CliRunner().invoke(app, ["finetune", "--model", str(base), "--data", str(data), "--method", "qlora"])
    assert result.exit_code != 0
    assert "--method must be one of" in str(result.exception)


def test_finetune_command_passes_compute_and_names_a_bad_one(tmp_path, run_files):
    base, data = run_files
    common = ["finetune", "--model", str(base), "--data", str(data), "--steps", "1", "--experts", "4", "--rank", "4", "--eval-examples", "0"]
    result = CliRunner().invoke(app, [*common, "--output", str(tmp_path / "dense"), "--compute", "dense"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "dense" / "adapter" / "adapter_config.json").read_text())["compute"] == "dense"
    result = CliRunner().invoke(app, [*common, "--output", str(tmp_path / "bad"), "--compute", "triton"])
    assert result.exit_code != 0
    assert "compute must be one of" in str(result.exception)


def test_eval_with_adapter_scores_the_tuned_model(tmp_path, run_files):
    base, data = run_files
    out = tmp_path / "run"
    train = ["finetune", "--model", str(base), "--data", str(data), "--output", str(out), "--steps", "2",
             "--batch-size", "4", "--experts", "4", "--rank", "4", "--eval-examples", "0"]
    assert CliRunner().invoke(app, train).exit_code == 0
    records = tmp_path / "mc.jsonl"
    records.write_text("\n".join(json.dumps({"id": f"q{i}", "question": f"{i} plus 1?", "options": ["1", "2", "3"], "answer": "B"})
                                 for i in range(5)) + "\n")
    from medmoe.cli import app as medmoe_app

    result = CliRunner().invoke(medmoe_app, ["eval", "--model", str(base), "--adapter", str(out / "adapter"),
                                      "--benchmarks", str(records), "--output", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output
    [predictions] = (tmp_path / "eval").glob("*/predictions.jsonl")
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(rows) == 5 and all(r["prediction"] in "ABC" for r in rows)


def test_finetune_says_when_eval_examples_leave_nothing_held_out(tmp_path, run_files):
    base, data = run_files
    n = sum(1 for line in data.read_text().splitlines() if line.strip())
    args = ["finetune", "--model", str(base), "--data", str(data), "--output", str(tmp_path / "run"), "--steps", "1",
            "--experts", "4", "--rank", "4", "--limit", "6", "--eval-examples", "8"]
    assert n > 6
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "--eval-examples 8 is not below the 6 training examples: none is held out" in result.output
    assert "on 6 examples from" in result.output and "0 held out for the eval loss" in result.output

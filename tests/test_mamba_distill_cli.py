"""`medmoe mambaformer distill` end to end on a tiny teacher saved to disk: runs, checkpoints, resumes."""

import json

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from typer.testing import CliRunner

from medmoe.cli import app


def _tiny_teacher(folder):
    words = ["<unk>", "</s>", "the", "of", "and", "in", "patients", "with", "to", "a", "was", "were"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True,
                      eos_token_id=1, bos_token_id=None, pad_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(folder)


def test_distill_command_runs_and_resumes(tmp_path):
    _tiny_teacher(tmp_path / "teacher")
    out = tmp_path / "run"
    args = ["mambaformer", "distill", "--model", str(tmp_path / "teacher"), "--output", str(out), "--layers", "2",
            "--keep-attention", "2", "--seq-len", "32", "--batch-size", "2", "--save-every", "1"]
    first = CliRunner().invoke(app, args + ["--max-steps", "2"])
    assert first.exit_code == 0, first.output
    assert json.loads((out / "latest.json").read_text())["step"] == 2
    spec = json.loads((out / "ckpt-000002" / "config.json").read_text())["hybrid"]
    assert spec["layers"] == [0, 2] and spec["attention_layers"] == [2]
    second = CliRunner().invoke(app, args + ["--max-steps", "3"])
    assert second.exit_code == 0, second.output
    assert "resuming from" in second.output
    state = json.loads((out / "ckpt-000003" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["history"]] == [1, 2, 3]


def test_bad_size_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["mambaformer", "distill", "--output", str(tmp_path), "--size", "huge"])
    assert result.exit_code != 0
    assert "--size must be one of" in str(result.exception) + result.output

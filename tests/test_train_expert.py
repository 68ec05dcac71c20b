"""`medmoe mambaformer expert`: task fine-tuning of a Mamba hybrid expert on real data, saved as a hybrid,
and the pipeline's guard against a gate trained on records the experts were fine-tuned on."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from medmoe.cli import app
from medmoe.data import load_dataset
from medmoe.errors import ModelError
from medmoe.mamba.transfer import build_hybrid, save_hybrid
from medmoe.mambaformer.experts import check_gate_records, load_expert
from tiny_lm import tiny_llama, tiny_tokenizer


@pytest.fixture()
def hybrid_folder(tmp_path):
    records = load_dataset("pubmedqa", "train")[:12]
    text = " ".join(f"{r.context} {r.question}" for r in records)
    tokenizer = tiny_tokenizer(extra_text=text)
    student, spec = build_hybrid(tiny_llama(vocab=len(tokenizer)), teacher_name="tiny")
    return save_hybrid(student, spec, tmp_path / "hybrid", tokenizer)


def test_train_expert_fine_tunes_a_hybrid_and_saves_it_as_one(tmp_path, hybrid_folder):
    out = tmp_path / "run"
    before = load_expert("mamba", str(hybrid_folder)).model
    result = CliRunner().invoke(app, ["mambaformer", "expert", "--model", str(hybrid_folder), "--data", "pubmedqa",
                                      "--output", str(out), "--skip-first", "380", "--batch-size", "2",
                                      "--grad-accum", "1", "--lr", "0.01", "--max-length", "64", "--top-layers", "1"])
    assert result.exit_code == 0, result.output
    assert "first 380 kept for the gate" in result.output
    tuned = load_expert("mamba", str(out / "model"))
    assert type(tuned.model.model.layers[0].self_attn).__name__ == "AttentionMamba"
    assert tuned.trained_on == {"method": "full", "data": "pubmedqa", "skip_first": 380, "limit": 0, "top_layers": 1,
                                 "freeze_mixers": True, "with_explanation": False}
    frozen, trained = before.model.layers[0], tuned.model.model.layers[0]   # below the top layer: unchanged
    assert torch.equal(frozen.mlp.up_proj.weight, trained.mlp.up_proj.weight)
    assert not torch.equal(before.model.layers[-1].mlp.up_proj.weight, tuned.model.model.layers[-1].mlp.up_proj.weight)
    assert torch.equal(before.model.layers[-1].self_attn.x_proj.weight, tuned.model.model.layers[-1].self_attn.x_proj.weight)
    assert torch.equal(before.model.layers[-1].input_layernorm.weight, tuned.model.model.layers[-1].input_layernorm.weight)
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert not torch.allclose(tuned.model(ids).logits, before(ids).logits)
    with pytest.raises(ModelError, match="--train-limit 380"):
        check_gate_records({"mamba": tuned}, "pubmedqa", 381)
    check_gate_records({"mamba": tuned}, "pubmedqa", 380)   # the held-out records are fine
    check_gate_records({"mamba": tuned}, "dental", 700)     # another dataset is fine


def test_gate_holdout_that_leaves_nothing_is_a_clear_error(tmp_path, hybrid_folder):
    result = CliRunner().invoke(app, ["mambaformer", "expert", "--model", str(hybrid_folder), "--output", str(tmp_path / "r"),
                                      "--skip-first", "100000"])
    assert result.exit_code != 0
    assert "leaves none" in str(result.exception) + result.output


def test_completion_loss_with_the_head_at_answer_positions_equals_the_full_loss():
    """The LM head only where a completion token is predicted gives Hugging Face's own loss."""
    from medmoe.train.data import collate
    from medmoe.train.finetune import completion_loss

    model = tiny_llama()
    features = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, -100, 8, 9]},
                {"input_ids": [5, 6, 7, 10, 11, 12, 13], "labels": [-100, -100, -100, -100, -100, 12, 13]}]
    batch = collate(features, pad_id=0)
    with torch.no_grad():
        expected = model(**batch).loss
        got, n_tokens = completion_loss(model, **batch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert n_tokens == 4

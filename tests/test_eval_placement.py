"""`medmoe eval --dtype/--device`: parsed as usage errors naming the flag, the dtype reaches the loaded model,
run.json and summary.json record the resolved placement, and a resumed folder never mixes in another."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from medmoe.cli import app
from medmoe.errors import DataError
from medmoe.eval.model import load_eval_model
from medmoe.eval.runner import check_settings
from tiny_lm import tiny_llama, tiny_tokenizer

ROWS = [{"id": f"u{i}", "question": "which drug is best ?", "options": ["aspirin", "heparin", "rest"], "answer": "ABC"[i % 3]}
        for i in range(3)]
runner = CliRunner()


@pytest.fixture()
def model_and_data(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return tmp_path / "m", data


def _eval(model, data, out, *flags: str):
    return runner.invoke(app, ["eval", "--model", str(model), "--benchmarks", str(data), "-o", str(out), "--threads", "1",
                               *flags])


@pytest.mark.parametrize("flag, value", [("--dtype", "fp8"), ("--device", "tpu")])
def test_a_bad_value_is_a_usage_error_naming_the_flag(tmp_path, flag, value):
    result = runner.invoke(app, ["eval", "--model", "nowhere", flag, value, "-o", str(tmp_path / "e")], terminal_width=300)
    assert result.exit_code == 2 and flag in result.output and value in result.output


def test_the_dtype_reaches_the_model_and_the_default_is_float32_on_cpu(model_and_data):
    model, _ = model_and_data
    bf16 = load_eval_model(str(model), dtype="bf16", device="cpu")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert bf16.placement == {"dtype": "bfloat16", "device": "cpu"}
    plain = load_eval_model(str(model))
    assert {p.dtype for p in plain.model.parameters()} == {torch.float32} and plain.placement["device"] == "cpu"


def test_eval_records_its_placement_and_refuses_to_resume_in_another(model_and_data, tmp_path):
    model, data = model_and_data
    out = tmp_path / "eval"
    result = _eval(model, data, out, "--dtype", "bf16", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["settings"].items() >= {"dtype": "bfloat16", "device": "cpu"}.items()
    assert json.loads((out / "run.json").read_text())["dtype"] == "bfloat16"
    again = _eval(model, data, out, "--device", "cpu")  # the default dtype, float32
    assert again.exit_code != 0 and isinstance(again.exception, DataError)
    message = " ".join(str(again.exception).split())
    assert "dtype: 'bfloat16' -> 'float32'" in message and "--dtype bfloat16 to add to its rows" in message
    assert _eval(model, data, out, "--dtype", "bfloat16", "--device", "cpu").exit_code == 0  # the same: resumes


def test_a_run_json_from_before_the_flags_counts_as_float32_on_cpu(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"model": "m", "rule": "letter"}))
    check_settings(tmp_path, {"model": "m", "rule": "letter", "dtype": "float32", "device": "cpu"})  # continues
    with pytest.raises(DataError, match=r"device: 'cpu' -> 'cuda'.*--device cpu to add to its rows"):
        check_settings(tmp_path, {"model": "m", "rule": "letter", "dtype": "float32", "device": "cuda"})
    with pytest.raises(DataError, match=r"rule: 'letter' -> 'loglik'\); use another --output$"):
        check_settings(tmp_path, {"model": "m", "rule": "loglik"})


@pytest.mark.parametrize("flag", ["--dtype", "--device"])
def test_head_and_router_refuse_the_flags(tmp_path, flag):
    value = "bf16" if flag == "--dtype" else "cpu"
    result = runner.invoke(app, ["eval", "--head", str(tmp_path / "h"), flag, value, "-o", str(tmp_path / "e")],
                           terminal_width=300)
    assert result.exit_code == 2 and "medmoe_head.json" in result.output
    from medmoe.cli.eval import check_placement_options

    with pytest.raises(Exception, match="router.json"):
        check_placement_options("bfloat16", None, "--router")
    check_placement_options(None, None, "--router")  # not given: the router's own placement

"""Odd input gives a clear error (or a documented, reported behaviour), never a silent wrong metric or
a traceback: duplicate ids, prompts longer than the window, integer options out of range, damaged
model and adapter files (issue 15, item 8; reports/bad_input.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from medmoe.cli import app
from medmoe.data.record import Record
from medmoe.data.validate import check_file, validate
from medmoe.errors import DataError, MedmoeError, ModelError
from medmoe.eval.benchmarks import Benchmark, load_benchmark
from medmoe.eval.harness import evaluate
from medmoe.eval.model import HFEvalModel
from medmoe.eval.runner import run_benchmark
from medmoe.eval.window import PromptFitter, cut_context, fit_record
from tiny_lm import tiny_llama, tiny_tokenizer

ROW = {"question": "which drug is best ?", "options": ["aspirin", "heparin"], "answer": "A"}
WINDOW = 512  # tiny_llama's max_position_embeddings


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def no_bertscore(language):
    raise AssertionError("not needed for option benchmarks")


@pytest.fixture(scope="module")
def tiny():
    return HFEvalModel(tiny_llama(), tiny_tokenizer(chat=True), "tiny")


@pytest.fixture()
def model_dir(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "m")
    tiny_tokenizer(chat=True).save_pretrained(tmp_path / "m")
    return tmp_path / "m"


@pytest.fixture()
def duplicated(tmp_path):
    """Four rows, the fourth reusing the second's id: scored by id, accuracy read 1.000 instead of 0.750."""
    rows = [ROW | {"id": f"q{i}"} for i in range(3)] + [ROW | {"id": "q1", "answer": "B"}]
    return write_jsonl(tmp_path / "dup.jsonl", rows)


# -- duplicate ids -----------------------------------------------------------------------------------

def test_validate_names_the_duplicate_id_and_both_lines(duplicated):
    count, problems = validate(duplicated)
    assert count == 0 and len(problems) == 1
    assert problems[0].line == 4 and "duplicate id 'q1' (also line 2)" in problems[0].message
    result = CliRunner().invoke(app, ["data", "validate", str(duplicated)])
    assert result.exit_code == 1 and "dup.jsonl:4: duplicate id 'q1' (also line 2)" in result.output.replace("\n", "")


def test_eval_refuses_duplicate_ids_before_scoring(duplicated, model_dir, tmp_path):
    with pytest.raises(DataError, match="dup.jsonl:4: duplicate id 'q1'"):
        load_benchmark(str(duplicated))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["eval", "--model", str(model_dir), "--benchmarks", str(duplicated), "--output", str(out)])
    assert isinstance(result.exception, DataError) and "duplicate id 'q1'" in str(result.exception)
    assert not out.exists()  # nothing scored, nothing written


def test_run_benchmark_refuses_duplicate_ids_of_a_benchmark_built_in_code(tiny, tmp_path):
    records = [Record("a", "which drug is best ?", "A", options=("aspirin", "heparin"))] * 2
    with pytest.raises(DataError, match="duplicate id 'a'"):
        run_benchmark(tiny, Benchmark("mine", records), tmp_path / "p.jsonl", bertscorer=no_bertscore)
    assert not (tmp_path / "p.jsonl").exists() or not (tmp_path / "p.jsonl").read_text()


def test_the_cli_prints_one_error_line_without_a_traceback(duplicated):
    code = "from medmoe.cli import main; main()"
    run = subprocess.run([sys.executable, "-c", code, "eval", "--benchmarks", str(duplicated)],
                         check=False, capture_output=True, text=True, env={"PYTHONPATH": "src", "COLUMNS": "300"}, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "error: " in run.stderr and "duplicate id 'q1' (also line 2)" in run.stderr


# -- prompts longer than the window ----------------------------------------------------------------

LONG_QUESTION = "the patient has fever " * 3000 + "which drug is best ?"


def test_validate_warns_about_a_very_long_question(tmp_path):
    path = write_jsonl(tmp_path / "big.jsonl", [ROW | {"id": "big", "question": LONG_QUESTION}])
    result = check_file(path)
    assert result.count == 1 and not result.problems
    assert "question is 66,020 characters" in result.warnings[0].message and result.warnings[0].record == "big"
    cli = CliRunner().invoke(app, ["data", "validate", str(path)])
    assert cli.exit_code == 0 and "warning:" in cli.output and "1 warning(s)" in cli.output.replace("\n", "")


def test_eval_cuts_a_long_question_to_the_window_and_says_so(model_dir, tmp_path):
    path = write_jsonl(tmp_path / "big.jsonl", [ROW | {"id": "big", "question": LONG_QUESTION}, ROW | {"id": "short"}])
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["eval", "--model", str(model_dir), "--benchmarks", str(path), "--output", str(out)])
    assert result.exit_code == 0, result.output
    rows = {r["id"]: r for r in map(json.loads, (out / "file-big" / "predictions.jsonl").read_text().splitlines())}
    assert rows["big"]["prompt_tokens"] < WINDOW < 12000  # the whole question is ~12,000 tokens
    assert rows["big"]["truncated_tokens"] > 11000 and rows["short"]["truncated_tokens"] == 0
    summary = json.loads((out / "summary.json").read_text())["benchmarks"][str(path)]
    assert summary["truncated_prompts"] == 1
    assert "1 of 2 prompts were longer than the model's window" in result.output.replace("\n", " ")
    assert "Warning: " in (out / "report.md").read_text()


def test_context_is_cut_first_keeping_its_beginning_then_the_question_keeping_its_end(tiny):
    fitter = PromptFitter(tiny, "letter")
    context = "the patient has fever and cough " * 200
    record = Record("x", "which drug is best ?", "A", context=context, options=("aspirin", "heparin"))
    fitted, dropped = fitter.fit(record)
    assert dropped > 0 and fitted.question == record.question
    assert fitted.context and context.startswith(fitted.context[:40]) and len(fitted.context) < len(context)
    huge = replace(record, question=LONG_QUESTION)
    fitted, dropped = fitter.fit(huge)
    assert fitted.context is None and fitted.question.endswith("fever which drug is best?")
    assert len(fitted.question) < len(LONG_QUESTION)
    assert fitter.fit(Record("s", "which drug is best ?", "A", options=("aspirin", "heparin")))[1] == 0


def test_a_prompt_whose_options_alone_fill_the_window_is_a_clear_error(tiny):
    record = Record("opt", "which drug ?", "A", options=("aspirin " * 2000, "heparin"))
    with pytest.raises(MedmoeError, match="record opt: the prompt is .* tokens with no context and no question"):
        PromptFitter(tiny, "letter").fit(record)


def test_the_server_cuts_with_the_same_function(tiny):
    from medmoe.answer.causal_lm import CausalLMAnswerer
    from medmoe.serve import answerers

    assert answerers.cut_context is cut_context
    server = CausalLMAnswerer(tiny.model, tiny.tokenizer, "tiny", max_new_tokens=8, max_input_tokens=120)
    record = Record("x", "which drug is best ?", "", context="the patient has fever . " * 100, options=("aspirin", "heparin"))
    assert server.fit(record) == fit_record(record, server.prompt_tokens, tiny.tokenizer, server.max_input_tokens)


# -- integer options ---------------------------------------------------------------------------------

@pytest.mark.parametrize("option, value", [("--limit", "-5"), ("--limit", "0"), ("--batch-size", "0"), ("--shots", "-1"),
                                           ("--max-new-tokens", "0"), ("--threads", "-2")])
def test_eval_integer_options_out_of_range_are_usage_errors(option, value, tmp_path):
    result = CliRunner().invoke(app, ["eval", "--benchmarks", "dental", option, value, "--output", str(tmp_path / "o")])
    assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output
    assert not (tmp_path / "o").exists()


def test_evaluate_api_checks_its_counts_before_loading_anything(tiny, tmp_path):
    with pytest.raises(MedmoeError, match="limit must be >= 1, got -5"):
        evaluate(tiny, ["dental"], tmp_path / "o", limit=-5, bertscorer=no_bertscore)
    with pytest.raises(MedmoeError, match="batch_size must be >= 1, got 0"):
        run_benchmark(tiny, load_benchmark("dental", limit=2), tmp_path / "p.jsonl", batch_size=0, bertscorer=no_bertscore)
    assert not (tmp_path / "o").exists()


# -- damaged model and adapter files ---------------------------------------------------------------

def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_a_truncated_loramoe_adapter_is_named_as_truncated(model_dir, tmp_path):
    from medmoe.loramoe import LoraMoeConfig, LoraMoeModel
    from medmoe.loramoe.model import WEIGHTS_NAME

    adapter = tmp_path / "adapter"
    LoraMoeModel(tiny_llama(), LoraMoeConfig(num_experts=4, top_k=2, rank=4, router_dim=8, queue_size=16)).save_adapter(adapter)
    truncate(adapter / WEIGHTS_NAME)
    with pytest.raises(ModelError, match=f"{WEIGHTS_NAME}: truncated: [0-9,]+ bytes of the [0-9,]+ its header describes"):
        LoraMoeModel.from_pretrained(tiny_llama(), adapter)
    result = CliRunner().invoke(app, ["eval", "--model", str(model_dir), "--adapter", str(adapter), "--benchmarks", "dental",
                                      "--limit", "1", "--output", str(tmp_path / "o")])
    assert isinstance(result.exception, ModelError) and "truncated" in str(result.exception)


def test_a_truncated_peft_adapter_is_named_as_truncated(model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    from medmoe.models import load_causal_lm

    adapter = tmp_path / "lora"
    get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(adapter)
    truncate(adapter / "adapter_model.safetensors")
    with pytest.raises(ModelError, match="adapter_model.safetensors: truncated: [0-9,]+ bytes of the [0-9,]+"):
        load_causal_lm(str(model_dir), adapter=str(adapter))


def test_a_truncated_model_safetensors_is_named_as_truncated(model_dir):
    from medmoe.models import load_causal_lm

    truncate(model_dir / "model.safetensors")
    with pytest.raises(ModelError, match="model.safetensors: truncated: [0-9,]+ bytes of the [0-9,]+ its header describes"):
        load_causal_lm(str(model_dir))
    (model_dir / "model.safetensors").write_bytes(b"\x05")
    with pytest.raises(ModelError, match="not even the 8-byte header length"):
        load_causal_lm(str(model_dir))


def test_a_folder_without_config_json_says_so(model_dir, tmp_path):
    from medmoe.models import load_causal_lm

    (model_dir / "config.json").unlink()
    with pytest.raises(ModelError, match="no config.json in .*m, so it is not a model folder .it holds"):
        load_causal_lm(str(model_dir))
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text("{}")
    with pytest.raises(ModelError, match=r"did you mean .*run/model\?"):
        load_causal_lm(str(run))


def test_a_truncated_gguf_says_truncated_or_corrupt(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from medmoe.file_checks import gguf_problem
    from medmoe.models import load_causal_lm

    path = tmp_path / "small.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.ones((64, 32), dtype=np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    assert gguf_problem(path) is None
    truncate(path)
    with pytest.raises(ModelError, match=r"small.gguf: truncated or corrupt GGUF file \([0-9,]+ bytes"):
        load_causal_lm(str(path))
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    assert "not a GGUF file (it starts with b'PK" in gguf_problem(path)


def test_max_new_tokens_that_fill_the_window_fail_before_the_run_folder_is_made(tiny, tmp_path):
    with pytest.raises(MedmoeError, match="its window is 512 tokens; generating 600 leaves 0 for the prompt"):
        evaluate(tiny, ["dental"], tmp_path / "o", rule="generate", limit=1, max_new_tokens=600, bertscorer=no_bertscore)
    assert not (tmp_path / "o").exists()


def test_data_show_refuses_a_negative_count():
    result = CliRunner().invoke(app, ["data", "show", "pubmedqa", "-n", "-1"])
    assert result.exit_code == 2 and "Invalid value for '-n'" in result.output

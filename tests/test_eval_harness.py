"""The harness end to end on a tiny model: shots, prompts, resumable runs, reproducibility, outputs."""

import json

import pytest

from medmoe.data.record import Record
from medmoe.errors import DataError, ModelError
from medmoe.eval.benchmarks import load_benchmark, subsample
from medmoe.eval.harness import evaluate
from medmoe.eval.model import HFEvalModel, load_eval_model
from medmoe.eval.prompts import build_prompt
from medmoe.eval.runner import read_done, run_benchmark
from tiny_lm import tiny_llama, tiny_tokenizer

FILE_ROWS = [
    {"id": f"u{i}", "question": "which drug is best ?", "options": ["aspirin", "heparin", "rest"], "answer": "ABC"[i % 3]}
    for i in range(6)
]


@pytest.fixture()
def user_file(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in FILE_ROWS))
    return path


@pytest.fixture(scope="module")
def tiny():
    return HFEvalModel(tiny_llama(), tiny_tokenizer(chat=True), "tiny")


def no_bertscore(language):
    raise AssertionError("not needed for option benchmarks")


def test_shots_come_from_train_or_dev_and_match_the_subject():
    for name in ("pubmedqa", "dental", "cmexam", "cmmlu-med", "medmcqa"):
        bench = load_benchmark(name, limit=30)
        evaluated = {r.id for r in bench.records}
        for record in bench.records[:5]:
            shots = bench.shots_for(record, 5)
            assert len(shots) == 5 and not {s.id for s in shots} & evaluated
            if name == "cmmlu-med":
                assert {s.metadata["subject"] for s in shots} == {record.metadata["subject"]}
                assert all(s.id.startswith("cmmlu/dev/") for s in shots)
    assert load_benchmark("cmb-clin", limit=3).shots_for(load_benchmark("cmb-clin", limit=3).records[0], 5) == []


def test_subsample_is_fixed_and_nested():
    records = load_benchmark("dental").records
    assert [r.id for r in subsample(records, 10)] == [r.id for r in subsample(records, 20)[:10]]
    assert subsample(records, None) == records


def test_prompt_never_depends_on_the_gold_answer():
    a = Record("x", "which drug is best ?", "A", options=("aspirin", "heparin", "rest"))
    b = Record("x", "which drug is best ?", "AC", options=("aspirin", "heparin", "rest"))
    tok = tiny_tokenizer()
    for kind in ("letter", "text", "none"):
        assert build_prompt(a, tok, kind=kind, multi=True) == build_prompt(b, tok, kind=kind, multi=True)


def test_chat_template_prompts_score_letters_without_a_space():
    record = Record("x", "which drug is best ?", "A", options=("aspirin", "heparin"))
    chat = build_prompt(record, tiny_tokenizer(chat=True), kind="letter")
    plain = build_prompt(record, tiny_tokenizer(), kind="letter")
    assert chat.context.endswith("<|assistant|>") and chat.continuations == ("A", "B")
    assert plain.context.endswith("Answer:") and plain.continuations == (" A", " B")


def test_k_shot_prompt_shows_the_shots_with_answers():
    bench = load_benchmark("dental", limit=2)
    record = bench.records[0]
    shots = bench.shots_for(record, 2)
    text = build_prompt(record, tiny_tokenizer(), shots, kind="letter").context
    assert text.count("Answer:") == 3 and f"Answer: {shots[0].answer}" in text


class Counting(HFEvalModel):
    calls = 0

    def score_options(self, context, continuations):
        Counting.calls += 1
        return super().score_options(context, continuations)


def test_interrupted_run_resumes_and_two_runs_agree(tmp_path, user_file):
    model = Counting(tiny_llama(), tiny_tokenizer(), "tiny")
    bench = load_benchmark(str(user_file))
    out = tmp_path / "a.jsonl"
    full = run_benchmark(model, bench, out, "loglik", bertscorer=no_bertscore)
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:3]) + "\n" + lines[3][:10])  # crash: 3 rows and a torn fourth
    Counting.calls = 0
    resumed = run_benchmark(model, bench, out, "loglik", bertscorer=no_bertscore)
    assert Counting.calls == 3  # only the unfinished examples were scored again
    assert [r["prediction"] for r in resumed] == [r["prediction"] for r in full]
    assert list(read_done(out)) == [r["id"] for r in full]  # the torn line is gone: the file reads cleanly
    again = run_benchmark(model, bench, tmp_path / "b.jsonl", "loglik", bertscorer=no_bertscore)
    assert [(r["prediction"], r["scores"]) for r in again] == [(r["prediction"], r["scores"]) for r in full]  # bit for bit


def test_evaluate_writes_rows_summary_report_and_plot(tmp_path, user_file, tiny):
    result = evaluate(tiny, ["dental", str(user_file)], tmp_path / "run", "letter", shots=2, limit=5, bertscorer=no_bertscore)
    row = json.loads((tmp_path / "run" / "dental" / "predictions.jsonl").read_text().splitlines()[0])
    for key in ("id", "prediction", "gold", "correct", "scores", "probs", "latency_ms", "prompt_tokens", "shots"):
        assert key in row
    assert row["shots"] == 2 and set(row["scores"]) == set("ABCD")
    summary = result["benchmarks"]["dental"]
    assert summary["examples"] == 5 and summary["accuracy_ci"][0] <= summary["accuracy"] <= summary["accuracy_ci"][1]
    assert (tmp_path / "run" / "results.png").stat().st_size > 0
    assert "| dental | 5 | accuracy |" in (tmp_path / "run" / "report.md").read_text()
    assert (tmp_path / "run" / "file-mine" / "predictions.jsonl").exists()
    with pytest.raises(DataError, match="other settings"):
        evaluate(tiny, ["dental"], tmp_path / "run", "loglik", shots=2, limit=5, bertscorer=no_bertscore)


def test_grouped_benchmark_reports_per_subject_micro_and_macro(tmp_path, tiny):
    result = evaluate(tiny, ["cmmlu-med"], tmp_path / "c", "letter", limit=12, bertscorer=no_bertscore)
    s = result["benchmarks"]["cmmlu-med"]
    groups = s["per_group"]
    assert sum(g["examples"] for g in groups.values()) == 12
    assert s["macro_accuracy"] == pytest.approx(sum(g["accuracy"] for g in groups.values()) / len(groups))


def test_open_benchmark_generates_and_scores_text(tmp_path, tiny):
    from medmoe.eval.textmetrics import BertScorer

    class Fixed:
        name = "fixed"
        def score(self, candidate, reference):
            return 0.5, 0.5, 0.5

    bench = load_benchmark("cmb-clin", limit=3)
    # batch_size applies to option questions only: open ones are generated one by one, none skipped
    rows = run_benchmark(tiny, bench, tmp_path / "o.jsonl", "letter", batch_size=8, bertscorer=lambda lang: Fixed())
    assert [r["id"] for r in rows] == [r.id for r in bench.records]
    assert rows[0]["rule"] == "generate" and 0 <= rows[0]["rouge_l"] <= 1 and rows[0]["bertscore_f1"] == 0.5
    assert BertScorer  # the real scorer is tested in test_textmetrics.py


def test_adapter_hook_errors_are_clear(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_eval_model(str(tmp_path / "m"), adapter=str(tmp_path / "none"))
    (tmp_path / "moe").mkdir()  # a folder that holds no adapter at all
    tiny_llama().save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    with pytest.raises(ModelError, match="no loramoe_config.json, adapter_config.json or config.json"):
        load_eval_model(str(tmp_path / "m"), adapter=str(tmp_path / "moe"))
    with pytest.raises(ModelError, match="routed"):
        load_eval_model("routed:/nowhere")


def test_peft_lora_adapter_loads_and_changes_scores(tmp_path):
    peft = pytest.importorskip("peft")
    from medmoe.eval.scoring import score_options

    base = tiny_llama()
    base.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    lora = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    plain = load_eval_model(str(tmp_path / "m"))
    adapted = load_eval_model(str(tmp_path / "m"), adapter=str(tmp_path / "lora"))
    args = ("Question : which drug is best ? Answer :", (" A", " B aspirin"))
    reference = score_options(lora.eval(), plain.tokenizer, *args)  # PEFT's own (unmerged) model
    assert adapted.score_options(*args).logprobs == pytest.approx(reference.logprobs, abs=1e-4)
    assert adapted.score_options(*args).logprobs != pytest.approx(plain.score_options(*args).logprobs, abs=1e-4)


def test_a_run_folder_has_one_writer(tmp_path):
    import subprocess
    import sys

    from medmoe.eval.runner import claim_folder

    claim_folder(tmp_path / "run")
    code = "import sys; from pathlib import Path; from medmoe.eval.runner import claim_folder; claim_folder(Path(sys.argv[1]))"
    other = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True,
                           env={"PYTHONPATH": "src"})
    assert other.returncode != 0 and "another medmoe eval" in other.stderr


def test_cmb_exam_file_and_question_type(tmp_path, tiny):
    rows = [{"id": i, "question": "which drug is best ?", "option": {"A": "aspirin", "B": "heparin", "C": "rest"},
             "answer": "AC" if i % 2 else "B", "exam_type": "医师考试", "exam_class": "执业医师", "exam_subject": "内科",
             "question_type": "多项选择题" if i % 2 else "单项选择题"} for i in range(4)]
    path = tmp_path / "cmb.json"
    path.write_text(json.dumps(rows, ensure_ascii=False))
    bench = load_benchmark(f"cmb-exam:{path}")
    multi = build_prompt(bench.records[1], tiny_tokenizer(), kind="letter").context
    single = build_prompt(bench.records[0], tiny_tokenizer(), kind="letter").context
    assert "more than one" in multi and "more than one" not in single
    result = evaluate(tiny, [f"cmb-exam:{path}"], tmp_path / "out", "letter", bertscorer=no_bertscore)
    assert result["benchmarks"][f"cmb-exam:{path}"]["examples"] == 4
    assert (tmp_path / "out" / "file-cmb" / "predictions.jsonl").exists()


def test_medmoe_eval_command_end_to_end(tmp_path):
    from typer.testing import CliRunner

    from medmoe.cli import app

    tiny_llama().save_pretrained(tmp_path / "m")
    tiny_tokenizer(chat=True).save_pretrained(tmp_path / "m")
    args = ["eval", "--model", str(tmp_path / "m"), "--benchmarks", "dental,pubmedqa", "--shots", "1", "--limit", "2",
            "--output", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["benchmarks"]["pubmedqa"]["examples"] == 2 and summary["settings"]["shots"] == 1
    bad = CliRunner().invoke(app, args[:-2] + ["--rule", "vibes", "--output", str(tmp_path / "o2")])
    assert bad.exit_code != 0 and "vibes" in bad.output


def test_batched_runs_predict_what_one_at_a_time_runs_predict(tmp_path, tiny):
    bench = load_benchmark("dental", limit=5)
    one = run_benchmark(tiny, bench, tmp_path / "one.jsonl", "letter", batch_size=1, bertscorer=no_bertscore)
    four = run_benchmark(tiny, bench, tmp_path / "four.jsonl", "letter", batch_size=4, bertscorer=no_bertscore)
    assert [r["prediction"] for r in four] == [r["prediction"] for r in one]
    for a, b in zip(one, four):
        assert list(b["scores"].values()) == pytest.approx(list(a["scores"].values()), abs=1e-4)

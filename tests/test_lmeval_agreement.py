"""lm-eval's own pubmedqa task on bundled rows: its log-likelihoods equal medmoe's on its prompt.

benchmarks/lmeval_agreement.py runs lm-eval's installed `pubmedqa` and `medmcqa` task definitions with
only the data source changed (a local JSONL of the hub rows, made from medmoe's bundled files). Here,
on a tiny random Llama and 5 bundled PubMedQA test records, offline: lm-eval builds the prompts with
its own doc_to_text, the `medmoe` lm-eval model and lm-eval's `hf` model score them, and medmoe's
score_options on each logged request gives the same per-option log-likelihoods and the same choices.
The MedMCQA rows are checked against the hub script's conversion (cop 0-based) without a model.
"""

import json
import sys
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import lmeval_agreement as agreement  # noqa: E402
from medmoe.eval.benchmarks import load_benchmark  # noqa: E402
from medmoe.eval.model import load_eval_model  # noqa: E402
from tiny_lm import tiny_llama, tiny_tokenizer  # noqa: E402

EXAMPLES = 5


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_pubmedqa_task_on_bundled_rows_scores_as_medmoe(tmp_path):
    records = load_benchmark("pubmedqa", EXAMPLES).records
    source = agreement.SOURCES["pubmedqa"]
    task_yaml = agreement.write_local_task(source, records, tmp_path / "tasks")
    rows = [json.loads(line) for line in (tmp_path / "tasks" / "pubmedqa_bundled.jsonl").read_text().splitlines()]
    assert [tuple(row) for row in rows] == [agreement.PUBMEDQA_FIELDS] * EXAMPLES  # the hub's source schema
    assert all(isinstance(row["CONTEXTS"], list) and len(row["CONTEXTS"]) > 1 for row in rows)
    assert f"include: {json.dumps(str(source.yaml))}" in task_yaml.read_text()  # lm-eval's own task file

    text = " ".join(row["QUESTION"] + " " + " ".join(row["CONTEXTS"]) for row in rows) + " Abstract Question Answer"
    tokenizer = tiny_tokenizer(extra_text=text)
    tiny_dir = tmp_path / "tiny"
    tiny_llama(vocab=len(tokenizer)).save_pretrained(tiny_dir)
    tokenizer.save_pretrained(tiny_dir)

    results, samples = agreement.run_lm_eval("medmoe", f"model={tiny_dir}", task_yaml, batch_size=2)
    _, hf_samples = agreement.run_lm_eval("hf", f"pretrained={tiny_dir}", task_yaml, batch_size=2)
    assert [s["doc_id"] for s in samples] == list(range(EXAMPLES))
    for sample, row in zip(samples, rows):  # lm-eval's prompt: its doc_to_text over the hub row, CONTEXTS joined by lines
        assert sample["arguments"][0][0] == "Abstract: {}\nQuestion: {}\nAnswer:".format("\n".join(row["CONTEXTS"]), row["QUESTION"])
        assert [cont for _, cont in sample["arguments"]] == [" yes", " no", " maybe"]

    summary = agreement.compare(load_eval_model(str(tiny_dir)), source, samples, reference=hf_samples)
    assert summary["prompts_equal_lm_eval_doc_to_text"] == EXAMPLES
    assert summary["max_abs_logprob_diff"] < 1e-4
    assert summary["hf"]["max_abs_logprob_diff_vs_medmoe"] < 1e-4
    assert summary["chosen_option_agreement"]["count"] == EXAMPLES
    assert summary["medmoe_acc_on_lm_eval_prompt"] == pytest.approx(results["acc,none"])
    assert summary["lm_eval_acc_recomputed"] == pytest.approx(results["acc,none"])
    golds = [row["gold"] for row in summary["per_example"]]
    assert golds == [("yes", "no", "maybe").index(row["final_decision"]) for row in rows]
    assert golds == [r.gold_indices[0] for r in records]


def test_medmcqa_rows_follow_the_hub_script():
    records = load_benchmark("dental", EXAMPLES).records
    rows = agreement.medmcqa_rows(records)
    assert [tuple(row) for row in rows] == [agreement.MEDMCQA_FIELDS] * EXAMPLES
    assert [row["cop"] for row in rows] == [r.gold_indices[0] for r in records]  # 0-based, as lm-eval's choices A-D
    assert [f"medmcqa/{row['id']}" for row in rows] == [r.id for r in records]
    assert all(row["subject_name"] == "Dental" for row in rows)
    prompt = agreement.SOURCES["medmcqa"].doc_to_text()(rows[0])
    assert prompt.startswith("Question: " + rows[0]["question"]) and prompt.endswith("D. " + rows[0]["opd"] + "\nAnswer:")

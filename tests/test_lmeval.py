"""lm-evaluation-harness integration: medmoe as an lm-eval model, and accuracy agreement.

A local task over bundled data (our prompts, exported verbatim) is scored by lm-eval's own `hf`
model and by medmoe's harness on the same tiny model: loglik accuracy must equal lm-eval's acc and
loglik-norm must equal acc_norm, example for example.
"""

import json

import pytest

lm_eval = pytest.importorskip("lm_eval")

from medmoe.eval.benchmarks import load_benchmark  # noqa: E402
from medmoe.eval.harness import evaluate  # noqa: E402
from medmoe.eval.model import load_eval_model  # noqa: E402
from tiny_lm import tiny_llama, tiny_tokenizer  # noqa: E402

LIMIT = 12


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    text = " ".join(r.question + " " + " ".join(r.options) for r in load_benchmark("dental", LIMIT).records)
    tokenizer = tiny_tokenizer(extra_text=text)
    tiny_llama(vocab=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def lm_eval_samples(model, model_args, task, include):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=model, model_args=model_args, tasks=[task], task_manager=TaskManager(include_path=str(include)),
                          device="cpu", batch_size=1, log_samples=True)
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return out["results"][task], samples


def test_option_likelihood_accuracy_equals_lm_eval(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from medmoe.eval.lmeval import export_task

    model = load_eval_model(str(tiny_dir))
    task = export_task("dental", tmp_path / "tasks", model.tokenizer, "text", LIMIT)
    ours = {}
    for rule in ("loglik", "loglik-norm"):
        result = evaluate(model, ["dental"], tmp_path / rule, rule, limit=LIMIT)
        ours[rule] = result["benchmarks"]["dental"]["accuracy"]
    rows = [json.loads(line) for line in (tmp_path / "loglik" / "dental" / "predictions.jsonl").read_text().splitlines()]

    hf_results, hf_samples = lm_eval_samples("hf", f"pretrained={tiny_dir}", task, tmp_path / "tasks")
    assert len(hf_samples) == LIMIT
    assert ours["loglik"] == pytest.approx(hf_results["acc,none"])
    assert ours["loglik-norm"] == pytest.approx(hf_results["acc_norm,none"])
    for row, sample in zip(rows, hf_samples):  # per example, per option
        theirs = [resp[0][0] for resp in sample["resps"]]
        assert list(row["scores"].values()) == pytest.approx(theirs, abs=1e-3)

    mm_results, _ = lm_eval_samples("medmoe", f"model={tiny_dir}", task, tmp_path / "tasks")
    assert mm_results["acc,none"] == pytest.approx(hf_results["acc,none"])
    assert mm_results["acc_norm,none"] == pytest.approx(hf_results["acc_norm,none"])

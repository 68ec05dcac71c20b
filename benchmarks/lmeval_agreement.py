"""lm-eval's own `pubmedqa` and `medmcqa` tasks on medmoe's bundled data, against medmoe's scoring.

lm-evaluation-harness 0.4.13 loads these tasks from the Hugging Face hub (bigbio/pubmed_qa,
openlifescienceai/medmcqa), which is not reachable here. medmoe bundles the same upstream rows
(src/medmoe/data/bundled/*/SOURCE.md), so each task is run as a local task that is lm-eval's own
definition with only its data source changed. The local YAML is

    include: <site-packages>/lm_eval/tasks/<task>/<task>.yaml   # doc_to_text, doc_to_choice,
    task: <task>_bundled                                           #   doc_to_target, metrics: lm-eval's
    dataset_path: json
    dataset_name: null
    dataset_kwargs: {data_files: {<its test_split>: <rows>.jsonl}}
    training_split: null    # (and pubmedqa's validation_split) no bundled rows; zero-shot never reads them

lm-eval's loader merges an included file under the local keys, and resolves the included file's
`!function preprocess_pubmedqa.doc_to_text` / `utils_medmcqa.doc_to_text` next to that file: the
installed lm-eval code builds every prompt. The rows are the hub dataset's rows, made the way its
loading script makes them from the same upstream files:
  pubmedqa  bigbio/pubmed_qa, config pubmed_qa_labeled_fold0_source, split test (= pqal_test_set.json,
            the official 500 PMIDs): the upstream ori_pqal.json row unchanged (QUESTION, CONTEXTS, LABELS,
            MESHES, YEAR, reasoning_required_pred, reasoning_free_pred, final_decision, LONG_ANSWER)
  medmcqa   openlifescienceai/medmcqa, split validation (= MedMCQA dev.json): the upstream row with
            cop = cop - 1 (0-based ClassLabel a-d) and exp = row.get("exp", ""); id, question,
            opa..opd, cop, choice_type, exp, subject_name, topic_name
The upstream rows are taken from the bundled files, not rebuilt from medmoe's Records: a Record
joins PubMedQA's CONTEXTS into one string (lm-eval joins them with newlines) and strips option text.

Examples: medmoe's fixed subsample (`medmoe eval --limit N`, sha256 order) of pubmedqa test and of
dental test (MedMCQA dev, subject Dental), so the same N questions are scored everywhere:
  1. lm-eval `simple_evaluate` with the `medmoe` model (medmoe.eval.lmeval), model_args
     model=NAME, batch_size 8, device cpu, log_samples: acc (and acc_norm where the task has it);
  2. with --hf, the same with lm-eval's own `hf` model on the same weights (off by default: on one
     CPU core it doubles the run; tests/test_lmeval.py and tests/test_lmeval_agreement.py check it);
  3. medmoe's scoring (`load_eval_model(NAME).score_options`) on lm-eval's prompt and options, read
     from each logged sample's request arguments (context, target_delimiter + choice);
  4. medmoe's own `medmoe eval` prompt (harness.evaluate, zero-shot; rules letter, the default, and
     loglik, lm-eval's acc rule) on the same ids: a different prompt (SmolLM2-Instruct gets its chat
     template there), so its accuracy may differ and is shown beside the others, not compared.

  OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/lmeval_agreement.py --model smollm2-135m \\
      --examples 100 --threads 1 [--hf]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_report  # reports/<name>.md + .json naming command, machine, date
from medmoe.data.datasets import bundled_dir
from medmoe.data.readers import read_json
from medmoe.data.record import LETTERS, Record
from medmoe.errors import MedmoeError

PUBMEDQA_FIELDS = ("QUESTION", "CONTEXTS", "LABELS", "MESHES", "YEAR", "reasoning_required_pred", "reasoning_free_pred",
                   "final_decision", "LONG_ANSWER")  # bigbio/pubmed_qa source schema (its _info)
MEDMCQA_FIELDS = ("id", "question", "opa", "opb", "opc", "opd", "cop", "choice_type", "exp", "subject_name", "topic_name")
DATA_NOTES = {"medmcqa": ": MedMCQA dev rows of subject Dental, i.e. hub validation rows with subject_name Dental"}
OWN_RULES = ("letter", "loglik")  # medmoe's own prompt: medmoe eval's default rule, and lm-eval's acc rule


def lm_eval_tasks_dir() -> Path:
    """The installed lm_eval/tasks folder (the task files this benchmark includes)."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent


def pubmedqa_rows(records: Sequence[Record]) -> list[dict[str, Any]]:
    """bigbio/pubmed_qa `pubmed_qa_labeled_fold0_source` rows: its script yields the PQA-L row as is."""
    raw = read_json(bundled_dir() / "pubmedqa" / "ori_pqal.json")
    rows = []
    for record in records:
        row = raw[record.metadata["pmid"]]
        if row["final_decision"] != record.options[record.gold_indices[0]]:
            raise MedmoeError(f"{record.id}: bundled final_decision {row['final_decision']!r} differs from the record's answer")
        rows.append({key: row[key] for key in PUBMEDQA_FIELDS})
    return rows


def medmcqa_rows(records: Sequence[Record]) -> list[dict[str, Any]]:
    """openlifescienceai/medmcqa rows: its script sets cop = cop - 1 (0-based) and exp = row.get("exp", "")."""
    path = bundled_dir() / "dental" / "medmcqa_dev_dental.jsonl"
    raw = {row["id"]: row for row in map(json.loads, path.read_text(encoding="utf-8").splitlines())}
    rows = []
    for record in records:
        row = dict(raw[record.id.removeprefix("medmcqa/")])
        row["cop"] = int(row.get("cop", 0)) - 1
        row["exp"] = row.get("exp", "")
        if LETTERS[row["cop"]] != record.answer:
            raise MedmoeError(f"{record.id}: bundled cop {row['cop']} (0-based) differs from the record's answer {record.answer}")
        rows.append({key: row[key] for key in MEDMCQA_FIELDS})
    return rows


@dataclass(frozen=True)
class TaskSource:
    """One lm-eval task and the bundled rows it is run on.

    task:    lm-eval's task name (lm_eval/tasks/<task>/<task>.yaml)
    benchmark: the medmoe benchmark whose fixed subsample is scored
    split:   the task's test_split: the one split given a data file
    nulled:  split keys of the task set to null (no bundled rows for them)
    hub:     where lm-eval would load the rows from
    module:  the task's Python file with doc_to_text
    rows:    Records -> hub-schema rows
    """

    task: str
    benchmark: str
    split: str
    nulled: tuple[str, ...]
    hub: str
    module: str
    rows: Callable[[Sequence[Record]], list[dict[str, Any]]]

    @property
    def yaml(self) -> Path:
        return lm_eval_tasks_dir() / self.task / f"{self.task}.yaml"

    @property
    def local_name(self) -> str:
        return f"{self.task}_bundled"

    def doc_to_text(self) -> Callable[[dict[str, Any]], str]:
        """lm-eval's own doc_to_text, imported from the installed task file."""
        return importlib.import_module(f"lm_eval.tasks.{self.task}.{self.module}").doc_to_text


SOURCES = {
    "pubmedqa": TaskSource("pubmedqa", "pubmedqa", "test", ("training_split", "validation_split"),
                           "bigbio/pubmed_qa (pubmed_qa_labeled_fold0_source), split test", "preprocess_pubmedqa", pubmedqa_rows),
    "medmcqa": TaskSource("medmcqa", "dental", "validation", ("training_split",),
                          "openlifescienceai/medmcqa, split validation", "utils_medmcqa", medmcqa_rows),
}


def write_local_task(source: TaskSource, records: Sequence[Record], folder: Path) -> Path:
    """folder/<task>_bundled.{jsonl,yaml}: lm-eval's task over the records' hub rows; returns the YAML."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{source.local_name}.jsonl"
    with data.open("w", encoding="utf-8") as sink:
        for row in source.rows(records):
            sink.write(json.dumps(row, ensure_ascii=False) + "\n")
    lines = [f"# lm-eval's own task {source.task}; only the data source is changed (was {source.hub})",
             f"include: {json.dumps(str(source.yaml))}", f"task: {source.local_name}", "dataset_path: json",
             "dataset_name: null", "dataset_kwargs:", "  data_files:", f"    {source.split}: {json.dumps(str(data.resolve()))}"]
    lines += [f"{key}: null" for key in source.nulled]
    path = folder / f"{source.local_name}.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_lm_eval(model: Any, model_args: str | None, task_yaml: Path, batch_size: int = 8) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(lm-eval's results for the task, its logged samples by doc_id) from simple_evaluate on the YAML file."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import medmoe.eval.lmeval  # noqa: F401  (registers the `medmoe` model)

    out = simple_evaluate(model=model, model_args=model_args, tasks=[str(task_yaml)], task_manager=TaskManager(include_defaults=False),
                          device="cpu", batch_size=batch_size, log_samples=True)
    if out is None:
        raise MedmoeError(f"lm-eval returned no results for {task_yaml}")
    (name,) = out["results"]
    return out["results"][name], sorted(out["samples"][name], key=lambda s: s["doc_id"])


def sample_request(sample: dict[str, Any]) -> tuple[str, list[str]]:
    """(context, continuations) of a logged multiple_choice sample: one request per choice, one context."""
    contexts = {context for context, _ in sample["arguments"]}
    if len(contexts) != 1:
        raise MedmoeError(f"sample {sample['doc_id']}: the choices have {len(contexts)} different contexts")
    return contexts.pop(), [continuation for _, continuation in sample["arguments"]]


def sample_gold(sample: dict[str, Any], choices: Sequence[str]) -> int:
    """lm-eval's gold index: doc_to_target is an index (medmcqa's cop) or the choice text (pubmedqa's final_decision)."""
    target = sample["target"]
    return choices.index(target) if isinstance(target, str) else int(target)


def argmax(values: Sequence[float]) -> int:
    """The first maximum (numpy's argmax, lm-eval's rule)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def compare(eval_model: Any, source: TaskSource, samples: Sequence[dict[str, Any]], delimiter: str = " ",
            reference: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    """medmoe's score_options on each sample's own context and continuations, against lm-eval's.

    reference: another lm-eval run's samples (the `hf` model) to compare with as well."""
    doc_to_text = source.doc_to_text()
    per_example = []
    for n, sample in enumerate(samples):
        context, continuations = sample_request(sample)
        choices = [c.removeprefix(delimiter) for c in continuations]
        theirs = [float(resp[0][0]) for resp in sample["resps"]]  # (log-likelihood, is_greedy) per choice
        ours = eval_model.score_options(context, continuations).logprobs
        gold = sample_gold(sample, choices)
        lengths = [len(c) for c in choices]
        row = {"doc_id": sample["doc_id"], "gold": gold, "lm_eval_choice": argmax(theirs), "medmoe_choice": argmax(ours),
               "lm_eval_norm_choice": argmax([lp / k for lp, k in zip(theirs, lengths)]),
               "medmoe_norm_choice": argmax([lp / k for lp, k in zip(ours, lengths)]),
               "lm_eval_logprobs": theirs, "medmoe_logprobs": ours,
               "prompt_is_lm_evals": context == doc_to_text(sample["doc"]) and all(c.startswith(delimiter) for c in continuations),
               "lm_eval_acc": float(sample["acc"])}
        if reference is not None:
            other = reference[n]
            if other["doc_id"] != sample["doc_id"] or [list(a) for a in other["arguments"]] != [list(a) for a in sample["arguments"]]:
                raise MedmoeError(f"doc {sample['doc_id']}: the two lm-eval runs scored different requests")
            row["hf_logprobs"] = [float(resp[0][0]) for resp in other["resps"]]
            row["hf_choice"] = argmax(row["hf_logprobs"])
        per_example.append(row)
    return summarize(per_example)


def max_diff(rows: Sequence[dict[str, Any]], a: str, b: str) -> float:
    return max(abs(x - y) for row in rows for x, y in zip(row[a], row[b]))


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracies, per-example agreement of the chosen option and the largest log-likelihood difference."""
    n = len(rows)
    share = lambda count: count / n  # noqa: E731
    agree = sum(r["lm_eval_choice"] == r["medmoe_choice"] for r in rows)
    agree_norm = sum(r["lm_eval_norm_choice"] == r["medmoe_norm_choice"] for r in rows)
    summary: dict[str, Any] = {
        "examples": n,
        "prompts_equal_lm_eval_doc_to_text": sum(r["prompt_is_lm_evals"] for r in rows),
        "lm_eval_acc_from_samples": share(sum(r["lm_eval_acc"] for r in rows)),
        "lm_eval_acc_recomputed": share(sum(r["lm_eval_choice"] == r["gold"] for r in rows)),
        "medmoe_acc_on_lm_eval_prompt": share(sum(r["medmoe_choice"] == r["gold"] for r in rows)),
        "medmoe_acc_norm_on_lm_eval_prompt": share(sum(r["medmoe_norm_choice"] == r["gold"] for r in rows)),
        "chosen_option_agreement": {"count": agree, "share": share(agree)},
        "chosen_option_agreement_norm": {"count": agree_norm, "share": share(agree_norm)},
        "max_abs_logprob_diff": max_diff(rows, "lm_eval_logprobs", "medmoe_logprobs"),
        "per_example": rows,
    }
    if "hf_logprobs" in rows[0]:
        agree_hf = sum(r["hf_choice"] == r["medmoe_choice"] for r in rows)
        summary["hf"] = {"acc_recomputed": share(sum(r["hf_choice"] == r["gold"] for r in rows)),
                         "chosen_option_agreement_with_medmoe": {"count": agree_hf, "share": share(agree_hf)},
                         "max_abs_logprob_diff_vs_medmoe": max_diff(rows, "hf_logprobs", "medmoe_logprobs"),
                         "max_abs_logprob_diff_vs_medmoe_lm_eval_model": max_diff(rows, "hf_logprobs", "lm_eval_logprobs")}
    return summary


def own_prompt_accuracy(eval_model: Any, benchmark: str, limit: int, folder: Path, ids: Sequence[str],
                        rules: Sequence[str] = OWN_RULES) -> dict[str, float]:
    """medmoe's own prompt (`medmoe eval`, zero-shot) on the same fixed subsample: accuracy per rule."""
    from medmoe.eval.harness import evaluate

    accuracy = {}
    for rule in rules:
        result = evaluate(eval_model, [benchmark], folder / rule, rule, limit=limit, bertscorer=lambda language: None)
        scored = [json.loads(line)["id"] for line in (folder / rule / benchmark / "predictions.jsonl").read_text().splitlines()]
        if sorted(scored) != sorted(ids):
            raise MedmoeError(f"{benchmark}: medmoe eval scored other examples than the lm-eval task")
        accuracy[rule] = result["benchmarks"][benchmark]["accuracy"]
    return accuracy


def run_task(source: TaskSource, model_name: str, limit: int, folder: Path, eval_model: Any, with_hf: bool) -> dict[str, Any]:
    from medmoe.eval.benchmarks import load_benchmark
    from medmoe.models import resolve

    records = load_benchmark(source.benchmark, limit).records
    task_yaml = write_local_task(source, records, folder / "tasks")
    seconds = {}
    start = time.perf_counter()
    results, samples = run_lm_eval("medmoe", f"model={model_name}", task_yaml)
    seconds["lm_eval_medmoe_model"] = time.perf_counter() - start
    print(source.task, {k: v for k, v in results.items() if k.startswith("acc")}, flush=True)
    reference = None
    hf_results = None
    if with_hf:
        start = time.perf_counter()
        hf_results, reference = run_lm_eval("hf", f"pretrained={resolve(model_name)},dtype=float32", task_yaml)
        seconds["lm_eval_hf_model"] = time.perf_counter() - start
    start = time.perf_counter()
    summary = compare(eval_model, source, samples, reference=reference)
    seconds["medmoe_score_options"] = time.perf_counter() - start
    summary["lm_eval"] = {k: v for k, v in results.items() if k.split(",")[0] in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr")}
    if hf_results is not None:
        summary["hf"]["lm_eval"] = {k: v for k, v in hf_results.items() if k.split(",")[0] in ("acc", "acc_norm")}
    start = time.perf_counter()
    summary["own_prompt_accuracy"] = own_prompt_accuracy(eval_model, source.benchmark, limit, folder / "own", [r.id for r in records])
    seconds["medmoe_own_prompt"] = time.perf_counter() - start
    summary["seconds"] = seconds
    summary["ids"] = [r.id for r in records]
    summary["task_files"] = {"yaml": str(source.yaml.relative_to(lm_eval_tasks_dir().parent.parent)),
                             "python": f"lm_eval/tasks/{source.task}/{source.module}.py", "local_yaml": task_yaml.read_text()}
    summary["data"] = {"hub": source.hub, "benchmark": source.benchmark, "split_given_a_file": source.split, "nulled": list(source.nulled)}
    return summary


def shown_paths(text: str) -> str:
    """A local YAML with machine-specific folders shortened: <site-packages>/lm_eval/..., <tmp>/...."""
    text = text.replace(str(lm_eval_tasks_dir().parent.parent), "<site-packages>")
    return text.replace(tempfile.gettempdir(), "<tmp>")


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown(report: dict[str, Any], model: str, limit: int) -> str:
    lines = [f"lm-eval {report['lm_eval_version']}'s own tasks, run offline on medmoe's bundled copy of the same upstream rows; "
             f"{model}, zero-shot, the first {limit} examples of medmoe's fixed subsample (`medmoe eval --limit {limit}`).", "",
             "| task (examples) | lm-eval acc | lm-eval acc_norm | `hf` acc | medmoe acc, lm-eval prompt | medmoe acc_norm, lm-eval prompt "
             "| same chosen option | max abs log-lik diff | medmoe own prompt: " + " / ".join(OWN_RULES) + " |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, task in report["tasks"].items():
        agree = task["chosen_option_agreement"]
        own = task["own_prompt_accuracy"]
        hf = task.get("hf", {}).get("lm_eval", {})
        has_norm = "acc_norm,none" in task["lm_eval"]
        lines.append(f"| {name} ({task['examples']}) | {fmt(task['lm_eval']['acc,none'])} | {fmt(task['lm_eval'].get('acc_norm,none'))} "
                     f"| {fmt(hf.get('acc,none'))} | {fmt(task['medmoe_acc_on_lm_eval_prompt'])} "
                     f"| {fmt(task['medmoe_acc_norm_on_lm_eval_prompt']) if has_norm else '-'} "
                     f"| {agree['count']}/{task['examples']} ({agree['share']:.0%}) | {task['max_abs_logprob_diff']:.2e} "
                     "| " + " / ".join(fmt(own.get(rule)) for rule in OWN_RULES) + " |")
    lines += ["", "* lm-eval acc / acc_norm: `simple_evaluate(model=\"medmoe\", model_args=\"model=" + model + "\", batch_size=8, "
              "device=\"cpu\", log_samples=True)`. `hf` acc: the same task with lm-eval's own `hf` model on the same weights.",
              "* medmoe on lm-eval's prompt: `load_eval_model(...).score_options(context, continuations)` with each logged sample's "
              "own request arguments; same chosen option and max abs log-likelihood difference are per example and per option "
              "against the `medmoe` lm-eval model's log-likelihoods.",
              "* medmoe own prompt: `medmoe eval` (harness.evaluate, zero-shot) on the same ids; a different prompt (medmoe's "
              "instruction, SmolLM2-Instruct's chat template, options without the leading space), so its accuracy may differ "
              "and is not an agreement check.", ""]
    for name, task in report["tasks"].items():
        hf = task.get("hf")
        lines += [f"## {name}", "",
                  f"* Task files used (unchanged): `{task['task_files']['yaml']}` and `{task['task_files']['python']}` (its doc_to_text).",
                  f"* Data: lm-eval reads {task['data']['hub']} from the hub; here the rows come from `src/medmoe/data/bundled` "
                  f"(benchmark `{task['data']['benchmark']}` test{DATA_NOTES.get(name, '')}), written in that hub dataset's row schema.",
                  f"* Changed, only the data source: `dataset_path: json`, `dataset_name: null`, `dataset_kwargs.data_files` "
                  f"(split `{task['data']['split_given_a_file']}`), " + ", ".join(f"`{k}: null`" for k in task["data"]["nulled"])
                  + " (no bundled rows; a zero-shot run never reads them), and the task name. The local YAML:", "",
                  "```yaml", shown_paths(task["task_files"]["local_yaml"]).strip(), "```", "",
                  f"* Prompts equal to lm-eval's doc_to_text(doc): {task['prompts_equal_lm_eval_doc_to_text']}/{task['examples']}; "
                  f"lm-eval's acc recomputed from its per-option log-likelihoods: {fmt(task['lm_eval_acc_recomputed'])}.",
                  f"* acc_norm choice agreement: {task['chosen_option_agreement_norm']['count']}/{task['examples']}."]
        if hf:
            lines.append(f"* `hf` model: same chosen option as medmoe {hf['chosen_option_agreement_with_medmoe']['count']}/{task['examples']}; "
                         f"max abs log-likelihood difference vs medmoe's score_options {hf['max_abs_logprob_diff_vs_medmoe']:.2e}, "
                         f"vs the `medmoe` lm-eval model {hf['max_abs_logprob_diff_vs_medmoe_lm_eval_model']:.2e}.")
        lines.append("* Wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in task["seconds"].items()) + ".")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--examples", type=int, default=100, help="per task: the first N of medmoe's fixed subsample")
    parser.add_argument("--tasks", default="pubmedqa,medmcqa")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hf", action="store_true", help="also run lm-eval's own hf model on the same weights")
    parser.add_argument("--report", default="lmeval_agreement", help="reports/<name>.{md,json}")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval

    from medmoe.eval.model import load_eval_model

    eval_model = load_eval_model(args.model)
    folder = Path(tempfile.mkdtemp(prefix="medmoe-lmeval-agreement-"))
    tasks = {}
    for name in args.tasks.split(","):
        tasks[name] = run_task(SOURCES[name], args.model, args.examples, folder / name, eval_model, args.hf)
        print(name, {k: v for k, v in tasks[name].items() if k not in ("per_example", "ids", "task_files")}, flush=True)
    report = {"model": args.model, "examples": args.examples, "lm_eval_version": lm_eval.__version__, "tasks": tasks}
    title = f"lm-eval's own pubmedqa and medmcqa tasks vs medmoe ({args.model}, {args.examples} examples per task)"
    return write_report(args.report, title, markdown(report, args.model, args.examples), report)


if __name__ == "__main__":
    print(main())

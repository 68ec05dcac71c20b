"""Reproducibility and lm-evaluation-harness agreement on a real model.

1. Reproducibility: the same eval run twice (separate output folders, same process) must give
   identical predictions and identical per-option scores.
2. Agreement: a local lm-eval task with medmoe's prompts over the same fixed subsample; lm-eval's own
   `hf` model gives acc / acc_norm, medmoe's harness gives loglik / loglik-norm accuracy. The chat
   template is switched off for this check (lm-eval's multiple_choice joins prompt and option with a
   space, which is medmoe's plain prompt style).

  PYTHONPATH=src python benchmarks/agreement.py --model smollm2-135m --examples 10
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
from pathlib import Path

import torch

from medmoe.eval.harness import evaluate
from medmoe.eval.model import HFEvalModel, load_eval_model
from medmoe.models import resolve


def rows_of(folder: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (folder / name / "predictions.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--benchmark", default="dental")
    parser.add_argument("--examples", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="reports/agreement")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    tmp = Path(tempfile.mkdtemp(prefix="medmoe-agreement-"))
    model = load_eval_model(args.model)
    no_score = lambda language: None  # noqa: E731  (option benchmarks only)

    repro = {}
    for rule in ("letter", "loglik"):
        runs = []
        for i in (1, 2):
            evaluate(model, [args.benchmark], tmp / f"{rule}-{i}", rule, limit=args.examples, bertscorer=no_score)
            runs.append(rows_of(tmp / f"{rule}-{i}", args.benchmark))
        same_pred = all(a["prediction"] == b["prediction"] for a, b in zip(*runs))
        same_scores = all(a["scores"] == b["scores"] for a, b in zip(*runs))
        repro[rule] = {"examples": len(runs[0]), "identical_predictions": same_pred, "identical_scores": same_scores}
        print(rule, repro[rule], flush=True)

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from medmoe.eval.lmeval import export_task

    model.tokenizer.chat_template = None
    plain = HFEvalModel(model.model, model.tokenizer, args.model + " (plain prompts)")
    task = export_task(args.benchmark, tmp / "tasks", plain.tokenizer, "text", args.examples)
    ours = {}
    for rule in ("loglik", "loglik-norm"):
        result = evaluate(plain, [args.benchmark], tmp / f"plain-{rule}", rule, limit=args.examples, bertscorer=no_score)
        ours[rule] = result["benchmarks"][args.benchmark]["accuracy"]
    out = simple_evaluate(model="hf", model_args=f"pretrained={resolve(args.model)},dtype=float32", tasks=[task],
                          task_manager=TaskManager(include_path=str(tmp / "tasks")), device="cpu", batch_size=1, log_samples=True)
    theirs = out["results"][task]
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    ours_rows = rows_of(tmp / "plain-loglik", args.benchmark)
    max_diff = max(abs(a - r[0][0]) for row, s in zip(ours_rows, samples) for a, r in zip(row["scores"].values(), s["resps"]))
    agreement = {"examples": len(samples), "medmoe_loglik_acc": ours["loglik"], "lm_eval_acc": theirs["acc,none"],
                 "medmoe_loglik_norm_acc": ours["loglik-norm"], "lm_eval_acc_norm": theirs["acc_norm,none"],
                 "max_abs_option_logprob_diff": max_diff}
    print(agreement, flush=True)

    import lm_eval

    meta = {"command": f"PYTHONPATH=src python benchmarks/agreement.py --model {args.model} --benchmark {args.benchmark} "
                       f"--examples {args.examples} --threads {args.threads}",
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.platform()}, 2 shared CPU cores, torch {torch.__version__}, CPU, lm-eval {lm_eval.__version__}"}
    Path(args.out + ".json").write_text(json.dumps(meta | {"reproducibility": repro, "lm_eval_agreement": agreement}, indent=2) + "\n")
    lines = [f"# Reproducibility and lm-eval agreement ({args.model}, {args.benchmark}, fixed subsample of {args.examples})", "",
             f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}  ", f"Date: {meta['date']}", "",
             "## Two runs of the same eval", "", "| rule | examples | identical predictions | identical per-option scores |",
             "|---|---|---|---|"]
    lines += [f"| {r} | {v['examples']} | {v['identical_predictions']} | {v['identical_scores']} |" for r, v in repro.items()]
    lines += ["", "## medmoe vs lm-evaluation-harness (`hf` model), same prompts and data", "",
              "| metric | medmoe | lm-eval |", "|---|---|---|",
              f"| accuracy, summed log-likelihood (loglik / acc) | {agreement['medmoe_loglik_acc']:.4f} | {agreement['lm_eval_acc']:.4f} |",
              f"| accuracy, per-character normalized (loglik-norm / acc_norm) | {agreement['medmoe_loglik_norm_acc']:.4f} | {agreement['lm_eval_acc_norm']:.4f} |",
              "", f"Largest per-option log-likelihood difference: {max_diff:.2e}."]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""The quality report: every answering system on the full test splits, beside the best constant answer.

  PYTHONPATH=src python benchmarks/quality.py run --benchmarks pubmedqa,dental [--dtype bfloat16]
  PYTHONPATH=src python benchmarks/quality.py report

`run` (per benchmark; resumable: the expert's features are cached per record, heads train in seconds):
  1. the benchmark's training pool (medmoe.data.pools: every train/dev record the splits allow, never
     a test question) and its full test split;
  2. the expert's features of both (one forward pass per question: hidden states + its own answer);
  3. heads chosen by 5-fold cross-validation on the pool only (medmoe.heads.fit): zero-shot,
     calibrated (per-option bias, or contextual calibration), head on hidden states, and the head with
     retrieval features (nearest training questions, medmoe.heads.retrieval) when an encoder exists;
  4. each system's test predictions -> runs/quality/<benchmark>/<expert>/predictions.jsonl, and the chosen
     heads -> runs/quality/<benchmark>/<expert>/heads/<family>/ (loadable with `medmoe eval --head`).
A benchmark may be run with several experts (`--expert`); the report lists every expert's systems,
named "<expert> <family>".
`report` reads every benchmark's results and writes reports/quality.md and reports/quality.json:
  {"benchmarks": {NAME: {"n", "best_constant": {"answer", "accuracy", "macro_f1"},
                         "systems": {SYSTEM: {"accuracy", "macro_f1", "ci95", "diff_vs_constant_ci95", "deployed"}}}}}
Intervals: 95% bootstrap over test questions (1,000 resamples, seed 0); the difference to the constant
is paired (the same resampled questions for both). Multi-answer questions (CMExam) count as wrong for
every single-letter system, the constant included; `cmexam-single` is the single-answer subset.

CMExam also lists the SparseDoctor adapters on Qwen's top 4 blocks when benchmarks/loramoe_cmexam.py has
scored them on the whole test split (runs/loramoe_cmexam/{loramoe,lora}.jsonl; its report has their
training budgets): systems "qwen2.5-coder-1.5b LoRA-MoE (top 4 blocks)" and "... PEFT LoRA (top 4
blocks)", in fp32 (the dtype they were trained in), with no CV column (nothing is chosen on the pool).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

RUNS = Path("runs/quality")
TOP_BLOCK_RUNS = Path("runs/loramoe_cmexam")  # benchmarks/loramoe_cmexam.py: adapters scored over cached lower-block states
TOP_BLOCK_SYSTEMS = {"loramoe": "LoRA-MoE (top 4 blocks)", "lora": "PEFT LoRA (top 4 blocks)"}  # its file -> family
EXPERTS = {  # benchmark -> (expert, what it is)
    "pubmedqa": "smollm2-135m",
    "dental": "smollm2-135m",
    "cmexam": "qwen2.5-coder-1.5b",
    "cmmlu-med": "qwen2.5-coder-1.5b",
}


def _letters_of(records: list, predictions: list[int]) -> list[str]:
    return [r.letters[p] for r, p in zip(records, predictions)]


def run(args: argparse.Namespace) -> None:
    import torch

    from medmoe.data import load_dataset
    from medmoe.data.pools import training_pool
    from medmoe.eval.benchmarks import subsample
    from medmoe.eval.model import HFEvalModel
    from medmoe.heads.fit import option_inputs, predict
    from medmoe.heads.train import RETRIEVAL_FEATURES, expert_features, retrieval_extra, train_heads
    from medmoe.models import load_causal_lm
    from medmoe.models.head import save_head
    from medmoe.paths import atomic_write_json

    torch.set_num_threads(args.threads)
    for name in args.benchmarks.split(","):
        expert = args.expert or EXPERTS[name]
        start = time.time()
        pool = training_pool(name)
        if args.pool_limit:
            pool = sorted(pool, key=lambda r: __import__("hashlib").sha256(r.id.encode()).hexdigest())[: args.pool_limit]
        test = subsample(load_dataset(name, "test"), args.test_limit)  # a partial run: the fixed sha256 subsample
        model, tokenizer = load_causal_lm(expert, dtype=getattr(torch, args.dtype))
        lm = HFEvalModel(model, tokenizer, expert, share_prefix=False)
        features = expert_features(lm, expert, test)  # first: the longest part, cached for a resumed run
        extra, retrieval = (None, None) if args.no_retrieval else retrieval_extra(name, pool)
        heads, candidates = train_heads(lm, expert, name, pool, extra=extra, extra_names=RETRIEVAL_FEATURES,
                                        retrieval=retrieval)
        folder = RUNS / name / expert
        systems: dict[str, list[str]] = {}
        for family, trained in heads.items():
            uses_extra = family == "head+retrieval" and extra is not None
            f, present = option_inputs(features, trained.head.letters, extra(test) if uses_extra and extra is not None else None)
            h = None if trained.config.layer is None else features.pooled(trained.config.layer, trained.config.pooling or "last")
            systems[family] = _letters_of(test, predict(trained.head, h, f, present).tolist())
            save_head(trained.head, trained.config, folder / "heads" / family)
        # the server's default (heads/bundled.py): the CV-best family without retrieval features
        deployed = max((f for f in heads if f != "head+retrieval"), key=lambda f: heads[f].candidate.accuracy)
        if args.bundle:
            from medmoe.heads.bundled import BUNDLED_HEADS

            save_head(heads[deployed].head, heads[deployed].config, BUNDLED_HEADS / expert / name)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "predictions.jsonl", "w", encoding="utf-8") as out:
            for i, record in enumerate(test):
                row = {"id": record.id, "gold": record.answer, "multi_answer": len(record.answer) > 1,
                       **{s: p[i] for s, p in systems.items()}}
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
        atomic_write_json(folder / "run.json", {
            "benchmark": name, "expert": expert, "dtype": args.dtype, "pool": len(pool), "test": len(test),
            "test_split": len(load_dataset(name, "test")), "deployed": deployed, "bundled": args.bundle,
            "systems": {family: {"chosen": t.candidate.name, "cv_accuracy": t.candidate.accuracy,
                                 "config": t.config.selection | {"candidates": None}}
                        for family, t in heads.items()},
            "candidates": [{"name": c.name, "kind": c.kind, "cv_accuracy": c.accuracy} for c in candidates],
            "cpu_seconds_wall": time.time() - start,
        })
        print(f"{name}: {len(test)} test, pool {len(pool)}, " + ", ".join(
            f"{s} {sum(p == r.answer for p, r in zip(ps, test)) / len(test):.3f}" for s, ps in systems.items()), flush=True)


def summarize(name: str, rows: list[dict[str, Any]], systems: list[str], deployed: str | None) -> dict[str, Any]:
    from medmoe.eval.metrics import best_constant, bootstrap_mean, macro_f1, paired_difference

    gold = [r["gold"] for r in rows]
    labels = sorted({g for g in gold if len(g) == 1})
    answer, accuracy = best_constant(gold)
    constant_correct = [float(g == answer) for g in gold]
    out: dict[str, Any] = {"n": len(rows), "best_constant": {
        "answer": answer, "accuracy": accuracy, "macro_f1": macro_f1(gold, [answer] * len(gold), labels)}, "systems": {}}
    for system in systems:
        pred = [r[system] for r in rows]
        correct = [float(p == g) for p, g in zip(pred, gold)]
        _, diff_ci = paired_difference(correct, constant_correct)
        out["systems"][system] = {
            "accuracy": sum(correct) / len(correct), "macro_f1": macro_f1(gold, pred, labels),
            "ci95": list(bootstrap_mean(correct)), "diff_vs_constant_ci95": list(diff_ci),
            "deployed": system == deployed,
        }
    return out


def deployed_system(run_info: dict[str, Any]) -> str | None:
    """What the server answers this benchmark's questions with by default: its model's bundled head
    when the benchmark's expert is the server's default model; None when another model answers them
    by default (the expert's heads are then used only with `medmoe serve --model EXPERT`)."""
    from medmoe.serve.config import ServeConfig

    if run_info["expert"] != ServeConfig().model:
        return None
    return run_info["deployed"] if run_info.get("bundled") else "zero-shot"


def load_run(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    run_info = json.loads((folder / "run.json").read_text(encoding="utf-8"))
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    return run_info, rows


def merge_runs(name: str, runs: list[tuple[dict[str, Any], list[dict[str, Any]]]]
               ) -> tuple[list[dict[str, Any]], list[str], str | None, dict[str, Any]]:
    """One benchmark's runs (one per expert) on the same test questions -> rows with a column per
    "<expert> <family>", those system names, the deployed one, and the runs' details."""
    ids = [r["id"] for r in runs[0][1]]
    merged = [{"id": r["id"], "gold": r["gold"], "multi_answer": r["multi_answer"]} for r in runs[0][1]]
    systems: list[str] = []
    deployed = None
    details: dict[str, Any] = {"test": runs[0][0]["test"], "test_split": runs[0][0]["test_split"], "experts": {}, "systems": {}}
    for run_info, rows in runs:
        expert = run_info["expert"]
        if [r["id"] for r in rows] != ids:
            raise SystemExit(f"runs/quality/{name}: the {expert} run answered other test questions than "
                             f"{runs[0][0]['expert']}'s (rerun both with the same --test-limit)")
        for family, chosen in run_info["systems"].items():
            system = f"{expert} {family}"
            systems.append(system)
            details["systems"][system] = {**chosen, "expert": expert, "family": family}
            for row, out in zip(rows, merged):
                out[system] = row[family]
        if deployed_system(run_info) is not None:
            deployed = f"{expert} {deployed_system(run_info)}"
        details["experts"][expert] = {k: run_info[k] for k in ("dtype", "pool", "deployed", "bundled", "cpu_seconds_wall", "candidates")
                                      if k in run_info}
    return merged, systems, deployed, details


def add_top_block_adapters(name: str, rows: list[dict[str, Any]], systems: list[str], details: dict[str, Any]) -> None:
    """Add the CMExam columns of the adapters benchmarks/loramoe_cmexam.py scored (TOP_BLOCK_SYSTEMS), when
    their rows cover exactly these test questions; in place."""
    from medmoe.eval.runner import read_done

    if name != "cmexam":
        return
    for stem, family in TOP_BLOCK_SYSTEMS.items():
        path = TOP_BLOCK_RUNS / f"{stem}.jsonl"
        if not path.is_file():
            continue
        scored = read_done(path)  # by id; a torn last line left out
        if set(scored) != {r["id"] for r in rows}:
            print(f"{path}: {len(scored)} rows, not the {len(rows)} questions of runs/quality/{name}; left out", flush=True)
            continue
        info = json.loads(path.with_suffix(".json").read_text(encoding="utf-8")).get("settings", {})
        expert = info.get("model", EXPERTS[name])
        system = f"{expert} {family}"
        systems.append(system)
        details["systems"][system] = {"chosen": f"adapter {info.get('adapter')} ({info.get('dtype')})", "cv_accuracy": None,
                                      "expert": expert, "family": family}
        for row in rows:
            row[system] = scored[row["id"]]["prediction"]


def report(args: argparse.Namespace) -> None:
    from common import write_report

    benchmarks: dict[str, Any] = {}
    details: dict[str, Any] = {}
    for bench in sorted(p for p in RUNS.iterdir() if p.is_dir()):
        runs = [load_run(folder) for folder in sorted(bench.iterdir()) if (folder / "predictions.jsonl").is_file()]
        if not runs:
            continue
        rows, systems, deployed, run_info = merge_runs(bench.name, runs)
        add_top_block_adapters(bench.name, rows, systems, run_info)
        benchmarks[bench.name] = summarize(bench.name, rows, systems, deployed)
        for system, row in benchmarks[bench.name]["systems"].items():
            row |= {"expert": run_info["systems"][system]["expert"], "family": run_info["systems"][system]["family"]}
        details[bench.name] = run_info
        if bench.name == "cmexam":
            single = [r for r in rows if not r["multi_answer"]]
            benchmarks["cmexam-single"] = summarize("cmexam-single", single, systems, deployed)
            for system, row in benchmarks["cmexam-single"]["systems"].items():
                row |= {"expert": run_info["systems"][system]["expert"], "family": run_info["systems"][system]["family"]}
            details["cmexam-single"] = {**run_info, "subset": "the single-answer questions"}
    lines = ["`deployed`: what `medmoe serve` answers option questions with by default on a fresh install (its "
             "model is smollm2-135m, whose bundled heads answer English yes/no/maybe and 4-option questions; once "
             "the main job has written its router, plain `medmoe serve` serves the routed MambaFormer system "
             "instead). Every Qwen row's deployed family is bundled too and answers by default under "
             "`medmoe serve --model qwen2.5-coder-1.5b` (a 7.1 GB on-demand model, not in the default setup). "
             "The main job and `medmoe ask` (the routed MambaFormer system) still answer with the experts' own "
             "scores.", "",
             "Every system answers from one forward pass of its expert over the zero-shot prompt; heads and "
             "calibrations are chosen by 5-fold cross-validation on the training pool only (no test question "
             "is seen). `diff vs constant` is the paired-bootstrap 95% interval of accuracy minus the best "
             "constant answer's; a system beats the floor when its lower end is above 0.", ""]
    for name, b in benchmarks.items():
        info = details[name]
        c = b["best_constant"]
        partial = ""
        if info["test"] < info["test_split"]:
            partial = f"; PARTIAL: a fixed subsample of {info['test']} of {info['test_split']} test questions"
        if info.get("subset"):
            partial += f"; {info['subset']}"
        experts = "; ".join(f"{e} ({x['dtype']}, training pool {x['pool']})" for e, x in info["experts"].items())
        lines += [f"## {name} (n = {b['n']}{partial}; experts: {experts})", "",
                  f"Best constant answer: '{c['answer']}', accuracy {c['accuracy']:.3f}, macro-F1 {c['macro_f1']:.3f}.", "",
                  "| system | chosen by CV on the pool | CV accuracy | accuracy [95% CI] | macro-F1 | diff vs constant [95% CI] | deployed |",
                  "|---|---|---|---|---|---|---|"]
        for system, s in b["systems"].items():
            chosen = info["systems"][system]
            lo, hi = s["diff_vs_constant_ci95"]
            cv = "" if chosen["cv_accuracy"] is None else f"{chosen['cv_accuracy']:.3f}"
            lines.append(f"| {system} | {chosen['chosen']} | {cv} | {s['accuracy']:.3f} "
                         f"[{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}] | {s['macro_f1']:.3f} | "
                         f"{s['accuracy'] - c['accuracy']:+.3f} [{lo:+.3f}, {hi:+.3f}] | {'yes' if s['deployed'] else ''} |")
        lines.append("")
    write_report("quality", "Quality: every system beside the best constant answer (full test splits)",
                 "\n".join(lines), {"benchmarks": benchmarks, "runs": details})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train and score every system on the named benchmarks")
    r.add_argument("--benchmarks", default="pubmedqa,dental,cmexam,cmmlu-med")
    r.add_argument("--expert", default=None, help="override the benchmark's expert (EXPERTS)")
    r.add_argument("--dtype", default="bfloat16", help="the expert's dtype for its forward passes")
    r.add_argument("--pool-limit", type=int, default=None, help="a fixed sha256-ordered subset of the pool")
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--no-retrieval", action="store_true", help="skip the head with retrieval features")
    r.add_argument("--test-limit", type=int, default=None, help="only N test questions, the fixed sha256 subsample (a partial run, marked so in the report)")
    r.add_argument("--bundle", action="store_true", help="write the deployed head into src/medmoe/heads/bundled/<expert>/<benchmark>/")
    sub.add_parser("report", help="write reports/quality.md and .json from runs/quality")
    args = parser.parse_args()
    (run if args.command == "run" else report)(args)


if __name__ == "__main__":
    main()

"""SparseDoctor results table: base zero-shot vs PEFT LoRA (same trainable budget) vs LoRA-MoE
without contrastive loss vs without queue vs the full method, on several test sets, one run.

Bounded CPU runs: each variant trains on the first --train-limit training examples of each
--train-data set (mixed), for --steps steps; every test set is the fixed sha256 subsample of
`medmoe eval --limit` (NAME:LIMIT, 0 = all), stated in the report. Evaluation is `medmoe eval`'s
harness (zero-shot, letter rule; CMB-Clin generated and scored with ROUGE-L and BERTScore), so every
number comes with its example count and a 95% bootstrap interval, and the per-example predictions
stay in --workdir. The full method's routing analytics (expert load per layer, specialisation per
--routing-groups group) are plotted next to the report.

    # English: SmolLM2-135M on PubMedQA + Dental
    PYTHONPATH=src python benchmarks/loramoe_results.py --base smollm2-135m --train-data pubmedqa,dental \
        --eval pubmedqa:200 --eval dental:200 --name loramoe_results_en
    # Chinese: Gemma-3-270M on CMExam, CMMLU-Med (per subject), CMB-Clin
    PYTHONPATH=src python benchmarks/loramoe_results.py --base gemma3-270m --train-data cmexam --steps 25 \
        --eval cmexam:100 --eval cmmlu-med:108 --eval cmb-clin:12 --routing-data cmmlu-med \
        --routing-groups subject --name loramoe_results_zh
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _loramoe_common import constant_answer
from common import write_report

REPORTS = Path(__file__).resolve().parents[1] / "reports"
VARIANTS = {
    "lora": {},
    "loramoe_no_contrastive": {"contrastive_kind": "none", "contrastive_weight": 0.0},
    "loramoe_no_queue": {"queue_size": 0},
    "loramoe_full": {},
}


def matched_lora_rank(base, moe_params: int) -> int:
    """PEFT LoRA rank whose trainable count matches the LoRA-MoE adapter's (same target linears)."""
    from medmoe.loramoe.model import find_target_linears

    width = sum(base.get_submodule(n).in_features + base.get_submodule(n).out_features for n in find_target_linears(base, "all-linear"))
    return max(1, round(moe_params / width))


def mixed_examples(specs: list[str], tokenizer, limit: int, seed: int = 0, with_explanation: bool = False) -> list:
    """The first `limit` training examples of each set, shuffled together with a fixed seed."""
    from medmoe.train.data import load_examples

    examples = [e for spec in specs for e in load_examples(spec, tokenizer, with_explanation=with_explanation)[:limit]]
    random.Random(seed).shuffle(examples)
    return examples


def evaluate(model, tokenizer, name: str, spec: str, folder: Path) -> dict:
    """One test set through the `medmoe eval` harness; the summary with its example count."""
    from medmoe.eval.benchmarks import load_benchmark
    from medmoe.eval.harness import evaluate as harness_evaluate
    from medmoe.eval.model import HFEvalModel

    bench, _, limit = spec.partition(":")
    limit = int(limit) if limit and int(limit) > 0 else None
    lm = HFEvalModel(model, tokenizer, name)
    summary = harness_evaluate(lm, [bench], folder / bench, rule="letter", limit=limit, batch_size=8)["benchmarks"][bench]
    summary["test_size"] = len(load_benchmark(bench).records)
    return summary


def cell(s: dict) -> str:
    n = f"({s['examples']}/{s['test_size']})"
    if "accuracy" in s:
        return f"{s['accuracy']:.3f} [{s['accuracy_ci'][0]:.3f}, {s['accuracy_ci'][1]:.3f}] {n}"
    return f"R-L {s['rouge_l']:.3f} [{s['rouge_l_ci'][0]:.3f}, {s['rouge_l_ci'][1]:.3f}], BS {s['bertscore_f1']:.3f} {n}"


def headline(s: dict) -> float:
    """The number averaged across test sets: accuracy, or ROUGE-L for open questions."""
    return s["accuracy"] if "accuracy" in s else s["rouge_l"]


def report_lines(args, results: dict, meta: dict) -> list[str]:
    sets = [e.partition(":")[0] for e in args.eval]
    lines = [(f"Base `{args.base}`. Each trained variant: the first {args.train_limit} training examples of each of "
             f"`{args.train_data}` (train splits, shuffled together"
             f"{'; completions: the answer, then the explanation' if args.with_explanations else ''}), {args.steps} steps of batch {args.batch_size} x "
             f"accumulation {args.grad_accum}, lr {args.lr}, max length {args.max_length}, seed {args.seed}. Test sets: the fixed "
             f"sha256 subsamples of `medmoe eval --limit` ({', '.join(args.eval)}; 0 = all). Zero-shot, letter rule "
             "(CMB-Clin: generated, ROUGE-L and BERTScore). 95% bootstrap intervals; (n evaluated / test split size).\n"),
             "| variant | trainable params | train s | " + " | ".join(sets) + " | mean |",
             "| --- | ---: | ---: | " + " | ".join("---" for _ in sets) + " | ---: |"]
    for variant, by_set in results.items():
        mean = sum(headline(s) for s in by_set.values()) / len(by_set)
        lines.append(f"| {variant} | {meta[variant]['trainable_params']:,} | {meta[variant].get('train_s', 0):.0f} | "
                     + " | ".join(cell(s) for s in by_set.values()) + f" | {mean:.3f} |")
    constant = [constant_answer(e) for e in args.eval]
    if any(constant):
        lines.append("| best constant answer (the most frequent gold answer, always) | 0 | 0 | "
                     + " | ".join(f"{c[0]:.3f}" if c else "-" for c in constant) + " | |")
    grouped = [b for b in sets if "per_group" in next(iter(results.values()))[b]]
    for bench in grouped:
        groups = list(next(iter(results.values()))[bench]["per_group"])
        lines += [f"\n### {bench} per subject (accuracy; macro = mean over subjects)\n",
                  "| variant | " + " | ".join(groups) + " | macro |", "| --- | " + " | ".join("---:" for _ in groups) + " | ---: |"]
        for variant, by_set in results.items():
            s = by_set[bench]
            lines.append(f"| {variant} | " + " | ".join(f"{s['per_group'][g]['accuracy']:.3f} ({s['per_group'][g]['examples']})" for g in groups)
                         + f" | {s['macro_accuracy']:.3f} |")
    if "lora" in results and "loramoe_full" in results:
        full, lora = results["loramoe_full"], results["lora"]
        wins = [b for b in sets if headline(full[b]) >= headline(lora[b])]
        mean_gap = sum(headline(full[b]) - headline(lora[b]) for b in sets) / len(sets)
        met = len(wins) == len(sets) and mean_gap > 0
        lines.append(f"\nTarget (full method >= PEFT LoRA on every test set and better on average): "
                     f"{'met' if met else 'NOT met'}. Full >= LoRA on {len(wins)}/{len(sets)} sets "
                     f"({', '.join(wins) or 'none'}); mean difference {mean_gap:+.3f}. Differences smaller than "
                     "the intervals are not evidence either way.")
    return lines


def routing_plot(model, tokenizer, args) -> dict:
    """The full method's routing analytics, plotted as reports/<name>_routing.png."""
    from medmoe.data import load_dataset
    from medmoe.loramoe.analytics import plot_routing, record_groups, routing_profile

    datasets = {name: load_dataset(name, split="test") for name in args.routing_data.split(",")}
    profile = routing_profile(model, tokenizer, record_groups(datasets, args.routing_groups, per_group=40), max_length=256)
    plot_routing(profile, REPORTS / f"{args.name}_routing.png")
    return profile.to_dict()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--train-data", default="pubmedqa,dental", help="comma-separated bundled datasets (train splits) or files")
    p.add_argument("--eval", action="append", default=None, help="NAME[:LIMIT] test set of `medmoe eval`; repeatable")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--max-length", type=int, default=320)
    p.add_argument("--train-limit", type=int, default=200, help="training examples per --train-data set")
    p.add_argument("--with-explanations", action="store_true",
                   help="completions go on with each record's explanation (as `medmoe finetune --with-explanations`)")
    p.add_argument("--variants", default=",".join(["base", *VARIANTS]))
    p.add_argument("--routing-data", default="pubmedqa,dental", help="test sets whose texts the routing plot groups")
    p.add_argument("--routing-groups", default="dataset", help="'dataset' or a metadata field (CMMLU: subject)")
    p.add_argument("--seed", type=int, default=0, help="seed of the adapter's initialisation, the data order and the mix of training sets")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="loramoe_results_en")
    p.add_argument("--workdir", default="runs/loramoe_results")
    args = p.parse_args()
    args.eval = args.eval or ["pubmedqa:200", "dental:200"]
    torch.set_num_threads(args.threads)

    from medmoe.models import load_causal_lm
    from medmoe.train.finetune import FinetuneConfig, finetune

    work = Path(args.workdir) / args.name
    results, meta, routing = {}, {}, None
    moe_params = None
    for variant in args.variants.split(","):
        model, tokenizer = load_causal_lm(args.base)
        meta[variant] = {"train_examples": 0, "steps": 0, "trainable_params": 0}
        if variant != "base":
            start = time.time()
            examples = mixed_examples(args.train_data.split(","), tokenizer, args.train_limit, seed=args.seed,
                                    with_explanation=args.with_explanations)
            method = "lora" if variant == "lora" else "loramoe"
            cfg = FinetuneConfig(method=method, output=str(work / variant), steps=args.steps, batch_size=args.batch_size,
                                 grad_accum=args.grad_accum, lr=args.lr, max_length=args.max_length, eval_examples=0,
                                 save_every=max(10, args.steps // 3), warmup_steps=max(1, args.steps // 10),
                                 seed=args.seed, loramoe=VARIANTS.get(variant, {}))
            if method == "lora":
                if moe_params is None:  # budget of the default LoRA-MoE adapter on this base
                    from medmoe.loramoe import LoraMoeConfig, LoraMoeModel

                    probe, _ = load_causal_lm(args.base)
                    moe_params = LoraMoeModel(probe, LoraMoeConfig()).trainable_parameter_count()
                    del probe
                cfg.lora_rank = matched_lora_rank(model, moe_params)
            model = finetune(cfg, model, tokenizer, train_examples=examples)["model"]
            meta[variant] = {"train_examples": len(examples), "steps": args.steps, "train_s": round(time.time() - start, 1),
                             "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                             **({"lora_rank": cfg.lora_rank} if method == "lora" else {})}
        model.eval()
        results[variant] = {e.partition(":")[0]: evaluate(model, tokenizer, variant, e, work / variant) for e in args.eval}
        print(variant, json.dumps({b: round(headline(s), 4) for b, s in results[variant].items()}), flush=True)
        if variant == "loramoe_full":
            routing = routing_plot(model, tokenizer, args)

    lines = report_lines(args, results, meta)
    if routing:
        lines.append(f"\nRouting analytics of the full method (40 test texts per group of `{args.routing_data}` by "
                     f"{args.routing_groups}): `reports/{args.name}_routing.png`; shares in the JSON report.")
    path = write_report(args.name, f"SparseDoctor results ({args.base})", "\n".join(lines),
                        {"args": vars(args), "results": results, "runs": meta, "routing": routing})
    print("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

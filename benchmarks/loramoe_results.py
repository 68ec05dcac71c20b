"""SparseDoctor results table: base zero-shot vs PEFT LoRA (same trainable budget) vs LoRA-MoE
without contrastive loss vs without queue vs the full method, on a dataset's test split.

Bounded CPU runs: training uses the first --train-limit training examples for --steps steps and the
test split is subsampled to --eval-limit examples (both stated in the report). Every number comes
with its example count and a 95% bootstrap interval; per-example predictions go to JSONL.

    PYTHONPATH=src python benchmarks/loramoe_results.py --base smollm2-135m --train-data pubmedqa \
        --eval pubmedqa --eval pubmedqa:dental --steps 60 --train-limit 240 --eval-limit 200
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_report  # noqa: E402

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


def evaluate(model, tokenizer, dataset: str, limit: int, out: Path) -> dict:
    from medmoe.data import load_dataset
    from medmoe.eval.model import HFEvalModel
    from medmoe.eval.report import summarize_rows
    from medmoe.eval.runner import run_records

    records = load_dataset(dataset, split="test")
    subset = records[:limit] if limit else records
    rows = run_records(HFEvalModel(model, tokenizer, out.parent.name), subset, out, f"{dataset} ({out.parent.name})")
    s = summarize_rows(rows)
    return {"examples": s["examples"], "test_size": len(records), "accuracy": s["accuracy"], "ci": list(s["accuracy_ci"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--train-data", default="pubmedqa", help="bundled dataset (train split) or file")
    p.add_argument("--eval", action="append", default=None, help="test sets (bundled names); repeatable")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--max-length", type=int, default=320)
    p.add_argument("--train-limit", type=int, default=240)
    p.add_argument("--eval-limit", type=int, default=200)
    p.add_argument("--variants", default=",".join(["base", *VARIANTS]))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="loramoe_results_en")
    p.add_argument("--workdir", default="runs/loramoe_results")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    evals = args.eval or ["pubmedqa"]

    from medmoe.train.base_models import load_base
    from medmoe.train.data import load_examples
    from medmoe.train.finetune import FinetuneConfig, finetune

    work = Path(args.workdir) / args.name
    results: dict[str, dict] = {}
    meta: dict[str, dict] = {}
    moe_params = None
    for variant in args.variants.split(","):
        model, tokenizer = load_base(args.base)
        start = time.time()
        if variant != "base":
            examples = load_examples(args.train_data, tokenizer)[: args.train_limit]
            method = "lora" if variant == "lora" else "loramoe"
            cfg = FinetuneConfig(method=method, output=str(work / variant), steps=args.steps, batch_size=args.batch_size,
                                 grad_accum=args.grad_accum, lr=args.lr, max_length=args.max_length, eval_examples=0,
                                 save_every=max(10, args.steps // 3), warmup_steps=max(1, args.steps // 10),
                                 loramoe=VARIANTS.get(variant, {}))
            if method == "lora":
                if moe_params is None:  # budget of the default LoRA-MoE adapter on this base
                    from medmoe.loramoe import LoraMoeConfig, LoraMoeModel

                    probe, _ = load_base(args.base)
                    moe_params = LoraMoeModel(probe, LoraMoeConfig()).trainable_parameter_count()
                    del probe
                cfg.lora_rank = matched_lora_rank(model, moe_params)
            model = finetune(cfg, model, tokenizer, train_examples=examples)["model"]
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            meta[variant] = {"train_examples": len(examples), "steps": args.steps, "trainable_params": trainable,
                             "train_s": round(time.time() - start, 1), **({"lora_rank": cfg.lora_rank} if method == "lora" else {})}
        else:
            meta[variant] = {"train_examples": 0, "steps": 0, "trainable_params": 0}
        model.eval()
        results[variant] = {d: evaluate(model, tokenizer, d, args.eval_limit, work / variant / f"pred_{d}.jsonl") for d in evals}
        print(variant, json.dumps(results[variant]), flush=True)

    lines = [f"Base `{args.base}`; training on the first {args.train_limit} examples of `{args.train_data}` (train split), "
             f"{args.steps} steps of batch {args.batch_size} x accumulation {args.grad_accum}, lr {args.lr}; "
             f"test sets subsampled to the first {args.eval_limit} examples (0 = all). Zero-shot option scoring.\n",
             "| variant | trainable params | " + " | ".join(f"{d} acc [95% CI] (n)" for d in evals) + " | mean |",
             "| --- | ---: | " + " | ".join("---" for _ in evals) + " | ---: |"]
    for variant, by_set in results.items():
        cells = [f"{r['accuracy']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] ({r['examples']}/{r['test_size']})" for r in by_set.values()]
        mean = sum(r["accuracy"] for r in by_set.values()) / len(by_set)
        lines.append(f"| {variant} | {meta[variant]['trainable_params']:,} | " + " | ".join(cells) + f" | {mean:.3f} |")
    path = write_report(args.name, f"SparseDoctor results ({args.base})", "\n".join(lines), {"args": vars(args), "results": results, "runs": meta})
    print("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

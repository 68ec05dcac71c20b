"""Quality and speed of distilled Mamba students against their Transformer teacher.

    PYTHONPATH=src python benchmarks/mamba_distill_eval.py --run runs/mamba-shallow --run runs/mamba-full

For the teacher (SmolLM2-135M-Instruct) and each run's latest checkpoint:
- held-out perplexity on PubMedQA **dev** contexts (never used in distillation), blocks of 256 tokens;
- zero-shot PubMedQA accuracy on the first --n-test questions of the official test split, scoring
  yes/no/maybe with medmoe.eval (chat prompt, option log-likelihood), with a 95% bootstrap interval;
- prefill latency of one 375-token input (the mean PubMedQA prompt length), models timed alternately,
  median of --repeats, 2 threads.
Writes reports/mamba_distill.{md,json} and per-question predictions to reports/mamba_distill_predictions.jsonl.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def zero_shot(model, tokenizer, records) -> list[dict]:
    from medmoe.eval.prompts import build_prompt
    from medmoe.eval.scoring import score_options

    rows = []
    for r in records:
        prompt = build_prompt(r, tokenizer)
        scores = score_options(model, tokenizer, prompt.context, prompt.continuations)
        pred = max(range(len(scores.logprobs)), key=scores.logprobs.__getitem__)
        rows.append({"id": r.id, "gold": r.options[r.gold_indices[0]], "pred": r.options[pred],
                     "logprobs": [round(x, 4) for x in scores.logprobs], "tokens": scores.context_tokens})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", default=[], help="distillation run folder (repeatable)")
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--ppl-blocks", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "mamba_distill")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from medmoe.data import load_dataset
    from medmoe.eval.metrics import accuracy, bootstrap_interval
    from medmoe.mamba.distill import latest_checkpoint, perplexity, tokenize_blocks
    from medmoe.mamba.transfer import load_hybrid
    from medmoe.models import load_causal_lm

    teacher, tokenizer = load_causal_lm(args.teacher)
    models = {"teacher (" + args.teacher + ")": (teacher, None)}
    for run in args.run:
        ckpt = latest_checkpoint(run)
        if ckpt is None:
            sys.exit(f"{run}: no checkpoint (latest.json missing)")
        student, _, spec = load_hybrid(ckpt)
        state = json.loads((ckpt / "trainer_state.json").read_text())
        models[Path(run).name] = (student, {"checkpoint": str(ckpt), "layers": spec.layers,
                                            "attention_layers": spec.attention_layers, "steps": state["step"],
                                            "train_seconds": state["history"][-1]["seconds"] if state["history"] else 0,
                                            "first_kl": state["history"][0]["kl"] if state["history"] else None,
                                            "last_kl": state["history"][-1]["kl"] if state["history"] else None,
                                            "tokens_seen": state["step"] * state["config"]["batch_size"] * state["config"]["seq_len"]})
    dev_blocks = tokenize_blocks([r.context for r in load_dataset("pubmedqa", split="dev") if r.context],
                                 tokenizer, 256)[: args.ppl_blocks]
    test = load_dataset("pubmedqa", split="test")[: args.n_test]
    ids375 = tokenizer(" ".join(r.context for r in test[:3]), add_special_tokens=False)["input_ids"][:375]
    x375 = torch.tensor([ids375])

    with torch.no_grad():  # latency first: alternate the models, warm-up each
        for m, _ in models.values():
            m(input_ids=x375, use_cache=False)
        lat = {k: [] for k in models}
        for _ in range(args.repeats):
            for k, (m, _) in models.items():
                t0 = time.perf_counter()
                m(input_ids=x375, use_cache=False)
                lat[k].append(time.perf_counter() - t0)
    results, predictions = [], []
    teacher_lat = statistics.median(next(iter(lat.values())))
    for name, (model, meta) in models.items():
        ppl = perplexity(model, dev_blocks)
        rows = zero_shot(model, tokenizer, test)
        gold, pred = [r["gold"] for r in rows], [r["pred"] for r in rows]
        lo, hi = bootstrap_interval(accuracy, gold, pred)
        med = statistics.median(lat[name])
        results.append({"model": name, **(meta or {}), "heldout_ppl": ppl, "pubmedqa_acc": accuracy(gold, pred),
                        "pubmedqa_acc_ci95": [lo, hi], "n_test": len(rows), "prefill_375_s": med,
                        "speedup_vs_teacher_375": teacher_lat / med,
                        "pred_counts": {o: pred.count(o) for o in ("yes", "no", "maybe")}})
        predictions += [{"model": name, **r} for r in rows]
        print(json.dumps(results[-1]), flush=True)
        write(args, results, predictions, len(dev_blocks) * 256)  # after every model: a cut-short run still reports


def write(args, results, predictions, ppl_tokens) -> None:
    meta = {"command": "PYTHONPATH=src python benchmarks/mamba_distill_eval.py " + " ".join(sys.argv[1:]),
            "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, threads={args.threads}",
            "load_average": round(os.getloadavg()[0], 1), "torch": torch.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    with open(args.out.parent / (args.out.name + "_predictions.jsonl"), "w") as fh:
        for p in predictions:
            fh.write(json.dumps(p) + "\n")
    lines = ["# Distilled Mamba experts vs their teacher", "",
             f"Command: `{meta['command']}`  ", f"Date: {meta['date_utc']}; machine: {meta['machine']}; torch {meta['torch']}; "
             f"1-minute load average {meta['load_average']} (shared machine).", "",
             f"Held-out perplexity: PubMedQA dev contexts, {ppl_tokens:,} tokens in 256-token blocks (never trained on). "
             f"Zero-shot PubMedQA: first {results[0]['n_test']} questions of the official test split, yes/no/maybe scored "
             "by option log-likelihood after the chat template (medmoe.eval), 95% bootstrap interval. "
             "Prefill: one 375-token input, models timed alternately, median.", "",
             "| model | layers (Mamba / attention) | distillation | held-out ppl | PubMedQA acc [95% CI] | predicted yes/no/maybe | prefill 375 tok (s) | speed vs teacher |",
             "|---|---|---|---:|---:|---|---:|---:|"]
    for r in results:
        if "layers" in r:
            n_att = len(r["attention_layers"])
            layers = f"{len(r['layers']) - n_att} / {n_att}"
            dist = (f"{r['steps']} steps, {r['tokens_seen']:,} tokens, {r['train_seconds'] / 60:.1f} min; "
                    f"KL {r['first_kl']:.2f} → {r['last_kl']:.2f}") if r["steps"] else "none (transfer initialisation only)"
        else:
            layers, dist = "0 / 30 (Transformer)", "—"
        c = r["pred_counts"]
        lines.append(f"| {r['model']} | {layers} | {dist} | {r['heldout_ppl']:.2f} | {r['pubmedqa_acc']:.3f} "
                     f"[{r['pubmedqa_acc_ci95'][0]:.3f}, {r['pubmedqa_acc_ci95'][1]:.3f}] | {c['yes']}/{c['no']}/{c['maybe']} | "
                     f"{r['prefill_375_s']:.3f} | {r['speedup_vs_teacher_375']:.2f}x |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

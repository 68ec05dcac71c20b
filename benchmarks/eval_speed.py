"""Option-scoring throughput: medmoe's scoring vs a naive full forward pass per option.

  naive   for each option: one forward over prompt + option, sum the option tokens' log-probs
          (what a harness without prefix sharing does; the reference the tests pin us to)
  medmoe  HFEvalModel.score_options: the prompt once, all options over its KV cache, and the
          few-shot prefix reused across questions

Both score the same questions (dental, fixed subsample) with the same model and thread count, timed
alternately (naive, medmoe, naive, ...) after a warm-up; the ratio of medians is quoted.

  PYTHONPATH=src python benchmarks/eval_speed.py --model smollm2-135m --examples 3 --repeats 5
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from medmoe.eval.benchmarks import load_benchmark
from medmoe.eval.model import HFEvalModel, load_eval_model
from medmoe.eval.prompts import build_prompt
from medmoe.eval.scoring import bos_ids, encode_pair

CONFIGS = (("dental", 0, "text"), ("dental", 0, "letter"), ("dental", 5, "letter"))


@torch.inference_mode()
def naive_scores(model, tokenizer, context, continuations):
    out = []
    for continuation in continuations:
        ctx, cont = encode_pair(tokenizer, context, continuation)
        ids = torch.tensor([bos_ids(tokenizer, ctx) + ctx + cont])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, -len(cont) - 1:-1].float(), dim=-1)  # (m, V)
        out.append(logp.gather(-1, torch.tensor(cont)[:, None]).sum().item())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--examples", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="reports/eval_speed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_eval_model(args.model)
    rows = []
    for name, shots, kind in CONFIGS:
        bench = load_benchmark(name, args.examples)
        prompts = [build_prompt(r, loaded.tokenizer, bench.shots_for(r, shots), kind) for r in bench.records]
        ours = HFEvalModel(loaded.model, loaded.tokenizer, args.model)  # a fresh prefix cache per config

        def run_naive(prompts=prompts):  # bound explicitly: this iteration's prompts (and model below)
            return [naive_scores(loaded.model, loaded.tokenizer, p.context, p.continuations) for p in prompts]

        def run_ours(prompts=prompts, ours=ours):
            ours.prefix = type(ours.prefix)()  # start cold each repeat: the first question pays for the shots
            return [ours.score_options(p.context, p.continuations).logprobs for p in prompts]

        reference, fast = run_naive(), run_ours()  # warm-up, and the agreement check
        max_diff = max(abs(a - b) for ra, rb in zip(reference, fast) for a, b in zip(ra, rb))
        times = {"naive": [], "medmoe": []}
        for _ in range(args.repeats):
            for label, fn in (("naive", run_naive), ("medmoe", run_ours)):
                start = time.perf_counter()
                fn()
                times[label].append(time.perf_counter() - start)
        naive_s, ours_s = statistics.median(times["naive"]), statistics.median(times["medmoe"])
        n_opts = sum(len(p.continuations) for p in prompts)
        rows.append({"benchmark": name, "shots": shots, "continuations": kind, "questions": len(prompts), "options": n_opts,
                     "mean_prompt_chars": sum(len(p.context) for p in prompts) / len(prompts),
                     "naive_s": naive_s, "medmoe_s": ours_s, "speedup": naive_s / ours_s,
                     "naive_options_per_s": n_opts / naive_s, "medmoe_options_per_s": n_opts / ours_s,
                     "max_abs_logprob_diff": max_diff, "times": times})
        print(rows[-1], flush=True)
    meta = {"command": f"PYTHONPATH=src python benchmarks/eval_speed.py --model {args.model} --examples {args.examples} "
                       f"--repeats {args.repeats} --threads {args.threads}",
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.platform()}, 2 shared CPU cores (other jobs running), torch {torch.__version__}, CPU",
            "model": args.model}
    Path(args.out).parent.mkdir(exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(meta | {"rows": rows}, indent=2) + "\n")
    lines = [f"# Option scoring throughput: medmoe vs naive per-option forward ({args.model})", "",
             f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}  ", f"Date: {meta['date']}", "",
             "Timed alternately (naive, medmoe, ...) after a warm-up; medians of the repeats. "
             "`continuations`: letter = option letters (one token), text = option texts (several tokens).", "",
             "| benchmark | shots | continuations | questions | options | naive (s) | medmoe (s) | speedup | max abs log-prob diff |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['benchmark']} | {r['shots']} | {r['continuations']} | {r['questions']} | {r['options']} | "
                     f"{r['naive_s']:.2f} | {r['medmoe_s']:.2f} | {r['speedup']:.2f}x | {r['max_abs_logprob_diff']:.1e} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""The server's two engines on the same model and prompts: llama.cpp (the GGUF, Q4_1) against torch (fp32).

    PYTHONPATH=src python benchmarks/llamacpp_vs_torch.py        # writes reports/llamacpp_vs_torch.{md,json,jsonl}

Both engines serve SmolLM2-135M-Instruct from the same bundled GGUF file: torch dequantized to float32
(`CausalLMAnswerer`, without option heads, as `heads: none`), llama.cpp as it is stored
(`LlamaCppAnswerer`: Q4_1 weights, Q8 activations in the dot products), each on `--threads` CPU threads.
Each question goes through the answerer as the server sends it (`fit`, then `answer_batch` of one record),
timed around both calls.

  (a) scoring: the first `--questions` PubMedQA test questions, each answered by both engines in turn
      (ABBA order, one question at a time, after one warm-up question each): accuracy of each with the best
      constant answer beside it and the paired-bootstrap 95% interval of llama.cpp - torch, how often the
      answers agree and the largest option-probability gap, p50 / p95 latency per question and the ratios
      torch / llama.cpp (of the p50s, and the median of the per-question ratios).
  (b) generation: `--prompts` open prompts (the PubMedQA test questions without context or options),
      `--new-tokens` new tokens, greedy, in the same alternating order: tokens per second of each (tokens
      generated / time, prompt evaluation included) and their ratio, and how often the two texts agree.

The llama.cpp answerer keeps the KV cache of the previous prompt's common prefix (the chat header and the
instruction, `reuse_prefix`, as the server runs it); `--no-reuse-prefix` measures it without.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from common import write_report

NAME = "llamacpp_vs_torch"
ENGINES = ("torch", "llama.cpp")


def answer(answerer: Any, record: Any) -> tuple[Any, float]:
    """(Answer, milliseconds) for one record, fitted and answered as the server does it."""
    start = time.perf_counter()
    fitted, _ = answerer.fit(record)
    result = answerer.answer_batch([fitted])[0]
    return result, (time.perf_counter() - start) * 1000


def alternate(engines: dict[str, Any], records: list) -> list[dict[str, Any]]:
    """Each record answered by every engine, which goes first alternating per record (ABBA)."""
    rows = []
    for i, record in enumerate(records):
        row: dict[str, Any] = {"id": record.id, "gold": record.answer}
        for name in ENGINES if i % 2 == 0 else ENGINES[::-1]:
            result, ms = answer(engines[name], record)
            row[name] = {"answer": result.answer, "ms": ms, "label_scores": result.label_scores,
                         "completion_tokens": result.completion_tokens}
        rows.append(row)
    return rows


def scoring_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    from medmoe.eval.metrics import best_constant, bootstrap_mean, paired_difference, percentile

    gold = [r["gold"] for r in rows]
    correct = {e: [float(r[e]["answer"] == r["gold"]) for r in rows] for e in ENGINES}
    constant, constant_accuracy = best_constant(gold)
    difference, interval = paired_difference(correct["llama.cpp"], correct["torch"])
    ms = {e: [r[e]["ms"] for r in rows] for e in ENGINES}
    gaps = [max(abs(r["llama.cpp"]["label_scores"][k] - p) for k, p in r["torch"]["label_scores"].items()) for r in rows]
    return {
        "questions": len(rows),
        "accuracy": {e: sum(correct[e]) / len(rows) for e in ENGINES},
        "accuracy_interval": {e: bootstrap_mean(correct[e]) for e in ENGINES},
        "best_constant": {"answer": constant, "accuracy": constant_accuracy},
        "difference_llamacpp_minus_torch": difference, "difference_interval": interval,
        "agreement": sum(r["llama.cpp"]["answer"] == r["torch"]["answer"] for r in rows) / len(rows),
        "max_probability_gap": max(gaps), "median_probability_gap": statistics.median(gaps),
        "p50_ms": {e: percentile(ms[e], 50) for e in ENGINES}, "p95_ms": {e: percentile(ms[e], 95) for e in ENGINES},
        "ratio_p50_torch_over_llamacpp": percentile(ms["torch"], 50) / percentile(ms["llama.cpp"], 50),
        "ratio_median_per_question": statistics.median(t / c for t, c in zip(ms["torch"], ms["llama.cpp"])),
    }


def generation_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    rates = {e: [r[e]["completion_tokens"] / (r[e]["ms"] / 1000) for r in rows] for e in ENGINES}
    total = {e: sum(r[e]["completion_tokens"] for r in rows) / sum(r[e]["ms"] / 1000 for r in rows) for e in ENGINES}
    return {
        "prompts": len(rows),
        "tokens_per_s_median": {e: statistics.median(rates[e]) for e in ENGINES},
        "tokens_per_s_total": total,
        "mean_completion_tokens": {e: statistics.mean(r[e]["completion_tokens"] for r in rows) for e in ENGINES},
        "ratio_total_llamacpp_over_torch": total["llama.cpp"] / total["torch"],
        "ratio_median_per_prompt": statistics.median(c / t for c, t in zip(rates["llama.cpp"], rates["torch"])),
        "texts_agree": sum(r["llama.cpp"]["answer"] == r["torch"]["answer"] for r in rows) / len(rows),
    }


def llama_build() -> dict[str, str]:
    """llama-cpp-python's version and the CPU features its llama.cpp was built with (AVX512, AMX, ...)."""
    import llama_cpp

    return {"version": llama_cpp.__version__, "system_info": llama_cpp.llama_print_system_info().decode().strip()}


def markdown(args: argparse.Namespace, s: dict[str, Any], g: dict[str, Any], load: dict[str, float],
             build: dict[str, str]) -> str:
    lo, hi = s["difference_interval"]
    lines = [
        f"SmolLM2-135M-Instruct from the bundled GGUF: torch float32 (dequantized) against llama.cpp (Q4_1 as stored), "
        f"{args.threads} threads each, one request at a time, the engines alternating (ABBA). Load average (1 min) "
        f"{load['before']:.2f} before, {load['after']:.2f} after: a busy machine slows both; read the ratios.",
        "",
        f"## (a) {s['questions']} PubMedQA test questions, letter rule",
        "",
        "| engine | accuracy (95% CI) | p50 ms | p95 ms |",
        "| --- | ---: | ---: | ---: |",
    ]
    for e in ENGINES:
        low, high = s["accuracy_interval"][e]
        lines.append(f"| {e} | {s['accuracy'][e]:.3f} ({low:.3f}-{high:.3f}) | {s['p50_ms'][e]:.1f} | {s['p95_ms'][e]:.1f} |")
    lines += [
        f"| best constant ({s['best_constant']['answer']}) | {s['best_constant']['accuracy']:.3f} | | |",
        "",
        f"llama.cpp - torch accuracy: {s['difference_llamacpp_minus_torch']:+.3f} (paired bootstrap 95% CI {lo:+.3f} to {hi:+.3f}); "
        f"answers agree on {s['agreement']:.1%} of the questions; option probabilities differ by at most "
        f"{s['max_probability_gap']:.3f} (median {s['median_probability_gap']:.3f}).",
        f"Latency torch / llama.cpp (above 1: llama.cpp is faster): {s['ratio_p50_torch_over_llamacpp']:.2f} (p50s), "
        f"{s['ratio_median_per_question']:.2f} (median of the per-question ratios).",
        "",
        f"## (b) generation: {g['prompts']} open prompts, at most {args.new_tokens} new tokens, greedy",
        "",
        "| engine | tokens/s (total) | tokens/s (median per prompt) | mean tokens generated |",
        "| --- | ---: | ---: | ---: |",
    ]
    for e in ENGINES:
        lines.append(f"| {e} | {g['tokens_per_s_total'][e]:.1f} | {g['tokens_per_s_median'][e]:.1f} | "
                     f"{g['mean_completion_tokens'][e]:.1f} |")
    lines += [
        "",
        f"Tokens/s llama.cpp / torch (above 1: llama.cpp is faster): {g['ratio_total_llamacpp_over_torch']:.2f} (totals), "
        f"{g['ratio_median_per_prompt']:.2f} (median per prompt); the greedy texts agree on {g['texts_agree']:.0%} of the prompts.",
        f"llama.cpp reuses the previous prompt's common prefix: {args.reuse_prefix}. llama-cpp-python {build['version']}, "
        f"CPU features of its build: {build['system_info']}",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="a bundled model that ships as GGUF")
    p.add_argument("--questions", type=int, default=200, help="PubMedQA test questions scored (after one warm-up)")
    p.add_argument("--prompts", type=int, default=20, help="open prompts generated for")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--limit", type=int, default=None, help="at most this many questions and prompts (a quick check)")
    p.add_argument("--reuse-prefix", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--report-dir", type=Path, default=common.REPORTS, help="where the report goes [reports/]")
    args = p.parse_args()
    if args.limit is not None:
        args.questions, args.prompts = min(args.questions, args.limit), min(args.prompts, args.limit)

    import torch

    from medmoe.answer.causal_lm import CausalLMAnswerer
    from medmoe.answer.llamacpp import LlamaCppAnswerer
    from medmoe.data import load_dataset
    from medmoe.models import load_causal_lm

    torch.set_num_threads(args.threads)
    model, tokenizer = load_causal_lm(args.model, dtype=torch.float32)
    engines = {"torch": CausalLMAnswerer(model, tokenizer, name=args.model, max_new_tokens=args.new_tokens),
               "llama.cpp": LlamaCppAnswerer.load(args.model, max_new_tokens=args.new_tokens, threads=args.threads,
                                                  reuse_prefix=args.reuse_prefix)}
    test = load_dataset("pubmedqa", "test")
    questions = test[: args.questions + 1]
    prompts = [replace(r, id=f"{r.id}/open", context=None, options=(), answer="") for r in test[: args.prompts + 1]]
    for name in ENGINES:  # warm-up: the first question and prompt, not timed
        answer(engines[name], questions[0])
        answer(engines[name], prompts[0])

    load = {"before": os.getloadavg()[0]}
    scored = alternate(engines, questions[1:])
    print(f"scored {len(scored)} questions", flush=True)
    generated = alternate(engines, prompts[1:])
    load["after"] = os.getloadavg()[0]
    s, g = scoring_summary(scored), generation_summary(generated)

    common.REPORTS = args.report_dir  # write_report writes into common.REPORTS
    args.report_dir.mkdir(parents=True, exist_ok=True)
    with open(args.report_dir / f"{NAME}.jsonl", "w", encoding="utf-8") as out:
        for kind, rows in (("scoring", scored), ("generation", generated)):
            for row in rows:
                out.write(json.dumps({"part": kind, **row}, ensure_ascii=False) + "\n")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    build = llama_build()
    path = write_report(NAME, "Engines: llama.cpp against torch on SmolLM2-135M", markdown(args, s, g, load, build),
                        {"args": settings, "load": load, "llama_cpp": build, "scoring": s, "generation": g})
    print(path.read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()

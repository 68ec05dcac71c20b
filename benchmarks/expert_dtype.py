"""Per-question latency of each main-job expert in float32 and bfloat16, interleaved on the same questions.

    PYTHONPATH=src python benchmarks/expert_dtype.py --mamba PATH   # writes reports/expert_dtype.{md,json}

For each model (E_T SmolLM2-135M, the big baseline Gemma-3-270M, the Mamba hybrid E_M) both dtypes are
loaded side by side and score the same test questions exactly as `medmoe run` does (zero-shot letter
scores through `run_benchmark`'s prompt fitter and `apply_rule`), alternating which dtype goes first on
each question (ABBA), so a shared machine's load falls on both alike. Reported: each dtype's median
latency, the median and geometric mean of the per-question ratio bf16 / fp32 and the ratio of their
total times (what a run's wall time follows: long prompts weigh most) and of their process CPU
times (less sensitive to other processes taking the cores than wall time), whether the predicted
letters agree, and the 1-minute load average around each model's pairs. The first question warms each
model up (kernel compile, allocator) and is not timed. The hybrid in bfloat16 runs the unfused PyTorch
path (its fused CPU kernel is float32 only), loaded directly with `load_causal_lm`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_report


def score(model: Any, record: Any) -> tuple[str, float, float]:
    """(predicted letter, latency ms, process CPU ms) of one question, as the pipeline's `run_records` scores it."""
    from medmoe.eval.rules import CONTINUATIONS, apply_rule
    from medmoe.eval.window import PromptFitter

    cpu = time.process_time()
    fitted, _ = PromptFitter(model, CONTINUATIONS["letter"]).fit(record)
    outcome = apply_rule(model, [fitted], "letter", [()])[0]
    return outcome.prediction, outcome.latency_ms, (time.process_time() - cpu) * 1000


def pair(source: str, records: list, tokenizer: str | None) -> dict[str, Any]:
    import torch

    from medmoe.eval.model import HFEvalModel
    from medmoe.models import load_causal_lm

    models = {}
    for name in ("float32", "bfloat16"):
        network, tok = load_causal_lm(source, dtype=getattr(torch, name), tokenizer=tokenizer)
        models[name] = HFEvalModel(network, tok, f"{source} {name}")
    failed = None
    for name, model in list(models.items()):
        try:
            score(model, records[0])  # warm-up, not timed
        except RuntimeError as exc:  # a dtype the model's code cannot run in: time the other one alone
            failed = f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
            del models[name]
    order = list(models)
    rows = []
    load_before = os.getloadavg()[0]
    for i, record in enumerate(records[1:]):
        row = {"id": record.id, "gold": record.answer}
        for name in order if i % 2 == 0 else order[::-1]:
            row[f"{name}_pred"], row[f"{name}_ms"], row[f"{name}_cpu_ms"] = score(models[name], record)
        rows.append(row)
    result = {"source": source, "questions": len(rows), "load_before": load_before, "load_after": os.getloadavg()[0],
              "error": failed, "rows": rows}
    if failed:
        return {**result, "float32_p50_ms": statistics.median(r["float32_ms"] for r in rows),
                "float32_accuracy": sum(r["float32_pred"] == r["gold"] for r in rows) / len(rows)}
    ratios = [r["bfloat16_ms"] / r["float32_ms"] for r in rows]
    return {
        **result,
        "float32_p50_ms": statistics.median(r["float32_ms"] for r in rows),
        "bfloat16_p50_ms": statistics.median(r["bfloat16_ms"] for r in rows),
        "ratio_median": statistics.median(ratios), "ratio_geomean": statistics.geometric_mean(ratios),
        "ratio_total": sum(r["bfloat16_ms"] for r in rows) / sum(r["float32_ms"] for r in rows),
        "cpu_ratio_total": sum(r["bfloat16_cpu_ms"] for r in rows) / sum(r["float32_cpu_ms"] for r in rows),
        "agreement": sum(r["float32_pred"] == r["bfloat16_pred"] for r in rows) / len(rows),
        "float32_accuracy": sum(r["float32_pred"] == r["gold"] for r in rows) / len(rows),
        "bfloat16_accuracy": sum(r["bfloat16_pred"] == r["gold"] for r in rows) / len(rows),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="pubmedqa")
    p.add_argument("--questions", type=int, default=20, help="timed test questions (one more warms up)")
    p.add_argument("--transformer", default="smollm2-135m")
    p.add_argument("--big", default="gemma3-270m")
    p.add_argument("--mamba", required=True, help="the Mamba hybrid: a distill run or hybrid folder")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default="transformer,big,mamba", help="which of the three to time")
    args = p.parse_args()

    import torch

    from medmoe.data import load_dataset
    from medmoe.models import hybrid_folder
    from medmoe.models.placement import cpu_has_native_bf16

    torch.set_num_threads(args.threads)
    records = load_dataset(args.data, "test")[: args.questions + 1]
    hybrid = str(hybrid_folder(Path(args.mamba)) or args.mamba)
    sources = {"transformer": (args.transformer, None), "big": (args.big, None), "mamba": (hybrid, args.transformer)}
    results = {}
    for role in args.only.split(","):
        start = time.time()
        source, tokenizer = sources[role]
        results[role] = pair(source, records, tokenizer)
        r = results[role]
        if r["error"]:
            print(f"{role} {r['source']}: fp32 p50 {r['float32_p50_ms']:.0f} ms; {r['error']}", flush=True)
            continue
        print(f"{role} {r['source']}: fp32 p50 {r['float32_p50_ms']:.0f} ms, bf16 p50 {r['bfloat16_p50_ms']:.0f} ms, "
              f"ratio median {r['ratio_median']:.2f} (geomean {r['ratio_geomean']:.2f}, total {r['ratio_total']:.2f}, CPU time {r['cpu_ratio_total']:.2f}), agreement {r['agreement']:.2f}, "
              f"load {r['load_before']:.2f} -> {r['load_after']:.2f} ({time.time() - start:.0f} s)", flush=True)

    lines = ["| expert | model | fp32 p50 ms | bf16 p50 ms | bf16/fp32 per question (median, geomean) | bf16/fp32 total time | bf16/fp32 CPU time | answers agree | accuracy fp32 / bf16 | load avg 1 min |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for role, r in results.items():
        if r["error"]:
            lines.append(f"| {role} | {Path(r['source']).name} | {r['float32_p50_ms']:.0f} | fails | - | - | - | - | "
                         f"{r['float32_accuracy']:.2f} / - | {r['load_before']:.2f} -> {r['load_after']:.2f} |")
            continue
        lines.append(f"| {role} | {Path(r['source']).name} | {r['float32_p50_ms']:.0f} | {r['bfloat16_p50_ms']:.0f} | "
                     f"{r['ratio_median']:.2f}, {r['ratio_geomean']:.2f} | {r['ratio_total']:.2f} | {r['cpu_ratio_total']:.2f} | {r['agreement']:.2f} | "
                     f"{r['float32_accuracy']:.2f} / {r['bfloat16_accuracy']:.2f} | {r['load_before']:.2f} -> {r['load_after']:.2f} |")
    body = (f"{args.questions} {args.data} test questions (after one warm-up), each scored by both dtypes in turn "
            f"(ABBA order), {args.threads} torch threads; CPU native bf16 (AVX512-BF16/AMX): {cpu_has_native_bf16()}. "
            "The machine is shared: read the ratios, not the absolute times.\n\n" + "\n".join(lines)
            + "".join(f"\n\n{role} in bfloat16 does not run: {r['error']}" for role, r in results.items() if r["error"]))
    print(write_report("expert_dtype", "Expert latency in float32 and bfloat16", body,
                       {"args": vars(args), "native_bf16": cpu_has_native_bf16(), "results": results}))


if __name__ == "__main__":
    main()

"""MambaFormer report for one dataset: the routed system against every baseline, and the Pareto plot.

Runs `medmoe.mambaformer.experiments.pipeline.run_pipeline` (per-example expert results are cached in --out, so a
rerun after `medmoe run` only retrains the gate and rewrites the report) and writes
reports/mambaformer_<dataset>.md / .json / .png.

Usage: python benchmarks/mambaformer_report.py --dataset pubmedqa --mamba $MEDMOE_HOME/experts/mamba-shallow \
           [--train-limit 150 --dev-limit 100 --test-limit 200] [--out runs/mambaformer]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPORTS, write_report


def provenance(args) -> str:
    """One line per fine-tuned expert: what `medmoe train expert` wrote next to it."""
    lines = []
    for role, source in (("E_T", args.transformer), ("E_M", args.mamba)):
        path = Path(source) / "medmoe_training.json"
        if path.is_file():
            t = json.loads(path.read_text())
            what = f"the MLP and norms of its last {t['top_layers']} layer(s)" if t.get("top_layers") else "every weight"
            lines.append(f"- {role} was fine-tuned ({what}) on `{t['data']}` train records from #{t['skip_first']} on; "
                         f"the gate trained on records before #{t['skip_first']}.\n")
    return "".join(lines) + ("\n" if lines else "")


def targets(report: dict) -> str:
    """The issue's targets, read off the Pareto sweep: the fastest Pareto-optimal gate setting within 1
    point of E_T (target: 3x E_T's p50), the best speedup over the big baseline at its accuracy or
    better, and whether some setting beats both single experts."""
    base = {p["name"]: p for p in report["baselines"]}
    e_t, e_m = base["transformer-only"], base["mamba-only"]
    front = [p for p in report["gate_points"] if p["pareto"]]
    lines = ["## Targets", ""]
    near = [p for p in front if p["accuracy"] >= e_t["accuracy"] - 0.01]
    if near:
        best = min(near, key=lambda p: p["latency_ms"])
        speed = e_t["latency_ms"] / best["latency_ms"]
        lines.append(f"- Fastest Pareto-optimal gate setting within 1 point of E_T ({e_t['accuracy']:.3f}): {best['name']}, "
                     f"accuracy {best['accuracy']:.3f}, p50 {best['latency_ms']:.0f} ms = **{speed:.2f}x** E_T's "
                     f"{e_t['latency_ms']:.0f} ms (target 3x: {'met' if speed >= 3 else 'NOT met'}).")
    else:
        lines.append(f"- No Pareto-optimal gate setting is within 1 point of E_T ({e_t['accuracy']:.3f}): target 3x NOT met.")
    calibrated = next((r for r in report["summary"] if r["router"] == "mambaformer (calibrated)"), None)
    if calibrated:
        lines.append(f"- The deployed gate (tau {report['tau']:.4f} chosen on dev, not on test): accuracy {calibrated['accuracy']:.3f}, "
                     f"p50 {calibrated['p50_ms']:.0f} ms = {e_t['latency_ms'] / calibrated['p50_ms']:.2f}x E_T.")
    big = report.get("big")
    if big:
        equal = [p for p in front if p["accuracy"] >= big["accuracy"]]
        if equal:
            best = min(equal, key=lambda p: p["latency_ms"])
            lines.append(f"- Best speedup over {big['name']} ({big['accuracy']:.3f}, p50 {big['latency_ms']:.0f} ms) at its "
                         f"accuracy or better: {big['latency_ms'] / best['latency_ms']:.2f}x ({best['name']}, {best['accuracy']:.3f}).")
        else:
            lines.append(f"- No gate setting reaches {big['name']}'s accuracy ({big['accuracy']:.3f}).")
    top = max(report["gate_points"], key=lambda p: p["accuracy"], default=None)
    if top:
        above = top["accuracy"] > max(e_t["accuracy"], e_m["accuracy"])
        lines.append(f"- Most accurate gate setting: {top['name']}, {top['accuracy']:.3f}, against E_T {e_t['accuracy']:.3f} "
                     f"and E_M {e_m['accuracy']:.3f}: {'above both' if above else 'not above both'} single experts.")
    return "\n".join(lines) + "\n\n"


def main() -> None:
    import torch

    from medmoe.mambaformer.experiments.pareto import markdown_table
    from medmoe.mambaformer.experiments.pipeline import PipelineConfig, run_pipeline

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="pubmedqa")
    parser.add_argument("--mamba", required=True, help="E_M: a `medmoe distill` run folder")
    parser.add_argument("--transformer", default="smollm2-135m")
    parser.add_argument("--big", default="gemma3-270m")
    parser.add_argument("--train-limit", type=int, default=150)
    parser.add_argument("--dev-limit", type=int, default=100)
    parser.add_argument("--test-limit", type=int, default=200)
    parser.add_argument("--out", default="runs/mambaformer")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="", help="report name [default: mambaformer_<dataset>]")
    parser.add_argument("--describe", default="", help="how the experts were made (the commands), printed in the report")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = PipelineConfig(dataset=args.dataset, transformer=args.transformer, mamba=args.mamba, big=args.big or None,
                         train_limit=args.train_limit or None, dev_limit=args.dev_limit or None,
                         test_limit=args.test_limit or None, out=args.out)
    report = run_pipeline(cfg)
    name = args.name or f"mambaformer_{args.dataset}"
    distill = json.loads((Path(args.mamba) / "latest.json").read_text()) if (Path(args.mamba) / "latest.json").exists() else {}
    made = f"distillation step {distill['step']}" if distill else "see below"
    rows = ["| router | accuracy | macro-F1 | p50 ms | p95 ms | share to E_M | speedup vs big (p50) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["summary"]:
        speed = f"{r['speedup_vs_big']:.2f}x" if r["speedup_vs_big"] else "-"
        rows.append(f"| {r['router']} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | "
                    f"{r['share_mamba']:.2f} | {speed} |")
    big = report.get("big")
    if big:
        rows.append(f"| {big['name']} | {big['accuracy']:.3f} | | {big['latency_ms']:.0f} | | | 1.00x |")
    body = (
        f"Dataset `{args.dataset}`: {report['examples']} examples per split (train/dev/test limits "
        f"{args.train_limit}/{args.dev_limit}/{args.test_limit}; 0 = full split). E_T = `{args.transformer}`; "
        f"E_M = `{args.mamba}` ({made}); big baseline = `{args.big}` alone. "
        f"Calibrated tau = {report['tau']:.4f} (beta {report['beta']:g}); gate cost {report['gate_ms']:.2f} ms per query.\n\n"
        + (f"How the experts were made: {args.describe}\n\n" if args.describe else "")
        + provenance(args)
        + targets(report)
        + "\n".join(rows)
        + "\n\n## Pareto sweep (tau x beta) and baselines\n\n" + markdown_table(report)
        + f"\n![accuracy vs latency]({name}.png)\n"
    )
    write_report(name, f"MambaFormer on {args.dataset}", body, {"report": report})
    shutil.copyfile(Path(args.out) / args.dataset / "pareto.png", REPORTS / f"{name}.png")
    print(body)


if __name__ == "__main__":
    main()

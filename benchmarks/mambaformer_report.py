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


def verdict(met: bool) -> str:
    return "**met**" if met else "**NOT met**"


def ci(interval: list[float]) -> str:
    return f"[{interval[0]:+.3f}, {interval[1]:+.3f}]"


def targets(report: dict, router: str = "gate", deployed: bool = True, title: str = "Targets") -> str:
    """The issue's targets (a)-(d), each met / NOT met, read off `report["targets"]`
    (`medmoe.mambaformer.experiments.targets.routing_targets`), plus whether some setting of `router`
    ("gate", or "cascade" for benchmarks/mambaformer_heads.py) beats both single experts; `deployed`:
    whether report["tau"]'s router is the one deployed (else it is named the calibrated one)."""
    t, holds = report["targets"], report["targets"]["holds"]
    et, em, dep = t["et"], t["em"], t["deployed"]
    fastest, vs_big, apgr = t["fastest_within_1pt"], t["best_speedup_vs_big"], t["apgr"]
    which = f"The deployed {router}" if deployed else f"The calibrated {router} (not deployed)"
    lines = [f"## {title}", "",
             f"Floor: always answering '{t['floor_answer']}' scores {t['floor_accuracy']:.3f}. E_T {et['accuracy']:.3f} "
             f"(minus floor, 95% paired CI {ci(et['diff_vs_floor_ci95'])}), E_M {em['accuracy']:.3f} "
             f"({ci(em['diff_vs_floor_ci95'])}).", ""]
    near = (f"{fastest['name']}, accuracy {fastest['accuracy']:.3f}, p50 {fastest['p50_ms']:.0f} ms = "
            f"{fastest['speedup_vs_et']:.2f}x E_T's {et['p50_ms']:.0f} ms" if fastest else f"no Pareto-optimal {router} setting")
    lines.append(f"- (a) A {router} setting >= 3x faster than E_T within 1 point of E_T ({et['accuracy']:.3f}), E_T above "
                 f"the floor by a paired CI: {verdict(holds['speedup_3x_within_1pt_of_et_above_floor'])} ({near}).")
    lines.append(f"- (b) {which} (tau {report['tau']:.4f}, chosen on dev) mixes, share to E_M "
                 f"{dep['share_to_mamba']:.2f} (target 0.2 to 0.95): {verdict(holds['deployed_mixes'])}; and beats random "
                 f"routing at that mix (expected accuracy {dep['random_same_mix_accuracy']:.3f}) by a paired CI above 0: "
                 f"{verdict(holds['deployed_beats_random_same_mix'])} (accuracy {dep['accuracy']:.3f}, CI "
                 f"{ci(dep['diff_vs_random_same_mix_ci95'])}; p50 {dep['p50_ms']:.0f} ms = {dep['speedup_vs_et']:.2f}x E_T).")
    lines.append(f"- (c) APGR >= 0.5: {verdict(holds['apgr_at_least_0.5'])} "
                 f"({'undefined: the slower expert is not more accurate' if apgr is None else f'{apgr:.3f}'}).")
    big = report.get("big")
    if big:
        best = (f"{vs_big['speedup_vs_big']:.2f}x ({vs_big['name']}, {vs_big['accuracy']:.3f})" if vs_big
                else f"no {router} setting reaches its accuracy")
        lines.append(f"- (d) Best speedup over {big['name']} ({big['accuracy']:.3f}, p50 {big['latency_ms']:.0f} ms) at its "
                     f"accuracy or better, faster than it: {verdict(bool(vs_big) and vs_big['speedup_vs_big'] > 1)}: {best}.")
    else:
        lines.append("- (d) Best speedup over the largest offline Transformer: **NOT met** (no big baseline was run).")
    top = max(report["gate_points"], key=lambda p: p["accuracy"], default=None)
    if top:
        above = top["accuracy"] > max(et["accuracy"], em["accuracy"])
        lines.append(f"- Most accurate {router} setting: {top['name']}, {top['accuracy']:.3f}, against E_T {et['accuracy']:.3f} "
                     f"and E_M {em['accuracy']:.3f}: {'above both' if above else 'not above both'} single experts.")
    return "\n".join(lines) + "\n\n"


def summary_table(report: dict) -> str:
    """The test table: every router, the big baseline and the best constant answer (markdown)."""
    rows = ["| router | accuracy | macro-F1 | p50 ms | p95 ms | share to E_M | speedup vs big (p50) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["summary"]:
        speed = f"{r['speedup_vs_big']:.2f}x" if r["speedup_vs_big"] else "-"
        rows.append(f"| {r['router']} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | "
                    f"{r['share_mamba']:.2f} | {speed} |")
    big = report.get("big")
    if big:
        rows.append(f"| {big['name']} | {big['accuracy']:.3f} | | {big['latency_ms']:.0f} | | | 1.00x |")
    rows.append(f"| best constant ('{report['floor']['answer']}') | {report['floor']['accuracy']:.3f} | | | | | |")
    return "\n".join(rows)


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
    body = (
        f"Dataset `{args.dataset}`: {report['examples']} examples per split (train/dev/test limits "
        f"{args.train_limit}/{args.dev_limit}/{args.test_limit}; 0 = full split). E_T = `{args.transformer}`; "
        f"E_M = `{args.mamba}` ({made}); big baseline = `{args.big}` alone. "
        f"Calibrated tau = {report['tau']:.4f} (beta {report['beta']:g}); gate cost {report['gate_ms']:.2f} ms per query.\n\n"
        + (f"How the experts were made: {args.describe}\n\n" if args.describe else "")
        + provenance(args)
        + targets(report)
        + summary_table(report)
        + "\n\n## Pareto sweep (tau x beta) and baselines\n\n" + markdown_table(report)
        + f"\n![accuracy vs latency]({name}.png)\n"
    )
    write_report(name, f"MambaFormer on {args.dataset}", body, {"targets": report["targets"], "report": report})
    shutil.copyfile(Path(args.out) / args.dataset / "pareto.png", REPORTS / f"{name}.png")
    print(body)


if __name__ == "__main__":
    main()

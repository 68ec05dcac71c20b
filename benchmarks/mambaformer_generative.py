"""Generative MambaFormer: a gate trained on the per-example generative utility, against every baseline.

For the option questions of --data that carry a reference explanation (Dental: MedMCQA's `exp`,
143 / 23 / 89 of train / dev / test; PubMedQA: every question, its long answer), each expert
generates an answer with an explanation on train, dev and test (greedy, the harness's prompt with
"Then explain your answer briefly.", chat template where present), scored against the reference with
ROUGE-L and BERTScore (`minilm-l6`, layer 6). A gate is trained on the train split's utility
U_e = q_e - 1 - beta C_e / C_ref (q = --metric, C = measured generation time), tau is calibrated on
dev, and the test table compares it with E_T, E_M, random routing at its mix, the length threshold,
the oracles and the best constant text (the floor), with the issue's targets. `--router` adds the row
of a gate trained on option scoring (`medmoe run`'s <out>/<data>/router) on the same generations.
See `medmoe.mambaformer.experiments.generative_routing` and docs/mambaformer.md ("Generative routing").
Writes reports/mambaformer_<data>_generative.md / .json / .png; per-example rows in --out (resumable).

Usage: python benchmarks/mambaformer_generative.py --data dental --mamba $MEDMOE_HOME/experts/mamba-shallow \
           [--train-limit 150 --dev-limit 100 --test-limit 200] [--metric bertscore_f1] [--threads 2] \
           [--router runs/mambaformer/dental/router]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_report

NAMES = {"transformer-only": "E_T alone", "mamba-only": "E_M alone", "length-threshold": "length threshold (fit on dev)",
         "mambaformer (calibrated)": "MambaFormer (gate on the generative utility, tau from dev)"}


def system_name(router: str, metric: str) -> str:
    if router.startswith("random("):
        return f"random at the gate's mix, one seeded draw ({router})"
    if router == "oracle-accuracy":
        return f"oracle: higher {metric} per query (upper bound)"
    if router.startswith("oracle("):
        return f"utility oracle {router[6:]} (upper bound)"
    return NAMES.get(router, router)


def verdict(met: bool) -> str:
    return "**met**" if met else "**NOT met**"


def ci(interval: list[float]) -> str:
    return f"[{interval[0]:+.3f}, {interval[1]:+.3f}]"


def targets(report: dict, metric: str) -> str:
    """The issue's generation targets, met / NOT met, read off report["generative"]["targets"]."""
    t = report["generative"]["targets"]
    holds, et, em, dep, fastest, apgr = t["holds"], t["et"], t["em"], t["deployed"], t["fastest_within_1pt"], t["apgr"]
    near = (f"{fastest['name']}, {fastest['accuracy']:.3f} at p50 {fastest['p50_ms']:.0f} ms = "
            f"{fastest['speedup_vs_et']:.2f}x lower than E_T's {et['p50_ms']:.0f} ms" if fastest else "no Pareto-optimal gate setting")
    return "\n".join([
        "## Targets", "",
        f"Floor: the best constant text (one train reference, chosen on dev) scores {t['floor_accuracy']:.3f} {metric} on test. "
        f"E_T {et['accuracy']:.3f} (minus floor, 95% paired CI {ci(et['diff_vs_floor_ci95'])}), E_M {em['accuracy']:.3f} "
        f"({ci(em['diff_vs_floor_ci95'])}).", "",
        f"- (a) A gate setting at >= 3x lower p50 than E_T within 0.01 {metric} of E_T ({et['accuracy']:.3f}), E_T above the "
        f"floor by a paired CI: {verdict(holds['speedup_3x_within_1pt_of_et_above_floor'])} ({near}).",
        f"- (b) The deployed gate (tau {report['tau']:.4f}, chosen on dev) mixes, share to E_M {dep['share_to_mamba']:.2f} "
        f"(target 0.2 to 0.95): {verdict(holds['deployed_mixes'])}; and beats random routing at that mix (expected "
        f"{dep['random_same_mix_accuracy']:.3f}) by a paired CI above 0: {verdict(holds['deployed_beats_random_same_mix'])} "
        f"({dep['accuracy']:.3f}, CI {ci(dep['diff_vs_random_same_mix_ci95'])}; p50 {dep['p50_ms']:.0f} ms = "
        f"{dep['speedup_vs_et']:.2f}x E_T).",
        f"- (c) APGR >= 0.5: {verdict(holds['apgr_at_least_0.5'])} "
        f"({'undefined: the slower expert is not better' if apgr is None else f'{apgr:.3f}'}).", "", ""])


def summary_table(report: dict, metric: str, field: str, classification_gate: dict | None) -> str:
    """Every system on the test queries: mean quality, p50/p95 latency (gate included), share to E_M."""
    rows = [f"| system | {metric} | p50 ms | p95 ms | share to E_M |", "| --- | ---: | ---: | ---: | ---: |"]
    for r in report["summary"]:
        rows.append(f"| {system_name(r['router'], metric)} | {r['accuracy']:.3f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | "
                    f"{r['share_mamba']:.2f} |")
    dep = report["generative"]["targets"]["deployed"]
    rows.append(f"| random at the gate's mix, expected | {dep['random_same_mix_accuracy']:.3f} | | | {dep['share_to_mamba']:.2f} |")
    if classification_gate:
        rows.append(f"| gate trained on option scoring (--router) | {classification_gate[field]:.3f} | "
                    f"{classification_gate['latency_p50_ms']:.0f} | {classification_gate['latency_p95_ms']:.0f} | "
                    f"{classification_gate['share_mamba']:.2f} |")
    floor = report["generative"]["floor"]
    rows.append(f"| best constant text (floor; chosen on dev, {floor['dev_quality']:.3f} there) | {floor['test_quality']:.3f} "
                "| | | |")
    return "\n".join(rows)


def same_source(a: str, b: str) -> bool:
    return a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve())


def checkpoint_mismatch(config: dict, args) -> str:
    """A warning line when the --router gate was trained for other experts than the ones given."""
    wrong = [f"{role} {config.get(key)!r} (given {given!r})" for role, key, given in
             (("E_T", "transformer", args.transformer), ("E_M", "mamba", args.mamba))
             if config.get(key) and not same_source(str(config[key]), given)]
    return f"**Warning:** the --router gate was trained for {', '.join(wrong)}.\n\n" if wrong else ""


def main() -> None:
    import torch

    from medmoe.mambaformer.answerer import RoutedAnswerer
    from medmoe.mambaformer.checkpoint import RouterCheckpoint
    from medmoe.mambaformer.experiments.generative import generative_run
    from medmoe.mambaformer.experiments.generative_routing import (
        METRICS,
        GenerativeConfig,
        explained_splits,
        generative_routing_run,
    )
    from medmoe.mambaformer.experiments.pareto import markdown_table
    from medmoe.mambaformer.experts import load_expert

    defaults = GenerativeConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=("pubmedqa", "dental"), default="dental")
    parser.add_argument("--transformer", default="smollm2-135m", help="E_T")
    parser.add_argument("--mamba", required=True, help="E_M: a `medmoe mambaformer distill` run folder or a hybrid folder")
    parser.add_argument("--train-limit", type=int, default=150, help="explained train questions (0 = all)")
    parser.add_argument("--dev-limit", type=int, default=100, help="explained dev questions (0 = all)")
    parser.add_argument("--test-limit", type=int, default=200, help="explained test questions (0 = all)")
    parser.add_argument("--metric", choices=tuple(METRICS), default=defaults.metric, help="the quality q the gate trains on")
    parser.add_argument("--beta", type=float, default=defaults.beta, help="the deployed gate's utility beta")
    parser.add_argument("--betas", default=",".join(f"{b:g}" for b in defaults.betas), help="betas of the Pareto sweep")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--router", default="", help="optional: a gate trained on option scoring, for one more row")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=defaults.out, help="per-example JSONL per split (resumable), gate, pareto.*")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    cfg = GenerativeConfig(dataset=args.data, transformer=args.transformer, mamba=args.mamba,
                           train_limit=args.train_limit or None, dev_limit=args.dev_limit or None,
                           test_limit=args.test_limit or None, metric=args.metric, beta=args.beta,
                           betas=tuple(float(b) for b in args.betas.split(",")), max_new_tokens=args.max_new_tokens,
                           dtype=args.dtype, device=args.device, out=args.out)
    experts = {"transformer": load_expert("transformer", args.transformer, dtype=args.dtype, device=args.device),
               "mamba": load_expert("mamba", args.mamba, tokenizer_source=args.transformer, dtype=args.dtype,
                                    device=args.device)}
    report = generative_routing_run(cfg, experts)
    metric = METRICS[args.metric]
    classification_gate, warning = None, ""
    if args.router:
        checkpoint = RouterCheckpoint.load(args.router)
        settings = {"transformer": experts["transformer"].source, "mamba": experts["mamba"].source}
        run = generative_run(RoutedAnswerer(checkpoint, experts), explained_splits(cfg)["test"],
                             Path(args.out) / args.data / "test", args.max_new_tokens, settings=settings)
        classification_gate = run["systems"]["mambaformer"]
        warning = checkpoint_mismatch(checkpoint.info.get("config") or {}, args)
    load_after = os.getloadavg()

    name = f"mambaformer_{args.data}_generative"
    n = report["examples"]
    body = (
        f"`{args.data}` option questions with a reference explanation: {n['train']} train / {n['dev']} dev / {n['test']} test "
        f"(the first of each split; limits {args.train_limit}/{args.dev_limit}/{args.test_limit}, 0 = all). Each expert "
        f"generates an answer with an explanation (greedy, at most {args.max_new_tokens} new tokens, the evaluation harness's "
        "question prompt + \"Then explain your answer briefly.\" in E_T's chat template; E_M shares E_T's tokenizer), "
        f"scored against the reference: q = {metric} (ROUGE-L F1, or BERTScore-F1 with the named local encoder "
        "`minilm-l6`, layer 6, no idf, no rescaling). The experts are not trained to write these answers (zero-shot).\n\n"
        f"E_T = `{experts['transformer'].source}`; E_M = `{experts['mamba'].source}`. The gate is trained on the train "
        f"split's utility U_e = q_e - 1 - beta C_e / C_ref (l_e = 1 - q_e; C_e = the measured generation time, C_ref = E_T's "
        f"mean train generation time), one gate per beta in {{{args.betas}}}, the deployed one with beta {report['beta']:g}; "
        f"tau {report['tau']:.4f} is the fastest dev routing within 0.01 {metric} of E_T's dev quality. Gate cost "
        f"{report['gate_ms']:.2f} ms per query, included in every routed latency. A routed query's generation and latency "
        "are those of the chosen expert's solo pass (greedy decoding is deterministic). Latency = wall time of one "
        f"generation (batch 1, {args.threads} threads); load average {load_before[0]:.1f} before, {load_after[0]:.1f} after.\n\n"
        + warning + targets(report, metric)
        + summary_table(report, metric, args.metric, classification_gate)
        + "\n\nThe oracles read the references: upper bounds, not deployable routers. Paired intervals: 95% percentile "
        "bootstrap over test questions (1,000 resamples, seed 0).\n\n"
        + "## Pareto sweep (tau x beta) and baselines\n\n" + markdown_table(report, quality=metric)
        + f"\n![{metric} vs latency]({name}.png)\n"
    )
    rest = {k: v for k, v in report.items() if k != "generative"}
    md = write_report(name, f"Generative MambaFormer on {args.data}: a gate trained on {metric}", body,
                      {"generative": report["generative"], "report": rest, "classification_gate": classification_gate,
                       "args": vars(args)})
    png = Path(args.out) / args.data / "pareto.png"
    if png.exists():
        shutil.copyfile(png, md.with_suffix(".png"))
    print(body)


if __name__ == "__main__":
    main()

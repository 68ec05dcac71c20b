"""Generative MambaFormer on Dental: explanations by E_T, E_M, the routed system and the ROUGE-L oracle.

For the Dental test questions that have a reference explanation (89 of 500), each expert generates
an answer with an explanation (greedy, the harness's prompt with "Then explain your answer briefly.",
chat template where present), scored against the reference with ROUGE-L and BERTScore (`minilm-l6`,
layer 6). The gate of a pipeline run (`--router`, written by `medmoe run` at <out>/dental/router)
picks the expert per query. See `medmoe.mambaformer.experiments.generative` and docs/mambaformer.md.
Writes reports/mambaformer_dental_generative.md / .json; per-example rows in --out (resumable).

Usage: python benchmarks/mambaformer_generative.py --mamba $MEDMOE_HOME/experts/mamba-shallow \
           --router runs/mambaformer/dental/router [--limit 20] [--max-new-tokens 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_report

NAMES = {"transformer": "E_T alone", "mamba": "E_M alone", "mambaformer": "MambaFormer (gate)",
         "oracle-rouge": "oracle (best ROUGE-L per query; upper bound)"}


def _ci(value: float, ci) -> str:
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def table(report: dict) -> str:
    rows = [("| system | ROUGE-L [95% CI] | ROUGE-L minus E_T [95% CI] | BERTScore-F1 [95% CI] | answer accuracy | "
             "p50 ms | p95 ms | new tokens/s | share to E_M |"),
            "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, s in report["systems"].items():
        rows.append(f"| {NAMES[name]} | {_ci(s['rouge_l'], s['rouge_l_ci'])} | "
                    f"{_ci(s['rouge_l_minus_transformer'], s['rouge_l_minus_transformer_ci'])} | "
                    f"{_ci(s['bertscore_f1'], s['bertscore_f1_ci'])} | {s['answer_accuracy']:.3f} | "
                    f"{s['latency_p50_ms']:.0f} | {s['latency_p95_ms']:.0f} | {s['new_tokens_per_s']:.1f} | "
                    f"{s['share_mamba']:.2f} |")
    return "\n".join(rows)


def same_source(a: str, b: str) -> bool:
    return a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve())


def checkpoint_mismatch(config: dict, args) -> str:
    """A warning line when the gate was trained for other experts than the ones given."""
    wrong = [f"{role} {config.get(key)!r} (given {given!r})" for role, key, given in
             (("E_T", "transformer", args.transformer), ("E_M", "mamba", args.mamba))
             if config.get(key) and not same_source(str(config[key]), given)]
    return f"**Warning:** the gate was trained for {', '.join(wrong)}.\n\n" if wrong else ""


def main() -> None:
    import torch

    from medmoe.data import load_dataset
    from medmoe.eval.benchmarks import subsample
    from medmoe.mambaformer.answerer import RoutedAnswerer
    from medmoe.mambaformer.checkpoint import RouterCheckpoint
    from medmoe.mambaformer.experiments.generative import explained_records, generative_run
    from medmoe.mambaformer.experts import load_expert

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transformer", default="smollm2-135m", help="E_T")
    parser.add_argument("--mamba", required=True, help="E_M: a `medmoe distill` run folder or a hybrid folder")
    parser.add_argument("--router", required=True, help="router checkpoint folder (<pipeline out>/dental/router)")
    parser.add_argument("--limit", type=int, default=0, help="the fixed subsample of N explained questions (0 = all)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/mambaformer_generative/dental", help="per-example JSONL (resumable)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    checkpoint = RouterCheckpoint.load(args.router)
    experts = {"transformer": load_expert("transformer", args.transformer),
               "mamba": load_expert("mamba", args.mamba, tokenizer_source=args.transformer)}
    router = RoutedAnswerer(checkpoint, experts)
    records = subsample(explained_records(load_dataset("dental", "test")), args.limit or None)
    settings = {"transformer": args.transformer, "mamba": experts["mamba"].source}
    report = generative_run(router, records, Path(args.out), args.max_new_tokens, settings=settings)

    body = (
        f"Dental test questions with a reference explanation: {report['examples']} "
        f"({'all' if not args.limit else f'fixed subsample --limit {args.limit}'}). Each system generates an "
        f"answer with an explanation (greedy, at most {args.max_new_tokens} new tokens, prompt = the evaluation "
        "harness's question prompt + \"Then explain your answer briefly.\", in E_T's chat template; E_M shares "
        "E_T's tokenizer and template), scored against the reference explanation: ROUGE-L F1 and BERTScore-F1 "
        f"(encoder {', '.join(f'`{e}`' for e in report['bertscore_encoders'])}, layer 6, no idf, no rescaling). "
        "Answer accuracy = the letter the strict extractor reads from the generation (none = wrong).\n\n"
        f"E_T = `{args.transformer}`; E_M = `{experts['mamba'].source}`; gate = `{args.router}` "
        f"(tau {report['tau']:.4f}, cost p50 {report['gate_ms_p50']:.2f} ms per query, one query at a time). "
        "The routed system's generation for a query is that of the expert the gate picks (greedy decoding is "
        "deterministic); its latency is that generation's plus the gate's cost. The oracle picks per query the "
        "expert with the higher ROUGE-L against the reference: an upper bound for any router, not a "
        "deployable system. Latency = wall time of one generation (batch 1, "
        f"{args.threads} threads); new tokens/s = all new tokens / all generation time.\n\n"
        + checkpoint_mismatch(checkpoint.info.get("config") or {}, args)
        + table(report) + "\n\nIntervals: 95% percentile bootstrap over questions (1,000 resamples, seed 0); "
        "\"minus E_T\" is the paired per-question difference.\n"
    )
    write_report("mambaformer_dental_generative", "Generative MambaFormer on Dental (explanations)", body,
                 {"report": report, "args": vars(args)})
    print(body)


if __name__ == "__main__":
    main()

"""MambaFormer with target-specific output heads: E_T = Qwen2.5-Coder-1.5B through its option head (the
one expert above the best constant answer on PubMedQA and Dental, reports/quality.md), E_M = the
default Mamba hybrid (the main job's `medmoe mambaformer distill --size shallow`) through a head of
its own on cached features. The gate, its utility-guided training, tau calibration, the baselines and
the routing targets are the pipeline's (`medmoe.mambaformer`); only the experts' per-example results
come from heads instead of zero-shot letter scores.

    PYTHONPATH=src python benchmarks/mambaformer_heads.py prepare --data pubmedqa,dental   # CPU: features, timing
    PYTHONPATH=src python benchmarks/mambaformer_heads.py report  --data pubmedqa,dental   # seconds

prepare (resumable; features are cached in $MEDMOE_HOME/features):
  1. E_M's features of the training pool and the test split (one forward pass per question, float32;
     E_T's bfloat16 features come from `benchmarks/quality.py run --expert qwen2.5-coder-1.5b`, which
     must have run first: this stage only reads them);
  2. the latency of both experts, one question at a time, on a fixed sha256 subsample of --timed test
     questions (the head's forward pass: prompt -> hidden states and option scores), then a measured
     latency model C_e(n) = a n^2 + b n + c per expert (`mambaformer.latency.fit_latency_model`) that
     gives every question's latency from its prompt length n in that expert's tokens. Written to
     runs/mambaformer_heads/<data>/timing.json.

report (seconds; reads only caches and timing.json):
  3. each expert's head, chosen by 5-fold CV on the pool, answers every pool question out of fold and
     every test question from the head fitted on the whole pool (`experiments.head_tables`);
  4. the pool is split by the same id hash: folds 0-2 train the gate, folds 3-4 are its dev set (tau);
     the gate reads E_M's tokenizer and embeddings (the cheap expert's: E_M's pass starts anyway), and
     everything after that is the pipeline's own routing and report (`pipeline.route_and_report`), with
     each question's latency from the experts' measured latency models;
  5. writes reports/mambaformer_heads_<data>.md / .json / .png, with the "targets" object.
No test question is used to choose anything: heads, gate and tau come from the pool.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

E_T = "qwen2.5-coder-1.5b"
RUNS = Path("runs/mambaformer_heads")
POOL_LIMIT = {"pubmedqa": None, "dental": 1000}  # Dental: the fixed sha256 subset quality.py --pool-limit 1000 used


def sha_order(records: list) -> list:
    return sorted(records, key=lambda r: hashlib.sha256(r.id.encode()).hexdigest())


def pool_records(name: str) -> list:
    from medmoe.data.pools import training_pool

    pool = training_pool(name)
    limit = POOL_LIMIT.get(name)
    return sha_order(pool)[:limit] if limit else pool


def default_mamba() -> str:
    from medmoe.models import hybrid_folder
    from medmoe.paths import medmoe_home

    folder = hybrid_folder(medmoe_home() / "experts" / "mamba-shallow")
    if folder is None:
        raise SystemExit("no default Mamba expert: run `medmoe run` (or `medmoe mambaformer distill --size shallow`) first")
    return str(folder)


def load_lm(source: str, dtype: torch.dtype):
    from medmoe.eval.model import HFEvalModel
    from medmoe.models import load_causal_lm

    model, tokenizer = load_causal_lm(source, dtype=dtype)
    return HFEvalModel(model.eval(), tokenizer, source, share_prefix=False)


@torch.inference_mode()
def time_expert(lm, records: list) -> tuple[list[int], list[float]]:
    """(prompt tokens, wall ms) of the head's forward pass, one question at a time, after one warm-up."""
    from medmoe.eval.prompts import build_prompt
    from medmoe.eval.window import PromptFitter
    from medmoe.heads.features import forward_prompt, letter_plan

    fitter = PromptFitter(lm, "letter")
    prompts = [build_prompt(fitter.fit(r)[0], lm.tokenizer, (), "letter") for r in records]
    forward_prompt(lm.model, lm.tokenizer, prompts[0].context, prompts[0].continuations)
    tokens, ms = [], []
    for p in prompts:
        start = time.perf_counter()
        forward_prompt(lm.model, lm.tokenizer, p.context, p.continuations)
        ms.append((time.perf_counter() - start) * 1000)
        tokens.append(len(letter_plan(lm.tokenizer, p.context, p.continuations)[0]))
    return tokens, ms


def prompt_tokens(lm, records: list) -> dict[str, int]:
    from medmoe.eval.prompts import build_prompt
    from medmoe.eval.window import PromptFitter
    from medmoe.heads.features import letter_plan

    fitter = PromptFitter(lm, "letter")
    out = {}
    for r in records:
        p = build_prompt(fitter.fit(r)[0], lm.tokenizer, (), "letter")
        out[r.id] = len(letter_plan(lm.tokenizer, p.context, p.continuations)[0])
    return out


def prepare(args) -> None:
    from medmoe.data import load_dataset
    from medmoe.heads.train import expert_features
    from medmoe.mambaformer.latency import fit_latency_model, machine_description

    torch.set_num_threads(args.threads)
    mamba = args.mamba or default_mamba()
    for name in args.data.split(","):
        folder = RUNS / name
        folder.mkdir(parents=True, exist_ok=True)
        pool, test = pool_records(name), load_dataset(name, "test")
        timed = sha_order(test)[: args.timed]
        timing: dict = {"data": name, "machine": machine_description(), "timed": [r.id for r in timed], "experts": {}}
        for role, source, dtype in (("mamba", mamba, torch.float32), ("transformer", E_T, torch.bfloat16)):
            lm = load_lm(source, dtype)
            start = time.time()
            if role == "mamba":
                expert_features(lm, source, pool + test)
            features_s = time.time() - start
            tokens, ms = time_expert(lm, timed)
            model = fit_latency_model(tokens, ms, expert=source, machine=timing["machine"])
            timing["experts"][role] = {"source": source, "dtype": str(dtype).replace("torch.", ""),
                                       "features_s": features_s, "tokens": tokens, "ms": ms,
                                       "median_ms": statistics.median(ms), "latency_model": model.to_dict(),
                                       "prompt_tokens": prompt_tokens(lm, pool + test)}
            print(f"{name} {role}: median {statistics.median(ms):.0f} ms over {len(ms)} timed questions "
                  f"(features {features_s:.0f} s)", flush=True)
            del lm
        (folder / "timing.json").write_text(json.dumps(timing, indent=1) + "\n")


def expert_answers(name: str, pool: list, test: list, timing: dict) -> tuple[dict, dict]:
    """Per role: HeadAnswers (head_tables.cross_fitted) and {record id: latency ms} from the latency model."""
    from medmoe.heads.features import feature_folder, read_features
    from medmoe.mambaformer.experiments.head_tables import cross_fitted
    from medmoe.mambaformer.latency import LatencyModel

    answers, latency = {}, {}
    for role, info in timing["experts"].items():
        folder = feature_folder(info["source"], getattr(torch, info["dtype"]))
        answers[role] = cross_fitted(pool, read_features(folder, pool), read_features(folder, test))
        model = LatencyModel.from_dict(info["latency_model"])
        latency[role] = {r.id: float(model(info["prompt_tokens"][r.id])) for r in pool + test}
        print(f"{name} {role}: {answers[role].candidate.name} (CV {answers[role].candidate.accuracy:.3f})", flush=True)
    return answers, latency


def split_tables(splits: dict, index: dict, answers: dict, latency: dict, tokens: dict) -> dict:
    """ExpertResults per split: test answers from the whole-pool heads, train/dev from out-of-fold ones."""
    import numpy as np

    from medmoe.mambaformer.experiments.head_tables import results_table

    tables = {}
    for split, recs in splits.items():
        probs = {role: (a.test_probs if split == "test" else a.pool_probs[index[split]]) for role, a in answers.items()}
        lat = {role: np.array([latency[role][r.id] for r in recs]) for role in answers}
        tables[split] = results_table(recs, probs, lat, np.array([tokens[r.id] for r in recs]))
    return tables


def markdown(name: str, result: dict, timing: dict) -> str:
    """The report's body: how the experts answer, the targets (mambaformer_report's wording), the tables."""
    from mambaformer_report import summary_table, targets
    from medmoe.mambaformer.experiments.pareto import markdown_table

    ex = result["examples"]
    experts = "\n".join(
        f"- {'E_T' if role == 'transformer' else 'E_M'} = `{info['source']}` ({info['dtype']}), head "
        f"{result['heads'][role]['chosen']} (pool CV accuracy {result['heads'][role]['cv_accuracy']:.3f}); latency model "
        f"fitted on {len(info['ms'])} timed test questions, median {info['median_ms']:.0f} ms"
        for role, info in timing["experts"].items())
    return (f"Dataset `{name}`: gate train {ex['train']} / dev {ex['dev']} (pool folds 0-2 / 3-4), test {ex['test']} "
            f"(the whole split). Calibrated tau = {result['tau']:.4f} (beta {result['beta']:g}); gate cost "
            f"{result['gate_ms']:.2f} ms per query. E_T is also the largest offline Transformer, so the big "
            f"baseline is E_T itself.\n\n{experts}\n\n" + targets(result) + summary_table(result)
            + "\n\n## Pareto sweep (tau x beta) and baselines\n\n" + markdown_table(result)
            + f"\n\n![accuracy vs latency](mambaformer_heads_{name}.png)\n")


def report(args) -> None:
    import numpy as np

    from common import REPORTS, write_report
    from medmoe.data import load_dataset
    from medmoe.heads.fit import folds_of
    from medmoe.mambaformer.experiments.pareto import OperatingPoint
    from medmoe.mambaformer.experiments.pipeline import PipelineConfig, gate_inputs, route_and_report
    from medmoe.mambaformer.experts import load_expert

    torch.set_num_threads(args.threads)
    for name in args.data.split(","):
        timing = json.loads((RUNS / name / "timing.json").read_text())
        pool = [r for r in pool_records(name) if len(r.gold_indices) == 1]
        test = load_dataset(name, "test")
        answers, latency = expert_answers(name, pool, test, timing)
        is_dev = folds_of([r.id for r in pool]).numpy() >= 3
        index = {"train": np.flatnonzero(~is_dev), "dev": np.flatnonzero(is_dev)}
        splits = {s: [pool[i] for i in ix] for s, ix in index.items()} | {"test": test}

        tables = split_tables(splits, index, answers, latency, timing["experts"]["mamba"]["prompt_tokens"])
        mamba = load_expert("mamba", timing["experts"]["mamba"]["source"], tokenizer_source="smollm2-135m")
        featurizer, features, gate_ms = gate_inputs(mamba, splits)
        et = tables["test"].transformer
        big = OperatingPoint(f"{E_T} head alone", float(et.correct.mean()), float(np.percentile(et.latency_ms, 50)), kind="baseline")
        cfg = PipelineConfig(dataset=name, transformer=E_T, mamba=timing["experts"]["mamba"]["source"], big=None,
                             out=str(RUNS / "route"))
        # no router checkpoint: the served router answers with the experts' own scores, not these heads
        result = route_and_report(cfg, splits, tables, featurizer, features, gate_ms,
                                  {"transformer": E_T, "mamba": cfg.mamba}, big, None)
        result["heads"] = {role: {"chosen": a.candidate.name, "cv_accuracy": a.candidate.accuracy} for role, a in answers.items()}
        result["timing"] = {role: {k: v for k, v in info.items() if k != "prompt_tokens"} for role, info in timing["experts"].items()}
        write_report(f"mambaformer_heads_{name}", f"MambaFormer with option heads on {name}", markdown(name, result, timing),
                     result)
        shutil.copy(RUNS / "route" / name / "pareto.png", REPORTS / f"mambaformer_heads_{name}.png")
        print((REPORTS / f"mambaformer_heads_{name}.md").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="E_M's features, both experts' latency models (CPU)")
    p.add_argument("--data", default="pubmedqa,dental")
    p.add_argument("--mamba", default=None, help="E_M: a hybrid folder or distill run (default: the main job's)")
    p.add_argument("--timed", type=int, default=40, help="test questions timed per expert")
    p.add_argument("--threads", type=int, default=2)
    r = sub.add_parser("report", help="heads, gate, routing, report (seconds)")
    r.add_argument("--data", default="pubmedqa,dental")
    r.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    {"prepare": prepare, "report": report}[args.cmd](args)


if __name__ == "__main__":
    main()

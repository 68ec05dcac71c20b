"""MambaFormer with target-specific output heads: E_T = Qwen2.5-Coder-1.5B through its option head (the
one expert above the best constant answer on PubMedQA and Dental, reports/quality.md), E_M = the
default Mamba hybrid (the main job's `medmoe mambaformer distill --size shallow`) through a head of
its own on cached features. The gate, its utility-guided training, tau calibration, the baselines and
the routing targets are the pipeline's (`medmoe.mambaformer`); only the experts' per-example results
come from heads instead of zero-shot letter scores.

    PYTHONPATH=src python benchmarks/mambaformer_heads.py prepare --data pubmedqa,dental   # CPU: features, timing
    PYTHONPATH=src python benchmarks/mambaformer_heads.py report  --data pubmedqa,dental   # minutes

prepare (resumable; features are cached in $MEDMOE_HOME/features):
  1. E_M's features of the training pool and the test split (one forward pass per question, float32;
     E_T's bfloat16 features come from `benchmarks/quality.py run --expert qwen2.5-coder-1.5b`, which
     must have run first: this stage only reads them);
  2. the latency of both experts, one question at a time, on a fixed sha256 subsample of --timed test
     questions (the head's forward pass: prompt -> hidden states and option scores), then a measured
     latency model C_e(n) = a n^2 + b n + c per expert (`mambaformer.latency.fit_latency_model`) that
     gives every question's latency from its prompt length n in that expert's tokens. Written to
     runs/mambaformer_heads/<data>/timing.json.

report (minutes on 2 cores; reads only caches and timing.json):
  3. each expert's head, chosen by 5-fold CV on the pool, answers every pool question out of fold and
     every test question from the head fitted on the whole pool (`experiments.head_tables`); E_M's head
     is also distilled from E_T's answers at each alpha of `head_tables.ALPHAS` (nested cross-fitting:
     no pool answer comes from a head, or a teacher, that saw the question);
  4. the pool is split by the same id hash: folds 0-2 train the routers, folds 3-4 are their dev set;
     per alpha, a cascade (`experiments.cascade`: E_M answers first, a logistic on its head's output
     decides whether to escalate to E_T) is trained on train and calibrated on dev, and the alpha whose
     cascade is fastest on dev within 1 point of E_T's dev accuracy is E_M's head from then on;
  5. on those tables the token gate: it reads E_M's tokenizer and embeddings (the cheap expert's: E_M's
     pass starts anyway), and everything after that is the pipeline's own routing and report
     (`pipeline.route_and_report`), with each question's latency from the experts' measured latency
     models; its checkpoint goes to a temporary folder only for its dev metrics (not a served router);
  6. the router deployed, token gate or cascade, is the one faster on dev within 1 point of E_T's dev
     accuracy (`cascade.choose_router`); writes reports/mambaformer_heads_<data>.md / .json / .png with
     "targets" (the deployed router's), "token_gate" and "cascade" (each one's targets), "distillation".
No test question is used to choose anything: heads, alpha, gate, cascade, tau and router come from the pool.
"""

from __future__ import annotations

import argparse
import json
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
    from medmoe.mambaformer.experiments.expert_heads import sha_order as ordered

    return ordered(records)


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


def time_expert(lm, records: list) -> tuple[list[int], list[float]]:
    """(prompt tokens, wall ms) of the head's forward pass, one question at a time, after one warm-up."""
    from medmoe.mambaformer.experiments.expert_heads import time_head_pass

    return time_head_pass(lm, records)


def prompt_tokens(lm, records: list) -> dict[str, int]:
    from medmoe.mambaformer.experiments.expert_heads import prompt_token_counts

    return dict(zip((r.id for r in records), prompt_token_counts(lm, records)))


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


def expert_answers(name: str, pool: list, test: list, timing: dict) -> tuple[dict, dict, dict]:
    """Per role: HeadAnswers (head_tables.cross_fitted), {record id: latency ms} from the latency model,
    and the (pool, test) Features the heads read."""
    from medmoe.heads.features import feature_folder, read_features
    from medmoe.mambaformer.experiments.head_tables import cross_fitted
    from medmoe.mambaformer.latency import LatencyModel

    answers, latency, features = {}, {}, {}
    for role, info in timing["experts"].items():
        folder = feature_folder(info["source"], getattr(torch, info["dtype"]))
        features[role] = (read_features(folder, pool), read_features(folder, test))
        answers[role] = cross_fitted(pool, *features[role])
        model = LatencyModel.from_dict(info["latency_model"])
        latency[role] = {r.id: float(model(info["prompt_tokens"][r.id])) for r in pool + test}
        print(f"{name} {role}: {answers[role].candidate.name} (CV {answers[role].candidate.accuracy:.3f})", flush=True)
    return answers, latency, features


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


def distillation_sweep(name: str, pool: list, test: list, answers: dict, features: dict, tables_of) -> dict:
    """E_M's head per alpha (head_tables.distilled), a cascade per alpha on its tables, and the alpha
    whose calibrated cascade is chosen on dev (cascade.choose_router): {"alpha", "tables", "cascade", "rows"}."""
    import numpy as np

    from medmoe.eval.metrics import paired_difference
    from medmoe.mambaformer.experiments.cascade import choose_router, fit_cascade
    from medmoe.mambaformer.experiments.head_tables import distilled
    from medmoe.mambaformer.experiments.targets import random_same_mix

    start = time.time()
    (student_pool, student_test), teacher_pool = features["mamba"], features["transformer"][0]
    dist = distilled(pool, answers["mamba"], student_pool, student_test, answers["transformer"], teacher_pool)
    print(f"{name}: distillation of E_M's head at {len(dist.answers)} alphas in {time.time() - start:.0f} s", flush=True)
    tables, cascades = {}, {}
    for alpha, head in dist.answers.items():
        tables[alpha] = tables_of({**answers, "mamba": head})
        cascades[alpha] = fit_cascade(tables[alpha]["train"], tables[alpha]["dev"])
    dev_et = float(next(iter(tables.values()))["dev"].transformer.correct.mean())
    alpha = choose_router({a: c.calibration.metrics for a, c in cascades.items()}, dev_et)
    gold = np.array([r.gold_indices[0] for r in test])
    et_test = answers["transformer"].test_probs.argmax(1)
    rows = []
    for a, head in dist.answers.items():
        dev, test_table = cascades[a].calibration.metrics, tables[a]["test"]
        keep = cascades[a].decisions(test_table)
        correct = np.where(keep, test_table.mamba.correct, test_table.transformer.correct).astype(float)
        ci = paired_difference(correct.tolist(), random_same_mix(test_table, float(keep.mean())).tolist())[1]
        rows.append({"alpha": a, "head": head.candidate.name, "pool_accuracy": dist.pool_accuracy[a],
                     "pool_agreement": dist.pool_agreement[a], "test_accuracy": float((head.test_probs.argmax(1) == gold).mean()),
                     "test_agreement": float((head.test_probs.argmax(1) == et_test).mean()),
                     "cascade_dev": {"accuracy": dev.accuracy, "p50_ms": dev.p50_ms, "share_kept": dev.share_mamba},
                     "cascade_test": {**cascades[a].metrics(test_table).to_dict(), "diff_vs_random_same_mix_ci95": list(ci)},
                     "chosen": a == alpha})  # test columns: shown for every alpha, used for no choice
    return {"alpha": alpha, "tables": tables[alpha], "cascade": cascades[alpha], "head": dist.answers[alpha], "rows": rows,
            "dev_et_accuracy": dev_et}


def token_gate(cfg, splits: dict, tables: dict, featurizer, features: dict, gate_ms: float, big) -> tuple[dict, dict]:
    """The pipeline's route_and_report on the head tables, and the deployed gate's dev metrics (read
    from its checkpoint, written to a temporary folder: it routes with these heads' tables, so it is
    not a checkpoint to serve)."""
    import tempfile

    from medmoe.mambaformer.experiments.pipeline import route_and_report

    with tempfile.TemporaryDirectory() as folder:
        result = route_and_report(cfg, splits, tables, featurizer, features, gate_ms,
                                  {"transformer": E_T, "mamba": cfg.mamba}, big, Path(folder))
        info = json.loads((Path(folder) / "router.json").read_text())
    return result, info["dev_metrics"]


def summary_rows(test_records: list, table, cascade, big_p50: float) -> list[dict]:
    """Summary rows (mambaformer_report.summary_table's layout) of the calibrated cascade and the
    cascade-cost baselines: random escalation at its mix (one seeded draw) and the accuracy oracle."""
    from medmoe.eval.metrics import macro_f1
    from medmoe.mambaformer.experiments.baselines import OracleRouter, RandomRouter
    from medmoe.mambaformer.experiments.cascade import cascade_costs
    from medmoe.mambaformer.metrics import evaluate

    costs = cascade_costs(table)
    keep = cascade.decisions(table)
    routers = [("cascade (calibrated)", keep, cascade.router_ms),
               (f"cascade random({keep.mean():.2f})", RandomRouter(float(keep.mean())).route(table), 0.0),
               ("cascade oracle-accuracy", OracleRouter(costs=costs, objective="accuracy").route(table), 0.0)]
    gold = [r.answer for r in test_records]
    rows = []
    for name, decisions, router_ms in routers:
        m = evaluate(table, decisions, costs, router_ms)
        preds = [table.mamba.pred[i] if d else table.transformer.pred[i] for i, d in enumerate(decisions)]
        rows.append({"router": name, "accuracy": m.accuracy, "macro_f1": macro_f1(gold, preds), "p50_ms": m.p50_ms,
                     "p95_ms": m.p95_ms, "share_mamba": m.share_mamba, "speedup_vs_big": big_p50 / m.p50_ms})
    return rows


def distillation_table(sweep: dict) -> str:
    """Per alpha: E_M's head on the pool and on test, and its calibrated cascade on dev and on test."""
    from mambaformer_report import ci

    rows = ["| alpha | E_M head | pool accuracy (OOF) | pool agreement with E_T | cascade dev accuracy | cascade dev p50 ms | "
            "dev share kept | test E_M accuracy | test agreement with E_T | test cascade accuracy | test cascade p50 ms | "
            "test cascade - random at its mix, CI | chosen |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | :---: |"]
    for r in sweep["rows"]:
        d, t = r["cascade_dev"], r["cascade_test"]
        rows.append(f"| {r['alpha']:g} | {r['head']} | {r['pool_accuracy']:.3f} | {r['pool_agreement']:.3f} | {d['accuracy']:.3f} | "
                    f"{d['p50_ms']:.0f} | {d['share_kept']:.2f} | {r['test_accuracy']:.3f} | {r['test_agreement']:.3f} | "
                    f"{t['accuracy']:.3f} | {t['p50_ms']:.0f} | {ci(t['diff_vs_random_same_mix_ci95'])} | "
                    f"{'*' if r['chosen'] else ''} |")
    return "\n".join(rows)


def choice_table(result: dict) -> str:
    dev = result["router_choice"]["dev"]
    rows = ["| router (calibrated) | dev accuracy | dev p50 ms | dev share answered by E_M alone | deployed |",
            "| --- | ---: | ---: | ---: | :---: |"]
    for router, m in dev.items():
        rows.append(f"| {router.replace('_', ' ')} | {m['accuracy']:.3f} | {m['p50_ms']:.0f} | {m['share_mamba']:.2f} | "
                    f"{'*' if router == result['deployed_router'] else ''} |")
    return "\n".join(rows)


def markdown(name: str, result: dict, timing: dict) -> str:
    """The report's body: how the experts answer, E_M's distillation, the router chosen on dev, the
    targets of both routers (mambaformer_report's wording), the tables."""
    from mambaformer_report import summary_table, targets
    from medmoe.mambaformer.experiments.pareto import markdown_table

    ex, cas, choice = result["examples"], result["cascade"], result["router_choice"]
    alpha = result["distillation"]["alpha"]
    how = {"transformer": "pool CV accuracy",
           "mamba": f"alpha {alpha:g}: {'distilled from' if alpha else 'not distilled from'} E_T's head; pool out-of-fold accuracy"}
    experts = "\n".join(
        f"- {'E_T' if role == 'transformer' else 'E_M'} = `{info['source']}` ({info['dtype']}), head "
        f"{result['heads'][role]['chosen']} ({how[role]} {result['heads'][role]['cv_accuracy']:.3f}); latency model "
        f"fitted on {len(info['ms'])} timed test questions, median {info['median_ms']:.0f} ms"
        for role, info in timing["experts"].items())
    deployed = result["deployed_router"]
    reports = {"cascade": {"targets": cas["targets"], "tau": cas["tau"], "gate_points": cas["report"]["gate_points"],
                           "big": result["big"]},
               "token_gate": {**result, "targets": result["token_gate"]["targets"]}}
    sections = "".join(
        targets(reports[r], "cascade" if r == "cascade" else "gate", r == deployed,
                f"Targets: {'cascade' if r == 'cascade' else 'token gate'}{' (deployed)' if r == deployed else ''}")
        for r in (deployed, *(x for x in ("cascade", "token_gate") if x != deployed)))
    return (f"Dataset `{name}`: routers trained on {ex['train']} / calibrated on {ex['dev']} pool questions (folds 0-2 / 3-4), "
            f"test {ex['test']} (the whole split). Token gate: tau = {result['tau']:.4f} (beta {result['beta']:g}), cost "
            f"{result['gate_ms']:.2f} ms per query. Cascade: E_M answers first, escalates to E_T when its keep score "
            f"<= tau = {cas['tau']:.4f}; router cost {cas['router_ms'] * 1000:.0f} us per query, latency t_M (kept) or "
            f"t_M + t_T (escalated). E_T is also the largest offline Transformer, so the big baseline is E_T itself.\n\n"
            f"{experts}\n\n"
            "## Deployed router (chosen on dev)\n\n"
            f"Rule: the calibrated router fastest (p50) on dev within 1 point of E_T's dev accuracy "
            f"({choice['dev_et_accuracy']:.3f}), else the most accurate. Deployed: **{deployed.replace('_', ' ')}**. "
            "For the cascade, \"share to E_M\" is the share E_M answers alone (E_M runs on every query).\n\n"
            + choice_table(result) + "\n\n"
            "## E_M's head distilled from E_T's\n\n"
            "Loss (1 - alpha) CE(gold) + alpha KL(p_T || p_M), p_T = E_T's out-of-fold head probabilities (nested: "
            "the head answering fold k never saw fold k, nor did its teacher); alpha 0 is the plain CV-chosen head. "
            "The alpha used is the one whose calibrated cascade is fastest on dev within 1 point of E_T (same rule); "
            "the test columns are shown for every alpha, chosen or not. Caveat: this rule for alpha was settled after "
            "exploratory runs had shown test numbers for other rules (pool CV accuracy picks alpha 0, the one-SE rule "
            "alpha 1), so a result that holds only at some alphas is provisional until a rule fixed in advance "
            "confirms it on new data.\n\n"
            + distillation_table(result["distillation"]) + "\n\n"
            + sections + summary_table(result)
            + "\n\n## Pareto sweep: cascade (tau) and its baselines\n\n" + markdown_table(cas["report"])
            + "\n\n## Pareto sweep: token gate (tau x beta) and baselines\n\n" + markdown_table(result)
            + f"\n\n![accuracy vs latency](mambaformer_heads_{name}.png)\n")


def plot(result: dict, path: Path, title: str) -> None:
    """Both routers' sweeps and Pareto fronts and every baseline, accuracy against p50 latency."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for i, (label, report) in enumerate((("token gate", result), ("cascade", result["cascade"]["report"]))):
        points = report["gate_points"]
        ax.scatter([p["latency_ms"] for p in points], [p["accuracy"] for p in points], s=6, c=f"C{i}", alpha=0.25)
        front = sorted((p for p in points if p["pareto"]), key=lambda p: p["latency_ms"])
        ax.plot([p["latency_ms"] for p in front], [p["accuracy"] for p in front], "o-", c=f"C{i}", ms=3,
                drawstyle="steps-post", label=f"{label} Pareto front")
    markers = "s^vDPX*hp<>"
    cascade_only = [p for p in result["cascade"]["report"]["baselines"] if p["name"].startswith("cascade")]
    for i, p in enumerate(result["baselines"] + cascade_only):
        ax.scatter([p["latency_ms"]], [p["accuracy"]], marker=markers[i % len(markers)], s=50, c=f"C{i + 2}",
                   label=p["name"], zorder=3)
    for label in ("token_gate", "cascade"):
        d = result[label]["targets"]["deployed"]
        ax.scatter([d["p50_ms"]], [d["accuracy"]], marker="*", s=160, edgecolors="k", c="gold" if label == "cascade" else "w",
                   zorder=4, label=f"{label.replace('_', ' ')} (calibrated on dev)")
    ax.set_xlabel("p50 latency per query (ms)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    path.write_bytes(buffer.getvalue())


def report(args) -> None:
    from dataclasses import asdict
    from functools import partial

    import numpy as np

    from common import REPORTS, write_report
    from medmoe.data import load_dataset
    from medmoe.heads.fit import folds_of
    from medmoe.mambaformer.experiments.cascade import cascade_costs, cascade_report, choose_router, feature_names
    from medmoe.mambaformer.experiments.pareto import OperatingPoint
    from medmoe.mambaformer.experiments.pipeline import PipelineConfig, gate_inputs
    from medmoe.mambaformer.experiments.targets import routing_targets
    from medmoe.mambaformer.experts import load_expert
    from medmoe.mambaformer.metrics import RoutingMetrics

    torch.set_num_threads(args.threads)
    for name in args.data.split(","):
        timing = json.loads((RUNS / name / "timing.json").read_text())
        pool = [r for r in pool_records(name) if len(r.gold_indices) == 1]
        test = load_dataset(name, "test")
        answers, latency, head_features = expert_answers(name, pool, test, timing)
        is_dev = folds_of([r.id for r in pool]).numpy() >= 3
        index = {"train": np.flatnonzero(~is_dev), "dev": np.flatnonzero(is_dev)}
        splits = {s: [pool[i] for i in ix] for s, ix in index.items()} | {"test": test}
        tokens = timing["experts"]["mamba"]["prompt_tokens"]

        sweep = distillation_sweep(name, pool, test, answers, head_features,
                                   partial(split_tables, splits, index, latency=latency, tokens=tokens))
        tables, cascade = sweep["tables"], sweep["cascade"]
        answers["mamba"] = sweep["head"]
        mamba = load_expert("mamba", timing["experts"]["mamba"]["source"], tokenizer_source="smollm2-135m")
        featurizer, features, gate_ms = gate_inputs(mamba, splits)
        et = tables["test"].transformer
        big = OperatingPoint(f"{E_T} head alone", float(et.correct.mean()), float(np.percentile(et.latency_ms, 50)), kind="baseline")
        cfg = PipelineConfig(dataset=name, transformer=E_T, mamba=timing["experts"]["mamba"]["source"], big=None,
                             out=str(RUNS / "route"))
        result, gate_dev = token_gate(cfg, splits, tables, featurizer, features, gate_ms, big)

        test_table, gold = tables["test"], [r.answer for r in test]
        cas_report = cascade_report(test_table, cascade, [big])
        cas_report["big"] = asdict(big)
        cas_targets = routing_targets(test_table, gold, cascade.decisions(test_table), cascade.router_ms, cas_report,
                                      costs=cascade_costs(test_table))
        dev = {"token_gate": RoutingMetrics(**gate_dev), "cascade": cascade.calibration.metrics}
        deployed = choose_router(dev, sweep["dev_et_accuracy"])
        result["summary"] += summary_rows(test, test_table, cascade, big.latency_ms)
        result["token_gate"] = {"targets": result["targets"], "tau": result["tau"], "dev_metrics": gate_dev}
        result["cascade"] = {"targets": cas_targets, "tau": cascade.tau, "router_ms": cascade.router_ms,
                             "model": cascade.model.to_dict(feature_names(test_table.mamba.label_probs.shape[1])),
                             "dev_metrics": cascade.calibration.metrics.to_dict(), "report": cas_report}
        result["targets"] = cas_targets if deployed == "cascade" else result["token_gate"]["targets"]
        result["deployed_router"] = deployed
        result["router_choice"] = {"rule": "fastest p50 on dev within 1 point of E_T's dev accuracy, else the most accurate",
                                   "dev_et_accuracy": sweep["dev_et_accuracy"], "dev": {k: m.to_dict() for k, m in dev.items()}}
        result["distillation"] = {"alpha": sweep["alpha"], "rows": sweep["rows"]}
        result["heads"] = {role: {"chosen": a.candidate.name, "cv_accuracy": a.candidate.accuracy} for role, a in answers.items()}
        chosen = next(r for r in sweep["rows"] if r["chosen"])
        result["heads"]["mamba"] |= {"alpha": sweep["alpha"], "cv_accuracy": chosen["pool_accuracy"]}  # out of fold, as distilled
        result["timing"] = {role: {k: v for k, v in info.items() if k != "prompt_tokens"} for role, info in timing["experts"].items()}
        write_report(f"mambaformer_heads_{name}", f"MambaFormer with option heads on {name}", markdown(name, result, timing),
                     result)
        apgr = "/".join("-" if a is None else f"{a:.2f}" for a in (result["apgr"], cas_report["apgr"]))
        plot(result, REPORTS / f"mambaformer_heads_{name}.png", f"{name} test: token gate and cascade (APGR {apgr})")
        print((REPORTS / f"mambaformer_heads_{name}.md").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="E_M's features, both experts' latency models (CPU)")
    p.add_argument("--data", default="pubmedqa,dental")
    p.add_argument("--mamba", default=None, help="E_M: a hybrid folder or distill run (default: the main job's)")
    p.add_argument("--timed", type=int, default=40, help="test questions timed per expert")
    p.add_argument("--threads", type=int, default=2)
    r = sub.add_parser("report", help="heads, distillation, gate, cascade, report (minutes)")
    r.add_argument("--data", default="pubmedqa,dental")
    r.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    {"prepare": prepare, "report": report}[args.cmd](args)


if __name__ == "__main__":
    main()

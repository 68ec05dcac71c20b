"""MambaFormer end to end on one dataset: experts -> per-example results -> gate -> calibration -> test.

  1. run each frozen expert once over train / dev / test (per-example JSONL, resumable, cached);
  2. build the gate's feature tables from E_T's tokenizer and embeddings and the train split's text;
  3. train one gate per beta with the utility-guided loss (costs = measured latencies);
  4. calibrate tau on dev: the fastest routing within `tolerance` of E_T's dev accuracy, or the most
     accurate one within a latency budget;
  5. evaluate on test against every baseline (E_T only, E_M only, random at the same mix, length
     threshold fit on dev, the oracle, and the largest offline Transformer alone), sweep tau x beta
     for the Pareto plot, and write the table, JSON and PNG.

Routed latency per query = the chosen expert's measured latency on that query + the gate's measured
cost per query (features + gate), so the table needs no second pass of the experts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medmoe.data import load_dataset
from medmoe.data.record import Record
from medmoe.eval.metrics import macro_f1
from medmoe.eval.model import HFEvalModel
from medmoe.eval.runner import run_records
from medmoe.mambaformer.calibrate import calibrate_tau, threshold_sweep
from medmoe.mambaformer.checkpoint import RouterCheckpoint
from medmoe.mambaformer.experts import Expert, check_gate_records, load_expert
from medmoe.mambaformer.features import GateFeatures, GateFeaturizer, featurizer_for_tokenizer, pad_batch
from medmoe.mambaformer.lexicon import build_lexicon
from medmoe.mambaformer.loss import LossConfig
from medmoe.mambaformer.metrics import default_c_ref, evaluate
from medmoe.mambaformer.pareto import OperatingPoint, write_report
from medmoe.mambaformer.queries import query_text
from medmoe.mambaformer.results import ExpertOutcome, ExpertResults
from medmoe.mambaformer.train import TrainConfig, gate_scores, train_gate
from medmoe.mambaformer.workflow import baseline_routers, pareto_run


@dataclass
class PipelineConfig:
    dataset: str = "pubmedqa"
    transformer: str = "smollm2-135m"
    mamba: str = "runs/mamba-shallow"  # a `medmoe distill` run folder or a hybrid folder
    big: str | None = "gemma3-270m"  # the largest Transformer available offline, used alone
    train_limit: int | None = None
    dev_limit: int | None = None
    test_limit: int | None = None
    betas: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0)
    beta: float = 1.0  # the gate deployed (and calibrated) is the one trained with this beta
    tolerance: float = 0.01  # calibration: fastest dev routing within this of E_T's dev accuracy
    latency_budget_ms: float | None = None  # if set, calibrate for this p50 budget instead
    out: str = "runs/mambaformer"
    loss: dict[str, Any] = field(default_factory=dict)  # LossConfig overrides
    epochs: int = 60


def table_from_rows(records: Sequence[Record], rows_t: list[dict], rows_m: list[dict]) -> ExpertResults:
    """ExpertResults from the runner's per-example rows (same record order for both experts)."""

    def outcome(rows: list[dict]) -> ExpertOutcome:
        probs = np.array([[r["probs"][letter] for letter in rec.letters] for r, rec in zip(rows, records)])  # (N, K)
        gold = [rec.gold_indices for rec in records]
        p_gold = np.array([probs[i, list(g)].sum() for i, g in enumerate(gold)])
        return ExpertOutcome(
            loss=-np.log(np.clip(p_gold, 1e-12, 1.0)),  # l_e = -log p_e(gold)
            correct=np.array([r["correct"] for r in rows]),
            pred=[r["prediction"] for r in rows],
            latency_ms=np.array([r["latency_ms"] for r in rows]),
            label_probs=probs,
        )

    return ExpertResults(
        ids=[r.id for r in records],
        n_tokens=np.array([r["prompt_tokens"] for r in rows_t]),
        experts={"transformer": outcome(rows_t), "mamba": outcome(rows_m)},
    )


def gate_inputs(featurizer: GateFeaturizer, tokenizer: Any, records: Sequence[Record]) -> GateFeatures:
    """Gate features of each record's query text (question, context, options; never the explanation,
    which a user's query does not have), batched and padded."""
    ids = tokenizer([query_text(r) for r in records], add_special_tokens=False)["input_ids"]
    return featurizer(*pad_batch(ids))


def gate_cost_ms(checkpoint: RouterCheckpoint, tokenizer: Any, records: Sequence[Record], repeats: int = 5) -> float:
    """Median wall time per query of tokenizing + features + gate, one query at a time (as served)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for record in records[:50]:
            ids = tokenizer([query_text(record)], add_special_tokens=False)["input_ids"]
            checkpoint.route(*pad_batch(ids))
        times.append((time.perf_counter() - start) * 1000 / min(len(records), 50))
    return float(np.median(times))


def expert_table(experts: dict[str, Expert], records: Sequence[Record], folder: Path, label: str) -> ExpertResults:
    rows = {
        name: run_records(HFEvalModel(e.model, e.tokenizer, name), records, folder / f"{name}.jsonl", f"{label} {name}")
        for name, e in experts.items()
    }
    return table_from_rows(records, rows["transformer"], rows["mamba"])


def summary_row(name: str, table: ExpertResults, decisions: np.ndarray, gate_ms: float, big_p50: float | None) -> dict:
    """Accuracy, macro-F1, p50/p95 latency, share to E_M and speedup vs the big baseline of a routing."""
    m = evaluate(table, decisions, gate_ms=gate_ms)
    preds = [table.mamba.pred[i] if d else table.transformer.pred[i] for i, d in enumerate(decisions)]
    return {"router": name, "accuracy": m.accuracy, "p50_ms": m.p50_ms, "p95_ms": m.p95_ms, "share_mamba": m.share_mamba,
            "preds": preds, "speedup_vs_big": (big_p50 / m.p50_ms) if big_p50 else None}


def run_pipeline(cfg: PipelineConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    torch.manual_seed(0)
    out = Path(cfg.out) / cfg.dataset
    splits = {
        "train": load_dataset(cfg.dataset, "train")[: cfg.train_limit],
        "dev": load_dataset(cfg.dataset, "dev")[: cfg.dev_limit],
        "test": load_dataset(cfg.dataset, "test")[: cfg.test_limit],
    }
    log(f"loading experts: E_T = {cfg.transformer}, E_M = {cfg.mamba}")
    experts = {"transformer": load_expert("transformer", cfg.transformer),
               "mamba": load_expert("mamba", cfg.mamba, tokenizer_source=cfg.transformer)}
    check_gate_records(experts, cfg.dataset, len(splits["train"]))
    tables = {s: expert_table(experts, recs, out / s, f"{cfg.dataset} {s}") for s, recs in splits.items()}

    t_expert = experts["transformer"]
    lexicon = build_lexicon(splits["train"])
    featurizer = featurizer_for_tokenizer(t_expert.tokenizer, t_expert.model.get_input_embeddings().weight.detach(),
                                          [query_text(r) for r in splits["train"]], sorted(lexicon.terms))
    features = {s: gate_inputs(featurizer, t_expert.tokenizer, recs) for s, recs in splits.items()}
    costs = tables["train"].stacked("latency_ms")
    c_ref = default_c_ref(costs)

    scores: dict[float, dict[str, np.ndarray]] = {}
    gates = {}
    for beta in sorted(set(cfg.betas) | {cfg.beta}):
        loss = LossConfig.from_dict({**LossConfig().to_dict(), **cfg.loss, "beta": beta, "c_ref": c_ref})
        gate, _ = train_gate(features["train"], tables["train"], costs, loss, TrainConfig(epochs=cfg.epochs))
        gates[beta] = gate
        scores[beta] = {s: gate_scores(gate, features[s]) for s in ("dev", "test")}
        log(f"gate beta={beta:g}: trained on {len(tables['train'])} examples")

    dev, test = tables["dev"], tables["test"]
    checkpoint = RouterCheckpoint(gates[cfg.beta], featurizer, 0.5, info={"config": asdict(cfg)})
    gate_ms = gate_cost_ms(checkpoint, t_expert.tokenizer, splits["test"])
    checkpoint.tau = calibrate(scores[cfg.beta]["dev"], dev, cfg, gate_ms)
    checkpoint.save(out / "router")

    decisions = scores[cfg.beta]["test"] > checkpoint.tau
    big = None
    if cfg.big:
        big_expert = load_expert("big", cfg.big)
        big_rows = run_records(HFEvalModel(big_expert.model, big_expert.tokenizer, cfg.big), splits["test"], out / "test" / "big.jsonl", f"{cfg.dataset} test {cfg.big}")
        big = OperatingPoint(f"{cfg.big} alone", float(np.mean([r["correct"] for r in big_rows])),
                             float(np.percentile([r["latency_ms"] for r in big_rows], 50)), kind="baseline")
    deployed_first = {cfg.beta: scores[cfg.beta]["test"], **{b: s["test"] for b, s in scores.items()}}
    routers = baseline_routers(test, float(decisions.mean()), dev)
    report = pareto_run(test, deployed_first, checkpoint.tau, dev, extra_points=[big] if big else [], gate_ms=gate_ms,
                        routers=routers)
    rows = [summary_row(r.name, test, r.route(test), 0.0, big.latency_ms if big else None) for r in routers]
    rows.append(summary_row("mambaformer (calibrated)", test, decisions, gate_ms, big.latency_ms if big else None))
    gold = [rec.answer for rec in splits["test"]]
    for row in rows:
        row["macro_f1"] = macro_f1(gold, row.pop("preds"))
    report.update({"summary": rows, "tau": checkpoint.tau, "beta": cfg.beta, "gate_ms": gate_ms, "examples": {s: len(t) for s, t in tables.items()},
                   "big": asdict(big) if big else None, "config": asdict(cfg)})
    write_report(report, out, name="pareto", header=f"# MambaFormer on {cfg.dataset} test\n")
    return report


def calibrate(dev_scores: np.ndarray, dev: ExpertResults, cfg: PipelineConfig, gate_ms: float) -> float:
    """tau on dev: within a latency budget (most accurate), else fastest within `tolerance` of E_T."""
    if cfg.latency_budget_ms is not None:
        return calibrate_tau(dev_scores, dev, cfg.latency_budget_ms, gate_ms=gate_ms).tau
    target = float(dev.transformer.correct.mean()) - cfg.tolerance
    sweep = threshold_sweep(dev_scores, dev, gate_ms=gate_ms)
    ok = [(tau, m) for tau, m in sweep if m.accuracy >= target] or [max(sweep, key=lambda tm: tm[1].accuracy)]
    return min(ok, key=lambda tm: (tm[1].p50_ms, -tm[1].accuracy))[0]

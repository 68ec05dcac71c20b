"""MambaFormer end to end on one dataset: experts -> per-example results -> gate -> calibration -> test.

  1. run each frozen expert once over train / dev / test (per-example JSONL, resumable, cached);
  2. build the gate's feature tables from E_T's tokenizer and embeddings and the train split's text,
     and each split's query features (`queries.query_features`, the one path the server uses too);
  3. measure the gate's own cost per query (`latency.gate_cost_ms`, on dev queries, one at a time);
  4. per beta, `fit.fit_gate`: train the gate with the utility-guided loss (costs = measured
     latencies) and calibrate tau on dev (`calibrate.calibrate_tau`, gate cost included): the fastest
     routing within `tolerance` of E_T's dev accuracy, or the most accurate one within a latency budget;
  5. save the gate of `beta` as the router checkpoint (tau, gate cost, both experts' sources);
  6. evaluate on test against every baseline (E_T only, E_M only, random at the same mix, length
     threshold fit on dev, the oracle, and the largest offline Transformer alone), sweep tau x beta
     for the Pareto plot, and write the table, JSON and PNG; the report's "floor" is the best constant
     answer on test and its "targets" the issue's targets (`targets.routing_targets`).

Routed latency per query = the chosen expert's measured latency on that query + the gate's measured
cost per query, so the table needs no second pass of the experts.

Precision and device (`cfg.dtype`, `cfg.device`; `medmoe run --dtype/--device`): every expert loads
through `experts.load_expert` (E_T and the big baseline in the dtype asked for, `auto` = bfloat16 where
the hardware computes it natively; the Mamba hybrid in float32 on CPU, its fused kernels' dtype). The
per-example rows are keyed by question id only, so `<out>/<dataset>/experts.json` records each expert's
resolved dtype and device; a later run asking one of them for another is an error naming --dtype/--device
(rows from before that file existed count as float32 on cpu, the only setting medmoe had then), as
`medmoe eval`'s run.json refuses a resumed run with other settings.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medmoe.data import load_dataset
from medmoe.data.record import Record
from medmoe.errors import DataError, MedmoeError
from medmoe.eval.metrics import macro_f1
from medmoe.eval.model import HFEvalModel
from medmoe.eval.runner import read_done, run_records
from medmoe.mambaformer.calibrate import DEFAULT_TOLERANCE
from medmoe.mambaformer.checkpoint import RouterCheckpoint
from medmoe.mambaformer.experiments.baselines import baseline_routers
from medmoe.mambaformer.experiments.expert_heads import ANSWERS, ExpertHead, answer_with_heads, heads_folder
from medmoe.mambaformer.experiments.pareto import OperatingPoint, pareto_run, write_report
from medmoe.mambaformer.experiments.targets import Floor, routing_targets
from medmoe.mambaformer.experts import Expert, check_gate_records, load_expert
from medmoe.mambaformer.features import GateFeatures, GateFeaturizer, featurizer_for_tokenizer
from medmoe.mambaformer.fit import FittedGate, fit_gate
from medmoe.mambaformer.gate import TokenGate
from medmoe.mambaformer.latency import gate_cost_ms
from medmoe.mambaformer.lexicon import build_lexicon
from medmoe.mambaformer.loss import LossConfig
from medmoe.mambaformer.metrics import evaluate
from medmoe.mambaformer.queries import query_features, query_text
from medmoe.mambaformer.results import ExpertOutcome, ExpertResults
from medmoe.mambaformer.train import TrainConfig, gate_scores
from medmoe.paths import atomic_write_json

PLACEMENT_FILE = "experts.json"  # <out>/<dataset>/: each expert's dtype and device its cached rows were computed in
LEGACY_PLACEMENT = {"dtype": "float32", "device": "cpu"}  # rows written before PLACEMENT_FILE existed


@dataclass
class PipelineConfig:
    dataset: str = "pubmedqa"
    transformer: str = "smollm2-135m"
    mamba: str = "runs/mamba-shallow"  # a `medmoe mambaformer distill` run folder or a hybrid folder
    big: str | None = "gemma3-270m"  # the largest Transformer available offline, used alone
    train_limit: int | None = None
    dev_limit: int | None = None
    test_limit: int | None = None
    betas: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0)
    beta: float = 1.0  # the gate deployed (and calibrated) is the one trained with this beta
    tolerance: float = DEFAULT_TOLERANCE  # calibration: fastest dev routing within this of E_T's dev accuracy
    latency_budget_ms: float | None = None  # if set, calibrate for this p50 budget instead
    out: str = "runs/mambaformer"
    loss: dict[str, Any] = field(default_factory=dict)  # LossConfig overrides
    epochs: int = 60
    dtype: str = "float32"  # experts' dtype: auto | float32 | bfloat16 | float16 (the hybrid stays float32 on CPU)
    device: str = "cpu"  # auto | cpu | cuda | cuda:N | mps
    answers: str = "zero-shot"  # how the experts answer: zero-shot (own option likelihoods) | heads (expert_heads.py)

    def __post_init__(self) -> None:
        if self.answers not in ANSWERS:
            raise MedmoeError(f"answers must be one of {', '.join(ANSWERS)}, got {self.answers!r}")


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


def expert_table(experts: dict[str, Expert], records: Sequence[Record], folder: Path, label: str) -> ExpertResults:
    rows = {
        name: run_records(HFEvalModel(e.model, e.tokenizer, name), records, folder / f"{name}.jsonl", f"{label} {name}")
        for name, e in experts.items()
    }
    return table_from_rows(records, rows["transformer"], rows["mamba"])


def rows_folder(cfg: PipelineConfig, split: str) -> Path:
    """Where a run keeps a split's per-example rows: <out>/<dataset>/<split>/ (zero-shot answers) or its
    heads/ subfolder (`expert_heads.heads_folder`)."""
    out = Path(cfg.out) / cfg.dataset
    return heads_folder(out, split) if cfg.answers == "heads" else out / split


def cached_table(cfg: PipelineConfig, split: str) -> tuple[list[Record], ExpertResults]:
    """(records, ExpertResults) of a run's split from its cached per-example rows (no expert runs):
    what `medmoe mambaformer calibrate` re-picks tau on (`fit.recalibrate`)."""
    limit = {"train": cfg.train_limit, "dev": cfg.dev_limit, "test": cfg.test_limit}[split]
    records = load_dataset(cfg.dataset, split)[:limit]
    folder = rows_folder(cfg, split)
    rows = {e: read_done(folder / f"{e}.jsonl") for e in ("transformer", "mamba")}
    missing = [f"{folder / e}.jsonl" for e in rows if any(r.id not in rows[e] for r in records)]
    if missing:
        raise MedmoeError(f"{cfg.dataset} {split}: the run's cached results are incomplete ({', '.join(missing)}); "
                          "run `medmoe run` with the same settings first")
    return records, table_from_rows(records, [rows["transformer"][r.id] for r in records],
                                    [rows["mamba"][r.id] for r in records])


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
    experts = {"transformer": load_expert("transformer", cfg.transformer, dtype=cfg.dtype, device=cfg.device),
               "mamba": load_expert("mamba", cfg.mamba, tokenizer_source=cfg.transformer, dtype=cfg.dtype, device=cfg.device)}
    log(f"loaded experts: E_T = {cfg.transformer} ({placement_text(experts['transformer'])}), "
        f"E_M = {cfg.mamba} ({placement_text(experts['mamba'])})")
    check_gate_records(experts, cfg.dataset, len(splits["train"]))
    for name, expert in experts.items():
        check_placement(out, name, expert, [f / f"{name}.jsonl" for s in splits for f in (out / s, heads_folder(out, s))])
    heads: dict[str, ExpertHead] | None = None
    if cfg.answers == "heads":
        heads = answer_with_heads(experts, cfg.dataset, splits, out, log)
        tables = {s: cached_table(cfg, s)[1] for s in splits}
    else:
        tables = {s: expert_table(experts, recs, out / s, f"{cfg.dataset} {s}") for s, recs in splits.items()}

    featurizer, features, gate_ms = gate_inputs(experts["transformer"], splits)
    placements = {n: {"source": e.source, "dtype": e.dtype, "device": e.device} for n, e in experts.items()}
    big = None
    if cfg.big:
        big_expert = load_expert("big", cfg.big, dtype=cfg.dtype, device=cfg.device)
        log(f"loaded the big baseline: {cfg.big} ({placement_text(big_expert)})")
        big = big_baseline(big_expert, splits["test"], out / "test" / "big.jsonl", cfg.dataset)
        placements["big"] = {"source": big_expert.source, "dtype": big_expert.dtype, "device": big_expert.device}
    sources: dict[str, str | None] = {n: e.source for n, e in experts.items()}
    return route_and_report(cfg, splits, tables, featurizer, features, gate_ms, sources,
                            big, out / "router", log, placement=placements, heads=heads)


def placement_text(expert: Expert) -> str:
    return f"{expert.dtype}, {expert.device}"


def check_placement(out: Path, name: str, expert: Expert, rows_files: Sequence[Path]) -> None:
    """Record the dtype and device `expert`'s rows in `rows_files` are computed in (<out>/PLACEMENT_FILE),
    or refuse to add to rows computed in another: their latencies and scores would mix two settings."""
    path = out / PLACEMENT_FILE
    recorded = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    now = {"dtype": expert.dtype, "device": expert.device}
    before = recorded.get(name)
    if before is None and any(f.exists() and f.stat().st_size for f in rows_files):
        before = LEGACY_PLACEMENT
    if before is not None and before != now:
        flags = " ".join(f"--{key} {before.get(key)}" for key in now if before.get(key) != now[key])
        raise DataError.single(path, f"this run folder holds {name} results computed in {before.get('dtype')} on "
                                     f"{before.get('device')}, and this run loads {name} in {now['dtype']} on {now['device']}; "
                                     f"use another --output, or {flags} to add to those results")
    if name not in recorded:  # first rows of this expert here, or rows from before this file: record them
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {**recorded, name: now})


def gate_inputs(expert: Expert, splits: dict[str, list[Record]]) -> tuple[GateFeaturizer, dict[str, GateFeatures], float]:
    """(featurizer, each split's query features, the gate's measured cost per query in ms): the feature
    tables from `expert`'s tokenizer and input embeddings and the train split's text (and lexicon)."""
    lexicon = build_lexicon(splits["train"])
    featurizer = featurizer_for_tokenizer(expert.tokenizer, expert.model.get_input_embeddings().weight.detach(),
                                          [query_text(r) for r in splits["train"]], sorted(lexicon.terms))
    features = {s: query_features(featurizer, expert.tokenizer, recs) for s, recs in splits.items()}
    # the gate's own cost per query, as served (depends on the featurizer, not on the gate's weights)
    return featurizer, features, gate_cost_ms(featurizer, TokenGate(), expert.tokenizer, splits["dev"])


def big_baseline(big_expert: Expert, records: Sequence[Record], rows_file: Path, dataset: str) -> OperatingPoint:
    """The largest offline Transformer alone on the test records (zero-shot letter scores, cached rows)."""
    source = big_expert.source
    check_placement(rows_file.parent.parent, "big", big_expert, [rows_file])
    big_rows = run_records(HFEvalModel(big_expert.model, big_expert.tokenizer, source), records, rows_file, f"{dataset} test {source}")
    return OperatingPoint(f"{source} alone", float(np.mean([r["correct"] for r in big_rows])),
                          float(np.percentile([r["latency_ms"] for r in big_rows], 50)), kind="baseline")


def route_and_report(cfg: PipelineConfig, splits: dict[str, list[Record]], tables: dict[str, ExpertResults],
                     featurizer: GateFeaturizer, features: dict[str, GateFeatures], gate_ms: float,
                     experts: dict[str, str | None], big: OperatingPoint | None, router_dir: Path | None,
                     log: Callable[[str], None] = print, placement: dict[str, dict] | None = None,
                     heads: dict[str, ExpertHead] | None = None) -> dict[str, Any]:
    """Steps 4-6 on per-example expert results, wherever they came from (the experts' own scores here,
    option heads in benchmarks/mambaformer_heads.py): `route_tables` with the best constant answer of the
    test split as the floor, each router's macro-F1, and the report written to <out>/<dataset>/pareto.*."""
    gold = [rec.answer for rec in splits["test"]]
    report = route_tables(cfg, tables, featurizer, features, gate_ms, experts, big, router_dir, gold, log, placement,
                          heads=heads)
    for row in report["summary"]:
        row["macro_f1"] = macro_f1(gold, row.pop("preds"))
    write_report(report, Path(cfg.out) / cfg.dataset, name="pareto", header=f"# MambaFormer on {cfg.dataset} test\n")
    return report


def route_tables(cfg: PipelineConfig, tables: dict[str, ExpertResults], featurizer: GateFeaturizer,
                 features: dict[str, GateFeatures], gate_ms: float, experts: dict[str, str | None],
                 big: OperatingPoint | None, router_dir: Path | None, floor: Sequence[str] | Floor,
                 log: Callable[[str], None] = print, placement: dict[str, dict] | None = None,
                 oracle_beta: float = 1.0, heads: dict[str, ExpertHead] | None = None) -> dict[str, Any]:
    """Steps 4-6 on the train/dev/test tables, whatever their `correct` scores (0/1 for option scoring,
    a generation's quality in [0, 1] for `generative_routing`): a gate per beta, tau on dev, the router
    checkpoint of cfg.beta in `router_dir` (None: not saved), the test report with baselines (the utility
    oracle's beta `oracle_beta`), Pareto sweep, "floor" and "targets" (`routing_targets` with `floor`: the
    test gold answers, whose best constant answer is the floor, or the `Floor` itself). Not written; each
    summary row still holds its router's test predictions under "preds". `placement`: each expert's
    source, dtype and device as loaded, kept in the report and the checkpoint. `heads`: the experts'
    option heads the tables came from (`expert_heads`), saved in the checkpoint with their latency models."""
    dev, test = tables["dev"], tables["test"]
    scores: dict[float, dict[str, np.ndarray]] = {}
    fitted: dict[float, FittedGate] = {}
    for beta in sorted(set(cfg.betas) | {cfg.beta}):
        loss = LossConfig.from_dict({**LossConfig().to_dict(), **cfg.loss, "beta": beta})
        fitted[beta] = fit_gate(tables["train"], features["train"], dev, features["dev"], loss, TrainConfig(epochs=cfg.epochs),
                                budget_ms=cfg.latency_budget_ms, gate_ms=gate_ms, tolerance=cfg.tolerance)
        scores[beta] = {"dev": fitted[beta].dev_scores, "test": gate_scores(fitted[beta].gate, features["test"])}
        log(f"gate beta={beta:g}: trained on {len(tables['train'])} examples")

    deployed = fitted[cfg.beta]
    if router_dir is not None:
        info = {"config": asdict(cfg), "dataset": cfg.dataset, "loss_config": deployed.loss_config.to_dict(),
                "calibration": deployed.calibration.to_dict(), "dev_metrics": deployed.dev_metrics}
        if placement:
            info["placement"] = placement
        RouterCheckpoint(deployed.gate, featurizer, deployed.tau, info=info, gate_ms=gate_ms, experts=experts,
                         latency_models={role: h.latency for role, h in (heads or {}).items()},
                         heads={role: (h.head, h.config) for role, h in (heads or {}).items()}).save(router_dir)

    decisions = scores[cfg.beta]["test"] > deployed.tau
    deployed_first = {cfg.beta: scores[cfg.beta]["test"], **{b: s["test"] for b, s in scores.items()}}
    routers = baseline_routers(test, float(decisions.mean()), dev, oracle_beta=oracle_beta)
    report = pareto_run(test, deployed_first, deployed.tau, dev, extra_points=[big] if big else [], gate_ms=gate_ms,
                        routers=routers)
    rows = [summary_row(r.name, test, r.route(test), 0.0, big.latency_ms if big else None) for r in routers]
    rows.append(summary_row("mambaformer (calibrated)", test, decisions, gate_ms, big.latency_ms if big else None))
    report.update({"summary": rows, "tau": deployed.tau, "beta": cfg.beta, "gate_ms": gate_ms, "examples": {s: len(t) for s, t in tables.items()},
                   "big": asdict(big) if big else None, "config": asdict(cfg)})
    if placement:
        report["placement"] = placement
    report["targets"] = routing_targets(test, floor, decisions, gate_ms, report)
    report["floor"] = {"answer": report["targets"]["floor_answer"], "accuracy": report["targets"]["floor_accuracy"]}
    return report

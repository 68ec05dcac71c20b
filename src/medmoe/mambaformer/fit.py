"""Fit the router on cached expert results (the experts themselves never run here).

  fit_gate       train a gate on the train table, then calibrate tau on dev (`calibrate.calibrate_tau`)
                 with the gate's measured cost; the pipeline (`medmoe run`) fits one per beta with it
  train_router   `medmoe mambaformer gate train`: lexicon, feature tables from E_T, query features, the gate's
                 cost, fit_gate, and the checkpoint (naming both experts) with history.json
  recalibrate    `medmoe mambaformer gate calibrate` and `medmoe mambaformer calibrate`: tau again for a checkpoint on dev
                 results, by the same rule, with the gate cost stored in the checkpoint
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medmoe.data.record import Record
from medmoe.errors import ModelError
from medmoe.mambaformer.calibrate import DEFAULT_TOLERANCE, Calibration, calibrate_tau
from medmoe.mambaformer.checkpoint import RouterCheckpoint
from medmoe.mambaformer.features import FeatureConfig, GateFeatures, featurizer_for_tokenizer
from medmoe.mambaformer.gate import GateConfig, TokenGate
from medmoe.mambaformer.latency import LatencyModel, gate_cost_ms
from medmoe.mambaformer.lexicon import Lexicon, build_lexicon
from medmoe.mambaformer.loss import LossConfig
from medmoe.mambaformer.metrics import default_c_ref, evaluate
from medmoe.mambaformer.queries import MAX_QUERY_TOKENS, query_features, query_text, records_for
from medmoe.mambaformer.results import ExpertResults
from medmoe.mambaformer.train import TrainConfig, expert_costs, gate_scores, train_gate


@dataclass
class FittedGate:
    gate: TokenGate
    tau: float
    loss_config: LossConfig   # with C_ref filled in
    history: list[dict]
    calibration: Calibration
    dev_metrics: dict         # the routing at tau on dev, gate cost included
    dev_scores: np.ndarray    # (N_dev,) p_M


def fit_gate(train: ExpertResults, train_features: GateFeatures, dev: ExpertResults, dev_features: GateFeatures,
             loss_config: LossConfig, train_config: TrainConfig, latency_models: Mapping[str, LatencyModel] | None = None,
             budget_ms: float | None = None, statistic: str = "p50", gate_config: GateConfig | None = None,
             c_ref: float | None = None, gate_ms: float = 0.0, tolerance: float = DEFAULT_TOLERANCE) -> FittedGate:
    """Train on `train` (costs from the latency models, else measured), then calibrate tau on `dev` (dev
    latencies as measured, plus `gate_ms`, the gate's own cost per query: pass the measured one,
    `latency.gate_cost_ms`): the most accurate tau within `budget_ms`, or without a budget the fastest
    within `tolerance` of E_T's dev accuracy (calibrate.py). C_ref defaults to E_T's mean train cost."""
    costs = expert_costs(train, latency_models)
    c_ref = default_c_ref(costs) if c_ref is None else c_ref
    loss_config = LossConfig.from_dict({**loss_config.to_dict(), "c_ref": c_ref})
    gate, history = train_gate(train_features, train, costs, loss_config, train_config, gate_config)
    dev_scores = gate_scores(gate, dev_features)
    calibration = calibrate_tau(dev_scores, dev, budget_ms, statistic, gate_ms=gate_ms, tolerance=tolerance)
    return FittedGate(gate, calibration.tau, loss_config, history, calibration,
                      evaluate(dev, dev_scores > calibration.tau, gate_ms=gate_ms).to_dict(), dev_scores)


def train_router(train: ExpertResults, dev: ExpertResults, train_records: Sequence[Record], dev_records: Sequence[Record],
                 out: str | Path, model: str, mamba: str | None = None, *, loss_config: LossConfig | None = None,
                 train_config: TrainConfig | None = None, latency_models: Mapping[str, LatencyModel] | None = None,
                 lexicon_path: str | Path | None = None, budget_ms: float | None = None, statistic: str = "p50",
                 tolerance: float = DEFAULT_TOLERANCE, max_tokens: int = MAX_QUERY_TOKENS,
                 feature_config: FeatureConfig | None = None, info: Mapping[str, Any] | None = None,
                 log: Callable[[str], None] = lambda _: None) -> tuple[RouterCheckpoint, FittedGate]:
    """`medmoe mambaformer gate train`'s job. train_records: the dataset's whole train split (the lexicon, unless
    `lexicon_path` is given, and the rarity counts come from it) and the source of the train table's
    queries; dev_records: the split of the dev table's ids. model: E_T (its tokenizer and embedding
    table feed the gate); mamba: E_M's source, so that the checkpoint can be asked, served and evaluated
    (`RoutedAnswerer.load`; without it the checkpoint names E_T only). Writes the checkpoint and
    history.json (and lexicon.json when it builds the lexicon) to `out`."""
    from medmoe.models import load_causal_lm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if lexicon_path is None:
        lexicon = build_lexicon(train_records)
        lexicon_path = out / "lexicon.json"
        lexicon.save(lexicon_path)
    else:
        lexicon = Lexicon.load(lexicon_path)
    log(f"loading {model} (tokenizer and embedding table)")
    lm, tokenizer = load_causal_lm(model)
    config = FeatureConfig.from_dict({**(feature_config or FeatureConfig()).to_dict(), "max_tokens": max_tokens})
    featurizer = featurizer_for_tokenizer(tokenizer, lm.get_input_embeddings().weight.detach(),
                                          [query_text(r) for r in train_records], sorted(lexicon.terms), config)
    del lm
    train_queries = records_for(train.ids, train_records, "train results")
    dev_queries = records_for(dev.ids, dev_records, "dev results")
    train_f = query_features(featurizer, tokenizer, train_queries)
    dev_f = query_features(featurizer, tokenizer, dev_queries)
    gate_ms = gate_cost_ms(featurizer, TokenGate(), tokenizer, dev_queries)  # the cost does not depend on the weights
    train_config = train_config or TrainConfig()
    log("training the gate")
    fitted = fit_gate(train, train_f, dev, dev_f, loss_config or LossConfig(), train_config, latency_models,
                      budget_ms, statistic, gate_ms=gate_ms, tolerance=tolerance)
    provenance = {**(info or {}), "loss_config": fitted.loss_config.to_dict(), "train_config": train_config.to_dict(),
                  "dev_metrics": fitted.dev_metrics, "calibration": fitted.calibration.to_dict(),
                  "final_epoch": fitted.history[-1] if fitted.history else None}
    checkpoint = RouterCheckpoint(fitted.gate, featurizer, fitted.tau, dict(latency_models or {}), str(lexicon_path),
                                  provenance, experts={"transformer": model, "mamba": mamba}, gate_ms=gate_ms)
    checkpoint.save(out)
    (out / "history.json").write_text(json.dumps(fitted.history, indent=1) + "\n", encoding="utf-8")
    return checkpoint, fitted


def recalibrate(router: str | Path, dev: ExpertResults, records: Sequence[Record], budget_ms: float | None = None,
                statistic: str = "p50", tolerance: float = DEFAULT_TOLERANCE, tokenizer: Any = None) -> Calibration:
    """Pick tau again for the checkpoint in `router` on the dev results `dev` (`records`: a split holding
    their ids) by `calibrate_tau`'s rule with the checkpoint's gate cost, and save it there (tau and
    info.calibration). A checkpoint without a measured gate cost (format 1) gets one measured now and
    saved. tokenizer: E_T's [default: loaded from the checkpoint's E_T source]."""
    checkpoint = RouterCheckpoint.load(router)
    if tokenizer is None:
        source = checkpoint.experts.get("transformer")
        if not source:
            raise ModelError(f"router checkpoint {router}: router.json names no Transformer expert (experts.transformer), "
                             "whose tokenizer the gate reads")
        from medmoe.models import load_tokenizer

        tokenizer = load_tokenizer(source)
    queries = records_for(dev.ids, records, "dev results")
    scores = gate_scores(checkpoint.gate, query_features(checkpoint.featurizer, tokenizer, queries))
    if checkpoint.gate_ms is None:
        checkpoint.gate_ms = gate_cost_ms(checkpoint.featurizer, checkpoint.gate, tokenizer, queries)
    calibration = calibrate_tau(scores, dev, budget_ms, statistic, gate_ms=checkpoint.gate_ms, tolerance=tolerance)
    checkpoint.tau = calibration.tau
    checkpoint.info["calibration"] = calibration.to_dict()
    checkpoint.save(router)
    return calibration

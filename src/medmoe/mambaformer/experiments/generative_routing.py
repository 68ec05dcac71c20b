"""MambaFormer in the generative setting: a gate trained on the per-example generative utility.

  1. each frozen expert writes an explanation for every option question of train, dev and test that
     carries a reference (`generative.explained_records`: Dental's MedMCQA `exp`, PubMedQA's long
     answer), scored with ROUGE-L and BERTScore (`generative.cached_rows`: resumable rows in
     `<out>/<dataset>/<split>/<expert>.jsonl`, one folder per split);
  2. one table per split (`quality_table`) from a quality metric q in [0, 1] (`bertscore_f1` by
     default, or `rouge_l`), for expert e on query x:
         l_e(x)       = 1 - q_e(x)                                     the loss the utility reads
         U_e(x)       = -l_e(x) - beta C_e(x) / C_ref = q_e(x) - 1 - beta C_e(x) / C_ref
         correct_e(x) = q_e(x)                                         "accuracy" = mean quality
     with C_e(x) the measured generation time and C_ref E_T's mean train generation time;
  3. the floor (`constant_text_floor`), the counterpart of the best constant answer: the one train
     reference text c* = argmax_c mean_{x in dev} q(c, ref(x)), chosen on dev, scored on test;
  4. the classification pipeline's own routing (`pipeline.route_tables`): a gate per beta, tau on dev
     (the fastest routing within `tolerance` quality units of E_T's dev quality: 0.01 BERTScore by
     default), the router checkpoint, every baseline, the tau x beta sweep and the targets
     (`targets.routing_targets` against that floor), returned and written under "generative".

What is not done here: the experts are not trained to write the long answers (completion training);
they explain zero-shot, which is the next step (docs/mambaformer.md, "Generative routing").
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from medmoe.data import load_dataset
from medmoe.data.record import Record
from medmoe.errors import MedmoeError
from medmoe.eval.prompts import language_of
from medmoe.eval.textmetrics import BertScorer, load_bertscorer, rouge_l
from medmoe.mambaformer.experiments.generative import EXPERTS, cached_rows, explained_records
from medmoe.mambaformer.experiments.pareto import write_report
from medmoe.mambaformer.experiments.pipeline import PipelineConfig, check_placement, gate_inputs, route_tables
from medmoe.mambaformer.experiments.targets import Floor
from medmoe.mambaformer.experts import Expert, check_gate_records, load_expert
from medmoe.mambaformer.results import ExpertOutcome, ExpertResults

METRICS = {"bertscore_f1": "BERTScore-F1", "rouge_l": "ROUGE-L"}  # row field -> name in reports
SPLITS = ("train", "dev", "test")


@dataclass
class GenerativeConfig(PipelineConfig):
    """The pipeline's settings plus the generation's. beta weighs one C_ref of latency against quality
    units: 0.1 by default, about the spread of per-question BERTScore-F1 (a prior, not tuned; the sweep
    over `betas` shows the others). No big baseline: it would have to generate too."""

    metric: str = "bertscore_f1"
    max_new_tokens: int = 64
    big: str | None = None
    betas: tuple[float, ...] = (0.0, 0.03, 0.1, 0.3, 1.0)
    beta: float = 0.1
    out: str = "runs/mambaformer_generative"


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise MedmoeError(f"generative routing: metric must be one of {', '.join(METRICS)}, got {metric!r}")


def quality_table(records: Sequence[Record], rows: Mapping[str, Sequence[dict[str, Any]]], metric: str) -> ExpertResults:
    """One split's table from both experts' generation rows (`rows[expert][i]` for `records[i]`):
    q_e = the row's `metric`, loss l_e = 1 - q_e, correct = q_e, latency = the generation's wall time,
    pred = the generation, n_tokens = E_T's prompt length (module docstring)."""
    check_metric(metric)
    ids = [r.id for r in records]
    for name in EXPERTS:
        if [row["id"] for row in rows[name]] != ids:
            raise MedmoeError(f"quality table: {name}'s generation rows are not those of the {len(ids)} records, in order")

    def outcome(expert_rows: Sequence[dict[str, Any]]) -> ExpertOutcome:
        q = np.array([row[metric] for row in expert_rows], dtype=np.float64)                # (N,) q_e
        return ExpertOutcome(loss=1.0 - q, correct=q, pred=[row["generation"] for row in expert_rows],
                             latency_ms=np.array([row["latency_ms"] for row in expert_rows], dtype=np.float64))

    return ExpertResults(ids, np.array([row["prompt_tokens"] for row in rows["transformer"]]),
                         {name: outcome(rows[name]) for name in EXPERTS})


class CachedBertScorer(BertScorer):
    """The same BERTScore, each distinct text embedded once: the floor scores every train reference
    against every dev reference."""

    def __init__(self, scorer: BertScorer):
        super().__init__(scorer.model, scorer.tokenizer, scorer.layer, scorer.name, scorer.max_tokens)
        self._embeddings: dict[str, torch.Tensor] = {}

    def embed(self, text: str) -> torch.Tensor:
        if text not in self._embeddings:
            self._embeddings[text] = super().embed(text)
        return self._embeddings[text]


def text_quality(metric: str, bertscorer: Callable[[str], BertScorer]) -> Callable[[str, Record], float]:
    """q(text, record): the metric of `text` against the record's reference, as the generation rows
    score it (BERTScore with the named encoder of the record's language)."""
    check_metric(metric)
    if metric == "rouge_l":
        return lambda text, record: rouge_l(text, cast(str, record.explanation))
    scorers: dict[str, CachedBertScorer] = {}

    def bertscore_f1(text: str, record: Record) -> float:
        language = language_of(record)
        if language not in scorers:
            scorers[language] = CachedBertScorer(bertscorer(language))
        return scorers[language].score(text, cast(str, record.explanation))[2]

    return bertscore_f1


@dataclass(frozen=True)
class ConstantText:
    """The best constant text: chosen among `candidates` train references on dev, `test` its floor."""

    text: str
    dev_quality: float
    test: Floor
    candidates: int

    def to_dict(self, metric: str) -> dict[str, Any]:
        return {"text": self.text, "metric": metric, "chosen_on": "dev", "dev_quality": self.dev_quality,
                "test_quality": float(self.test.correct.mean()), "candidates": self.candidates}


def constant_text_floor(train: Sequence[Record], dev: Sequence[Record], test: Sequence[Record], metric: str,
                        bertscorer: Callable[[str], BertScorer] = load_bertscorer) -> ConstantText:
    """The floor of generation: c* = argmax over the distinct train references c of mean_{x in dev}
    q(c, ref(x)) (ties: the first), chosen on dev only; its Floor holds q(c*, ref(x)) per test query x."""
    if not train or not dev or not test:
        raise MedmoeError("constant-text floor: needs train references to choose from, and dev and test references")
    q = text_quality(metric, bertscorer)
    candidates = list(dict.fromkeys(cast(str, r.explanation) for r in train))
    dev_means = [float(np.mean([q(c, r) for r in dev])) for c in candidates]
    best = int(np.argmax(dev_means))                                              # the first maximum
    text = candidates[best]
    return ConstantText(text, dev_means[best], Floor(text, np.array([q(text, r) for r in test])), len(candidates))


def explained_splits(cfg: GenerativeConfig) -> dict[str, list[Record]]:
    """Each split's option questions with a reference, the first `<split>_limit` of them."""
    limits = {"train": cfg.train_limit, "dev": cfg.dev_limit, "test": cfg.test_limit}
    splits = {s: explained_records(load_dataset(cfg.dataset, s))[:limits[s]] for s in SPLITS}
    empty = [s for s, records in splits.items() if not records]
    if empty:
        raise MedmoeError(f"generative routing on {cfg.dataset}: no question with a reference explanation in {', '.join(empty)}")
    return splits


def train_span(dataset: str, train: Sequence[Record]) -> int:
    """How many of the dataset's train records, from the first, the gate's (explained) train records span:
    what an expert fine-tuned with --skip-first must have left out (`check_gate_records`)."""
    position = {r.id: i for i, r in enumerate(load_dataset(dataset, "train"))}
    return 1 + max(position[r.id] for r in train)


def route_generations(cfg: GenerativeConfig, splits: Mapping[str, list[Record]],
                      rows: Mapping[str, Mapping[str, Sequence[dict[str, Any]]]], transformer: Expert, floor: ConstantText,
                      sources: dict[str, str | None], placement: dict[str, dict] | None = None,
                      log: Callable[[str], None] = print) -> dict[str, Any]:
    """Steps 2 and 4 on generation rows (`rows[split][expert]`, record order) and the floor: the tables,
    the gate's inputs from E_T (`transformer`), `route_tables`, and the report in <out>/<dataset>/pareto.*
    with the router checkpoint in <out>/<dataset>/router; the targets and the floor under "generative"."""
    tables: dict[str, ExpertResults] = {s: quality_table(splits[s], rows[s], cfg.metric) for s in SPLITS}
    featurizer, features, gate_ms = gate_inputs(transformer, dict(splits))
    out = Path(cfg.out) / cfg.dataset
    report = route_tables(cfg, tables, featurizer, features, gate_ms, sources, None, out / "router", floor.test, log,
                          placement, oracle_beta=cfg.beta)
    for row in report["summary"]:
        del row["preds"]  # the generations: in the rows files already
    del report["floor"]
    report["generative"] = {"metric": cfg.metric, "targets": report.pop("targets"), "floor": floor.to_dict(cfg.metric)}
    write_report(report, out, name="pareto", header=f"# MambaFormer (generative, {METRICS[cfg.metric]}) on {cfg.dataset} test\n",
                 quality=METRICS[cfg.metric])
    return report


def generative_routing_run(cfg: GenerativeConfig, experts: dict[str, Expert] | None = None,
                           bertscorer: Callable[[str], BertScorer] = load_bertscorer,
                           log: Callable[[str], None] = print) -> dict[str, Any]:
    """Steps 1-4 of the module docstring; `experts` already loaded, else from cfg.transformer / cfg.mamba."""
    check_metric(cfg.metric)
    torch.manual_seed(0)
    splits = explained_splits(cfg)
    if experts is None:
        experts = {"transformer": load_expert("transformer", cfg.transformer, dtype=cfg.dtype, device=cfg.device),
                   "mamba": load_expert("mamba", cfg.mamba, tokenizer_source=cfg.transformer, dtype=cfg.dtype,
                                        device=cfg.device)}
    check_gate_records(experts, cfg.dataset, train_span(cfg.dataset, splits["train"]))
    out = Path(cfg.out) / cfg.dataset
    for name, expert in experts.items():
        check_placement(out, name, expert, [out / s / f"{name}.jsonl" for s in SPLITS])
    scorer = functools.cache(bertscorer)  # one encoder per language for all splits and the floor
    settings = {"transformer": experts["transformer"].source, "mamba": experts["mamba"].source}
    rows = {s: cached_rows(experts, splits[s], out / s, cfg.max_new_tokens, scorer, settings) for s in SPLITS}
    floor = constant_text_floor(splits["train"], splits["dev"], splits["test"], cfg.metric, scorer)
    log(f"floor: the best constant train reference scores {floor.dev_quality:.3f} {METRICS[cfg.metric]} on dev")
    placement = {n: {"source": e.source, "dtype": e.dtype, "device": e.device} for n, e in experts.items()}
    return route_generations(cfg, splits, rows, experts["transformer"], floor,
                             {n: e.source for n, e in experts.items()}, placement, log)

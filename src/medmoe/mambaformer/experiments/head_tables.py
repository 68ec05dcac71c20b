"""Per-example expert results from target-specific output heads on cached features, for the router.

The gate learns from each expert's outcomes on its training records, so those outcomes must be what
the expert does on questions it has not seen. A head fitted on the whole pool has seen every pool
question; here each pool question's answer comes from the head fitted on the other folds (5 folds by
a hash of the id, `heads.fit.folds_of`: cross-fitting), and each test question's from the head fitted
on the whole pool (what is deployed). The head itself (kind, layer, pooling, lambda, loss) is the one
cross-validation picks on the pool (`heads.fit.score_candidates`, no contextual calibration: that
needs the model, and these tables need only its features).

Shapes: N pool questions, M test questions, K option slots; probabilities p (N, K) softmax of the head's
logits; the expert's loss on a question is l = -log p(gold) (what the gate's utility reads).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from medmoe.data.record import Record
from medmoe.heads.features import Features
from medmoe.heads.fit import Candidate, TrainingSet, best, fit_candidate, folds_of, option_inputs, score_candidates, training_set
from medmoe.mambaformer.results import ExpertOutcome, ExpertResults


@dataclass
class HeadAnswers:
    """One expert's head answers: the chosen candidate, out-of-fold pool probabilities and test ones."""

    candidate: Candidate
    pool_probs: np.ndarray  # (N, K), each row from the head fitted without that row's fold
    test_probs: np.ndarray  # (M, K), from the head fitted on the whole pool


def head_probs(ts: TrainingSet, candidate: Candidate, features: Features, letters: int) -> np.ndarray:
    """(len(features.ids), K) probabilities of `candidate` fitted on `ts`, on other records' features."""
    head = fit_candidate(ts, candidate)
    f, present = option_inputs(features, letters)
    h = None if candidate.layer is None or candidate.pooling is None else features.pooled(candidate.layer, candidate.pooling)
    with torch.no_grad():
        logits = head(h if head.W.shape[1] else None, f, present)
    return torch.softmax(logits, dim=-1).numpy()


def subset(ts: TrainingSet, keep: np.ndarray) -> TrainingSet:
    """The rows of `ts` where `keep` (N,) bool is true."""
    ids = list(np.array(ts.ids)[keep])
    mask = torch.from_numpy(keep)
    return TrainingSet(ids, ts.features.select(ids), ts.f[mask], ts.present[mask], ts.y[mask])


def cross_fitted(pool: Sequence[Record], pool_features: Features, test_features: Features,
                 layers: Sequence[int] | None = None) -> HeadAnswers:
    """The CV-chosen head's out-of-fold answers on the (single-answer) pool and its answers on the test set."""
    ts = training_set(pool_features, pool)
    candidate = best(score_candidates(ts, None, layers))
    folds = folds_of(ts.ids).numpy()
    oof = np.zeros((len(ts.ids), ts.letters))
    for k in np.unique(folds):
        held = folds == k
        oof[held] = head_probs(subset(ts, ~held), candidate, ts.features.select(list(np.array(ts.ids)[held])), ts.letters)
    return HeadAnswers(candidate, oof, head_probs(ts, candidate, test_features, ts.letters))


def outcome(records: Sequence[Record], probs: np.ndarray, latency_ms: np.ndarray) -> ExpertOutcome:
    """An expert's ExpertOutcome from its probabilities (N, K) over each record's options."""
    gold = [r.gold_indices[0] for r in records]
    p_gold = probs[np.arange(len(records)), gold]
    pred_index = probs.argmax(1)
    return ExpertOutcome(
        loss=-np.log(np.clip(p_gold, 1e-12, 1.0)),  # l_e = -log p_e(gold)
        correct=pred_index == np.array(gold),
        pred=[r.letters[i] for r, i in zip(records, pred_index)],
        latency_ms=np.asarray(latency_ms, dtype=np.float64),
        label_probs=probs,
    )


def results_table(records: Sequence[Record], probs: Mapping[str, np.ndarray], latency_ms: Mapping[str, np.ndarray],
                  n_tokens: np.ndarray) -> ExpertResults:
    """ExpertResults of `records` from each expert's ("transformer", "mamba") probabilities and latencies."""
    return ExpertResults(ids=[r.id for r in records], n_tokens=n_tokens,
                         experts={e: outcome(records, probs[e], latency_ms[e]) for e in ("transformer", "mamba")})

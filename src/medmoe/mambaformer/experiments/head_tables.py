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

Distillation (`distilled`): E_M's head can also learn E_T's answers. With q (N, K) E_T's probabilities
on the pool, the student's loss is (1 - alpha) CE(gold) + alpha KL(q || p_M) (`heads.fit.fit_head`),
alpha = 0 the plain head. The teacher's targets never carry the held-out fold: the student head that
answers fold k trains on rows of folds j != k whose q comes from E_T's head fitted on the folds
other than j and k (nested cross-fitting); the whole-pool student (test answers) trains on E_T's
out-of-fold q. A distilled student is the best hidden-state head of the plain CV (distilling a
zero-shot answer or a bias does not track anyone). Each alpha's out-of-fold answers are the student's
pool answers for the router; which alpha is used is the router's choice on the pool's dev folds
(benchmarks/mambaformer_heads.py: the cascade's deployment rule).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from medmoe.data.record import Record
from medmoe.errors import MedmoeError
from medmoe.heads.features import Features
from medmoe.heads.fit import (
    Candidate,
    TrainingSet,
    best,
    fit_candidate,
    fit_head,
    folds_of,
    option_inputs,
    score_candidates,
    training_set,
)
from medmoe.mambaformer.results import ExpertOutcome, ExpertResults


@dataclass
class HeadAnswers:
    """One expert's head answers: the chosen candidate, out-of-fold pool probabilities and test ones."""

    candidate: Candidate
    pool_probs: np.ndarray  # (N, K), each row from the head fitted without that row's fold
    test_probs: np.ndarray  # (M, K), from the head fitted on the whole pool
    candidates: list[Candidate] = field(default_factory=list)  # every candidate the pool CV scored
    alpha: float = 0.0  # distillation weight of E_T's answers (0: the plain head)


ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)  # distillation weights tried on the pool


def head_probs(ts: TrainingSet, candidate: Candidate, features: Features, letters: int,
               soft: np.ndarray | None = None, alpha: float = 0.0) -> np.ndarray:
    """(len(features.ids), K) probabilities of `candidate` fitted on `ts`, on other records' features;
    with `soft` (len(ts.ids), K) teacher probabilities and alpha > 0, the head distilled towards them."""
    if alpha > 0:
        if soft is None or candidate.kind != "head":
            raise MedmoeError(f"distilling needs a hidden-state head and teacher probabilities, got {candidate.name}")
        head = fit_head(ts.h(candidate.layer, candidate.pooling), ts.f, ts.present, ts.y, candidate.l2 or 0.0,
                        balanced=candidate.balanced, soft=torch.from_numpy(soft).float(), alpha=alpha)
    else:
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
    candidates = score_candidates(ts, None, layers)
    candidate = best(candidates)
    return HeadAnswers(candidate, out_of_fold(ts, candidate), head_probs(ts, candidate, test_features, ts.letters),
                       candidates)


def out_of_fold(ts: TrainingSet, candidate: Candidate, alpha: float = 0.0,
                targets: Mapping[int, np.ndarray] | None = None) -> np.ndarray:
    """(N, K): each pool row answered by `candidate` fitted on the other folds; with alpha > 0, distilled
    towards targets[k] (N, K), the teacher's probabilities for the rows that train fold k's head."""
    if alpha > 0 and targets is None:
        raise MedmoeError("out-of-fold distillation needs the teacher's probabilities per held-out fold")
    folds = folds_of(ts.ids).numpy()
    oof = np.zeros((len(ts.ids), ts.letters))
    for k in np.unique(folds):
        held = folds == k
        soft = targets[int(k)][~held] if alpha > 0 and targets is not None else None
        oof[held] = head_probs(subset(ts, ~held), candidate, ts.features.select(list(np.array(ts.ids)[held])),
                               ts.letters, soft, alpha)
    return oof


def nested_targets(ts: TrainingSet, candidate: Candidate, folds: np.ndarray, outer: int) -> np.ndarray:
    """(N, K) teacher probabilities: row i of fold j != outer from the head fitted on the folds other than
    j and `outer` (rows of fold `outer` are left 0: they are the held-out ones)."""
    q = np.zeros((len(ts.ids), ts.letters))
    for j in np.unique(folds):
        if j == outer:
            continue
        rows = folds == j
        q[rows] = head_probs(subset(ts, (folds != j) & (folds != outer)), candidate,
                             ts.features.select(list(np.array(ts.ids)[rows])), ts.letters)
    return q


@dataclass
class Distillation:
    """E_M's head with and without E_T's answers: per alpha, its answers and pool (out-of-fold) scores."""

    answers: dict[float, HeadAnswers]
    pool_accuracy: dict[float, float]   # out-of-fold accuracy against gold
    pool_agreement: dict[float, float]  # out-of-fold argmax agreement with E_T's out-of-fold answers


def distilled(pool: Sequence[Record], student: HeadAnswers, student_features: Features, test_features: Features,
              teacher: HeadAnswers, teacher_features: Features, alphas: Sequence[float] = ALPHAS) -> Distillation:
    """E_M's head (`student`, from `cross_fitted`) distilled from E_T's (`teacher`) at each alpha > 0
    (module docstring), next to the plain head (alpha 0), with their out-of-fold pool scores."""
    ts, tts = training_set(student_features, pool), training_set(teacher_features, pool)
    if ts.ids != tts.ids:
        raise MedmoeError("distillation: the student's and the teacher's pools are not the same records")
    gold, teacher_pred = ts.y.numpy(), teacher.pool_probs.argmax(1)
    heads = [c for c in student.candidates if c.kind == "head"]
    answers = {0.0: student}
    if heads:
        candidate = best(heads)
        folds = folds_of(ts.ids).numpy()
        targets = {int(k): nested_targets(tts, teacher.candidate, folds, int(k)) for k in np.unique(folds)}
        for alpha in (a for a in alphas if a > 0):
            answers[alpha] = HeadAnswers(candidate, out_of_fold(ts, candidate, alpha, targets),
                                         head_probs(ts, candidate, test_features, ts.letters, teacher.pool_probs, alpha),
                                         student.candidates, alpha)
    accuracy = {a: float((h.pool_probs.argmax(1) == gold).mean()) for a, h in answers.items()}
    agreement = {a: float((h.pool_probs.argmax(1) == teacher_pred).mean()) for a, h in answers.items()}
    return Distillation(answers, accuracy, agreement)


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

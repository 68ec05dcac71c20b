"""Router tables from option heads (mambaformer.experiments.head_tables): out-of-fold pool answers never
come from a head that saw the question; test answers from the head fitted on the whole pool; E_M's head
distilled from E_T's answers, with nested cross-fitting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medmoe.data.record import Record
from medmoe.heads.features import Features
from medmoe.heads.fit import Candidate, fit_head, folds_of, training_set
from medmoe.mambaformer.experiments.head_tables import (
    ALPHAS,
    cross_fitted,
    distilled,
    head_probs,
    nested_targets,
    out_of_fold,
    results_table,
    subset,
)

LETTERS = ("A", "B", "C")


def synthetic(n: int, seed: int, prefix: str) -> tuple[list[Record], Features]:
    """n yes/no/maybe records whose layer-2 last state carries the gold option (plus noise)."""
    g = torch.Generator().manual_seed(seed)
    gold = torch.randint(0, 3, (n,), generator=g)
    hidden = torch.randn(n, 3, 8, generator=g)
    hidden[:, 2, :3] += 3 * torch.nn.functional.one_hot(gold, 3).float()
    records = [Record(id=f"{prefix}{i}", question=f"q{i} ?", options=("yes", "no", "maybe"), answer=LETTERS[int(y)])
               for i, y in enumerate(gold)]
    logprobs = torch.log(torch.full((n, 3), 1 / 3))
    return records, Features([r.id for r in records], hidden.half(), hidden.half(), logprobs)


def test_out_of_fold_answers_come_from_heads_that_did_not_see_the_question():
    pool, pool_features = synthetic(120, 0, "p")
    test, test_features = synthetic(40, 1, "t")
    answers = cross_fitted(pool, pool_features, test_features, layers=[2])
    assert answers.pool_probs.shape == (120, 3) and answers.test_probs.shape == (40, 3)
    np.testing.assert_allclose(answers.pool_probs.sum(1), 1, atol=1e-5)
    gold = np.array([r.gold_indices[0] for r in pool])
    assert (answers.pool_probs.argmax(1) == gold).mean() > 0.8  # the signal is learnable out of fold
    # fold 0's rows are exactly what the chosen head fitted on folds 1-4 alone answers
    held = folds_of([r.id for r in pool]).numpy() == 0
    ts = training_set(pool_features, pool)
    alone = head_probs(subset(ts, ~held), answers.candidate, pool_features.select(list(np.array(ts.ids)[held])), 3)
    np.testing.assert_allclose(answers.pool_probs[held], alone, atol=1e-6)
    whole = head_probs(ts, answers.candidate, pool_features.select(list(np.array(ts.ids)[held])), 3)
    assert not np.allclose(whole, alone)  # the whole-pool head (which saw them) answers them otherwise

def test_results_table_losses_and_predictions():
    records, _ = synthetic(4, 2, "r")
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.2, 0.5, 0.3]])
    table = results_table(records, {"transformer": probs, "mamba": probs[:, ::-1].copy()},
                          {"transformer": np.full(4, 100.0), "mamba": np.full(4, 10.0)}, np.array([5, 6, 7, 8]))
    gold = [r.gold_indices[0] for r in records]
    np.testing.assert_allclose(table.transformer.loss, -np.log(probs[np.arange(4), gold]))
    assert table.transformer.pred == ["A", "B", "C", "B"]
    assert list(table.transformer.correct) == [p == r.answer for p, r in zip(table.transformer.pred, records)]
    assert table.mamba.latency_ms.tolist() == [10.0] * 4


def teacher_student(n: int, seed: int, prefix: str) -> tuple[list[Record], Features, Features]:
    """Records whose teacher answers t (gold 80% of the time): the teacher's layer-2 state carries t only,
    the student's carries t and the gold option (alone it learns gold; distilled, t)."""
    g = torch.Generator().manual_seed(seed)
    gold = torch.randint(0, 3, (n,), generator=g)
    t = torch.where(torch.rand(n, generator=g) < 0.7, gold, torch.randint(0, 3, (n,), generator=g))
    teacher, student = torch.randn(n, 3, 8, generator=g), torch.randn(n, 3, 8, generator=g)
    teacher[:, 2, :3] += 6 * torch.nn.functional.one_hot(t, 3).float()
    student[:, 2, :3] += 4 * torch.nn.functional.one_hot(t, 3).float()
    student[:, 2, 3:6] += 3 * torch.nn.functional.one_hot(gold, 3).float()
    records = [Record(id=f"{prefix}{i}", question=f"q{i} ?", options=("yes", "no", "maybe"), answer=LETTERS[int(y)])
               for i, y in enumerate(gold)]
    logprobs = torch.log(torch.full((n, 3), 1 / 3))
    ids = [r.id for r in records]
    return records, Features(ids, teacher.half(), teacher.half(), logprobs), Features(ids, student.half(), student.half(), logprobs)


def test_distillation_makes_the_student_answer_like_its_teacher():
    pool, teacher_f, student_f = teacher_student(200, 3, "p")
    test, teacher_tf, student_tf = teacher_student(60, 4, "t")
    teacher = cross_fitted(pool, teacher_f, teacher_tf, layers=[2])
    student = cross_fitted(pool, student_f, student_tf, layers=[2])
    dist = distilled(pool, student, student_f, student_tf, teacher, teacher_f)
    assert set(dist.answers) == set(ALPHAS) and dist.answers[0.0] is student  # alpha 0: the plain head
    assert dist.pool_accuracy[0.0] > 0.95                          # alone, the student learns gold (~0.99)
    assert dist.pool_agreement[1.0] > dist.pool_agreement[0.0] + 0.05 and dist.pool_agreement[1.0] > 0.95  # then E_T's t
    agreement = [dist.pool_agreement[a] for a in ALPHAS]
    assert agreement == sorted(agreement) and dist.pool_accuracy[1.0] < dist.pool_accuracy[0.0]
    for a in ALPHAS:
        assert dist.answers[a].test_probs.shape == (60, 3) and dist.answers[a].alpha == a
        np.testing.assert_allclose(dist.answers[a].pool_probs.sum(1), 1, atol=1e-5)


def test_a_distilled_held_out_answer_never_depends_on_its_own_gold():
    """Fold 0's answers at alpha = 1 (gold's weight 0) come from a student and teachers that never saw
    fold 0: relabelling fold 0 changes nothing in them (it changes the other folds' answers)."""
    pool, teacher_f, student_f = teacher_student(150, 5, "p")
    held = folds_of([r.id for r in pool]).numpy() == 0
    relabelled = [Record(id=r.id, question=r.question, options=r.options, answer=LETTERS[(r.gold_indices[0] + 1) % 3])
                  if h else r for r, h in zip(pool, held)]
    answers = []
    for records in (pool, relabelled):
        ts, tts = training_set(student_f, records), training_set(teacher_f, records)
        head = Candidate("head", 2, "last", 1e-2, balanced=False)
        folds = folds_of(ts.ids).numpy()
        targets = {int(k): nested_targets(tts, head, folds, int(k)) for k in np.unique(folds)}
        assert not targets[0][held].any()  # the held-out fold's own rows carry no teacher answer
        answers.append(out_of_fold(ts, head, 1.0, targets))
    np.testing.assert_allclose(answers[0][held], answers[1][held], atol=1e-6)
    assert not np.allclose(answers[0][~held], answers[1][~held])


def test_fit_head_with_alpha_0_is_the_plain_head_and_alpha_needs_a_teacher():
    pool, _, student_f = teacher_student(60, 6, "p")
    ts = training_set(student_f, pool)
    h = ts.h(2, "last")
    plain = fit_head(h, ts.f, ts.present, ts.y, balanced=False)
    same = fit_head(h, ts.f, ts.present, ts.y, balanced=False, soft=torch.full((60, 3), 1 / 3), alpha=0.0)
    assert torch.equal(plain.W, same.W) and torch.equal(plain.b, same.b)
    with pytest.raises(ValueError, match="teacher probabilities"):
        fit_head(h, ts.f, ts.present, ts.y, alpha=0.5)

"""Router tables from option heads (mambaformer.experiments.head_tables): out-of-fold pool answers never
come from a head that saw the question; test answers from the head fitted on the whole pool."""

from __future__ import annotations

import numpy as np
import torch

from medmoe.data.record import Record
from medmoe.heads.features import Features
from medmoe.heads.fit import folds_of, training_set
from medmoe.mambaformer.experiments.head_tables import cross_fitted, head_probs, results_table, subset

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

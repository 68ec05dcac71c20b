"""Option scoring with a shared context equals a naive full forward per option."""

from __future__ import annotations

import pytest
import torch

from medmoe.data.record import Record
from medmoe.eval.metrics import accuracy, macro_f1
from medmoe.eval.prompts import build_prompt
from medmoe.eval.scoring import encode_pair, score_options


def naive_logprob(model, tokenizer, context, continuation):
    ctx, cont = encode_pair(tokenizer, context, continuation)
    ids = torch.tensor([ctx + cont])
    logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    return sum(logp[len(ctx) - 1 + j, token].item() for j, token in enumerate(cont))


@pytest.mark.parametrize("continuations", [[" yes", " no", " maybe"], [" first option", " second", " third one here"]])
def test_shared_context_scores_equal_naive_forward(tiny_lm, continuations):
    model, tokenizer = tiny_lm
    context = "Context: patients with diabetes were treated. Question: which option is correct? Answer:"
    scores = score_options(model, tokenizer, context, continuations)
    expected = [naive_logprob(model, tokenizer, context, c) for c in continuations]
    assert scores.logprobs == pytest.approx(expected, abs=1e-4)
    assert sum(scores.probabilities()) == pytest.approx(1.0)


def test_plain_prompt_scores_letters_with_a_space(tiny_lm):
    _, tokenizer = tiny_lm
    record = Record(id="x", question="Which?", options=("first", "second"), answer="B")
    prompt = build_prompt(record, tokenizer)
    assert prompt.context.endswith("A. first\nB. second\nAnswer:")
    assert prompt.continuations == (" A", " B")


def test_macro_f1_on_a_hand_computed_case():
    gold = ["A", "A", "B", "C"]
    pred = ["A", "B", "B", "B"]
    # A: tp 1, fp 0, fn 1 -> 2/3;  B: tp 1, fp 2, fn 0 -> 1/2;  C: tp 0 -> 0
    assert macro_f1(gold, pred) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert accuracy(gold, pred) == 0.5

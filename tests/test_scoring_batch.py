"""Batched option scoring (shared prefix + length groups) against `score_options` on each prompt alone."""

import math

import pytest
import torch

from medmoe.eval.batch_scoring import MIN_SHARED_PREFIX, length_groups, score_options_batch
from medmoe.eval.prompts import Prompt
from medmoe.eval.scoring import score_options
from tiny_lm import tiny_llama, tiny_tokenizer

PREFIX = "Context : the patient has fever and cough and pain . Question : which drug is best ?"
PROMPTS = [  # one shared prefix, then suffixes of very different lengths; single-token options
    Prompt(f"{PREFIX} {tail} Answer :", (" A", " B", " C"), ())
    for tail in ("A", "A aspirin B heparin", "A aspirin with rest B heparin C surgery of the patient with pain and fever",
                 "A rest B surgery", "A aspirin , heparin , rest , surgery . B the patient has pain . C fever")
] + [Prompt("Question : fever ? Answer :", (" yes", " no", " maybe"), ())]  # shares nothing with the rest


@pytest.fixture(scope="module")
def lm():
    return tiny_llama(), tiny_tokenizer()


def record_shapes(model):
    shapes = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    return shapes, handle


@pytest.mark.parametrize("lengths", [[5, 90, 7, 88, 6, 200, 91, 5], [10] * 6, [3], list(range(1, 40, 3))])
@pytest.mark.parametrize("max_waste", [0.0, 0.15, 0.5])
def test_length_groups_cover_every_row_once_and_bound_the_padding(lengths, max_waste):
    groups = length_groups(lengths, max_waste)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        real = sum(lengths[i] for i in g)
        assert len(g) * max(lengths[i] for i in g) <= (1 + max_waste) * real + 1e-9
    assert len(length_groups(lengths, math.inf)) == 1  # no bound: the old single padded batch


def test_equal_lengths_form_one_group_and_outliers_their_own():
    assert length_groups([10, 10, 10, 10]) == [[0, 1, 2, 3]]
    assert length_groups([100, 10, 11, 10], 0.15) == [[1, 3, 2], [0]]


@pytest.mark.parametrize("max_waste", [0.0, 0.15, math.inf])
def test_batched_scores_equal_score_options_alone(lm, max_waste):
    model, tok = lm
    shapes, handle = record_shapes(model)
    try:
        batched = score_options_batch(model, tok, PROMPTS[:5], max_waste=max_waste)
    finally:
        handle.remove()
    assert shapes[0][0] == 1 and shapes[0][1] >= MIN_SHARED_PREFIX  # the shared prefix ran once, alone
    assert sum(s[0] * s[1] for s in shapes[1:]) < sum(b.context_tokens for b in batched)  # fewer tokens than 5 prompts
    for prompt, b in zip(PROMPTS, batched):
        alone = score_options(model, tok, prompt.context, prompt.continuations)
        assert b.logprobs == pytest.approx(alone.logprobs, abs=1e-4)
        assert b.context_tokens == alone.context_tokens


def test_prompts_without_a_common_prefix_are_scored_whole(lm):
    model, tok = lm
    shapes, handle = record_shapes(model)
    try:
        batched = score_options_batch(model, tok, PROMPTS)
    finally:
        handle.remove()
    shortest = min(b.context_tokens for b in batched)
    assert all(width >= shortest for _, width in shapes)  # no prefix pass: every forward runs whole contexts
    for prompt, b in zip(PROMPTS, batched):
        assert b.logprobs == pytest.approx(score_options(model, tok, prompt.context, prompt.continuations).logprobs, abs=1e-4)


def test_model_whose_layers_ignore_the_cache_gets_no_prefix_sharing(lm):
    """A hybrid with a Mamba mixer (no recurrent cache yet) would give wrong logits over a prefix
    cache: the check after the prefix pass must fall back to whole contexts."""
    from medmoe.mamba.transfer import build_hybrid

    model, tok = lm
    hybrid, _ = build_hybrid(model, attention_layers=[0])
    hybrid.eval()
    batched = score_options_batch(hybrid, tok, PROMPTS[:5])
    for prompt, b in zip(PROMPTS, batched):
        with torch.inference_mode():
            whole = torch.tensor([tok(prompt.context, add_special_tokens=False)["input_ids"]])
            last = torch.log_softmax(hybrid(input_ids=whole).logits[0, -1].float(), dim=-1)
        option_ids = [tok(c, add_special_tokens=False)["input_ids"][-1] for c in prompt.continuations]
        assert b.logprobs == pytest.approx([last[i].item() for i in option_ids], abs=1e-4)

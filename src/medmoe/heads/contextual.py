"""Contextual calibration (Zhao et al., 2021, "Calibrate before use"): the answer prior of a model
measured on content-free prompts, then removed.

For a benchmark's prompt format with K options, the content-free records put CONTENT_FREE texts in
place of the question (and the context and options, where the format has them). With p_cf (K,)
the model's mean option probabilities over them (renormalized over the K options), the calibrated
answer is argmax_k (s_k - log p_cf_k): the bias b = -log p_cf of a calibration head (models/head.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from medmoe.data.record import Record
from medmoe.eval.model import HFEvalModel
from medmoe.eval.prompts import build_prompt, is_yesno
from medmoe.heads.features import option_scores

CONTENT_FREE = ("N/A", "[MASK]", "...")


def content_free_records(example: Record) -> list[Record]:
    """The content-free versions of `example`'s format (same number of options, same kind)."""
    out = []
    for text in CONTENT_FREE:
        options = example.options if is_yesno(example) else tuple(text for _ in example.options)
        out.append(replace(example, id=f"content-free/{text}", question=text,
                           context=text if example.context else None, options=options, explanation=None))
    return out


@torch.inference_mode()
def contextual_bias(lm: HFEvalModel, examples: Sequence[Record], letters: int) -> torch.Tensor:
    """b (letters,) = -log p_cf for the most common option count K among `examples` (slots past K: 0)."""
    counts: dict[int, int] = {}
    for r in examples:
        counts[len(r.options)] = counts.get(len(r.options), 0) + 1
    k = max(counts, key=counts.__getitem__)
    example = next(r for r in examples if len(r.options) == k)
    probs = []
    for record in content_free_records(example):
        prompt = build_prompt(record, lm.tokenizer, (), "letter")
        logprobs = torch.tensor(option_scores(lm.model, lm.tokenizer, prompt.context, prompt.continuations))
        probs.append(torch.softmax(logprobs, dim=0))
    p_cf = torch.stack(probs).mean(0)  # (K,)
    bias = torch.zeros(letters)
    bias[:k] = -torch.log(p_cf)
    return bias

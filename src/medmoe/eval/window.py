"""Prompts that fit the model's window: one rule for long inputs, shared by `medmoe eval` and the server.

A prompt may hold at most `limit` tokens (the model's window less what follows the prompt: the
longest option, or the tokens to generate). When it is longer:

  1. the context passage is cut at a token boundary, keeping its beginning, until the prompt fits
     (`cut_context`; the server's rule, docs/serving.md). The instruction, the question, its options
     and the answer slot at the end of the prompt are never cut in this step;
  2. when the prompt without any context still does not fit (a 1 MB question), `medmoe eval` also
     cuts the question's start, keeping its end next to the answer slot (`cut_question`); the
     server refuses such a request instead (422).

Without this, a 1 MB question reached the model whole: attention over ~250k tokens asked for
191 GB. Eval rows record how many tokens were dropped (`truncated_tokens`), the summary counts the
prompts that were cut, and `medmoe eval` prints a warning.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from medmoe.data.record import Record
from medmoe.errors import MedmoeError
from medmoe.eval.prompts import Prompt, build_prompt
from medmoe.eval.scoring import bos_ids

CUT_STEP = 16  # tokens removed per retry when a cut text re-tokenizes longer
LABEL_ROOM = 8  # room for a label ("Context:") and line breaks the cut field brings back
MIN_PROMPT_TOKENS = 16  # a smaller limit leaves no room for a question

PromptTokens = Callable[[Record], int]  # the length in tokens of a record's whole prompt


def _with(record: Record, field: str, text: str) -> Record:
    """The record with its context (None when empty) or question replaced by `text`."""
    return replace(record, context=text or None) if field == "context" else replace(record, question=text)


def _cut(record: Record, field: str, keep_start: bool, prompt_tokens: PromptTokens, tokenizer: Any, limit: int) -> tuple[Record, int]:
    """(record with `field` shortened at a token boundary until its prompt fits or the field is empty,
    tokens dropped); keep_start keeps the field's beginning, else its end."""
    ids = tokenizer(getattr(record, field), add_special_tokens=False)["input_ids"]
    keep = min(max(limit - prompt_tokens(_with(record, field, "")) - LABEL_ROOM, 0), len(ids))
    while True:
        kept = ids[:keep] if keep_start else ids[len(ids) - keep:]
        cut = _with(record, field, tokenizer.decode(kept))
        if keep == 0 or prompt_tokens(cut) <= limit:
            return cut, len(ids) - keep
        keep = max(keep - CUT_STEP, 0)


def cut_context(record: Record, prompt_tokens: PromptTokens, tokenizer: Any, limit: int) -> tuple[Record, int]:
    """(record whose context is cut, keeping its beginning, until prompt_tokens(record) <= limit,
    context tokens dropped). The question is left whole: when it alone is too long the result has no
    context and still does not fit (the server then refuses; eval calls `cut_question`)."""
    if not record.context or prompt_tokens(record) <= limit:
        return record, 0
    return _cut(record, "context", True, prompt_tokens, tokenizer, limit)


def cut_question(record: Record, prompt_tokens: PromptTokens, tokenizer: Any, limit: int) -> tuple[Record, int]:
    """(record whose question is cut, keeping its end, until its prompt fits, question tokens dropped)."""
    if prompt_tokens(record) <= limit:
        return record, 0
    return _cut(record, "question", False, prompt_tokens, tokenizer, limit)


def fit_record(record: Record, prompt_tokens: PromptTokens, tokenizer: Any, limit: int) -> tuple[Record, int]:
    """(record whose prompt fits in `limit` tokens, tokens dropped): the context first, then the
    question's start (the module docstring). A MedmoeError names the record when even that is not
    enough (options or few-shot examples alone fill the window)."""
    if prompt_tokens(record) <= limit:
        return record, 0
    cut, dropped = cut_context(record, prompt_tokens, tokenizer, limit)
    cut, more = cut_question(cut, prompt_tokens, tokenizer, limit)
    if prompt_tokens(cut) > limit:
        raise MedmoeError(f"record {record.id}: the prompt is {prompt_tokens(cut)} tokens with no context and no question; "
                          f"the model's window allows {limit} (its options or few-shot examples are too long: try fewer --shots)")
    return cut, dropped + more


def window_of(network: Any) -> int | None:
    """The positions a network was built for (config.max_position_embeddings), or None when it names none
    (T5's relative positions): such a model's prompts are not cut."""
    window = getattr(getattr(network, "config", None), "max_position_embeddings", None)
    return int(window) if window else None


def readers(model: Any) -> list[tuple[Any, int]]:
    """(tokenizer, window) of each network that reads an EvalModel's prompts: the model itself, or each
    expert of the routed MambaFormer system (a record must fit the expert the gate picks)."""
    experts = getattr(model, "experts", None)
    pairs = [(e.tokenizer, e.model) for e in experts.values()] if experts else [(model.tokenizer, getattr(model, "model", None))]
    return [(tokenizer, window) for tokenizer, network in pairs if (window := window_of(network))]


def check_room(model: Any, new_tokens: int) -> None:
    """A MedmoeError when generating `new_tokens` leaves (almost) no room for a prompt in the window."""
    for _, window in readers(model):
        if window - new_tokens < MIN_PROMPT_TOKENS:
            raise MedmoeError(f"{getattr(model, 'name', 'the model')}: its window is {window} tokens; generating {new_tokens} "
                              f"leaves {max(window - new_tokens, 0)} for the prompt: lower --max-new-tokens")


def prompt_length(tokenizer: Any, prompt: Prompt) -> int:
    """Tokens a prompt runs through the model: BOS, the context, and its longest continuation."""
    ids = tokenizer(prompt.context, add_special_tokens=False)["input_ids"]
    longest = max((len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in prompt.continuations), default=0)
    return len(bos_ids(tokenizer, ids)) + len(ids) + longest


class PromptFitter:
    """Cuts each eval record so its prompt (with its shots, as `apply_rule` builds it) fits the window
    of every network that reads it. new_tokens: tokens generated after the prompt (0 for scoring)."""

    def __init__(self, model: Any, kind: str, multi: bool = False, new_tokens: int = 0):
        self.kind, self.multi = kind, multi
        check_room(model, new_tokens)
        self.limits = [(tokenizer, window - new_tokens) for tokenizer, window in readers(model)]

    def fit(self, record: Record, shots: Sequence[Record] = ()) -> tuple[Record, int]:
        """(record that fits, tokens dropped from its context and question)."""
        dropped = 0
        for tokenizer, limit in self.limits:
            record, cut = fit_record(record, self._counter(tokenizer, shots), tokenizer, limit)
            dropped += cut
        return record, dropped

    def _counter(self, tokenizer: Any, shots: Sequence[Record]) -> PromptTokens:
        """The length of a record's prompt as `apply_rule` builds it for this tokenizer and these shots."""
        return lambda r: prompt_length(tokenizer, build_prompt(r, tokenizer, shots, self.kind, self.multi))

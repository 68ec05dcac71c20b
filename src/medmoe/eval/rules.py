"""The scoring rules: how a model's output on an option question becomes a predicted answer.

  letter       one forward pass; the next-token log-probabilities of the option letters "A".."E"
               (yes/no/maybe questions: of the words) right after the prompt. Prediction = argmax.
  loglik       log p(option text | prompt), summed over the option's tokens (lm-eval's `acc`).
  loglik-norm  the same divided by the option's length in characters (lm-eval's `acc_norm`), so
               long options are not penalised for having more tokens.
  generate     greedy generation, then the strict extractor (extract.py) reads the letter(s);
               the only rule that can answer several letters for multi-answer questions.

Likelihood rules pick one option, so on a multi-answer question (CMExam, CMB-Exam 多项选择题) they
are never right: correctness is an exact match of the letter set. Use `generate` to credit them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from medmoe.data.record import Record
from medmoe.eval.extract import extract_letters, extract_yesno
from medmoe.eval.model import EvalModel
from medmoe.eval.prompts import build_prompt, is_yesno, may_have_several_answers

RULES = ("letter", "loglik", "loglik-norm", "generate")
CONTINUATIONS = {"letter": "letter", "loglik": "text", "loglik-norm": "text", "generate": "none"}


@dataclass
class Outcome:
    """What a rule made of one example (scores: letter -> the rule's score; empty for generate)."""

    prediction: str
    scores: dict[str, float] = field(default_factory=dict)
    probs: dict[str, float] = field(default_factory=dict)
    generation: str | None = None
    extraction: str | None = None
    prompt_tokens: int = 0
    new_tokens: int = 0
    latency_ms: float = 0.0
    route: dict[str, Any] | None = None


def check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"unknown scoring rule {rule!r}; rules: {', '.join(RULES)}")


def _softmax(scores: Sequence[float]) -> list[float]:
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    return [e / sum(exps) for e in exps]


def _from_scores(prompt_labels: Sequence[str], scores: Any, rule: str) -> Outcome:
    values = scores.normalized() if rule == "loglik-norm" else scores.logprobs
    best = max(range(len(values)), key=values.__getitem__)  # ties: the first option
    return Outcome(
        prediction=prompt_labels[best],
        scores=dict(zip(prompt_labels, values)),
        probs=dict(zip(prompt_labels, _softmax(values))),
        prompt_tokens=scores.context_tokens,
    )


def apply_rule(
    model: EvalModel,
    records: Sequence[Record],
    rule: str,
    shots: Sequence[Sequence[Record]],
    multi: bool = False,
    max_new_tokens: int = 32,
) -> list[Outcome]:
    """Apply `rule` to a batch of option questions; shots[i] are record i's few-shot examples.

    Likelihood rules over single-token continuations run as one batched forward; latency_ms is then
    the batch's wall time divided by its size (amortized per example). A system that decides per
    question, from the record itself, which model answers (the routed MambaFormer) provides
    `score_records(records, rule, shots, multi, max_new_tokens)` and is asked through it instead.
    """
    check_rule(rule)
    if hasattr(model, "score_records"):
        return model.score_records(records, rule, shots, multi, max_new_tokens)
    kind = CONTINUATIONS[rule]
    prompts = [build_prompt(r, model.tokenizer, s, kind, multi) for r, s in zip(records, shots)]
    start = time.perf_counter()
    if rule == "generate":
        outcomes = []
        for record, prompt in zip(records, prompts):
            t0 = time.perf_counter()
            gen = model.generate(prompt.context, max_new_tokens)
            if is_yesno(record):
                found = extract_yesno(gen.text)
            else:
                found = extract_letters(gen.text, record.letters, may_have_several_answers(record, multi))
            outcomes.append(Outcome(found.letters, generation=gen.text, extraction=found.status,
                                    prompt_tokens=gen.prompt_tokens, new_tokens=gen.new_tokens,
                                    latency_ms=(time.perf_counter() - t0) * 1000, route=model.last_route()))
        return outcomes
    requests = [(p.context, p.continuations) for p in prompts]
    all_scores = model.score_batch(requests) if len(records) > 1 else [model.score_options(*requests[0])]
    elapsed = (time.perf_counter() - start) * 1000 / len(records)
    outcomes = [_from_scores(p.labels, s, rule) for p, s in zip(prompts, all_scores)]
    for outcome in outcomes:
        outcome.latency_ms = elapsed
        outcome.route = model.last_route()
    return outcomes

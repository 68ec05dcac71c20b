"""What every question-answering system in medmoe returns, whatever answers the question.

The CLI (`medmoe ask`), the server and the evaluation harness consume `Answerer`s; the plain causal-LM
answerer (`medmoe.answer.causal_lm`), LoRA-MoE models and the routed MambaFormer system implement it.

An answerer needs only `answer_batch(records) -> answers`. Three optional additions make it better,
and the server uses them when an answerer has them:
  fit(record) -> (record, dropped_tokens): make a record fit the model's window or raise InputTooLong;
  batch_key(record) -> str: requests with the same key are batched together (e.g. the expert a gate
      picks, or "options" vs "open", since the two take different compute paths);
  answer_batch(records, sinks=...): one `medmoe.answer.streaming.TextSink` or None per record; the
      generated text of a record with a sink is pushed to it token by token while the batch decodes.
A request the answerer cannot answer because of the request itself raises `RequestRejected` (the server
answers 4xx for that request alone, even when found inside a batch); any other exception is a model
failure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from medmoe.data.record import Record
from medmoe.errors import MedmoeError


@dataclass
class Answer:
    """One answer to one question.

    answer:        the chosen option letter(s) for option questions, else generated text
    label_scores:  option letter -> probability (option questions; empty otherwise)
    expert:        which model answered ("transformer", "mamba", or the model's name)
    gate_probability: p_M, the router's probability of the Mamba expert (None without a router)
    top_features:  the gate's most influential features, (name, contribution), for "why this expert"
    latency_ms:    stage -> milliseconds ("gate", "expert", "total", ...)
    """

    answer: str
    expert: str
    label_scores: dict[str, float] = field(default_factory=dict)
    gate_probability: float | None = None
    top_features: list[tuple[str, float]] = field(default_factory=list)
    latency_ms: dict[str, float] = field(default_factory=dict)


class Answerer(Protocol):
    """Answers a batch of questions. Records without an id may use any placeholder id."""

    def answer_batch(self, records: Sequence[Record]) -> list[Answer]: ...


class RequestRejected(MedmoeError):
    """The request itself cannot be answered, whatever the model: the server answers 4xx (`status`,
    `kind`), naming the field at fault. An answerer may raise it from `fit` or, when it finds the
    problem late, from `answer_batch`: the batcher then answers that request alone with this error
    (medmoe.serve.batching), the others of its batch get their answers."""

    status, kind = 422, "invalid_request"

    def __init__(self, message: str, field: str | None = None):
        self.field = field
        super().__init__(message)


class InputTooLong(RequestRejected):
    """The question (with its options) alone is longer than the model accepts."""

    kind = "input_too_long"

    def __init__(self, field: str, tokens: int, limit: int, message: str | None = None):
        self.tokens, self.limit = tokens, limit
        super().__init__(message or f"{field} is {tokens} tokens; the model accepts at most {limit} (context is cut first, this is without it)", field)

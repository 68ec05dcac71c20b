"""What every question-answering system in medmoe returns, whatever answers the question.

The CLI (`medmoe ask`), the server and the evaluation harness consume `Answerer`s; the plain-model
answerer, LoRA-MoE models and the routed MambaFormer system implement it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from medmoe.data.record import Record


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

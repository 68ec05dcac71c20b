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

How an open record is generated for is in its metadata (`Generation`: the server sets it from the OpenAI
fields): the token limit, temperature / top_p / seed, stop sequences, a system prompt, or a raw prompt
(legacy completions). A generated `Answer` says why it ended (`finish_reason`) and its token counts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

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
    finish_reason: generated answers: "stop" (end of sequence or a stop sequence) or "length" (its token limit)
    prompt_tokens: generated answers: tokens of the prompt fed to the model (after any cut, BOS included)
    completion_tokens: generated answers: tokens generated (the end-of-sequence or stop-sequence token included)
    """

    answer: str
    expert: str
    label_scores: dict[str, float] = field(default_factory=dict)
    gate_probability: float | None = None
    top_features: list[tuple[str, float]] = field(default_factory=list)
    latency_ms: dict[str, float] = field(default_factory=dict)
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


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


class InvalidParameter(RequestRejected):
    """A generation parameter out of its range (temperature, top_p, seed, stop, ...): 400, as OpenAI answers."""

    status, kind = 400, "invalid_parameter"


# record.metadata keys of an open record's generation settings (`Generation.of` reads them)
MAX_NEW_TOKENS, TEMPERATURE, TOP_P, SEED, STOP = "max_new_tokens", "temperature", "top_p", "seed", "stop"
SYSTEM, RAW_PROMPT = "system", "raw_prompt"
MAX_TEMPERATURE = 2.0
MAX_STOP_SEQUENCES, MAX_STOP_CHARS = 4, 200
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


@dataclass(frozen=True)
class Generation:
    """How to generate for an open record, from its metadata (the server sets it; every key optional).

    temperature: 0 (or absent) decodes greedily; > 0 samples from softmax(logits / temperature), at most 2
    top_p:       sampling only: from the smallest set of most likely tokens whose probability reaches top_p, in (0, 1]
    seed:        sampling only: the row's own random generator starts from it (same seed, same text)
    stop:        up to 4 strings; the answer ends before the first one generated (finish_reason "stop")
    system:      a system prompt (the chat template's system role; see causal_lm.open_prompt)
    raw:         the question is a raw prompt continued as it is (no template, answer not stripped)
    """

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    system: str | None = None
    raw: bool = False

    @property
    def sampled(self) -> bool:
        return self.temperature > 0

    @classmethod
    def checked(cls, temperature: Any = None, top_p: Any = None, seed: Any = None, stop: Any = None,
                system: Any = None, raw: Any = False) -> Generation:
        """The settings, or InvalidParameter naming the field that is out of range."""
        def number(value: Any, name: str) -> float:
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise InvalidParameter(f"{name} must be a number, got {value!r}", name)
            return float(value)

        t = 0.0 if temperature is None else number(temperature, TEMPERATURE)
        if not 0.0 <= t <= MAX_TEMPERATURE:
            raise InvalidParameter(f"{TEMPERATURE} must be in [0, {MAX_TEMPERATURE:g}] (0: greedy), got {temperature!r}", TEMPERATURE)
        p = 1.0 if top_p is None else number(top_p, TOP_P)
        if not 0.0 < p <= 1.0:
            raise InvalidParameter(f"{TOP_P} must be in (0, 1], got {top_p!r}", TOP_P)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
            raise InvalidParameter(f"{SEED} must be an integer in [-2^63, 2^64), got {seed!r}", SEED)
        if stop is not None and not isinstance(stop, str | list | tuple):
            raise InvalidParameter(f"{STOP} must be a string or a list of strings, got {type(stop).__name__}", STOP)
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if len(stops) > MAX_STOP_SEQUENCES:
            raise InvalidParameter(f"{STOP}: at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}", STOP)
        for s in stops:
            if not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS:
                raise InvalidParameter(f"{STOP}: each stop sequence must be a non-empty string of at most {MAX_STOP_CHARS} "
                                       f"characters, got {s!r}", STOP)
        if system is not None and not isinstance(system, str):
            raise InvalidParameter(f"{SYSTEM} must be text, got {type(system).__name__}", SYSTEM)
        return cls(t, p, seed, stops, system or None, bool(raw))

    @classmethod
    def of(cls, metadata: Mapping[str, Any]) -> Generation:
        """A record's settings (record.metadata); InvalidParameter for a value out of range."""
        return cls.checked(metadata.get(TEMPERATURE), metadata.get(TOP_P), metadata.get(SEED), metadata.get(STOP),
                           metadata.get(SYSTEM), metadata.get(RAW_PROMPT, False))

    def metadata(self) -> dict[str, Any]:
        """The record.metadata entries that give these settings (none for the defaults)."""
        out: dict[str, Any] = {}
        if self.sampled:
            out[TEMPERATURE] = self.temperature
            if self.top_p < 1.0:
                out[TOP_P] = self.top_p
            if self.seed is not None:
                out[SEED] = self.seed
        if self.stop:
            out[STOP] = list(self.stop)
        if self.system:
            out[SYSTEM] = self.system
        if self.raw:
            out[RAW_PROMPT] = True
        return out

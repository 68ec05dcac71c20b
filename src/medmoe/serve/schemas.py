"""Request and response models of the HTTP API (they also make the OpenAPI schema).

Length limits come from the server config (`make_answer_request`), so a 422 names the field and the
limit. Text fields must be real text: not empty or whitespace-only (question), no NUL characters,
no lone UTF-16 surrogates (which JSON escapes can smuggle in but UTF-8 cannot encode).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from medmoe.errors import MissingExtra

try:
    from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator
except ImportError as exc:
    raise MissingExtra("pydantic", "serve", "medmoe.serve (the HTTP server)") from exc

REQUEST_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
ROUTING_DESCRIPTION = ("Routed system only: this request's threshold, {\"tau\": t} with t in [0, 1] (the Mamba expert "
                       "iff p_M > t), or {\"latency_budget_ms\": ms} (the threshold calibration picks for that p50 "
                       "budget on the run's dev results). Omit for the calibrated threshold. Checked by the server "
                       "(400 invalid_routing); docs/serving.md.")
ROUTING_EXAMPLES = [{"tau": 0.35}, {"latency_budget_ms": 300}]


def check_text(value: str | None, what: str) -> str | None:
    """Reject text that is not plain UTF-8-encodable text."""
    if value is None:
        return value
    if "\x00" in value:
        raise ValueError(f"{what} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid Unicode text (lone surrogate)") from None
    return value


class AnswerRequestBase(BaseModel):
    """A question, optionally with a context passage and answer options (then the answer is a letter)."""

    model_config = ConfigDict(extra="forbid")

    question: str = Field(description="The question. Must contain non-whitespace text.")
    context: str | None = Field(default=None, description="Supporting text (e.g. an abstract or a case). Cut to fit the model's window; see docs/serving.md.")
    options: list[str] | None = Field(default=None, description="Answer options in order (lettered A, B, ...). Omit for an open question.")
    request_id: str | None = Field(default=None, pattern=REQUEST_ID_PATTERN, description="Your id for this request, echoed back.")
    routing: dict[str, Any] | None = Field(default=None, description=ROUTING_DESCRIPTION, examples=ROUTING_EXAMPLES)

    @field_validator("question")
    @classmethod
    def _question(cls, v: str) -> str:
        check_text(v, "question")
        if not v.strip():
            raise ValueError("question is empty or only whitespace")
        return v.strip()

    @field_validator("context")
    @classmethod
    def _context(cls, v: str | None) -> str | None:
        check_text(v, "context")
        return v.strip() or None if v is not None else None

    @field_validator("options")
    @classmethod
    def _options(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if len(v) == 1:
            raise ValueError("give at least 2 options, or none for an open question")
        cleaned = []
        for i, option in enumerate(v):
            check_text(option, f"option {i + 1}")
            if not option.strip():
                raise ValueError(f"option {i + 1} is empty or only whitespace")
            cleaned.append(option.strip())
        return cleaned or None


def make_answer_request(max_question_chars: int, max_context_chars: int, max_options: int, max_option_chars: int) -> type[AnswerRequestBase]:
    """The request model with this server's limits built into the field constraints."""
    return create_model(
        "AnswerRequest",
        __base__=AnswerRequestBase,
        question=(str, Field(min_length=1, max_length=max_question_chars, description="The question. Must contain non-whitespace text.")),
        context=(str | None, Field(default=None, max_length=max_context_chars, description="Supporting text; cut to fit the model's window (docs/serving.md).")),
        options=(list[str] | None, Field(default=None, max_length=max_options, description="Answer options in order (lettered A, B, ...). Omit for an open question.")),
    )


class Feature(BaseModel):
    name: str
    contribution: float


class Latency(BaseModel):
    """Milliseconds per stage. gate/expert come from the answerer; queue and total from the server."""

    model_config = ConfigDict(extra="allow")
    queue: float
    total: float


class RoutingUsed(BaseModel):
    """The threshold this request was routed at (routed system only)."""

    model_config = ConfigDict(extra="allow")
    tau: float = Field(description="The threshold: the Mamba expert iff p_M > tau.")
    source: Literal["calibrated", "model", "request", "latency_budget"] = Field(
        description="calibrated (the router's own), model (mambaformer-tau-<tau>), request (routing.tau), latency_budget (routing.latency_budget_ms).")
    latency_budget_ms: float | None = None
    dev: dict[str, float] | None = Field(default=None, description="For a latency budget: that routing's dev accuracy, latency and share to the Mamba expert.")


class AnswerResponse(BaseModel):
    request_id: str
    answer: str = Field(description="Option letter for option questions, else generated text.")
    answer_text: str | None = Field(description="The chosen option's text (option questions).")
    label_scores: dict[str, float] = Field(description="Option letter -> probability.")
    expert: str = Field(description="Which expert (or model) answered.")
    gate_probability: float | None = Field(description="Router's probability of the Mamba expert; null without a router.")
    top_features: list[Feature] = Field(description="The gate's most influential features for this question.")
    routing: RoutingUsed | None = Field(default=None, description="The threshold the gate decided at; null for a single model.")
    latency_ms: Latency
    batch_size: int = Field(description="How many requests shared this request's forward pass.")
    truncated_context_tokens: int = Field(description="Context tokens cut to fit the model's window (0: none).")


class ErrorResponse(BaseModel):
    error: dict[str, Any]


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    expert: str | None
    queue_depth: int
    max_queue: int


# -- OpenAI-compatible chat --------------------------------------------------------------------------

class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""


STOP_DESCRIPTION = "Up to 4 sequences: the answer ends before the first one generated (finish_reason \"stop\")."
SEED_DESCRIPTION = "Sampling only: the same seed (and request) gives the same text."
TEMPERATURE_DESCRIPTION = "0 (the default here) or absent: greedy decoding; > 0 samples, at most 2."
TOP_P_DESCRIPTION = "Sampling only: sample from the smallest set of most likely tokens whose probability reaches top_p, in (0, 1]."


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = Field(default=None, description="A last chunk with empty `choices` and the request's `usage`.")


class GenerationFields(BaseModel):
    """The OpenAI fields of chat and text completions that this server honours (docs/serving.md); the
    ranges are checked by the server (400 invalid_parameter, naming the field)."""

    model_config = ConfigDict(extra="allow")  # OpenAI clients send many optional fields
    model: str | None = Field(default=None, description="Echoed back. A routed server also reads its threshold here: 'mambaformer' (calibrated) or 'mambaformer-tau-<tau>', tau in [0, 1]; other names get the calibrated one.")
    stream: bool = False
    stream_options: StreamOptions | None = Field(default=None, description="With stream: true only.")
    max_tokens: int | None = Field(default=None, ge=1, description="Generation limit in tokens (never above the server's max_new_tokens, its default).")
    temperature: float | None = Field(default=None, description=TEMPERATURE_DESCRIPTION)
    top_p: float | None = Field(default=None, description=TOP_P_DESCRIPTION)
    seed: int | None = Field(default=None, description=SEED_DESCRIPTION)
    stop: str | list[str] | None = Field(default=None, description=STOP_DESCRIPTION)
    n: int | None = Field(default=None, description="Only 1: one choice per request.")
    routing: dict[str, Any] | None = Field(default=None, description=ROUTING_DESCRIPTION, examples=ROUTING_EXAMPLES)


class ChatRequest(GenerationFields):
    """OpenAI chat-completions request. System messages are the prompt's system turn; the last user
    message is the question, earlier turns its context."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, description="The same as max_tokens (it wins when both are given).")


class CompletionRequest(GenerationFields):
    """OpenAI (legacy) text-completions request: the prompt is continued as it is, without a chat template."""

    prompt: str | list[str] = Field(description="The text to continue: a string, or a list of one string.")
    echo: bool | None = Field(default=None, description="Only false.")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[str]) -> str | list[str]:
        for text in [v] if isinstance(v, str) else v:
            check_text(text, "prompt")
        return v


def usage(prompt_tokens: int | None, completion_tokens: int | None) -> dict[str, int] | None:
    """OpenAI's usage object (None when the answerer does not count tokens)."""
    if prompt_tokens is None or completion_tokens is None:
        return None
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(answer_text: str, model: str, extra: dict[str, Any], finish_reason: str = "stop",
                    used: dict[str, int] | None = None) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer_text}, "logprobs": None, "finish_reason": finish_reason}],
        "usage": used,
        "medmoe": extra,
    }


def text_completion(answer_text: str, model: str, extra: dict[str, Any], finish_reason: str = "stop",
                    used: dict[str, int] | None = None) -> dict[str, Any]:
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": answer_text, "logprobs": None, "finish_reason": finish_reason}],
        "usage": used,
        "medmoe": extra,
    }


def chat_chunk(completion_id: str, model: str, delta: dict[str, Any], finish_reason: str | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    chunk = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    if extra is not None:
        chunk["medmoe"] = extra
    return chunk


def text_chunk(completion_id: str, model: str, text: str, finish_reason: str | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    chunk = {
        "id": completion_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }
    if extra is not None:
        chunk["medmoe"] = extra
    return chunk


def usage_chunk(completion_id: str, model: str, obj: str, used: dict[str, int] | None) -> dict[str, Any]:
    """The last chunk of a stream with `stream_options.include_usage`: no choices, the usage."""
    return {"id": completion_id, "object": obj, "created": int(time.time()), "model": model, "choices": [], "usage": used}

"""The OpenAI-compatible streaming path: chat and text completions as server-sent events.

`Shape` is how one OpenAI endpoint's answers look: chat completions (`chat.completion.chunk`, a role
chunk first) or legacy text completions (`text_completion` chunks). `Streamer.stream` answers a
`stream: true` request token by token, as its text is generated (the answerer pushes it to a
`TextSink`); `buffered_response` streams the whole answer of an answerer that cannot stream, cut into
word pieces once it is done. Either way: each chunk carries `"usage": null` and a last chunk with no
choices carries the usage when the request asked for `stream_options.include_usage`
(`include_usage`), the last text chunk carries the answer's `finish_reason` ("stop" unless the
answerer says otherwise, e.g. "length") and the `medmoe` fields, and `data: [DONE]` ends the stream.
A failure after the first event ends the stream with an error event; however the response ends, the
job is withdrawn (`ClosingStream`), so its row stops decoding.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from medmoe.errors import MissingExtra

try:
    from fastapi.responses import StreamingResponse
except ImportError as exc:
    raise MissingExtra("fastapi", "serve", "medmoe.serve (the HTTP server)") from exc

from medmoe.answer import Answer
from medmoe.answer.streaming import END, TextSink
from medmoe.data.record import Record
from medmoe.serve.batching import BatchInfo, MicroBatcher
from medmoe.serve.errors import ApiError
from medmoe.serve.guards import error_body
from medmoe.serve.metrics import ServerMetrics
from medmoe.serve.routing import Routing
from medmoe.serve.schemas import (
    GenerationFields,
    chat_chunk,
    chat_completion,
    text_chunk,
    text_completion,
    usage,
    usage_chunk,
)


@dataclass(frozen=True)
class Shape:
    """How one OpenAI endpoint's answers look: chat completions or (legacy) text completions."""

    prefix: str  # of the completion's id
    chunk_object: str
    completion: Callable[..., dict[str, Any]]  # (text, model, extra, finish_reason, usage) -> the JSON answer
    chat: bool

    def opening(self, completion_id: str, model: str) -> list[dict[str, Any]]:
        """The chunks before the text: chat's role chunk."""
        return [chat_chunk(completion_id, model, {"role": "assistant", "content": ""})] if self.chat else []

    def piece(self, completion_id: str, model: str, text: str) -> dict[str, Any]:
        return chat_chunk(completion_id, model, {"content": text}) if self.chat else text_chunk(completion_id, model, text)

    def last(self, completion_id: str, model: str, finish_reason: str, extra: dict[str, Any]) -> dict[str, Any]:
        if self.chat:
            return chat_chunk(completion_id, model, {}, finish_reason, extra)
        return text_chunk(completion_id, model, "", finish_reason, extra)


CHAT = Shape("chatcmpl", "chat.completion.chunk", chat_completion, chat=True)
COMPLETION = Shape("cmpl", "text_completion", text_completion, chat=False)


def include_usage(body: GenerationFields) -> bool:
    """Whether a streamed request asked for the usage chunk (`stream_options.include_usage`)."""
    return bool(body.stream and body.stream_options is not None and body.stream_options.include_usage)


@dataclass
class Streamer:
    """The streaming side of one app: its batcher and metrics, the request timeout, and the app's
    steps of answering a request (`fitted`, `admit`, `settle`, `answer_extra`, app.py's `create_app`),
    which raise `ApiError` for a request refused or failed."""

    batcher: MicroBatcher
    metrics: ServerMetrics
    timeout_s: float
    fitted: Callable[[Record], tuple[Record, int]]
    admit: Callable[[Record, TextSink], Any]
    settle: Callable[[Any, float], Awaitable[tuple[Answer, BatchInfo]]]
    answer_extra: Callable[[Record, Answer, BatchInfo, int, float, Routing | None], dict[str, Any]]

    async def stream(self, record: Record, model: str, routing: Routing | None, shape: Shape, with_usage: bool) -> StreamingResponse:
        """Queue a streamed request; answer with its events once its first piece of text (or its
        whole answer) is there, so that refusals and failures before that keep their HTTP status."""
        batcher, metrics, settle = self.batcher, self.metrics, self.settle
        start = time.perf_counter()
        deadline = start + self.timeout_s
        record, dropped = self.fitted(record)
        sink = TextSink(asyncio.get_running_loop())
        job = self.admit(record, sink)
        job.future.add_done_callback(lambda _: sink.close())
        try:
            first = await sink.next(deadline)
        except TimeoutError:
            first = END  # settle (below) answers 504 and withdraws the job
        except asyncio.CancelledError:
            batcher.withdraw(job, "cancelled")
            raise
        done = None  # nothing streamed: an empty answer, or the request failed (-> its HTTP status)
        if first is END:
            done = await settle(job, max(deadline - time.perf_counter(), 0.0))
        completion_id = f"{shape.prefix}-{uuid.uuid4().hex}"
        first_ms = (time.perf_counter() - start) * 1000

        def event(chunk: dict[str, Any]) -> bytes:
            return sse_event({**chunk, "usage": None} if with_usage else chunk)

        async def events() -> AsyncIterator[bytes]:
            for chunk in shape.opening(completion_id, model):
                yield event(chunk)
            piece = first
            try:
                while piece is not END:
                    yield event(shape.piece(completion_id, model, piece))
                    piece = await sink.next(deadline)
                result, info = done or await settle(job, max(deadline - time.perf_counter(), 0.0))
            except TimeoutError:
                batcher.withdraw(job, "timed_out")
                metrics.rejected.inc("timeout")
                yield sse_event(error_body(504, "timeout", f"not finished within {self.timeout_s:g} s"))
            except ApiError as exc:
                yield sse_event(error_body(exc.status, exc.kind, exc.message, exc.param))
            else:
                extra = self.answer_extra(record, result, info, dropped, start, routing)
                extra["latency_ms"]["first_token"] = round(first_ms, 2)
                yield event(shape.last(completion_id, model, result.finish_reason or "stop", extra))
                if with_usage:
                    yield sse_event(usage_chunk(completion_id, model, shape.chunk_object, usage(result.prompt_tokens, result.completion_tokens)))
            yield b"data: [DONE]\n\n"

        # however the response ends (done, client gone, error), the job is withdrawn: its row stops decoding
        return ClosingStream(events(), on_close=lambda: batcher.withdraw(job, "cancelled"),
                             media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def buffered_response(result: Answer, model: str, extra: dict[str, Any], shape: Shape, with_usage: bool) -> StreamingResponse:
    """The events of an answerer that cannot stream: the whole answer, cut into word pieces, once it is done."""
    return StreamingResponse(buffered_events(word_pieces(result.answer), model, result, extra, shape, with_usage),
                             media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def buffered_events(pieces: list[str], model: str, result: Answer, extra: dict[str, Any], shape: Shape,
                          with_usage: bool) -> AsyncIterator[bytes]:
    completion_id = f"{shape.prefix}-{uuid.uuid4().hex}"
    chunks = [*shape.opening(completion_id, model), *(shape.piece(completion_id, model, p) for p in pieces),
              shape.last(completion_id, model, result.finish_reason or "stop", extra)]
    for chunk in chunks:
        yield sse_event({**chunk, "usage": None} if with_usage else chunk)
    if with_usage:
        yield sse_event(usage_chunk(completion_id, model, shape.chunk_object, usage(result.prompt_tokens, result.completion_tokens)))
    yield b"data: [DONE]\n\n"


class ClosingStream(StreamingResponse):
    """A StreamingResponse that calls `on_close` however it ends: finished, failed, or cancelled
    because the client went away (Starlette then cancels the response, possibly before the body's
    generator has started, so a `finally` inside the generator would not be enough)."""

    def __init__(self, content: Any, on_close: Callable[[], None], **kwargs: Any):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def sse_event(data: dict[str, Any]) -> bytes:
    """One server-sent event."""
    return f"data: {json.dumps(data)}\n\n".encode()


def word_pieces(text: str) -> list[str]:
    """Split text after each space into pieces that concatenate back to it exactly."""
    return [piece for piece in re.split(r"(?<= )", text) if piece]

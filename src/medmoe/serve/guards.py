"""ASGI middleware that runs before any endpoint: body size and encoding, and request metrics.

BodyGuard reads a request body once, bounded: a declared or actual size over the limit is answered
413 before the endpoint (or JSON parsing) sees a byte; a body that is not valid UTF-8 is answered 400.
The checked body is then replayed to the app.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from medmoe.serve.metrics import ServerMetrics

Scope = dict[str, Any]
Message = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]


def error_body(status: int, kind: str, message: str, param: str | None = None, **extra: Any) -> dict[str, Any]:
    """The one error shape of the API (OpenAI's: error.message / type / param / code)."""
    return {"error": {"message": message, "type": kind, "param": param, "code": status, **extra}}


async def send_json(send: Callable[[Message], Awaitable[None]], status: int, body: dict[str, Any], headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode("utf-8")
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *headers]})
    await send({"type": "http.response.body", "body": data})


class BodyGuard:
    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]], send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        too_large = error_body(413, "request_too_large", f"request body exceeds {limit} bytes")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await send_json(send, 413, too_large)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await send_json(send, 413, too_large)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            await send_json(send, 400, error_body(400, "invalid_encoding", f"request body is not valid UTF-8 (byte {exc.start})"))
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would

        await self.app(scope, replay, send)


class RequestMetrics:
    """Counts every response by endpoint and status (unknown paths count as "other")."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, endpoints: set[str]):
        self.app, self.metrics, self.endpoints = app, metrics, endpoints

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]], send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in self.endpoints else "other"
        start = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.metrics.requests.inc(endpoint, str(status))
            if status == 200 and endpoint in ("/v1/answer", "/v1/chat/completions"):
                self.metrics.latency.observe(time.perf_counter() - start, endpoint)

"""`ApiError`: an endpoint's refusal as the API answers it (HTTP status, OpenAI-style error type,
message, the field it names, extra headers such as Retry-After). app.py turns it into the JSON error
body (guards.py `error_body`); a stream that has already started sends it as its last event (sse.py).
"""

from __future__ import annotations


class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str, param: str | None = None, headers: dict[str, str] | None = None):
        self.status, self.kind, self.message, self.param, self.headers = status, kind, message, param, headers or {}

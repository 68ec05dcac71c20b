"""The FastAPI app: POST /v1/answer, POST /v1/chat/completions, POST /v1/completions, GET /v1/models,
GET /healthz, GET /metrics, the page.

`create_app(answerer, config)` takes any `Answerer` (medmoe.answer); `app_from_config(config)` builds
the configured one first. Every request goes through one `MicroBatcher`. No endpoint takes a file
name: the page's three files are read from the package once, at start, and served from memory.
This module keeps the routes and their wiring (validation, routing, admission, JSON answers); a
`stream: true` completion is answered as server-sent events by sse.py, and `ApiError` (errors.py,
re-exported here) is every endpoint's refusal.
"""

# No `from __future__ import annotations` here: FastAPI must see the request model built at runtime
# (AnswerRequest, with this server's limits) as a real annotation, not as a string.
import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, replace
from importlib import resources
from typing import Any

from medmoe import __version__
from medmoe.errors import MissingExtra

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
except ImportError as exc:
    raise MissingExtra("fastapi", "serve", "medmoe.serve (the HTTP server)") from exc

from medmoe.answer import Answer
from medmoe.answer.streaming import TextSink
from medmoe.answer.types import MAX_NEW_TOKENS, SEED, Generation, InvalidParameter, RequestRejected
from medmoe.data.record import Record
from medmoe.mambaformer.answerer import TAU_METADATA
from medmoe.serve.batching import BatcherStopped, BatchInfo, MicroBatcher, QueueFull, RequestTimeout
from medmoe.serve.config import ServeConfig, build_answerer
from medmoe.serve.errors import ApiError
from medmoe.serve.guards import BodyGuard, RequestMetrics, error_body
from medmoe.serve.metrics import ServerMetrics
from medmoe.serve.routing import Routing, RoutingError, RoutingPolicy
from medmoe.serve.schemas import (
    AnswerResponse,
    ChatRequest,
    CompletionRequest,
    ErrorResponse,
    GenerationFields,
    Health,
    make_answer_request,
    usage,
)
from medmoe.serve.sse import CHAT, COMPLETION, Shape, Streamer, buffered_response, include_usage

log = logging.getLogger(__name__)

STATIC_FILES = {"/static/app.js": ("app.js", "text/javascript"), "/static/style.css": ("style.css", "text/css")}
ENDPOINTS = {"/", "/v1/answer", "/v1/chat/completions", "/v1/completions", "/v1/models", "/healthz", "/metrics", "/openapi.json", *STATIC_FILES}
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 413, 422, 500, 503, 504)}


def _load_static() -> dict[str, bytes]:
    folder = resources.files("medmoe.serve") / "static"
    return {name: (folder / name).read_bytes() for name in ("index.html", "app.js", "style.css")}


def app_from_config(config: ServeConfig) -> FastAPI:
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    return create_app(build_answerer(config), config)


def create_app(answerer: Any, config: ServeConfig | None = None) -> FastAPI:
    config = config or ServeConfig()
    batcher = MicroBatcher(answerer, config.max_batch_size, config.max_wait_ms, config.max_queue, max_new_tokens=config.max_new_tokens)
    metrics = ServerMetrics(queue_depth=lambda: batcher.depth, batcher_counts=lambda: asdict(batcher.stats))
    batcher.on_batch = lambda size, seconds, wait: metrics.batch_size.observe(size)
    expert_name = getattr(answerer, "name", type(answerer).__name__)
    policy = RoutingPolicy.for_answerer(answerer, expert_name)  # the thresholds requests may ask for (routed system)
    static = _load_static()
    fit = getattr(answerer, "fit", None)
    AnswerRequest = make_answer_request(config.max_question_chars, config.max_context_chars, config.max_options, config.max_option_chars)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await asyncio.to_thread(batcher.stop)

    app = FastAPI(
        title="medmoe clinical QA server",
        version=__version__,
        description="Routed clinical question answering. A research tool, not medical advice.",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI and ReDoc load from a CDN; the schema itself is at /openapi.json
        redoc_url=None,
    )
    app.state.batcher, app.state.metrics, app.state.config, app.state.routing = batcher, metrics, config, policy

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.status, exc.kind, exc.message, exc.param), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = []
        for err in exc.errors():
            loc = [str(p) for p in err["loc"] if p != "body"]
            message = str(err["msg"]).removeprefix("Value error, ")
            fields.append({"field": ".".join(loc) or "body", "message": message})
        summary = "; ".join(f"{f['field']}: {f['message']}" for f in fields)
        return JSONResponse(error_body(422, "invalid_request", summary, fields[0]["field"] if fields else None, fields=fields), status_code=422)

    def rejected(exc: RequestRejected) -> ApiError:
        metrics.rejected.inc("invalid")
        return ApiError(exc.status, exc.kind, str(exc), exc.field)

    def routed(record: Record, model: str | None, routing: dict[str, Any] | None) -> tuple[Record, Routing | None]:
        """The record with the threshold this request asked for (routed system), or a 400 naming the field."""
        try:
            chosen = policy.resolve(model, routing)
        except RoutingError as exc:
            raise ApiError(400, "invalid_routing", str(exc), exc.param) from None
        if chosen is None:
            return record, None
        return replace(record, metadata={**record.metadata, TAU_METADATA: chosen.tau}), chosen

    def fitted(record: Record) -> tuple[Record, int]:
        """(record that fits the model's window, dropped context tokens); 422 when it cannot fit."""
        if fit is None:
            return record, 0
        try:
            return fit(record)
        except RequestRejected as exc:
            raise rejected(exc) from None

    def admit(record: Record, sink: TextSink | None = None) -> Any:
        """Queue the record (its job) or refuse it now: 503 + Retry-After."""
        try:
            return batcher.enqueue(record, config.request_timeout_s, sink)
        except QueueFull as exc:
            metrics.rejected.inc("queue_full")
            raise ApiError(503, "overloaded", str(exc), headers={"Retry-After": str(exc.retry_after_s)}) from None
        except BatcherStopped as exc:
            raise ApiError(503, "unavailable", str(exc), headers={"Retry-After": "5"}) from None

    async def settle(job: Any, timeout_s: float) -> tuple[Answer, BatchInfo]:
        """The job's answer, or the ApiError its failure maps to: 504, 503, the 4xx of a request the
        answerer rejected (found late, in its batch), 500 for a model failure on this request."""
        try:
            answer, info = await batcher.wait(job, timeout_s)
        except RequestTimeout as exc:
            metrics.rejected.inc("timeout")
            raise ApiError(504, "timeout", str(exc)) from None
        except BatcherStopped as exc:
            raise ApiError(503, "unavailable", str(exc), headers={"Retry-After": "5"}) from None
        except RequestRejected as exc:
            raise rejected(exc) from None
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("answering failed")
            metrics.rejected.inc("error")
            raise ApiError(500, "internal_error", "the model failed on this request; see the server log") from None
        metrics.expert_answers.inc(answer.expert)
        metrics.queue_wait.observe(info.queue_ms / 1000)
        return answer, info

    async def answer_record(record: Record) -> tuple[Record, Answer, BatchInfo, int, float]:
        """Fit, queue, await: (fitted record, answer, batch info, dropped context tokens, start)."""
        start = time.perf_counter()
        record, dropped = fitted(record)
        answer, info = await settle(admit(record), config.request_timeout_s)
        return record, answer, info, dropped, start

    def latency(answer: Answer, info: BatchInfo, start: float) -> dict[str, float]:
        stages = {k: round(v, 2) for k, v in answer.latency_ms.items()}
        return {**stages, "queue": round(info.queue_ms, 2), "total": round((time.perf_counter() - start) * 1000, 2)}

    @app.post("/v1/answer", response_model=AnswerResponse, responses=ERRORS, summary="Answer one question")
    async def answer(body: AnswerRequest) -> dict[str, Any]:  # type: ignore[valid-type]
        """Answer a question (optionally with context and options): answer, label scores, expert, gate
        probability, top features and a latency breakdown in milliseconds."""
        fields: Any = body  # AnswerRequest is built at run time (make_answer_request): mypy cannot see its fields
        request_id = fields.request_id or uuid.uuid4().hex
        record = Record(id=request_id, question=fields.question, answer="", context=fields.context, options=tuple(fields.options or ()))
        record, routing = routed(record, None, fields.routing)
        record, result, info, dropped, start = await answer_record(record)
        letter_index = record.letters.find(result.answer) if record.options and len(result.answer) == 1 else -1
        return {
            "request_id": request_id,
            "answer": result.answer,
            "answer_text": record.options[letter_index] if letter_index >= 0 else None,
            "label_scores": result.label_scores,
            "expert": result.expert,
            "gate_probability": result.gate_probability,
            "top_features": [{"name": n, "contribution": c} for n, c in result.top_features],
            "routing": routing.to_dict() if routing else None,
            "latency_ms": latency(result, info, start),
            "batch_size": info.batch_size,
            "truncated_context_tokens": dropped,
        }

    def generation(body: GenerationFields, limit: int | None, unsupported: dict[str, Any], system: str | None = None,
                   raw: bool = False) -> dict[str, Any]:
        """The record metadata of a chat or text completion's generation settings; 400 naming the field
        for one out of range or one this server does not do (`unsupported`: field -> its default values)."""
        if body.n not in (None, 1):
            raise ApiError(400, "invalid_parameter", f"n: this server gives one choice per request (n=1), got n={body.n}", "n")
        given = {**(body.model_extra or {}), **{name: getattr(body, name) for name in unsupported if name in type(body).model_fields}}
        for name, defaults in unsupported.items():
            value = given.get(name)
            if value is not None and value not in defaults:
                raise ApiError(400, "invalid_parameter", f"{name}: not supported by this server (docs/serving.md, OpenAI API); "
                               f"got {value!r}", name)
        if body.stream_options is not None and not body.stream:
            raise ApiError(400, "invalid_parameter", "stream_options: only with stream: true", "stream_options")
        try:
            settings = Generation.checked(body.temperature, body.top_p, body.seed, body.stop, system, raw)
        except InvalidParameter as exc:
            raise ApiError(exc.status, exc.kind, str(exc), exc.field) from None
        if settings.sampled and settings.seed is None:  # a seed of its own, so that a retried batch repeats its text
            settings = replace(settings, seed=secrets.randbits(63))
        return {MAX_NEW_TOKENS: min(limit or config.max_new_tokens, config.max_new_tokens), **settings.metadata()}

    @app.post("/v1/chat/completions", responses=ERRORS, summary="OpenAI-compatible chat completion")
    async def chat(body: ChatRequest) -> Any:
        """System messages are the prompt's system turn; the last user message is the question, earlier
        turns its context. Greedy decoding unless temperature > 0. With `stream: true` the answer
        arrives as server-sent events, token by token as it is generated."""
        users = [i for i, m in enumerate(body.messages) if m.role == "user"]
        if not users or not body.messages[users[-1]].text().strip():
            raise ApiError(422, "invalid_request", "messages: needs a user message with non-empty text", "messages")
        last = users[-1]
        earlier = [f"{m.role}: {m.text().strip()}" for m in body.messages[:last] if m.role in ("user", "assistant") and m.text().strip()]
        system = "\n".join(m.text().strip() for m in body.messages if m.role in ("system", "developer") and m.text().strip())
        metadata = generation(body, body.max_completion_tokens or body.max_tokens, CHAT_UNSUPPORTED, system or None)
        record = Record(id=uuid.uuid4().hex, question=body.messages[last].text().strip(), answer="",
                        context="\n".join(earlier) or None, metadata=metadata)
        if len(record.question) > config.max_question_chars or len(record.context or "") + len(system) > config.max_context_chars:
            raise ApiError(422, "invalid_request", f"messages: the question is limited to {config.max_question_chars} characters, "
                           f"the earlier turns and system messages to {config.max_context_chars}", "messages")
        return await complete(record, body, CHAT)

    @app.post("/v1/completions", responses=ERRORS, summary="OpenAI-compatible (legacy) text completion")
    async def completions(body: CompletionRequest) -> Any:
        """The prompt is continued as it is (no chat template), by the same model as chat (a routed
        server: the expert its gate picks for the prompt). Greedy unless temperature > 0."""
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "invalid_parameter", f"prompt: one prompt per request (a string or a list of one), got {len(prompts)}", "prompt")
        prompt, limit = prompts[0], config.max_question_chars + config.max_context_chars
        if not prompt.strip() or len(prompt) > limit:
            raise ApiError(422, "invalid_request", f"prompt: needs text, at most {limit} characters", "prompt")
        metadata = generation(body, body.max_tokens, COMPLETION_UNSUPPORTED, raw=True)
        record = Record(id=uuid.uuid4().hex, question=prompt, answer="", metadata=metadata)
        try:
            return await complete(record, body, COMPLETION)
        except ApiError as exc:
            if exc.param == "question":  # the answerer's name for the text it was given (prompt too long)
                exc.param, exc.message = "prompt", exc.message.replace("question", "prompt", 1)
            raise

    async def complete(record: Record, body: GenerationFields, shape: Shape) -> Any:
        """Answer a chat or text completion: JSON, or server-sent events."""
        record, routing = routed(record, body.model, body.routing)
        model = body.model or expert_name
        if body.stream and batcher.streams:
            return await streamer.stream(record, model, routing, shape, include_usage(body))
        record, result, info, dropped, start = await answer_record(record)
        extra = answer_extra(record, result, info, dropped, start, routing)
        if not body.stream:
            return shape.completion(result.answer, model, extra, result.finish_reason or "stop", usage(result.prompt_tokens, result.completion_tokens))
        return buffered_response(result, model, extra, shape, include_usage(body))  # an answerer that cannot stream

    def answer_extra(record: Record, result: Answer, info: BatchInfo, dropped: int, start: float, routing: Routing | None) -> dict[str, Any]:
        extra = {"expert": result.expert, "gate_probability": result.gate_probability,
                 "top_features": [{"name": n, "contribution": c} for n, c in result.top_features],
                 "routing": routing.to_dict() if routing else None,
                 "latency_ms": latency(result, info, start), "batch_size": info.batch_size, "truncated_context_tokens": dropped}
        if SEED in record.metadata:  # a sampled answer: the seed that gives it again
            extra["seed"] = record.metadata[SEED]
        return extra

    streamer = Streamer(batcher, metrics, config.request_timeout_s, fitted, admit, settle, answer_extra)

    @app.get("/v1/models", summary="OpenAI-compatible model list")
    async def models() -> dict[str, Any]:
        """The served names; a routed system's first entry (`mambaformer`) carries its calibrated tau and
        the threshold forms a request may use (`mambaformer-tau-<tau>`, the `routing` field)."""
        return {"object": "list", "data": policy.models()}

    @app.get("/healthz", response_model=Health, responses={503: {"model": Health}}, summary="Liveness and queue depth")
    async def healthz() -> JSONResponse:
        ok = batcher.alive
        body = {"status": "ok" if ok else "unavailable", "expert": expert_name, "queue_depth": batcher.depth, "max_queue": config.max_queue}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(static["index.html"])

    for route, (name, media_type) in STATIC_FILES.items():
        app.add_api_route(route, _fixed_file(static[name], media_type), methods=["GET"], include_in_schema=False)

    app.add_middleware(BodyGuard, max_body_bytes=config.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics, endpoints=ENDPOINTS)  # outermost: sees 413s too
    return app


# OpenAI fields this server does not do: a request giving one of them a value other than these is a 400 naming it
_NO_PENALTY = (0, 0.0)
CHAT_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (False,), "top_logprobs": (0,), "tools": ([],), "functions": ([],), "tool_choice": ("none", "auto"),
    "function_call": ("none", "auto"), "logit_bias": ({},), "presence_penalty": _NO_PENALTY, "frequency_penalty": _NO_PENALTY,
    "response_format": ({"type": "text"},), "audio": (), "modalities": (["text"],), "prediction": (),
}
COMPLETION_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "echo": (False,), "best_of": (1,), "suffix": (), "logprobs": (), "logit_bias": ({},),
    "presence_penalty": _NO_PENALTY, "frequency_penalty": _NO_PENALTY,
}


def _fixed_file(content: bytes, media_type: str) -> Any:
    """An endpoint that always returns the same bytes (it takes no parameters at all)."""

    async def serve() -> Response:
        return Response(content, media_type=media_type, headers={"Cache-Control": "no-cache"})

    return serve

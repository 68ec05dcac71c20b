"""Admission control: a burst the server cannot serve in time is refused at once (503 + Retry-After)
instead of timing out (504), from a fresh start on, with batch costs that follow the token budget."""

from __future__ import annotations

import asyncio

import pytest
import torch

pytest.importorskip("fastapi")
import httpx

from medmoe.data.record import Record
from medmoe.serve.admission import CostModel, size_class
from medmoe.serve.app import create_app
from medmoe.serve.config import ServeConfig
from serve_helpers import FakeGenerator, running_server, slowed, tiny_answerer

torch.set_num_threads(1)


def chat_record(max_new_tokens: int | None = None, options: tuple[str, ...] = ()) -> Record:
    metadata = {"max_new_tokens": max_new_tokens} if max_new_tokens else {}
    return Record(id="r", question="What causes scurvy?", answer="", options=options, metadata=metadata)


def test_cost_model_scales_with_the_token_budget_and_batch_size():
    costs = CostModel(max_new_tokens=64)
    assert costs.predict("open", [chat_record()]) == (0.0, ["open"])  # never measured: no guess
    costs.observe("open", [chat_record()] * 4, 0.64)  # 4 rows x 64 tokens in 0.64 s
    assert costs.predict("open", [chat_record(8)] * 4)[0] == pytest.approx(0.08)  # max_tokens 8: an eighth
    assert costs.predict("open", [chat_record(500)] * 4)[0] == pytest.approx(0.64)  # never above the server's limit
    assert costs.predict("open", [chat_record()] * 2)[0] == pytest.approx(0.64)  # smaller: the larger size's cost
    assert costs.predict("open", [chat_record()] * 16)[0] == pytest.approx(2.56)  # larger: no batching gain assumed
    assert costs.predict("options", [chat_record(options=("a", "b"))])[1] == ["options"]  # another kind: its own
    assert [size_class(n) for n in (1, 2, 3, 4, 5, 16, 17)] == [1, 2, 4, 4, 8, 16, 32]


async def chat_burst(base: str, n: int, max_tokens: int | None = None) -> list[httpx.Response]:
    body = {"messages": [{"role": "user", "content": "What causes scurvy?"}]}
    if max_tokens:
        body["max_tokens"] = max_tokens
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        return await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(n)))


def check_refusals(responses: list[httpx.Response]) -> list[int]:
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes  # refused early, never timed out (504)
    for r in responses:
        if r.status_code == 503:
            assert int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["type"] == "overloaded"
    return codes


def test_chat_burst_is_refused_early_not_timed_out():
    """Batches of 4 take 0.64 s at 64 tokens and the timeout is 1.5 s: a burst of 24 cannot be served.
    Fresh, the server admits one batch; timed, what fits in the timeout; with max_tokens 4, all."""
    fake = FakeGenerator(step_s=0.01)
    app = create_app(fake, ServeConfig(max_batch_size=4, max_wait_ms=20, request_timeout_s=1.5, max_new_tokens=64))
    with running_server(app) as base:
        fresh = check_refusals(asyncio.run(chat_burst(base, 24)))
        timed = check_refusals(asyncio.run(chat_burst(base, 24)))
        short = check_refusals(asyncio.run(chat_burst(base, 24, max_tokens=4)))
    assert 1 <= fresh.count(200) <= 4 and fresh.count(503) >= 20  # one batch of unknown cost at a time
    assert 4 <= timed.count(200) <= 12 and timed.count(503) >= 12  # 1-2 batches fit in 80% of 1.5 s (3 if spread out)
    assert short.count(200) == 24  # 6 batches of 4 tokens: 0.24 s
    s = app.state.batcher.stats
    assert s.timed_out == 0 and s.accepted == s.answered


def test_chat_burst_on_a_slowed_tiny_model_gives_503s_and_no_504s():
    """The same with real batched generation: 16 new tokens, each step slowed to >= 20 ms."""
    answerer = tiny_answerer(max_new_tokens=16)
    slowed(answerer.model, 0.02)
    app = create_app(answerer, ServeConfig(max_batch_size=4, max_wait_ms=20, request_timeout_s=1.5, max_new_tokens=16))
    with running_server(app) as base:
        fresh, timed = [check_refusals(asyncio.run(chat_burst(base, 32))) for _ in range(2)]
    assert 1 <= fresh.count(200) <= 4  # one batch until a batch has been timed
    assert timed.count(503) > 0 and timed.count(200) >= 4, timed  # 8 batches of >= 0.34 s do not fit in 1.5 s
    assert app.state.batcher.stats.timed_out == 0

"""Micro-batching: batches by key, bounded queue (503 + Retry-After), timeouts, exactly-once answers."""

from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("fastapi")
import httpx

from medmoe.data.record import Record
from medmoe.serve.app import create_app
from medmoe.serve.batching import MicroBatcher, QueueFull, RequestTimeout
from medmoe.serve.config import ServeConfig
from serve_helpers import FakeAnswerer, running_server


def record(i: int, **kw) -> Record:
    return Record(id=f"r{i}", question=f"question {i}", answer="", **kw)


def run_batcher(batcher: MicroBatcher, coro_factory):
    async def main():
        batcher.start()
        try:
            return await coro_factory()
        finally:
            await asyncio.to_thread(batcher.stop)

    return asyncio.run(main())


def test_concurrent_requests_are_batched_and_each_answered_once():
    fake = FakeAnswerer(delay_s=0.05)
    batcher = MicroBatcher(fake, max_batch_size=8, max_wait_ms=20, max_queue=100)
    batcher.costs.observe("default", [record(0)] * 8, 0.05)  # as if timed: a fresh batcher admits one batch
    results = run_batcher(batcher, lambda: asyncio.gather(*(batcher.submit(record(i), 10) for i in range(30))))
    assert [answer.answer for answer, _ in results] == [f"echo:question {i}" for i in range(30)]  # each its own
    seen = [rid for batch in fake.batches for rid in batch]
    assert sorted(seen) == sorted(f"r{i}" for i in range(30))  # every request reached the model exactly once
    assert max(len(b) for b in fake.batches) <= 8 and max(len(b) for b in fake.batches) > 1
    assert max(info.batch_size for _, info in results) > 1
    s = batcher.stats
    assert (s.accepted, s.answered, s.duplicates, s.rejected) == (30, 30, 0, 0)


def test_batches_never_mix_keys():
    class Keyed(FakeAnswerer):
        def batch_key(self, r):
            return "options" if r.options else "open"

    fake = Keyed(delay_s=0.02)
    batcher = MicroBatcher(fake, max_batch_size=16, max_wait_ms=30, max_queue=100)
    for key, options in (("open", ()), ("options", ("a", "b"))):
        batcher.costs.observe(key, [record(0, options=options)] * 16, 0.02)  # as if timed
    records = [record(i, options=("a", "b")) if i % 2 else record(i) for i in range(20)]
    run_batcher(batcher, lambda: asyncio.gather(*(batcher.submit(r, 10) for r in records)))
    for batch in fake.batches:
        assert len({int(rid[1:]) % 2 for rid in batch}) == 1, batch


def test_full_queue_refuses_instead_of_waiting():
    fake = FakeAnswerer(delay_s=0.2)
    batcher = MicroBatcher(fake, max_batch_size=2, max_wait_ms=0, max_queue=3)

    async def burst():
        return await asyncio.gather(*(batcher.submit(record(i), 10) for i in range(12)), return_exceptions=True)

    results = run_batcher(batcher, burst)
    refused = [r for r in results if isinstance(r, QueueFull)]
    answered = [r for r in results if not isinstance(r, Exception)]
    assert refused and all(r.retry_after_s >= 1 for r in refused)
    assert len(answered) + len(refused) == 12
    assert batcher.stats.accepted == len(answered) == batcher.stats.answered


def test_timed_out_request_is_withdrawn_before_reaching_the_model():
    fake = FakeAnswerer(delay_s=0.4)
    batcher = MicroBatcher(fake, max_batch_size=1, max_wait_ms=0, max_queue=10)
    batcher.costs.observe("default", [record(0)], 0.01)  # a (wrong) estimate that lets r1 in, so that it times out

    async def scenario():
        first = asyncio.create_task(batcher.submit(record(0), 5))
        await asyncio.sleep(0.05)  # the worker is now busy with r0
        with pytest.raises(RequestTimeout):
            await batcher.submit(record(1), 0.1)
        return await first

    answer, _ = run_batcher(batcher, scenario)
    assert answer.answer == "echo:question 0"
    assert fake.batches == [["r0"]]  # r1 left the queue at its timeout and was never computed
    s = batcher.stats
    assert (s.accepted, s.answered, s.timed_out) == (2, 1, 1)


# -- over HTTP ---------------------------------------------------------------------------------------

async def _post_all(base: str, n: int, concurrency: int) -> list[httpx.Response]:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        async def one(i: int) -> httpx.Response:
            async with limit:
                return await client.post("/v1/answer", json={"question": f"question {i}", "request_id": f"id-{i}"})
        return await asyncio.gather(*(one(i) for i in range(n)))


def test_http_load_every_accepted_request_answered_exactly_once():
    fake = FakeAnswerer(delay_s=0.01)
    app = create_app(fake, ServeConfig(max_batch_size=16, max_wait_ms=5, max_queue=256))
    with running_server(app) as base:
        assert httpx.post(f"{base}/v1/answer", json={"question": "warm up"}).status_code == 200  # times a batch
        responses = asyncio.run(_post_all(base, 200, 64))
    assert all(r.status_code == 200 for r in responses)
    for i, r in enumerate(responses):
        assert r.json()["request_id"] == f"id-{i}" and r.json()["answer"] == f"echo:question {i}"
    stats = app.state.batcher.stats
    assert (stats.accepted, stats.answered, stats.duplicates) == (201, 201, 0)
    assert sum(len(b) for b in fake.batches) == 201 and max(len(b) for b in fake.batches) > 1


def test_http_overload_gives_503_with_retry_after_then_recovers():
    fake = FakeAnswerer(delay_s=0.1)
    app = create_app(fake, ServeConfig(max_batch_size=2, max_wait_ms=0, max_queue=4))
    with running_server(app) as base:
        responses = asyncio.run(_post_all(base, 40, 40))
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 503} and codes.count(503) > 0 and codes.count(200) > 0
        for r in responses:
            if r.status_code == 503:
                assert int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["type"] == "overloaded"
        after = asyncio.run(_post_all(base, 5, 1))  # the overload is over: the server serves again
        assert [r.status_code for r in after] == [200] * 5
        metrics = httpx.get(f"{base}/metrics").text
    stats = app.state.batcher.stats
    assert stats.accepted == stats.answered == codes.count(200) + 5 and stats.duplicates == 0
    assert f'medmoe_rejected_total{{reason="queue_full"}} {codes.count(503)}' in metrics
    assert f'medmoe_batcher_requests{{outcome="answered"}} {stats.answered}' in metrics
    assert 'medmoe_batcher_requests{outcome="duplicates"} 0' in metrics


def test_http_timeout_is_504_and_answerer_failure_is_500_without_stopping_the_server():
    class Flaky(FakeAnswerer):
        def answer_batch(self, records):
            if any(r.question == "boom" for r in records):
                raise RuntimeError("model exploded")
            if any(r.question == "slow" for r in records):
                time.sleep(0.5)
            return super().answer_batch(records)

    app = create_app(Flaky(), ServeConfig(max_batch_size=1, max_wait_ms=0, request_timeout_s=0.2))
    with running_server(app) as base:
        assert httpx.post(f"{base}/v1/answer", json={"question": "boom"}).status_code == 500
        slow = httpx.post(f"{base}/v1/answer", json={"question": "slow"})
        assert slow.status_code == 504 and slow.json()["error"]["type"] == "timeout"
        time.sleep(0.4)
        ok = httpx.post(f"{base}/v1/answer", json={"question": "fine"})
        assert ok.status_code == 200 and ok.json()["answer"] == "echo:fine"
        assert httpx.get(f"{base}/healthz").json()["status"] == "ok"


def test_refuses_when_the_queued_batches_would_outlast_the_timeout():
    """With 1 s batches measured and 2 requests queued (batch size 2), a new request would wait for
    what is left of the running batch, 1 batch ahead and its own: about 2.9 s > a 2 s timeout, so it
    is refused now."""
    fake = FakeAnswerer(delay_s=1.0)
    batcher = MicroBatcher(fake, max_batch_size=2, max_wait_ms=0, max_queue=100)

    async def scenario():
        batcher.costs.observe("default", [record(0), record(1)], 1.0)  # as if measured
        queued = [asyncio.create_task(batcher.submit(record(i), 30)) for i in range(4)]
        await asyncio.sleep(0.1)  # the worker took r0, r1; r2, r3 wait
        wait = batcher.estimated_wait(record(9))
        assert not wait.unknown and wait.seconds == pytest.approx(2.9, abs=0.05)
        with pytest.raises(QueueFull, match="estimated wait"):
            await batcher.submit(record(9), 2.0)
        late = await batcher.submit(record(10), 10.0)  # a patient request is still accepted
        return await asyncio.gather(*queued), late

    answers, late = run_batcher(batcher, scenario)
    assert len(answers) == 4 and late[0].answer == "echo:question 10"
    assert batcher.stats.rejected == 1 and batcher.stats.answered == 5

"""An item that fails fails alone: when a micro-batch's answer call raises, the batch is answered
again in halves, so only the request at fault gets an error (4xx when the request caused it, 500
for a model failure) and the others of its batch get their answers, streams included."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

pytest.importorskip("fastapi")
import httpx

from medmoe.answer.types import InputTooLong, RequestRejected
from medmoe.data.record import Record
from medmoe.serve.app import create_app
from medmoe.serve.batching import MicroBatcher
from medmoe.serve.config import ServeConfig
from serve_helpers import FakeStreamer, PoisonedAnswerer, running_server, sse_data, tiny_answerer

torch.set_num_threads(1)
QUESTIONS = ["q0", "q1", "q2", "boom", "q4", "q5"]  # one bad item among five good ones
WINDOW = ServeConfig(max_batch_size=8, max_wait_ms=300)  # the six arrive within one batching window


def record(question: str) -> Record:
    return Record(id=question, question=question, answer="")


def run(batcher: MicroBatcher, records: list[Record]) -> list:
    async def main():
        batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(r, 30) for r in records), return_exceptions=True)
        finally:
            await asyncio.to_thread(batcher.stop)

    return asyncio.run(main())


async def post_all(base: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        return await asyncio.gather(*(client.post("/v1/answer", json=b) for b in bodies))


def test_batcher_answers_the_good_items_of_a_failing_batch():
    fake = PoisonedAnswerer()
    batcher = MicroBatcher(fake, max_batch_size=8, max_wait_ms=300)
    results = run(batcher, [record(q) for q in QUESTIONS])
    assert isinstance(results[3], RuntimeError) and "exploded" in str(results[3])
    assert [a.answer for a, _ in results[:3] + results[4:]] == [f"echo:{q}" for q in QUESTIONS if q != "boom"]
    assert (batcher.stats.answered, batcher.stats.failed, batcher.stats.duplicates) == (5, 1, 0)
    assert fake.calls <= 7  # the six together, then halves: never more calls than one per item after the first
    assert sorted(rid for batch in fake.batches for rid in batch) == sorted(q for q in QUESTIONS if q != "boom")


def test_http_one_model_failure_in_a_batch_of_six_is_one_500():
    fake = PoisonedAnswerer()
    app = create_app(fake, WINDOW)
    with running_server(app) as base:
        responses = asyncio.run(post_all(base, [{"question": q} for q in QUESTIONS]))
        after = httpx.post(f"{base}/v1/answer", json={"question": "after"})
        metrics = httpx.get(f"{base}/metrics").text
    codes = [r.status_code for r in responses]
    assert codes == [200, 200, 200, 500, 200, 200], [r.text for r in responses]
    assert responses[3].json()["error"]["type"] == "internal_error"
    assert [r.json()["answer"] for r in responses if r.status_code == 200] == [f"echo:{q}" for q in QUESTIONS if q != "boom"]
    assert after.status_code == 200 and 'medmoe_rejected_total{reason="error"} 1' in metrics


@pytest.mark.parametrize("error, kind", [
    (RequestRejected("question: this model cannot read it", "question"), "invalid_request"),
    (InputTooLong("question", 900, 500), "input_too_long"),
])
def test_http_a_request_error_found_late_is_a_4xx_for_that_request_only(error, kind):
    app = create_app(PoisonedAnswerer(error=error), WINDOW)
    with running_server(app) as base:
        responses = asyncio.run(post_all(base, [{"question": q} for q in QUESTIONS]))
    assert [r.status_code for r in responses] == [200, 200, 200, 422, 200, 200]
    body = responses[3].json()["error"]
    assert (body["type"], body["param"], body["message"]) == (kind, "question", str(error))


def test_a_too_long_prompt_that_skipped_fit_fails_alone_with_input_too_long():
    """A record that never went through `fit` (its prompt over the window) raises InputTooLong inside
    the batch instead of overrunning the model; the two good records of its batch are answered."""
    answerer = tiny_answerer(max_new_tokens=4, max_input_tokens=64)
    long = Record(id="long", question="What causes scurvy?", answer="", context="fever cough " * 200)
    good = [Record(id=f"g{i}", question=f"Fever {i}?", answer="") for i in range(2)]
    results = run(MicroBatcher(answerer, max_batch_size=4, max_wait_ms=300), [good[0], long, good[1]])
    assert isinstance(results[1], InputTooLong) and results[1].field == "context" and results[1].limit == 64
    assert [a.answer for a, _ in (results[0], results[2])] == [a.answer for a in answerer.answer_batch(good)]


class PoisonedStreamer(FakeStreamer):
    """Streams every record's text, then fails the whole batch if it holds the question "boom"."""

    def answer_batch(self, records, sinks=None):
        answers = super().answer_batch(records, sinks)
        if any(r.question == "boom" for r in records):
            raise RuntimeError("failed after streaming")
        return answers


def test_a_stream_in_a_failing_batch_gets_its_text_once():
    async def scenario(base: str):
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            stream = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "fine"}], "stream": True})
            bad = client.post("/v1/answer", json={"question": "boom"})
            return await asyncio.gather(stream, bad)

    fake = PoisonedStreamer(pieces=4, step_s=0.02)
    with running_server(create_app(fake, WINDOW)) as base:
        streamed, bad = asyncio.run(scenario(base))
    assert bad.status_code == 500
    events = sse_data(streamed.text)
    chunks = [json.loads(e) for e in events[:-1]]
    pieces = [c["choices"][0]["delta"].get("content") or "" for c in chunks]
    assert "".join(pieces) == "w0 w1 w2 w3"  # streamed by the failed try, not again by the retry
    assert events[-1] == "[DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "stop"

"""True token streaming for /v1/chat/completions: text arrives while the batch decodes, equals the
non-streamed answer, stops decoding when the client goes away, and keeps the server's guards."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace

import pytest
import torch

pytest.importorskip("fastapi")
import httpx

from medmoe.answer.streaming import cut_at_stop, hold_back_stop_prefix, settled
from medmoe.data.record import Record
from medmoe.serve.app import create_app
from medmoe.serve.config import ServeConfig
from serve_helpers import FakeAnswerer, FakeStreamer, running_server, slowed, sse_data, tiny_answerer

torch.set_num_threads(1)
QUESTION = {"messages": [{"role": "user", "content": "What causes scurvy?"}]}


class ListSink:
    """A TextSink stand-in for the answerer-level tests: collects pieces, may cancel itself."""

    def __init__(self, cancel_after: int | None = None):
        self.pieces: list[str] = []
        self.cancel_after = cancel_after

    @property
    def cancelled(self) -> bool:
        return self.cancel_after is not None and len(self.pieces) >= self.cancel_after

    def push(self, text: str) -> None:
        self.pieces.append(text)


def content_of(events: list[str]) -> tuple[list[str], list[dict]]:
    chunks = [c for c in (json.loads(e) for e in events if e != "[DONE]") if "choices" in c]
    return [c["choices"][0]["delta"]["content"] for c in chunks if c["choices"][0]["delta"].get("content")], chunks


def test_settled_text_holds_back_what_later_tokens_may_change():
    assert settled("  Vitamin C ") == "Vitamin C"  # leading space dropped, trailing space held back
    assert settled("caf\ufffd") == "caf"  # half a character: wait for its other bytes
    assert settled("a \ufffd\n") == "a"
    assert settled("\n\n") == ""


def test_stop_sequences_cut_and_hold_back():
    assert cut_at_stop("Vitamin C. Then", [".", "Then"]) == ("Vitamin C", True)
    assert cut_at_stop("Vitamin C", ["."]) == ("Vitamin C", False)
    assert hold_back_stop_prefix("Vitamin C\n", ["\n\n"]) == "Vitamin C"  # the next token may make it "\n\n"
    assert hold_back_stop_prefix("Vitamin EN", ["END", "x"]) == "Vitamin "
    assert hold_back_stop_prefix("Vitamin C", ["END"]) == "Vitamin C"
    assert settled("  Vitamin", raw=True) == "  Vitamin"  # a raw completion keeps its leading whitespace


def test_streamed_row_with_a_stop_sequence_never_sends_it():
    """Stop sequences end a streamed row and a plain one in the same batch; no piece holds any part of a
    stop sequence, the pieces concatenate to the answer, the other rows are unchanged."""
    answerer = tiny_answerer(max_new_tokens=12)
    record = Record(id="s", question="What causes scurvy?", answer="")
    full = answerer.answer_batch([record])[0].answer
    stop = full[5:8]
    assert full.index(stop) == 5
    stopped = replace(record, metadata={"stop": [stop]})
    plain_row = Record(id="p", question="Fever?", answer="")
    sink = ListSink()
    streamed, plain, unstreamed = answerer.answer_batch([stopped, plain_row, stopped], sinks=[sink, None, None])
    assert streamed.answer == unstreamed.answer == answerer.answer_batch([stopped])[0].answer == full[:5].strip()
    assert streamed.finish_reason == unstreamed.finish_reason == "stop" and streamed.completion_tokens < 12
    assert len(sink.pieces) > 1 and "".join(sink.pieces) == streamed.answer  # pieces cannot be taken back: none held the stop
    assert plain.answer == answerer.answer_batch([plain_row])[0].answer and plain.finish_reason == "length"


def test_streamed_rows_in_a_batch_equal_the_unstreamed_batch():
    """A streamed row and a plain row share one generate call; each answer equals the non-streamed
    one, and the streamed row's pieces (more than one) concatenate to its answer."""
    answerer = tiny_answerer(max_new_tokens=12)
    records = [Record(id="s", question="What causes scurvy?", answer="", metadata={"max_new_tokens": 6}),
               Record(id="p", question="Fever?", answer="", context="The patient presented with fever.")]
    sink = ListSink()
    streamed = answerer.answer_batch(records, sinks=[sink, None])
    plain = answerer.answer_batch(records)
    assert [a.answer for a in streamed] == [a.answer for a in plain]
    assert len(sink.pieces) > 1 and "".join(sink.pieces) == plain[0].answer


def test_cancelled_sink_stops_decoding():
    answerer = tiny_answerer(max_new_tokens=40)
    calls = slowed(answerer.model, 0.0)
    answerer.answer_batch([Record(id="x", question="What causes scurvy?", answer="")], sinks=[ListSink()])
    full = len(calls)
    calls.clear()
    answerer.answer_batch([Record(id="x", question="What causes scurvy?", answer="")], sinks=[ListSink(cancel_after=2)])
    assert full >= 40 and len(calls) <= 6  # the row stopped a step after its client left, not at 40 tokens


def test_http_stream_arrives_token_by_token():
    answerer = tiny_answerer(max_new_tokens=16)
    slowed(answerer.model, 0.05)  # >= 0.8 s of decoding: a stream sent only at the end would show it
    app = create_app(answerer, ServeConfig(max_new_tokens=16, max_wait_ms=1))
    with running_server(app) as base:
        plain = httpx.post(f"{base}/v1/chat/completions", json=QUESTION, timeout=30).json()["choices"][0]["message"]["content"]
        arrivals, lines = [], []
        with httpx.stream("POST", f"{base}/v1/chat/completions", json={**QUESTION, "stream": True}, timeout=30) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line[len("data: "):])
                    arrivals.append(time.perf_counter())
    assert lines[-1] == "[DONE]"
    pieces, chunks = content_of(lines)
    assert len(pieces) > 1 and "".join(pieces) == plain  # greedy: the same text, in several chunks
    first_content = next(i for i, c in enumerate(chunks) if c["choices"][0]["delta"].get("content"))
    assert arrivals[-1] - arrivals[first_content] > 0.3  # the first text came long before the end
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    latency = chunks[-1]["medmoe"]["latency_ms"]
    assert 0 < latency["first_token"] < latency["total"]


def test_http_disconnect_mid_stream_stops_generation_and_the_server_keeps_serving():
    answerer = tiny_answerer(max_new_tokens=40)
    calls = slowed(answerer.model, 0.05)  # 40 tokens would take >= 2 s
    app = create_app(answerer, ServeConfig(max_new_tokens=40, max_wait_ms=1))
    with running_server(app) as base:
        with httpx.stream("POST", f"{base}/v1/chat/completions", json={**QUESTION, "stream": True}, timeout=30) as r:
            for line in r.iter_lines():
                if '"content": "' in line and '"content": ""' not in line:
                    break  # the first piece of text: hang up
        deadline = time.time() + 10
        while app.state.batcher.stats.cancelled == 0 and time.time() < deadline:
            time.sleep(0.05)
        after = httpx.post(f"{base}/v1/chat/completions", json={**QUESTION, "max_tokens": 2}, timeout=30)
        assert after.status_code == 200 and httpx.get(f"{base}/healthz").json()["status"] == "ok"
        assert len(calls) < 30  # the hung-up stream stopped decoding soon after, not after 40 tokens (+2)
    s = app.state.batcher.stats
    assert (s.accepted, s.answered, s.cancelled, s.duplicates) == (2, 1, 1, 0)


def test_http_stream_guards_queue_full_and_timeout():
    """A full queue refuses a stream with 503 + Retry-After before it starts; a stream that outlasts
    the request timeout ends with an error event and [DONE], and its work stops."""
    fake = FakeStreamer(pieces=40, step_s=0.1)
    app = create_app(fake, ServeConfig(max_batch_size=1, max_wait_ms=0, max_queue=1, request_timeout_s=1.0))
    app.state.batcher.costs.observe("default", [Record(id="x", question="q", answer="")], 0.01)  # as if timed (wrongly): the second is queued
    with running_server(app) as base:
        with httpx.stream("POST", f"{base}/v1/chat/completions", json={**QUESTION, "stream": True}, timeout=30) as r:
            queued = threading.Thread(target=httpx.post, args=(f"{base}/v1/chat/completions",), kwargs={"json": {**QUESTION, "stream": True}})
            queued.start()
            deadline = time.time() + 10
            while app.state.batcher.depth == 0:  # the second request waits behind the first
                assert time.time() < deadline, "the second stream was never queued"
                time.sleep(0.005)
            refused = httpx.post(f"{base}/v1/chat/completions", json={**QUESTION, "stream": True}, timeout=30)
            events = sse_data(r.read().decode())
            queued.join()
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["type"] == "timeout"
        pieces, _ = content_of(events)
        assert 1 <= len(pieces) < 40
    assert fake.steps < 25 and app.state.batcher.stats.timed_out >= 1  # 40 pieces each if nothing stopped them


def test_answerer_that_cannot_stream_still_answers_streams():
    with running_server(create_app(FakeAnswerer())) as base:
        events = sse_data(httpx.post(f"{base}/v1/chat/completions", json={**QUESTION, "stream": True}, timeout=30).text)
    pieces, chunks = content_of(events)
    assert events[-1] == "[DONE]" and "".join(pieces) == "echo:What causes scurvy?"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"

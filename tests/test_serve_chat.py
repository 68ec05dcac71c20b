"""OpenAI-compatible /v1/chat/completions, plain and streaming (server-sent events)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from medmoe.serve.app import create_app
from medmoe.serve.config import ServeConfig
from serve_helpers import FakeAnswerer, tiny_answerer

torch.set_num_threads(1)
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What causes scurvy?"}]


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(tiny_answerer(max_new_tokens=12), ServeConfig(max_new_tokens=12, max_wait_ms=1))) as c:
        yield c


def sse_events(text: str) -> list[str]:
    assert text.endswith("\n\n")
    events = [block for block in text.split("\n\n") if block]
    assert all(e.startswith("data: ") for e in events)
    return [e[len("data: "):] for e in events]


def test_chat_completion_matches_the_answer_endpoint(client):
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, "temperature": 0.7})
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-") and data["model"] == "tiny"
    choice = data["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "stop"
    same = client.post("/v1/answer", json={"question": "What causes scurvy?"}).json()["answer"]
    assert choice["message"]["content"] == same  # greedy: the same question gets the same answer
    assert data["medmoe"]["expert"] == "tiny-llama" and "total" in data["medmoe"]["latency_ms"]


def test_streaming_sends_the_same_text_as_chunks_then_done(client):
    plain = client.post("/v1/chat/completions", json={"messages": MESSAGES}).json()["choices"][0]["message"]["content"]
    with client.stream("POST", "/v1/chat/completions", json={"messages": MESSAGES, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.read().decode())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == plain
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "stop"
    assert chunks[-1]["medmoe"]["expert"] == "tiny-llama"


def test_max_tokens_limits_the_answer(client):
    """max_tokens=3 gives what transformers' greedy generate gives with max_new_tokens=3."""
    from medmoe.answer.causal_lm import open_prompt
    from medmoe.data.record import Record

    answerer = client.app.state.batcher.answerer
    tok, model = answerer.tokenizer, answerer.model
    short = client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 3}).json()["choices"][0]["message"]["content"]
    ids = torch.tensor([tok(open_prompt(Record(id="x", question="What causes scurvy?", answer=""), tok), add_special_tokens=False)["input_ids"]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    out = out[: out.index(tok.eos_token_id)] if tok.eos_token_id in out else out
    assert short == tok.decode(out, skip_special_tokens=True).strip()


def test_content_parts_and_earlier_turns_become_context():
    seen = []

    class Capture(FakeAnswerer):
        def answer_batch(self, records):
            seen.extend(records)
            return super().answer_batch(records)

    with TestClient(create_app(Capture())) as c:
        messages = [
            {"role": "system", "content": "ignored"},
            {"role": "user", "content": "I have a fever."},
            {"role": "assistant", "content": "Since when?"},
            {"role": "user", "content": [{"type": "text", "text": "Since yesterday. Is it serious?"}]},
        ]
        r = c.post("/v1/chat/completions", json={"messages": messages})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "echo:Since yesterday. Is it serious?"
    assert seen[0].context == "user: I have a fever.\nassistant: Since when?"
    assert seen[0].options == ()


@pytest.mark.parametrize("body", [
    {"messages": []},
    {"messages": [{"role": "system", "content": "only a system prompt"}]},
    {"messages": [{"role": "user", "content": "   "}]},
    {"messages": [{"role": "wizard", "content": "hi"}]},
    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
])
def test_bad_chat_requests_are_422_naming_the_field(client, body):
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"].split(".")[0] in ("messages", "max_tokens")


def test_models_list(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny-llama"

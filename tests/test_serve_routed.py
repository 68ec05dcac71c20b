"""The routed MambaFormer system behind the server: the gate picks an expert for open questions too,
that expert generates (plain, chat, streamed), and open and option questions never fail each other."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

pytest.importorskip("fastapi")
import httpx
from fastapi.testclient import TestClient

from medmoe.data.record import Record
from medmoe.serve.app import create_app
from medmoe.serve.config import ServeConfig
from serve_helpers import running_server, sse_data, tiny_model, tiny_router, tiny_tokenizer

torch.set_num_threads(1)
QUESTION = "What causes scurvy?"
CHAT = {"messages": [{"role": "user", "content": QUESTION}]}
CONFIG = ServeConfig(max_new_tokens=12, max_wait_ms=1)


def expected(router, record: Record) -> tuple[str, str]:
    """(expert the gate picks, that expert's greedy answer alone) for an open record."""
    expert, _ = router.route([record])[0]
    return expert, router.generator(expert).answer_batch([record])[0].answer


@pytest.fixture(scope="module")
def router():
    return tiny_router()


def test_one_batch_answers_open_and_option_questions(router):
    """The routed answerer answers a batch holding both kinds (it raised for any open question)."""
    open_ = Record(id="o", question=QUESTION, answer="", context="The patient presented with fever.")
    choice = Record(id="c", question="Does aspirin reduce the risk?", answer="", options=("yes", "no", "maybe"))
    got_open, got_choice = router.answer_batch([open_, choice])
    expert, text = expected(router, open_)
    assert (got_open.expert, got_open.answer) == (expert, text) and text
    assert got_open.gate_probability == pytest.approx(router.route([open_])[0][1])
    assert got_open.top_features and set(got_open.latency_ms) == {"gate", "expert", "total"}
    assert got_choice.answer in "ABC" and sum(got_choice.label_scores.values()) == pytest.approx(1.0)
    assert got_choice.expert == router.route([choice])[0][0]


@pytest.mark.parametrize("tau, expert", [(-1.0, "mamba"), (2.0, "transformer")])
def test_open_question_is_generated_by_the_expert_the_gate_picks(tau, expert):
    router = tiny_router(tau=tau)
    with TestClient(create_app(router, CONFIG)) as client:
        r = client.post("/v1/answer", json={"question": QUESTION})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["expert"] == expert and (expert, body["answer"]) == expected(router, Record(id="x", question=QUESTION, answer=""))
    assert body["answer"] and body["gate_probability"] is not None and body["top_features"]


def test_chat_completion_and_stream_come_from_the_chosen_expert(router):
    with running_server(create_app(router, CONFIG)) as base:
        plain = httpx.post(f"{base}/v1/chat/completions", json=CHAT, timeout=30)
        streamed = httpx.post(f"{base}/v1/chat/completions", json={**CHAT, "stream": True}, timeout=30)
    assert plain.status_code == 200, plain.text
    expert, text = expected(router, Record(id="x", question=QUESTION, answer="", metadata={"max_new_tokens": 12}))
    assert plain.json()["choices"][0]["message"]["content"] == text and text
    assert plain.json()["medmoe"]["expert"] == expert
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    events = sse_data(streamed.text)
    chunks = [json.loads(e) for e in events[:-1]]
    pieces = [c["choices"][0]["delta"]["content"] for c in chunks if c["choices"][0]["delta"].get("content")]
    assert events[-1] == "[DONE]" and "".join(pieces) == text  # greedy: the same text, streamed
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["medmoe"]["expert"] == expert
    assert "first_token" in chunks[-1]["medmoe"]["latency_ms"]


def test_open_question_among_five_option_questions_all_answered(router):
    """The issue's case: one open question arriving with five option questions (one batching window)."""
    choice = {"question": "Does aspirin reduce the risk of myocardial infarction?", "options": ["yes", "no", "maybe"]}
    bodies = [{**choice, "request_id": f"c{i}"} for i in range(5)] + [{"question": QUESTION, "request_id": "open"}]

    async def burst(base: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            return await asyncio.gather(*(client.post("/v1/answer", json=b) for b in bodies))

    app = create_app(router, ServeConfig(max_new_tokens=12, max_wait_ms=200))
    with running_server(app) as base:
        responses = asyncio.run(burst(base))
    assert [r.status_code for r in responses] == [200] * 6, [r.text for r in responses]
    assert all(r.json()["answer"] in "ABC" for r in responses[:5]) and responses[5].json()["answer"]
    assert app.state.batcher.stats.failed == 0


def test_long_context_is_cut_to_fit_both_experts():
    router = tiny_router()
    context = " ".join(["The patient presented with fever, cough and shortness of breath."] * 120)
    with TestClient(create_app(router, CONFIG)) as client:
        r = client.post("/v1/answer", json={"question": QUESTION, "context": context})
    assert r.status_code == 200, r.text
    assert r.json()["truncated_context_tokens"] > 0


def test_a_mamba_hybrid_expert_generates_and_streams():
    """E_M as a real Mamba hybrid (one attention block replaced by a Mamba mixer), every query routed to it."""
    from medmoe.mamba.transfer import build_hybrid

    hybrid, _ = build_hybrid(tiny_model(tiny_tokenizer(True), seed=0), layers=[1])
    router = tiny_router(tau=-1.0, mamba=hybrid.eval())
    with running_server(create_app(router, CONFIG)) as base:
        plain = httpx.post(f"{base}/v1/chat/completions", json=CHAT, timeout=30)
        streamed = httpx.post(f"{base}/v1/chat/completions", json={**CHAT, "stream": True}, timeout=30)
    assert plain.status_code == 200, plain.text
    assert plain.json()["medmoe"]["expert"] == "mamba"
    events = sse_data(streamed.text)
    pieces = [c["choices"][0]["delta"].get("content") or "" for c in map(json.loads, events[:-1])]
    assert events[-1] == "[DONE]" and "".join(pieces) == plain.json()["choices"][0]["message"]["content"]

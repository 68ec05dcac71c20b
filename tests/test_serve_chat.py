"""OpenAI-compatible /v1/chat/completions, plain and streaming (server-sent events)."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

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
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES[1:], "temperature": 0})
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-") and data["model"] == "tiny"
    choice = data["choices"][0]
    # the random model never says EOS: it stops at the server's max_new_tokens
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 12
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
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"  # at max_new_tokens, as the plain answer
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
    assert seen[0].options == () and seen[0].metadata["system"] == "ignored"  # the system turn of the prompt
    assert "temperature" not in seen[0].metadata  # greedy unless asked


def test_an_answerer_that_counts_no_tokens_gets_usage_null():
    with TestClient(create_app(FakeAnswerer())) as c:
        data = c.post("/v1/chat/completions", json={"messages": MESSAGES}).json()
    assert data["usage"] is None and data["choices"][0]["finish_reason"] == "stop"


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


def test_models_list_is_openais_shape(client):
    data = client.get("/v1/models").json()
    assert data["object"] == "list"
    assert data["data"] == [{"id": "tiny-llama", "object": "model", "created": 0, "owned_by": "medmoe"}]


# -- generation parameters, at the answerer ---------------------------------------------------------

RAISING_TEMPLATE = (  # a chat template without a system role: it raises, as Gemma-2's does
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
DROPPING_TEMPLATE = (  # one that silently drops system messages
    "{% for message in messages %}{% if message['role'] != 'system' %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.mark.parametrize("template", [RAISING_TEMPLATE, DROPPING_TEMPLATE, None])
def test_system_prompt_opens_the_user_message_without_a_system_role(template):
    from medmoe.answer.causal_lm import open_prompt
    from medmoe.data.record import Record
    from serve_helpers import tiny_tokenizer

    tok = copy.deepcopy(tiny_tokenizer(True))
    tok.chat_template = template
    record = Record(id="x", question="What causes scurvy?", answer="", metadata={"system": "Be terse."})
    prompt = open_prompt(record, tok)
    assert "Be terse.\n\nQuestion: What causes scurvy?" in prompt and "<|im_start|>system" not in prompt
    plain = tiny_tokenizer(True)  # the tests' template has a system role
    assert open_prompt(record, plain).startswith("<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nQuestion:")


def test_eos_ends_an_answer_with_finish_reason_stop_and_is_counted():
    answerer = tiny_answerer(max_new_tokens=12)
    eos, calls = answerer.tokenizer.eos_token_id, []

    def third_token_is_eos(module, args, output):
        calls.append(1)
        if len(calls) == 3:  # the prefill, then two decoding steps: the third new token is EOS
            output.logits[:, -1, eos] = 1e4

    answerer.model.register_forward_hook(third_token_is_eos)
    with TestClient(create_app(answerer, ServeConfig(max_new_tokens=12, max_wait_ms=1))) as c:
        data = c.post("/v1/chat/completions", json={"messages": MESSAGES[1:]}).json()
    assert data["choices"][0]["finish_reason"] == "stop"
    assert data["usage"]["completion_tokens"] == 3  # two tokens of text and the EOS
    assert data["usage"]["total_tokens"] == data["usage"]["prompt_tokens"] + 3


def test_sampled_and_greedy_rows_share_a_batch():
    """A sampled row with a seed gets the same text alone and in a batch; greedy rows next to sampled
    ones get their greedy answer; different seeds give different texts."""
    from medmoe.data.record import Record

    answerer = tiny_answerer(max_new_tokens=10)
    greedy = Record(id="g", question="What causes scurvy?", answer="")
    sampled = Record(id="s", question="Fever?", answer="", metadata={"temperature": 0.9, "top_p": 0.95, "seed": 42})
    other = Record(id="o", question="Fever?", answer="", metadata={"temperature": 0.9, "top_p": 0.95, "seed": 43})
    alone = [a.answer for a in (answerer.answer_batch([greedy])[0], answerer.answer_batch([sampled])[0])]
    together = answerer.answer_batch([greedy, sampled, other])
    assert [together[0].answer, together[1].answer] == alone
    assert together[2].answer != together[1].answer
    cold = Record(id="c", question="Fever?", answer="", metadata={"temperature": 1e-4, "seed": 1})  # ~greedy
    assert answerer.answer_batch([cold])[0].answer == answerer.answer_batch([replace(cold, metadata={})])[0].answer


@pytest.mark.parametrize("body, param", [
    ({"n": 2}, "n"), ({"temperature": 2.01}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"seed": 2**64}, "seed"),
    ({"stop": ["a"] * 5}, "stop"), ({"stop": [""]}, "stop"), ({"logit_bias": {"5": 1}}, "logit_bias"),
    ({"response_format": {"type": "json_object"}}, "response_format"), ({"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_out_of_range_parameters_are_400_naming_the_field(client, body, param):
    r = client.post("/v1/chat/completions", json={"messages": MESSAGES, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_parameter"


def test_parameters_at_their_defaults_are_accepted(client):
    defaults = {"n": 1, "temperature": 0, "top_p": 1, "logprobs": False, "presence_penalty": 0, "frequency_penalty": 0.0,
                "tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "logit_bias": {}, "user": "u"}
    r = client.post("/v1/chat/completions", json={"messages": MESSAGES, **defaults})
    assert r.status_code == 200, r.text


def test_text_completion_prompt_too_long_names_the_prompt():
    with TestClient(create_app(tiny_answerer(max_new_tokens=4, max_input_tokens=64), ServeConfig(max_new_tokens=4, max_wait_ms=1))) as c:
        r = c.post("/v1/completions", json={"prompt": "fever " * 200, "max_tokens": 2})
        assert r.status_code == 422 and r.json()["error"]["param"] == "prompt" and r.json()["error"]["type"] == "input_too_long"
        assert c.post("/v1/completions", json={"prompt": "   "}).status_code == 422

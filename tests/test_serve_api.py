"""The HTTP API with a tiny random Llama: answers, input safety, health, metrics, OpenAPI."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from medmoe.answer.causal_lm import open_prompt
from medmoe.answer.types import InputTooLong
from medmoe.data.record import Record
from medmoe.eval.prompts import build_prompt
from medmoe.eval.scoring import score_options
from medmoe.serve.app import create_app
from medmoe.serve.config import ServeConfig
from serve_helpers import tiny_answerer

torch.set_num_threads(1)  # tiny matrices: more threads only add contention on a shared machine

RECORDS = [
    Record(id="a", question="Which vitamin deficiency causes scurvy?", answer="", options=("Vitamin A", "Vitamin C", "Vitamin D")),
    Record(id="b", question="Does aspirin reduce the risk?", answer="", context="The patient presented with fever.", options=("yes", "no", "maybe")),
    Record(id="c", question="Fever, cough?", answer="", options=("A cold", "Pneumonia")),
]


@pytest.fixture(scope="module")
def answerer():
    return tiny_answerer(max_new_tokens=8, max_input_tokens=200)


@pytest.fixture(scope="module")
def client(answerer):
    config = ServeConfig(model="tiny", max_body_bytes=4096, max_question_chars=500, max_context_chars=3000, max_wait_ms=1)
    with TestClient(create_app(answerer, config)) as c:
        yield c


# -- the answerer against references ---------------------------------------------------------------

def test_batched_option_scores_match_unbatched_reference(answerer):
    """One padded forward for three questions gives each the probabilities score_options gives it alone."""
    answers = answerer.answer_batch(RECORDS)
    for record, answer in zip(RECORDS, answers):
        prompt = build_prompt(record, answerer.tokenizer)
        reference = score_options(answerer.model, answerer.tokenizer, prompt.context, prompt.continuations).probabilities()
        assert list(answer.label_scores) == list(record.letters)
        assert list(answer.label_scores.values()) == pytest.approx(reference, abs=1e-5)
        assert answer.answer == record.letters[max(range(len(reference)), key=reference.__getitem__)]
        assert answer.expert == "tiny-llama" and answer.latency_ms["expert"] > 0


def test_batched_generation_matches_unbatched_generate(answerer):
    """Left-padded batch generation equals transformers' greedy generate on each prompt alone."""
    tok, model = answerer.tokenizer, answerer.model
    records = [Record(id="o1", question="What causes scurvy?", answer=""),
               Record(id="o2", question="Fever?", answer="", context="The patient presented with fever, cough and shortness of breath.")]
    answers = answerer.answer_batch(records)
    for record, answer in zip(records, answers):
        ids = torch.tensor([tok(open_prompt(record, tok), add_special_tokens=False)["input_ids"]])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in out:
            out = out[: out.index(tok.eos_token_id)]
        assert answer.answer == tok.decode(out, skip_special_tokens=True).strip()
        assert answer.label_scores == {}


def test_mixed_batch_keeps_order(answerer):
    records = [RECORDS[0], Record(id="o", question="What causes scurvy?", answer=""), RECORDS[1]]
    answers = answerer.answer_batch(records)
    assert [bool(a.label_scores) for a in answers] == [True, False, True]
    assert answers[0].answer in "ABC" and answers[2].answer in "ABC"


def test_fit_cuts_long_context_keeping_its_beginning(answerer):
    context = "The patient presented with fever, cough and shortness of breath. " * 60
    record = Record(id="x", question="Does aspirin help?", answer="", context=context, options=("yes", "no", "maybe"))
    fitted, dropped = answerer.fit(record)
    assert dropped > 0
    assert answerer.prompt_tokens(fitted) <= answerer.max_input_tokens
    assert context.startswith(fitted.context[:50]) and len(fitted.context) < len(context)
    short = RECORDS[1]
    assert answerer.fit(short) == (short, 0)


def test_fit_rejects_a_question_that_cannot_fit(answerer):
    with pytest.raises(InputTooLong) as info:
        answerer.fit(Record(id="x", question="fever cough " * 300, answer=""))
    assert info.value.field == "question" and info.value.tokens > info.value.limit


# -- the endpoints ---------------------------------------------------------------------------------

def test_answer_with_options(client):
    body = {"question": "Which vitamin deficiency causes scurvy?", "options": ["Vitamin A", "Vitamin C", "Vitamin D"], "request_id": "q-1"}
    r = client.post("/v1/answer", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["request_id"] == "q-1"
    assert data["answer"] in "ABC" and data["answer_text"] == body["options"]["ABC".index(data["answer"])]
    assert sum(data["label_scores"].values()) == pytest.approx(1.0)
    assert data["expert"] == "tiny-llama" and data["gate_probability"] is None and data["top_features"] == []
    assert {"queue", "expert", "total"} <= set(data["latency_ms"]) and data["batch_size"] >= 1
    assert data["truncated_context_tokens"] == 0


def test_open_question_generates_text(client):
    r = client.post("/v1/answer", json={"question": "What causes scurvy?"})
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["answer"], str) and r.json()["label_scores"] == {}


def test_long_context_is_cut_and_reported(client):
    context = "The patient presented with fever, cough and shortness of breath. " * 40
    r = client.post("/v1/answer", json={"question": "Fever?", "context": context, "options": ["yes", "no"]})
    assert r.status_code == 200, r.text
    assert r.json()["truncated_context_tokens"] > 0


def test_question_over_the_token_window_is_422_naming_question(client):
    r = client.post("/v1/answer", json={"question": "fever cough " * 40})  # 480 chars, > 200 tokens
    assert r.status_code == 422
    assert r.json()["error"]["param"] == "question" and r.json()["error"]["type"] == "input_too_long"


@pytest.mark.parametrize("body, field", [
    ({"question": "   \n\t "}, "question"),
    ({"question": ""}, "question"),
    ({}, "question"),
    ({"question": "x" * 501}, "question"),
    ({"question": "ok", "context": "y" * 3001}, "context"),
    ({"question": "ok", "options": ["only one"]}, "options"),
    ({"question": "ok", "options": ["a", "  "]}, "options"),
    ({"question": "ok\u0000"}, "question"),
    ({"question": "ok", "request_id": "../../etc/passwd"}, "request_id"),
    ({"question": "ok", "temperature": 0.5}, "temperature"),
    ({"question": 5}, "question"),
])
def test_schema_errors_are_422_naming_the_field(client, body, field):
    r = client.post("/v1/answer", json=body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == field, error
    assert field in error["message"]


def test_lone_surrogate_is_rejected(client):
    r = client.post("/v1/answer", content=b'{"question": "bad \\ud800 text"}', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "question"


def test_non_utf8_body_is_400(client):
    r = client.post("/v1/answer", content='{"question": "caf\u00e9"}'.encode("latin-1"), headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert "UTF-8" in r.json()["error"]["message"]


def test_body_over_the_limit_is_413(client):
    r = client.post("/v1/answer", json={"question": "q", "context": "x" * 5000})
    assert r.status_code == 413
    chunked = client.post("/v1/answer", content=iter([b'{"question": "', b"x" * 5000, b'"}']), headers={"content-type": "application/json"})
    assert chunked.status_code == 413


def test_malformed_json_is_422(client):
    r = client.post("/v1/answer", content=b'{"question": ', headers={"content-type": "application/json"})
    assert r.status_code == 422


def test_healthz(client):
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "expert": "tiny-llama", "queue_depth": 0, "max_queue": 128}


def test_metrics_are_prometheus_text(client):
    client.post("/v1/answer", json={"question": "Fever?", "options": ["yes", "no"]})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    assert 'medmoe_requests_total{endpoint="/v1/answer",status="200"}' in text
    assert 'medmoe_request_latency_seconds_bucket{endpoint="/v1/answer",le="+Inf"}' in text
    assert 'medmoe_expert_share{expert="tiny-llama"} 1' in text
    assert "medmoe_queue_depth 0" in text and "# TYPE medmoe_batch_size histogram" in text
    for line in text.splitlines():  # every sample line is "name{labels} number"
        if line and not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])


def test_openapi_schema_describes_the_api(client):
    schema = client.get("/openapi.json").json()
    assert {"/v1/answer", "/v1/chat/completions", "/healthz", "/metrics"} <= set(schema["paths"])
    request = schema["components"]["schemas"]["AnswerRequest"]
    assert request["properties"]["question"]["maxLength"] == 500
    assert "413" in schema["paths"]["/v1/answer"]["post"]["responses"]


def test_page_and_assets_are_served_from_memory_only(client):
    page = client.get("/")
    assert page.status_code == 200 and "not medical advice" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN
    assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
    for path in ["/static/../pyproject.toml", "/static/index.html?name=x", "/static/%2e%2e/app.py", "/static/x.js"]:
        assert client.get(path).status_code == 404, path  # no route takes a path: nothing to traverse


def test_unknown_config_key_is_a_clear_error(tmp_path):
    from medmoe.errors import MedmoeError

    path = tmp_path / "serve.yaml"
    path.write_text("model: tiny\nmax_batchsize: 4\n")
    with pytest.raises(MedmoeError, match="unknown setting.*max_batchsize"):
        ServeConfig.from_yaml(path)
    path.write_text("model: tiny\nmax_batch_size: 4\nport: 9000\n")
    config = ServeConfig.from_yaml(path, port=9100)
    assert (config.max_batch_size, config.port) == (4, 9100)


def test_error_shape_is_json(client):
    r = client.post("/v1/answer", json={"question": " "})
    assert set(json.loads(r.text)["error"]) >= {"message", "type", "param", "code"}


@pytest.mark.real_model
def test_smollm2_batched_scores_match_score_options():
    """On the real SmolLM2 (chat template, 49k vocabulary), one padded batch with the LM head at the
    last positions only gives each question the probabilities score_options gives it alone."""
    from medmoe.answer.causal_lm import CausalLMAnswerer
    from medmoe.data import load_dataset
    from medmoe.models import load_causal_lm

    model, tokenizer = load_causal_lm("smollm2-135m")
    answerer = CausalLMAnswerer(model, tokenizer, name="smollm2-135m")
    records = load_dataset("dental", "test")[:6]
    for record, answer in zip(records, answerer.answer_batch(records)):
        prompt = build_prompt(record, tokenizer)
        reference = score_options(model, tokenizer, prompt.context, prompt.continuations).probabilities()
        assert list(answer.label_scores.values()) == pytest.approx(reference, abs=1e-4)


@pytest.mark.real_model
def test_the_default_server_answers_option_questions_through_its_bundled_heads():
    """The default factory on SmolLM2 answers a PubMedQA and a Dental question through the bundled heads
    (the quality report's head logits, up to float rounding: the batch shares its passes); a Chinese question,
    which no bundled head reads, by the model's own option likelihoods."""
    from medmoe.data import load_dataset
    from medmoe.heads.answerer import head_logits
    from medmoe.heads.bundled import HeadSet
    from medmoe.serve.config import ServeConfig, build_answerer

    answerer = build_answerer(ServeConfig(model="smollm2-135m"))
    records = [load_dataset("pubmedqa", "test")[0], load_dataset("dental", "test")[0], load_dataset("cmexam", "test")[0]]
    answers = answerer.answer_batch(records)
    assert [a.expert for a in answers] == ["smollm2-135m+head(head)", "smollm2-135m+head(head)", "smollm2-135m"]
    heads = HeadSet.bundled("smollm2-135m")
    for record, answer in zip(records[:2], answers):
        head, config = heads.for_record(record)
        logits, _, _ = head_logits(answerer.model, answerer.tokenizer, head, config, build_prompt(record, answerer.tokenizer),
                                   len(record.options))
        # the batch shares the chat template's prefix (one KV cache): float32 sums in another order, and
        # where a pooled value sits on a float16 rounding boundary it rounds one step over (~1e-3 in a logit)
        probs = torch.softmax(logits, 0).tolist()
        assert list(answer.label_scores.values()) == pytest.approx(probs, abs=1e-3)
        assert answer.answer == record.letters[max(range(len(probs)), key=probs.__getitem__)]

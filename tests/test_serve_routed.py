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
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["medmoe"]["expert"] == expert
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


# -- the threshold per request (RouteLLM style), `--router`, the main job's router by default ----------

def post_answer(client, **body):
    return client.post("/v1/answer", json={"question": QUESTION, **body})


def test_the_answerer_routes_each_record_at_its_own_threshold(router):
    """One batch, three thresholds: the gate decides per query (p_M > that record's tau)."""
    from medmoe.mambaformer.answerer import TAU_METADATA

    records = [Record(id=str(i), question=QUESTION, answer="", metadata=({TAU_METADATA: tau} if tau is not None else {}))
               for i, tau in enumerate([0.0, 1.0, None])]
    p_mamba = router.route(records[2:])[0][1]
    assert 0.0 < p_mamba < 1.0
    answers = router.answer_batch(records)
    assert [a.expert for a in answers] == ["mamba", "transformer", "mamba" if p_mamba > router.tau else "transformer"]
    assert [e for e, _ in router.route(records)] == [a.expert for a in answers]
    assert router.batch_key(records[0]) == "mamba:open" and router.batch_key(records[1]) == "transformer:open"


def test_a_request_threshold_of_0_sends_to_the_mamba_expert_and_of_1_to_the_transformer(router):
    with TestClient(create_app(router, CONFIG)) as client:
        default = post_answer(client)
        to_mamba = post_answer(client, routing={"tau": 0})
        to_transformer = post_answer(client, routing={"tau": 1.0})
        chat_m = client.post("/v1/chat/completions", json={**CHAT, "model": "mambaformer-tau-0"})
        chat_t = client.post("/v1/chat/completions", json={**CHAT, "model": "mambaformer-tau-1"})
        chat_default = client.post("/v1/chat/completions", json={**CHAT, "model": "mambaformer"})
        chat_any = client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-4o-mini"})  # a client's fixed name
        streamed = client.post("/v1/chat/completions", json={**CHAT, "model": "mambaformer-tau-0.0", "stream": True})
    for r in (default, to_mamba, to_transformer, chat_m, chat_t, chat_default, chat_any, streamed):
        assert r.status_code == 200, r.text
    calibrated = {"tau": 0.5, "source": "calibrated", "latency_budget_ms": None, "dev": None}
    assert default.json()["routing"] == calibrated
    assert (to_mamba.json()["expert"], to_mamba.json()["routing"]) == ("mamba", {**calibrated, "tau": 0.0, "source": "request"})
    assert (to_transformer.json()["expert"], to_transformer.json()["routing"]["tau"]) == ("transformer", 1.0)
    assert to_mamba.json()["gate_probability"] == to_transformer.json()["gate_probability"]  # same p_M, other tau
    assert chat_m.json()["medmoe"]["expert"] == "mamba" and chat_t.json()["medmoe"]["expert"] == "transformer"
    assert chat_m.json()["medmoe"]["routing"] == {**calibrated, "tau": 0.0, "source": "model"} and chat_m.json()["model"] == "mambaformer-tau-0"
    assert chat_default.json()["medmoe"]["routing"]["source"] == chat_any.json()["medmoe"]["routing"]["source"] == "calibrated"
    last = json.loads(sse_data(streamed.text)[-2])
    assert last["medmoe"]["expert"] == "mamba" and last["medmoe"]["routing"]["tau"] == 0.0


def test_requests_with_other_thresholds_in_one_window_each_get_their_expert(router):
    bodies = [{"question": QUESTION, "request_id": f"r{i}", "routing": {"tau": float(i % 2)}} for i in range(6)]

    async def burst(base: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            for warm in bodies[:2]:  # one timed batch per expert first: admission then admits the burst
                assert (await client.post("/v1/answer", json=warm)).status_code == 200
            return await asyncio.gather(*(client.post("/v1/answer", json=b) for b in bodies))

    app = create_app(router, ServeConfig(max_new_tokens=4, max_wait_ms=200))
    with running_server(app) as base:
        responses = asyncio.run(burst(base))
    assert [r.status_code for r in responses] == [200] * 6, [r.text for r in responses]
    assert [r.json()["expert"] for r in responses] == ["mamba", "transformer"] * 3
    assert app.state.batcher.stats.batches <= 2 + 4  # the burst: about one batch per expert


@pytest.mark.parametrize("model", ["mambaformer-tau-1.5", "mambaformer-tau-abc", "mambaformer-tau--0.1", "mambaformer-tau-nan",
                                   "mambaformer-tau-", "mambaformer-fast"])
def test_a_bad_threshold_in_the_model_name_is_a_400_naming_the_form(router, model):
    with TestClient(create_app(router, CONFIG)) as client:
        r = client.post("/v1/chat/completions", json={**CHAT, "model": model})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_routing" and error["param"] == "model"
    assert "mambaformer-tau-<tau>" in error["message"] and "[0, 1]" in error["message"]


@pytest.mark.parametrize("routing, param", [
    ({"tau": 2}, "routing.tau"), ({"tau": -0.5}, "routing.tau"), ({"tau": "0.3"}, "routing.tau"), ({"tau": True}, "routing.tau"),
    ({}, "routing"), ({"tau": 0.3, "latency_budget_ms": 300}, "routing"), ({"threshold": 0.3}, "routing"),
    ({"latency_budget_ms": 0}, "routing.latency_budget_ms"),
    ({"latency_budget_ms": 300}, "routing.latency_budget_ms"),  # this router has no run beside it: no budgets
])
def test_a_bad_routing_field_is_a_400_naming_the_field(router, routing, param):
    with TestClient(create_app(router, CONFIG)) as client:
        r = post_answer(client, routing=routing)
        chat = client.post("/v1/chat/completions", json={**CHAT, "routing": routing})
    for response in (r, chat):
        assert response.status_code == 400, response.text
        assert (response.json()["error"]["type"], response.json()["error"]["param"]) == ("invalid_routing", param)
    if routing == {"latency_budget_ms": 300}:
        assert "not available" in r.json()["error"]["message"] and "routing.tau" in r.json()["error"]["message"]


def test_the_threshold_is_given_once(router):
    with TestClient(create_app(router, CONFIG)) as client:
        r = client.post("/v1/chat/completions", json={**CHAT, "model": "mambaformer-tau-0.2", "routing": {"tau": 0.3}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "routing"


def test_a_single_model_refuses_a_threshold_and_reports_no_routing():
    from serve_helpers import FakeAnswerer

    with TestClient(create_app(FakeAnswerer(), CONFIG)) as client:
        plain = post_answer(client)
        asked = post_answer(client, routing={"tau": 0.3})
        named = client.post("/v1/chat/completions", json={**CHAT, "model": "mambaformer-tau-0.3"})
        own = client.post("/v1/chat/completions", json={**CHAT, "model": "fake"})
        models = client.get("/v1/models").json()
    assert plain.status_code == 200 and plain.json()["routing"] is None and own.json()["medmoe"]["routing"] is None
    assert asked.status_code == 400 and asked.json()["error"]["param"] == "routing" and "single model" in asked.json()["error"]["message"]
    assert named.status_code == 400 and named.json()["error"]["param"] == "model"
    assert [m["id"] for m in models["data"]] == ["fake"]


def test_models_lists_the_routed_names_with_the_calibrated_threshold(router):
    with TestClient(create_app(router, CONFIG)) as client:
        data = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["mambaformer", "tiny-mambaformer"]
    assert data[0]["medmoe"]["tau"] == 0.5 and data[0]["medmoe"]["latency_budgets"] is False
    assert "mambaformer-tau-<tau>" in data[0]["medmoe"]["threshold_model"]


# -- a router on disk: `medmoe serve --router DIR`, latency budgets from the run's dev results --------

DEV = 8  # dev questions of the fake run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A `medmoe run` folder: run/pubmedqa/router (a tiny router, naming its two experts saved as
    folders) and run/pubmedqa/dev/{transformer,mamba}.jsonl (E_T right and slow, E_M wrong and fast)."""
    from medmoe.data import load_dataset

    router = tiny_router()
    root = tmp_path_factory.mktemp("served")
    sources = {}
    for role, expert in router.experts.items():
        folder = root / f"expert-{role}"
        expert.model.save_pretrained(folder)
        expert.tokenizer.save_pretrained(folder)
        sources[role] = str(folder)
    checkpoint = router.checkpoint
    checkpoint.experts, checkpoint.gate_ms = sources, 0.5
    checkpoint.info = {"config": {"dataset": "pubmedqa", "transformer": sources["transformer"], "mamba": sources["mamba"],
                                  "dev_limit": DEV, "out": "somewhere/else"},  # the run was moved: found beside the router
                       "calibration": {"statistic": "p50"}}
    out = root / "run" / "pubmedqa"
    checkpoint.save(out / "router")
    (out / "dev").mkdir()
    records = load_dataset("pubmedqa", "dev")[:DEV]
    for role, ms, right in (("transformer", 100.0, True), ("mamba", 20.0, False)):
        rows = []
        for i, r in enumerate(records):
            pred = r.answer if right or i % 4 == 0 else next(letter for letter in r.letters if letter != r.answer)
            probs = {letter: (0.8 if letter == pred else 0.1) for letter in r.letters}
            rows.append({"id": r.id, "probs": probs, "correct": pred == r.answer, "prediction": pred,
                         "latency_ms": ms + i, "prompt_tokens": 50 + i})
        (out / "dev" / f"{role}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out


def test_serve_router_dir_serves_the_routed_system_with_latency_budgets(run_dir):
    from medmoe.data import load_dataset
    from medmoe.mambaformer.calibrate import calibrate_tau
    from medmoe.mambaformer.experiments.pipeline import table_from_rows
    from medmoe.mambaformer.train import gate_scores
    from medmoe.serve.app import app_from_config

    app = app_from_config(ServeConfig(router=str(run_dir / "router"), max_new_tokens=4, max_wait_ms=1))
    answerer, policy = app.state.batcher.answerer, app.state.routing
    assert type(answerer).__name__ == "RoutedAnswerer" and answerer.max_new_tokens == 4
    assert policy.budgets is not None and f"{DEV} dev questions of pubmedqa" in policy.describe()
    budget = 60.0
    with TestClient(app) as client:
        within = post_answer(client, routing={"latency_budget_ms": budget})
        impossible = post_answer(client, routing={"latency_budget_ms": 1})
        listed = client.get("/v1/models").json()["data"][0]["medmoe"]
    assert within.status_code == 200, within.text
    routing = within.json()["routing"]
    # the calibration's own budget rule, on the same dev results
    dev = load_dataset("pubmedqa", "dev")[:DEV]
    rows = {role: [json.loads(line) for line in (run_dir / "dev" / f"{role}.jsonl").read_text().splitlines()]
            for role in ("transformer", "mamba")}
    table = table_from_rows(dev, rows["transformer"], rows["mamba"])
    scores = gate_scores(answerer.checkpoint.gate, answerer.checkpoint.features(answerer.tokenizer, dev))
    expected = calibrate_tau(scores, table, budget, "p50", gate_ms=0.5)
    assert routing["source"] == "latency_budget" and routing["tau"] == pytest.approx(expected.tau)
    assert routing["latency_budget_ms"] == budget and routing["dev"]["p50_ms"] <= budget
    assert within.json()["expert"] == ("mamba" if within.json()["gate_probability"] > routing["tau"] else "transformer")
    assert impossible.status_code == 400 and impossible.json()["error"]["param"] == "routing.latency_budget_ms"
    assert "fastest routing" in impossible.json()["error"]["message"]
    assert listed["latency_budgets"] is True


def test_router_excludes_the_single_model_settings(run_dir):
    from medmoe.errors import MedmoeError

    for other in ({"model": "gemma3-270m"}, {"adapter": "x"}, {"heads": "none"}, {"answerer": "m:f"}):
        with pytest.raises(MedmoeError, match=f"router and {next(iter(other))} cannot be used together"):
            ServeConfig.from_dict({"router": str(run_dir / "router"), **other})
        with pytest.raises(MedmoeError, match="cannot be used together"):
            ServeConfig(router=str(run_dir / "router"), **other)
    with pytest.raises(MedmoeError, match="router and model"):  # given explicitly, even as the default value
        ServeConfig.from_dict({"router": "r"}, model="smollm2-135m")


def test_the_cli_refuses_router_with_model_and_serves_the_main_jobs_router_by_default(run_dir, tmp_path, monkeypatch):
    import shutil

    import typer
    from typer.testing import CliRunner

    from medmoe.cli import app
    from medmoe.cli.mambaformer import DEFAULT_OUT
    from medmoe.cli.serve import serve_settings
    from medmoe.serve.config import MAIN_JOB_ROUTER

    assert MAIN_JOB_ROUTER == DEFAULT_OUT / "pubmedqa" / "router"  # where `medmoe run` writes it, what `medmoe ask` reads
    result = CliRunner().invoke(app, ["serve", "--router", str(run_dir / "router"), "--model", "gemma3-270m"])
    assert result.exit_code == 2 and "--router and --model cannot be used together" in " ".join(result.output.split())
    with pytest.raises(typer.BadParameter, match="--router and --heads"):
        serve_settings(None, None, None, "none", None, str(run_dir / "router"))

    monkeypatch.chdir(tmp_path)  # no router here: the single model, as before
    settings, why = serve_settings(None, None, None, None, None, None)
    assert settings.router is None and settings.model == "smollm2-135m" and "no router at runs/mambaformer/pubmedqa/router" in why
    shutil.copytree(run_dir / "router", tmp_path / MAIN_JOB_ROUTER)
    settings, why = serve_settings(None, None, None, None, None, None, port=9001)
    assert settings.router == str(MAIN_JOB_ROUTER) and settings.port == 9001
    assert why == (f"serving the routed MambaFormer system from {MAIN_JOB_ROUTER} (the main job's router); "
                   "--model smollm2-135m for the single model")
    settings, why = serve_settings(None, "gemma3-270m", None, None, None, None)  # asked for a model: that one
    assert settings.router is None and settings.model == "gemma3-270m"
    yaml_file = tmp_path / "serve.yaml"
    yaml_file.write_text("port: 9002\n")
    assert serve_settings(yaml_file, None, None, None, None, None)[0].router is None  # a config says what it serves
    (tmp_path / MAIN_JOB_ROUTER / "gate.safetensors").unlink()  # not a whole checkpoint: not served
    assert serve_settings(None, None, None, None, None, None)[0].router is None


def test_served_experts_take_the_dtype_the_router_was_calibrated_with():
    """tau was chosen on each expert's latencies in the run's dtype, so the server loads that dtype; a
    GPU-calibrated router still serves where there is no GPU (auto), and an old router.json means float32."""
    from medmoe.mambaformer.answerer import served_placement

    info = {"placement": {"transformer": {"source": "smollm2-135m", "dtype": "bfloat16", "device": "cpu"},
                          "mamba": {"source": "em", "dtype": "float32", "device": "cuda"}}}
    assert served_placement(info, "transformer") == {"dtype": "bfloat16", "device": "cpu"}
    assert served_placement(info, "mamba") == {"dtype": "float32", "device": "auto"}
    assert served_placement({}, "transformer") == {"dtype": "float32", "device": "cpu"}

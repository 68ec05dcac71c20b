"""The llama.cpp engine (medmoe.answer.llamacpp, `medmoe serve --engine llama.cpp`): on the bundled
SmolLM2 GGUF it answers PubMedQA as the torch engine does on the same file dequantized to float32, generates
with the server's rules (token limit, stop sequences, seeds, streaming, counts), and the server refuses the
settings it cannot honour. The tests that run llama.cpp need llama-cpp-python (skipped without it)."""

from __future__ import annotations

import sys

import pytest
import typer

from medmoe.answer.types import InputTooLong
from medmoe.data.record import Record
from medmoe.errors import MedmoeError, ModelError
from medmoe.serve.config import ServeConfig

MODEL = "smollm2-135m"
OPEN = Record(id="open-1", question="What causes scurvy?", answer="")


def open_record(**metadata) -> Record:
    return Record(id="open", question=OPEN.question, answer="", metadata=metadata)


@pytest.fixture(scope="module")
def llama():
    pytest.importorskip("llama_cpp")
    from medmoe.answer.llamacpp import LlamaCppAnswerer

    return LlamaCppAnswerer.load(MODEL, max_new_tokens=16, threads=1)


@pytest.fixture(scope="module")
def torch_engine():
    import torch

    from medmoe.answer.causal_lm import CausalLMAnswerer
    from medmoe.models import load_causal_lm

    torch.set_num_threads(1)
    model, tokenizer = load_causal_lm(MODEL, dtype=torch.float32)
    return CausalLMAnswerer(model, tokenizer, name=MODEL, max_new_tokens=16)


class ListSink:
    """Collects a streamed answer's pieces (what a TextSink hands the event loop)."""

    cancelled = False

    def __init__(self):
        self.pieces: list[str] = []

    def push(self, text: str) -> None:
        self.pieces.append(text)


# -- against the torch engine ---------------------------------------------------------------------
@pytest.mark.real_model
def test_pubmedqa_answers_match_the_torch_engine_on_the_same_weights(llama, torch_engine):
    """Same prompt ids (llama.cpp's tokenizer against the HF one), and on 5 PubMedQA test questions the same
    answers for at least 4 and option probabilities within 0.05: both run the Q4_1 weights, torch dequantized
    to float32, llama.cpp with Q8 activations in its dot products."""
    from medmoe.data import load_dataset
    from medmoe.eval.prompts import build_prompt

    records = load_dataset("pubmedqa", "test")[:5]
    for record in records:
        text = build_prompt(record, torch_engine.tokenizer).context
        assert llama.encode(text) == torch_engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    ours, theirs = llama.answer_batch(records), torch_engine.answer_batch(records)
    assert sum(a.answer == b.answer for a, b in zip(ours, theirs)) >= 4
    for a, b in zip(ours, theirs):
        assert list(a.label_scores) == ["A", "B", "C"] and sum(a.label_scores.values()) == pytest.approx(1.0)
        assert list(a.label_scores.values()) == pytest.approx(list(b.label_scores.values()), abs=0.05)
        assert a.answer == max(a.label_scores, key=a.label_scores.__getitem__) and a.expert == MODEL


# -- generation -------------------------------------------------------------------------------------
@pytest.mark.real_model
def test_greedy_generation_ends_at_its_limit_or_a_stop_sequence(llama, torch_engine):
    from medmoe.answer.causal_lm import open_prompt

    tok = torch_engine.tokenizer
    full = llama.answer_batch([open_record(max_new_tokens=8)])[0]
    assert (full.finish_reason, full.completion_tokens) == ("length", 8)
    assert full.prompt_tokens == len(tok(open_prompt(OPEN, tok), add_special_tokens=False)["input_ids"])
    assert full.answer == llama.answer_batch([open_record(max_new_tokens=8)])[0].answer  # greedy repeats itself
    word = full.answer.split()[2]
    stopped = llama.answer_batch([open_record(max_new_tokens=8, stop=[word])])[0]
    assert stopped.finish_reason == "stop" and stopped.answer == full.answer[: full.answer.index(word)].strip()
    assert stopped.completion_tokens < 8


@pytest.mark.real_model
def test_a_seed_repeats_a_sampled_answer(llama):
    sampled = {"max_new_tokens": 16, "temperature": 1.0, "top_p": 0.95}
    first, again, other = llama.answer_batch([open_record(seed=7, **sampled), open_record(seed=7, **sampled),
                                              open_record(seed=8, **sampled)])
    assert first.answer == again.answer and first.answer != other.answer


@pytest.mark.real_model
def test_streamed_pieces_add_up_to_the_answer(llama):
    sink = ListSink()
    answer = llama.answer_batch([open_record(max_new_tokens=12)], sinks=[sink])[0]
    assert len(sink.pieces) > 1 and "".join(sink.pieces) == answer.answer


@pytest.mark.real_model
def test_long_contexts_are_cut_and_long_questions_refused(llama):
    record = Record(id="long", question="Does fever cause cough?", answer="A", options=("yes", "no", "maybe"),
                    context="The patient presented with fever, cough and shortness of breath. " * 200)
    fitted, dropped = llama.fit(record)
    assert dropped > 0 and llama.prompt_tokens(fitted) <= llama.max_input_tokens
    with pytest.raises(InputTooLong, match="question"):
        llama.fit(Record(id="huge", question="fever cough " * 2000, answer=""))


@pytest.mark.real_model
def test_the_server_answers_through_llama_cpp():
    pytest.importorskip("llama_cpp")
    import httpx

    from medmoe.serve.app import app_from_config
    from serve_helpers import running_server

    app = app_from_config(ServeConfig(model=MODEL, engine="llama.cpp", threads=1, max_new_tokens=8))
    with running_server(app) as base:
        r = httpx.post(f"{base}/v1/answer", timeout=60, json={
            "question": "Does aspirin reduce fever?", "options": ["yes", "no", "maybe"]})
        assert r.status_code == 200, r.text
        assert r.json()["answer"] in "ABC" and r.json()["expert"] == MODEL
        chat = httpx.post(f"{base}/v1/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": OPEN.question}], "max_tokens": 8}).json()
        assert chat["choices"][0]["finish_reason"] == "length" and chat["usage"]["completion_tokens"] == 8


# -- settings the engine cannot honour ----------------------------------------------------------------
@pytest.mark.parametrize("settings, message", [
    ({"adapter": "runs/adapter"}, "engine llama.cpp cannot be used with adapter runs/adapter"),
    ({"heads": ["runs/head"]}, "heads: head folders"),
    ({"dtype": "bfloat16"}, "dtype bfloat16 .*quantized"),
    ({"device": "cuda"}, "device cuda .*CPU"),
    ({"answerer": "my.module:factory"}, "answerer my.module:factory"),
])
def test_llamacpp_refuses_what_it_cannot_run(settings, message):
    with pytest.raises(MedmoeError, match=message):
        ServeConfig(engine="llama.cpp", **settings)
    ServeConfig(engine="llama.cpp", heads="none")  # the model's own likelihoods: fine, as heads: bundled (ignored)


def test_the_router_loads_torch_experts_and_vllm_is_not_there_yet():
    with pytest.raises(MedmoeError, match="router and engine cannot be used together.*loads its experts with torch"):
        ServeConfig.from_dict({"router": "runs/router", "engine": "llama.cpp"})
    with pytest.raises(MedmoeError, match="vllm is for GPU servers and is not implemented yet"):
        ServeConfig(engine="vllm")
    with pytest.raises(MedmoeError, match="engine must be one of torch, llama.cpp, vllm"):
        ServeConfig(engine="onnx")


def test_a_model_without_a_gguf_is_named(tmp_path):
    from medmoe.serve.answerers import load_llamacpp_answerer

    with pytest.raises(ModelError, match="'minilm-l6' is a Hugging Face folder.*GGUF files only"):
        load_llamacpp_answerer(ServeConfig(model="minilm-l6", engine="llama.cpp"))
    with pytest.raises(ModelError, match=f"model '{tmp_path}' is not a GGUF file.*smollm2-135m"):
        load_llamacpp_answerer(ServeConfig(model=str(tmp_path), engine="llama.cpp"))


def test_without_llama_cpp_the_install_command_is_named(monkeypatch):
    from medmoe.answer.llamacpp import find_gguf, open_llama

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # what an environment without the package imports
    with pytest.raises(ModelError, match="pip install llama-cpp-python"):
        open_llama(find_gguf(MODEL), n_ctx=256)


def test_the_engine_flag_reaches_the_settings(tmp_path):
    from medmoe.cli.serve import serve_settings

    settings, why = serve_settings(None, None, None, None, None, None, engine="llama.cpp")
    assert settings.engine == "llama.cpp" and settings.router is None and "llama.cpp" in why
    with pytest.raises(typer.BadParameter, match="--router and --engine cannot be used together"):
        serve_settings(None, None, None, None, None, str(tmp_path / "router"), engine="llama.cpp")
    with pytest.raises(MedmoeError, match="adapter"):
        serve_settings(None, None, str(tmp_path), None, None, None, engine="llama.cpp")

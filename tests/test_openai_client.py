"""The OpenAI API through the official `openai` Python client against a real uvicorn server: usage,
finish_reason, system messages, sampling and seeds, stop sequences, errors, streaming with usage,
legacy text completions (also through the routed system's gate) and the model list."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("openai")
import openai

from medmoe.answer.causal_lm import open_prompt
from medmoe.data.record import Record
from medmoe.eval.scoring import bos_ids
from medmoe.serve.app import create_app
from medmoe.serve.config import ServeConfig
from serve_helpers import running_server, tiny_answerer, tiny_router

torch.set_num_threads(1)
LIMIT = 8  # the server's max_new_tokens: the random model never says EOS, so every answer runs to its limit
QUESTION = "What causes scurvy?"
USER = [{"role": "user", "content": QUESTION}]
SYSTEM = "You are a terse clinician."


@pytest.fixture(scope="module")
def server():
    answerer = tiny_answerer(max_new_tokens=LIMIT)
    with running_server(create_app(answerer, ServeConfig(max_new_tokens=LIMIT, max_wait_ms=1))) as base:
        yield base, answerer


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="x", max_retries=0, timeout=60)


def prompt_tokens(answerer, record: Record) -> int:
    """Tokens of the prompt the answerer feeds for `record`, counted here independently."""
    tok = answerer.tokenizer
    ids = tok(open_prompt(record, tok), add_special_tokens=False)["input_ids"]
    return len(bos_ids(tok, ids)) + len(ids)


def test_chat_completion_has_usage_and_finish_reason_length(client, server):
    _, answerer = server
    completion = client.chat.completions.create(model="tiny-llama", messages=USER)
    choice = completion.choices[0]
    assert completion.object == "chat.completion" and choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"  # stopped at the server's max_new_tokens
    usage = completion.usage
    assert usage.prompt_tokens == prompt_tokens(answerer, Record(id="x", question=QUESTION, answer=""))
    assert usage.completion_tokens == LIMIT and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert completion.model_extra["medmoe"]["expert"] == "tiny-llama"

    short = client.chat.completions.create(model="tiny-llama", messages=USER, max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    assert choice.message.content.startswith(short.choices[0].message.content)  # greedy: a prefix of the longer answer
    also = client.chat.completions.create(model="tiny-llama", messages=USER, max_completion_tokens=2)
    assert also.choices[0].message.content == short.choices[0].message.content


def test_system_message_is_part_of_the_prompt(client, server):
    _, answerer = server
    completion = client.chat.completions.create(model="tiny-llama", messages=[{"role": "system", "content": SYSTEM}, *USER])
    record = Record(id="x", question=QUESTION, answer="", metadata={"system": SYSTEM})
    assert SYSTEM in open_prompt(record, answerer.tokenizer)
    assert completion.usage.prompt_tokens == prompt_tokens(answerer, record)
    assert completion.usage.prompt_tokens > prompt_tokens(answerer, Record(id="x", question=QUESTION, answer=""))


def test_seed_makes_sampling_reproducible(client):
    def ask(**kwargs):
        return client.chat.completions.create(model="tiny-llama", messages=USER, **kwargs).choices[0].message.content

    greedy = ask()
    assert ask(temperature=0) == greedy
    first, again = ask(temperature=1.0, seed=1234), ask(temperature=1.0, seed=1234)
    assert first == again
    others = {ask(temperature=1.0, seed=seed) for seed in (1, 2, 3)}
    assert len(others | {first, greedy}) > 2  # other seeds, other texts (320 tokens, 8 draws: a clash is all but impossible)
    assert ask(temperature=1.0, top_p=0.5, seed=1234)  # the nucleus is honoured (a smaller set to draw from)


def test_stop_sequence_cuts_the_answer(client):
    full = client.chat.completions.create(model="tiny-llama", messages=USER).choices[0].message.content
    stop = full[3:5]
    assert stop and full.index(stop) == 3  # the answer's first occurrence
    cut = client.chat.completions.create(model="tiny-llama", messages=USER, stop=[stop, "never generated"])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].message.content == full[:3].strip()
    assert cut.usage.completion_tokens < LIMIT


@pytest.mark.parametrize("kwargs, param", [
    ({"n": 2}, "n"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": ""}, "stop"),
    ({"logprobs": True}, "logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
])
def test_unsupported_or_out_of_range_parameters_are_400_naming_the_field(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny-llama", messages=USER, **kwargs)
    assert caught.value.status_code == 400 and caught.value.param == param


def test_streamed_chat_with_usage(client):
    plain = client.chat.completions.create(model="tiny-llama", messages=USER)
    chunks = list(client.chat.completions.create(model="tiny-llama", messages=USER, stream=True,
                                                 stream_options={"include_usage": True}))
    *with_choices, last = chunks
    assert last.choices == [] and last.usage is not None and last.usage.model_dump() == plain.usage.model_dump()
    assert all(c.usage is None for c in with_choices)
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == plain.choices[0].message.content and len(with_choices) > 3  # the role chunk, pieces, the finish chunk
    assert [c.choices[0].finish_reason for c in with_choices][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    without = list(client.chat.completions.create(model="tiny-llama", messages=USER, stream=True))
    assert without[-1].choices[0].finish_reason == "length" and all(c.usage is None for c in without)


def test_streamed_chat_with_a_stop_sequence_never_shows_it(client):
    full = client.chat.completions.create(model="tiny-llama", messages=USER).choices[0].message.content
    stop = full[4:7]
    chunks = list(client.chat.completions.create(model="tiny-llama", messages=USER, stream=True, stop=stop))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full[:4].strip() and chunks[-1].choices[0].finish_reason == "stop"


def test_text_completion(client, server):
    _, answerer = server
    prompt = "Vitamin C deficiency causes"
    completion = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=3)
    choice = completion.choices[0]
    assert completion.object == "text_completion" and choice.text and choice.finish_reason == "length"
    record = Record(id="x", question=prompt, answer="", metadata={"raw_prompt": True})
    assert open_prompt(record, answerer.tokenizer) == prompt  # continued as it is: no chat template
    assert completion.usage.prompt_tokens == prompt_tokens(answerer, record) and completion.usage.completion_tokens == 3
    listed = client.completions.create(model="tiny-llama", prompt=[prompt], max_tokens=3)
    assert listed.choices[0].text == choice.text
    seeded = [client.completions.create(model="tiny-llama", prompt=prompt, temperature=1.0, seed=5).choices[0].text for _ in range(2)]
    assert seeded[0] == seeded[1]

    chunks = list(client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=3, stream=True,
                                            stream_options={"include_usage": True}))
    *pieces, last = chunks
    assert "".join(c.choices[0].text for c in pieces) == choice.text and pieces[-1].choices[0].finish_reason == "length"
    assert last.choices == [] and last.usage.model_dump() == completion.usage.model_dump()


@pytest.mark.parametrize("kwargs, param", [
    ({"echo": True}, "echo"), ({"n": 3}, "n"), ({"best_of": 2}, "best_of"), ({"suffix": "x"}, "suffix"),
    ({"logprobs": 2}, "logprobs"), ({"prompt": ["one", "two"]}, "prompt"),
])
def test_text_completion_refuses_what_it_does_not_do(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(**{"model": "tiny-llama", "prompt": "Vitamin C", **kwargs})
    assert caught.value.param == param


def test_models_list(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-llama"]
    assert models[0].object == "model" and models[0].owned_by == "medmoe" and isinstance(models[0].created, int)


def test_routed_system_answers_completions_through_its_gate():
    router = tiny_router()
    app = create_app(router, ServeConfig(max_new_tokens=12, max_wait_ms=1))
    with running_server(app) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=60)
        prompt = "Vitamin C deficiency causes"
        completion = client.completions.create(model="mambaformer", prompt=prompt, max_tokens=4)
        record = Record(id="x", question=prompt, answer="", metadata={"raw_prompt": True, "max_new_tokens": 4})
        expert, _ = router.route([record])[0]
        assert completion.model_extra["medmoe"]["expert"] == expert
        assert completion.choices[0].text == router.generator(expert).answer_batch([record])[0].answer
        assert completion.usage.completion_tokens == 4 and completion.choices[0].finish_reason == "length"
        chat = client.chat.completions.create(model="mambaformer-tau-0", messages=USER, max_tokens=3)
        assert chat.model_extra["medmoe"]["expert"] == "mamba" and chat.usage.completion_tokens == 3


@pytest.mark.real_model
def test_smollm2_chat_through_the_official_client():
    """The bundled SmolLM2-135M-Instruct: a short chat completion with a system message."""
    from medmoe.serve.app import app_from_config

    with running_server(app_from_config(ServeConfig(threads=1, max_new_tokens=16, heads="none"))) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=120)
        completion = client.chat.completions.create(
            model="smollm2-135m", max_tokens=16,
            messages=[{"role": "system", "content": "Answer in one short sentence."},
                      {"role": "user", "content": "Which vitamin deficiency causes scurvy?"}])
        choice = completion.choices[0]
        assert choice.message.content.strip() and choice.finish_reason in ("stop", "length")
        assert completion.usage.prompt_tokens > 10 and 1 <= completion.usage.completion_tokens <= 16
        assert (choice.finish_reason == "length") == (completion.usage.completion_tokens == 16)
        assert "smollm2" in [m.id for m in client.models.list().data][0]

"""Tiny random models and servers for the serving tests (no download, built in well under a second)."""

from __future__ import annotations

import functools
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "Answer the question with yes, no or maybe.", "Answer with the letter of the correct option.",
    "Context: Question: Answer: A. B. C. D. E. yes no maybe",
    "Which vitamin deficiency causes scurvy? Vitamin C deficiency causes scurvy.",
    "The patient presented with fever, cough and shortness of breath.",
    "Does aspirin reduce the risk of myocardial infarction in adults?",
] * 20


@functools.cache
def tiny_tokenizer(chat: bool = True) -> Any:
    """A byte-level BPE tokenizer (vocab ~300) trained in-process, SmolLM2-style special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    core.train_from_iterator(CORPUS, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|im_end|>")
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_model(tokenizer: Any, seed: int = 0, max_positions: int = 512) -> Any:
    """A 2-layer LlamaForCausalLM with random weights, sized for `tokenizer`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


def tiny_answerer(chat: bool = True, **kwargs: Any) -> Any:
    from medmoe.answer.causal_lm import CausalLMAnswerer

    tok = tiny_tokenizer(chat)
    return CausalLMAnswerer(tiny_model(tok), tok, name="tiny-llama", **kwargs)


class FakeAnswerer:
    """Answers instantly (or after `delay_s` per batch) and records every batch it was given."""

    name = "fake"

    def __init__(self, delay_s: float = 0.0, expert_of: Any = None):
        self.delay_s = delay_s
        self.batches: list[list[str]] = []
        self.expert_of = expert_of or (lambda r: "fake")
        self.lock = threading.Lock()

    def answer_batch(self, records: Sequence[Any]) -> list[Any]:
        from medmoe.answer import Answer

        with self.lock:
            self.batches.append([r.id for r in records])
        if self.delay_s:
            time.sleep(self.delay_s)
        return [Answer(answer=f"echo:{r.question}", expert=self.expert_of(r), gate_probability=0.25,
                       top_features=[("length", 0.5)], latency_ms={"gate": 0.1, "expert": 1.0}) for r in records]


class FakeStreamer(FakeAnswerer):
    """Streams `pieces` text pieces per open record, one every `step_s` seconds, and stops a record
    whose sink is cancelled; `steps` counts the pieces it computed."""

    def __init__(self, pieces: int = 5, step_s: float = 0.05):
        super().__init__()
        self.pieces, self.step_s, self.steps = pieces, step_s, 0

    def answer_batch(self, records: Sequence[Any], sinks: Sequence[Any] | None = None) -> list[Any]:
        from medmoe.answer import Answer

        sinks = sinks or [None] * len(records)
        for k in range(self.pieces):
            if all(s is None or s.cancelled for s in sinks):
                break
            time.sleep(self.step_s)
            self.steps += 1
            for sink in sinks:
                if sink is not None and not sink.cancelled:
                    sink.push(f"w{k} " if k < self.pieces - 1 else f"w{k}")
        text = " ".join(f"w{k}" for k in range(self.pieces))
        return [Answer(answer=text, expert="fake") for _ in records]


class PoisonedAnswerer(FakeAnswerer):
    """A FakeAnswerer whose whole batch raises `error` when it holds a record with question `poison`
    (as a model fails on one bad row); `calls` counts the answer_batch calls."""

    def __init__(self, poison: str = "boom", error: Exception | None = None, delay_s: float = 0.0):
        super().__init__(delay_s)
        self.poison, self.error, self.calls = poison, error or RuntimeError("model exploded"), 0

    def answer_batch(self, records: Sequence[Any]) -> list[Any]:
        self.calls += 1
        if any(r.question == self.poison for r in records):
            raise self.error
        return super().answer_batch(records)


class FakeGenerator(FakeAnswerer):
    """Answers like greedy generation costs: `step_s` per token of the batch's largest budget (a
    record's metadata["max_new_tokens"], else `max_new_tokens`), whatever the batch size."""

    def __init__(self, step_s: float, max_new_tokens: int = 64):
        super().__init__()
        self.step_s, self.max_new_tokens = step_s, max_new_tokens

    def answer_batch(self, records: Sequence[Any]) -> list[Any]:
        budget = max(min(int(r.metadata.get("max_new_tokens", self.max_new_tokens)), self.max_new_tokens) for r in records)
        time.sleep(self.step_s * budget)
        return super().answer_batch(records)


def tiny_router(tau: float | None = None, mamba: Any = None) -> Any:
    """A RoutedAnswerer over two tiny random Llamas (seeds 0 and 1; `mamba` replaces the second, e.g.
    a hybrid) with a random gate. tau: the gate's threshold (-1: every query to E_M, 2: none) [0.5]."""
    import torch

    from medmoe.mambaformer.answerer import RoutedAnswerer
    from medmoe.mambaformer.checkpoint import RouterCheckpoint
    from medmoe.mambaformer.experts import Expert
    from medmoe.mambaformer.features import FeatureConfig, featurizer_for_tokenizer
    from medmoe.mambaformer.gate import GateConfig, TokenGate

    tok = tiny_tokenizer(True)
    transformer = tiny_model(tok, seed=0)
    featurizer = featurizer_for_tokenizer(tok, transformer.get_input_embeddings().weight.detach(), CORPUS[:6], [], FeatureConfig(embed_dim=8))
    torch.manual_seed(1)
    checkpoint = RouterCheckpoint(TokenGate(GateConfig()).eval(), featurizer, tau=0.5 if tau is None else tau)
    experts = {"transformer": Expert("transformer", "tiny-llama-0", transformer, tok),
               "mamba": Expert("mamba", "tiny-mamba", mamba if mamba is not None else tiny_model(tok, seed=1), tok)}
    return RoutedAnswerer(checkpoint, experts, name="tiny-mambaformer", max_new_tokens=12)


def slowed(model: Any, seconds: float) -> list[int]:
    """Make every forward call of `model` take at least `seconds`; returns a list counting the calls."""
    calls: list[int] = []

    def hook(module: Any, args: Any) -> None:
        calls.append(1)
        time.sleep(seconds)

    model.register_forward_pre_hook(hook)
    return calls


def sse_data(text: str) -> list[str]:
    """The data fields of a server-sent event stream, in order."""
    assert text.endswith("\n\n"), text[-200:]
    events = [block for block in text.split("\n\n") if block]
    assert all(e.startswith("data: ") for e in events), events
    return [e[len("data: "):] for e in events]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(app: Any) -> Iterator[str]:
    """Run `app` with uvicorn on 127.0.0.1:<free port> in a thread; yield its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1100,1500"]


def browser_missing() -> str | None:
    """Why the browser test cannot run here, or None when it can."""
    import importlib.util
    import os

    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install selenium)"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.path.exists(path):
            return f"{path} not found: install Debian's chromium and chromium-driver with scripts/install_browser.sh"
    return None


@contextmanager
def headless_chromium(profile_dir: Any) -> Iterator[Any]:
    """Selenium driving Debian's Chromium with a fresh profile; never downloads a driver."""
    import os

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not go looking for drivers
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile_dir}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()

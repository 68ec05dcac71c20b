"""Micro-batching: concurrent requests with the same batch key answered in one `answer_batch` call.

One worker thread owns the model (torch already uses every core inside one call, so a second
worker would only contend). Requests wait in one bounded FIFO queue:

  enqueue(record, ..)  -> QueueFull (the server answers 503 + Retry-After) when the queue holds
                          `max_queue` requests, or when the request could not be answered in time:
                          what is left of the running batch, the batches queued ahead of it and its
                          own, each predicted from what such batches cost so far (its batch key, kind
                          of work, size and token budget: medmoe.serve.admission), exceed 80% of its
                          timeout (`TIMEOUT_SHARE`: batch times vary);
                          or when more than one batch of one kind of work, of never-measured cost,
                          would be ahead of it (a fresh server admits one batch's worth of a burst,
                          times it, then admits by estimate).
                          An idle server admits any request (that is also how stale estimates heal).
                          Otherwise the request is queued; `wait(job)` awaits its answer (`submit` =
                          both). A streamed request carries a TextSink: the answerer pushes its text
                          there while the batch decodes (medmoe.answer.streaming).
  worker               takes the oldest request's key, waits up to `max_wait_ms` (counted from that
                          request's arrival) for up to `max_batch_size` requests with the same key,
                          removes them from the queue under the lock, runs `answer_batch` once and
                          hands each answer to its own caller.
  a failing batch      -> when `answer_batch` raises, the batch is answered again in halves, down to
                          single requests, so that only the requests at fault get an error, each its
                          own (a RequestRejected becomes a 4xx, anything else a 500, medmoe.serve.app);
                          the others get their answers. A streamed request's text already sent is not
                          sent again (ResumedSink).
  timeout / disconnect -> a request still queued is removed (it never reaches the model); one already
                          in a batch has its answer dropped. Either way it is answered exactly once:
                          by its answer, or by the timeout (504). A streamed request's sink is
                          cancelled too, which stops its row's decoding at the next step.

Exactly once: a request leaves the queue in exactly one place (taken into a batch, or withdrawn
by its caller), under one lock; its future is resolved on the event loop, where a second resolution
is detected and counted (`stats.duplicates`, 0 unless there is a bug).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from medmoe.answer import Answer
from medmoe.answer.streaming import ResumedSink
from medmoe.data.record import Record
from medmoe.serve.admission import CostModel, Wait

log = logging.getLogger(__name__)
DEFAULT_MAX_NEW_TOKENS = 64  # an open record's token budget when neither the server nor the answerer names one
TIMEOUT_SHARE = 0.8  # admit a request whose estimated wait fits in this share of its timeout: batch times vary


class QueueFull(Exception):
    """The queue cannot take this request now; retry after `retry_after_s` seconds."""

    def __init__(self, reason: str, retry_after_s: int):
        self.reason, self.retry_after_s = reason, retry_after_s
        super().__init__(f"server busy ({reason}); retry after {retry_after_s} s")


class RequestTimeout(Exception):
    """The request was not answered within its timeout."""


class BatcherStopped(Exception):
    """The server is shutting down."""


@dataclass
class BatchInfo:
    """How a request was served: queue wait, its batch's size and compute time (ms)."""

    queue_ms: float
    batch_size: int
    batch_ms: float


@dataclass(eq=False)  # identity: a job is only ever equal to itself (deque.remove, `in`)
class _Job:
    record: Record
    key: str
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    sink: Any = None  # medmoe.answer.streaming.TextSink for a streamed request
    enqueued: float = field(default_factory=time.perf_counter)
    withdrawn: bool = False  # its caller gave up (set under the lock; the worker skips it on a retry)


@dataclass
class _Running:
    """The batch the worker is answering: its key, jobs and start (for the wait of later requests)."""

    key: str
    jobs: list[_Job]
    started: float

    @property
    def records(self) -> list[Record]:
        return [j.record for j in self.jobs]

    @property
    def stopping(self) -> bool:
        """Every row is a stream whose client left: decoding stops at the next step."""
        return all(j.sink is not None and j.sink.cancelled for j in self.jobs)


@dataclass
class BatcherStats:
    """Counts for the exactly-once check: after traffic stops, accepted == answered + timed_out +
    cancelled + failed, and duplicates == 0."""

    accepted: int = 0
    rejected: int = 0
    answered: int = 0
    timed_out: int = 0
    cancelled: int = 0
    failed: int = 0
    duplicates: int = 0
    batches: int = 0


class MicroBatcher:
    def __init__(
        self,
        answerer: Any,
        max_batch_size: int = 16,
        max_wait_ms: float = 10.0,
        max_queue: int = 128,
        on_batch: Callable[[int, float, float], None] | None = None,
        max_new_tokens: int | None = None,
    ):
        self.answerer = answerer
        self.max_batch_size, self.max_wait_s, self.max_queue = max_batch_size, max_wait_ms / 1000, max_queue
        self.on_batch = on_batch  # (batch size, batch seconds, oldest queue wait seconds), for metrics
        key_of = getattr(answerer, "batch_key", None)
        self._key_of: Callable[[Record], str] = key_of if callable(key_of) else (lambda r: "default")
        self.streams = "sinks" in inspect.signature(answerer.answer_batch).parameters  # can stream text
        self._queue: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._running: _Running | None = None
        budget = max_new_tokens or getattr(answerer, "max_new_tokens", None) or DEFAULT_MAX_NEW_TOKENS
        self.costs = CostModel(budget)  # what batches cost so far: admission and Retry-After
        self.stats = BatcherStats()

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="medmoe-batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            left = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in left:
            job.loop.call_soon_threadsafe(self._fail, job, BatcherStopped("server is shutting down"))
        if self._thread:
            self._thread.join(timeout=60)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> bool:
        """A batch is being answered now."""
        return self._running is not None

    # -- caller side (event loop) ------------------------------------------------------------------
    def estimated_wait(self, record: Record, key: str | None = None) -> Wait:
        """The wait of `record` if it were queued now: what is left of the running batch, every batch
        queued ahead (per key, in queue order, `max_batch_size` at a time) and its own, plus the batch
        window; batches never measured count in `unknown` (per kind of work) instead of seconds."""
        key = self._key_of(record) if key is None else key
        with self._cond:
            wait = Wait(self.max_wait_s)
            running = self._running
            if running is not None and not running.stopping:
                seconds, unknown = self.costs.predict(running.key, running.records)
                wait.add(max(seconds - (time.perf_counter() - running.started), 0.0), unknown)
            groups: dict[str, list[Record]] = {}
            for job in self._queue:
                groups.setdefault(job.key, []).append(job.record)
            groups.setdefault(key, []).append(record)
            for group_key, records in groups.items():
                for start in range(0, len(records), self.max_batch_size):
                    wait.add(*self.costs.predict(group_key, records[start:start + self.max_batch_size]))
            return wait

    def retry_after(self, wait: Wait) -> int:
        """Seconds until about half the work ahead is done (at least 1); a batch of unknown cost is
        guessed to take as long as the running batch has taken so far."""
        running = self._running
        elapsed = time.perf_counter() - running.started if running is not None else 0.0
        return max(1, math.ceil((wait.seconds + wait.unknown_batches * elapsed) / 2))

    def enqueue(self, record: Record, timeout_s: float, sink: Any = None) -> _Job:
        """Admit a request that must be answered within `timeout_s` (call on the event loop), or
        refuse it now: QueueFull, BatcherStopped."""
        if sink is not None and not self.streams:
            raise ValueError(f"{type(self.answerer).__name__}.answer_batch takes no sinks: it cannot stream")
        loop = asyncio.get_running_loop()
        job = _Job(record, self._key_of(record), loop, loop.create_future(), sink)
        with self._cond:
            if self._stopping:
                raise BatcherStopped("server is shutting down")
            refusal = self._refusal(job, timeout_s)
            if refusal is not None:
                self.stats.rejected += 1
                raise refusal
            self._queue.append(job)
            self.stats.accepted += 1
            self._cond.notify()
        return job

    def _refusal(self, job: _Job, timeout_s: float) -> QueueFull | None:
        """Why `job` cannot be admitted now (None: it can). Call under the lock."""
        if not self._queue and self._running is None:
            return None  # idle: nothing would answer it sooner (and its batch refreshes the estimates)
        wait = self.estimated_wait(job.record, job.key)
        if len(self._queue) >= self.max_queue:
            return QueueFull("queue full", self.retry_after(wait))
        untimed = [kind for kind, batches in wait.unknown.items() if batches > 1]
        if untimed:
            return QueueFull(f"no {untimed[0]} batch like the ones ahead has been timed yet; one at a time until then",
                             self.retry_after(wait))
        if wait.seconds > timeout_s * TIMEOUT_SHARE:
            return QueueFull(f"estimated wait {wait.seconds:.1f} s is too close to the request timeout {timeout_s:g} s",
                             self.retry_after(wait))
        return None

    async def wait(self, job: _Job, timeout_s: float) -> tuple[Answer, BatchInfo]:
        """The job's answer; RequestTimeout after `timeout_s` (the job is withdrawn)."""
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout_s)
        except TimeoutError:
            self.withdraw(job, "timed_out")
            raise RequestTimeout(f"no answer within {timeout_s:g} s") from None
        except asyncio.CancelledError:
            self.withdraw(job, "cancelled")
            raise

    async def submit(self, record: Record, timeout_s: float) -> tuple[Answer, BatchInfo]:
        return await self.wait(self.enqueue(record, timeout_s), timeout_s)

    def withdraw(self, job: _Job, outcome: str) -> None:
        """The caller gave up ("timed_out" or "cancelled"): take the job out of the queue if it is still
        there, stop its stream, count the outcome. Does nothing for a job already resolved."""
        if job.sink is not None:
            job.sink.cancel()
        if job.future.done():
            return  # answered, failed or withdrawn before: counted there
        with self._cond:
            job.withdrawn = True
            try:
                self._queue.remove(job)
            except ValueError:
                pass  # already in a batch: its answer will find the future cancelled and be dropped
            setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)
        job.future.cancel()

    # -- worker side (thread) ----------------------------------------------------------------------
    def _take_batch(self) -> list[_Job] | None:
        """Block until a batch is ready; remove and return it, marked running (None when stopping)."""
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            oldest = self._queue[0]
            deadline = oldest.enqueued + self.max_wait_s
            while not self._stopping:
                same = sum(1 for j in self._queue if j.key == oldest.key)
                remaining = deadline - time.perf_counter()
                if same >= self.max_batch_size or remaining <= 0:
                    break
                self._cond.wait(remaining)
            if oldest not in self._queue:  # withdrawn while we waited: start over
                return []
            batch = [j for j in self._queue if j.key == oldest.key][: self.max_batch_size]
            for job in batch:
                self._queue.remove(job)
            self._running = _Running(oldest.key, batch, time.perf_counter())
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            if batch:
                try:
                    self._answer(batch)
                finally:
                    with self._cond:
                        self._running = None

    def _answer(self, batch: Sequence[_Job], retry: bool = False) -> None:
        """One `answer_batch` call for `batch`; its answers go to their callers, a failure to `_isolate`.
        A first try that ran to the end (no stream cut short) teaches the cost model."""
        start = time.perf_counter()
        try:
            answers = self._call(batch, retry)
        except Exception as exc:
            self._isolate(batch, exc)
            return
        elapsed = time.perf_counter() - start
        if not retry and not any(j.sink is not None and j.sink.cancelled for j in batch):
            with self._cond:  # the event loop reads the costs under this lock (admission)
                self.costs.observe(batch[0].key, [j.record for j in batch], elapsed)
        self.stats.batches += 1
        if self.on_batch:
            self.on_batch(len(batch), elapsed, start - batch[0].enqueued)
        for job, answer in zip(batch, answers):
            info = BatchInfo(queue_ms=(start - job.enqueued) * 1000, batch_size=len(batch), batch_ms=elapsed * 1000)
            job.loop.call_soon_threadsafe(self._deliver, job, (answer, info))

    def _call(self, batch: Sequence[_Job], retry: bool) -> list[Answer]:
        records, sinks = [j.record for j in batch], [j.sink for j in batch]
        if retry:  # the text of an earlier try was already sent: do not send it again
            sinks = [ResumedSink(s) if s is not None else None for s in sinks]
        if any(sink is not None for sink in sinks):
            answers = self.answerer.answer_batch(records, sinks=sinks)
        else:
            answers = self.answerer.answer_batch(records)
        if len(answers) != len(batch):
            raise RuntimeError(f"answerer returned {len(answers)} answers for {len(batch)} questions")
        return answers

    def _isolate(self, batch: Sequence[_Job], exc: Exception) -> None:
        """`answer_batch` raised for `batch`: a single job gets the error; a larger batch is answered
        again in halves (jobs whose callers left are dropped), so only the jobs at fault fail."""
        if len(batch) == 1:
            job = batch[0]
            job.loop.call_soon_threadsafe(self._fail, job, exc)
            return
        log.warning("a batch of %d failed (%s: %s); answering it again in halves", len(batch), type(exc).__name__, exc)
        live = [j for j in batch if not j.withdrawn]
        half = (len(live) + 1) // 2
        for part in (live[:half], live[half:]):
            if part:
                self._answer(part, retry=True)

    def _deliver(self, job: _Job, result: tuple[Answer, BatchInfo]) -> None:
        if job.future.cancelled():
            return  # the caller already got its timeout / went away; counted there
        if job.future.done():
            self.stats.duplicates += 1
            return
        job.future.set_result(result)
        self.stats.answered += 1

    def _fail(self, job: _Job, exc: BaseException) -> None:
        if job.future.done():
            return
        job.future.set_exception(exc)
        self.stats.failed += 1

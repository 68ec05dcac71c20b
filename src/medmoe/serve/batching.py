"""Micro-batching: concurrent requests with the same batch key answered in one `answer_batch` call.

One worker thread owns the model (torch already uses every core inside one call, so a second
worker would only contend). Requests wait in one bounded FIFO queue:

  enqueue(record, ..)  -> QueueFull (the server answers 503 + Retry-After) when the queue holds
                          `max_queue` requests, or when the batch running, the batches queued ahead
                          of it and its own ((ceil((depth + 1) / max_batch_size) + 1) x measured
                          seconds per batch) would take longer than the request timeout;
                          otherwise the request is queued; `wait(job)` awaits its answer
                          (`submit` = both). A streamed request carries a TextSink: the answerer
                          pushes its text there while the batch decodes (medmoe.serve.streaming).
  worker               takes the oldest request's key, waits up to `max_wait_ms` (counted from that
                          request's arrival) for up to `max_batch_size` requests with the same key,
                          removes them from the queue under the lock, runs `answer_batch` once and
                          hands each answer to its own caller.
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
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from medmoe.answer import Answer
from medmoe.data.record import Record

SERVICE_TIME_SMOOTHING = 0.2  # weight of the newest batch in the running seconds-per-batch estimate


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
    sink: Any = None  # medmoe.serve.streaming.TextSink for a streamed request
    enqueued: float = field(default_factory=time.perf_counter)


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
        self.seconds_per_batch: float | None = None  # running estimate (EMA), for admission and Retry-After
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

    # -- caller side (event loop) ------------------------------------------------------------------
    def estimated_wait_s(self) -> float:
        """Seconds until a request queued now is answered: the batch running, the batches ahead of
        it and its own (0 while the queue is empty or no batch has been timed yet)."""
        if not self._queue or self.seconds_per_batch is None:
            return 0.0
        return (math.ceil((len(self._queue) + 1) / self.max_batch_size) + 1) * self.seconds_per_batch

    def retry_after(self) -> int:
        return max(1, math.ceil(self.estimated_wait_s() / 2))  # about half the queue drained by then

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
            if len(self._queue) >= self.max_queue:
                self.stats.rejected += 1
                raise QueueFull("queue full", self.retry_after())
            if self.estimated_wait_s() > timeout_s:
                self.stats.rejected += 1  # it would time out behind the batches already queued: refuse now
                raise QueueFull("estimated wait exceeds the request timeout", self.retry_after())
            self._queue.append(job)
            self.stats.accepted += 1
            self._cond.notify()
        return job

    async def wait(self, job: _Job, timeout_s: float) -> tuple[Answer, BatchInfo]:
        """The job's answer; RequestTimeout after `timeout_s` (the job is withdrawn)."""
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout_s)
        except asyncio.TimeoutError:
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
            try:
                self._queue.remove(job)
            except ValueError:
                pass  # already in a batch: its answer will find the future cancelled and be dropped
            setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)
        job.future.cancel()

    # -- worker side (thread) ----------------------------------------------------------------------
    def _take_batch(self) -> list[_Job] | None:
        """Block until a batch is ready; remove and return it (None when stopping)."""
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
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            if batch:
                self._answer(batch)

    def _answer(self, batch: Sequence[_Job]) -> None:
        start = time.perf_counter()
        try:
            records, sinks = [j.record for j in batch], [j.sink for j in batch]
            if any(sink is not None for sink in sinks):
                answers = self.answerer.answer_batch(records, sinks=sinks)
            else:
                answers = self.answerer.answer_batch(records)
            if len(answers) != len(batch):
                raise RuntimeError(f"answerer returned {len(answers)} answers for {len(batch)} questions")
        except Exception as exc:  # the batch fails, the server keeps serving
            for job in batch:
                job.loop.call_soon_threadsafe(self._fail, job, exc)
            return
        elapsed = time.perf_counter() - start
        self.seconds_per_batch = elapsed if self.seconds_per_batch is None else (
            SERVICE_TIME_SMOOTHING * elapsed + (1 - SERVICE_TIME_SMOOTHING) * self.seconds_per_batch)
        self.stats.batches += 1
        if self.on_batch:
            self.on_batch(len(batch), elapsed, start - batch[0].enqueued)
        for job, answer in zip(batch, answers):
            info = BatchInfo(queue_ms=(start - job.enqueued) * 1000, batch_size=len(batch), batch_ms=elapsed * 1000)
            job.loop.call_soon_threadsafe(self._deliver, job, (answer, info))

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

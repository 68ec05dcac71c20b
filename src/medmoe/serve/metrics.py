"""Prometheus text exposition (format 0.0.4) for the server, without a client library.

Counters, gauges and histograms with labels; thread-safe, since the batching worker thread and the
event loop both record. `ServerMetrics` holds the server's series; `render()` is GET /metrics.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help, labels
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def lines(self) -> list[str]:  # each kind of metric renders its samples
        raise NotImplementedError


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        super().__init__(name, help, labels)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        with self._lock:
            self.values[labels] = self.values.get(labels, 0.0) + amount

    def get(self, *labels: str) -> float:
        with self._lock:
            return self.values.get(labels, 0.0)

    def lines(self) -> list[str]:
        with self._lock:
            return [f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in sorted(self.values.items())]


class Gauge(_Metric):
    """A value read when rendered (e.g. the queue depth), or set explicitly per label set."""

    kind = "gauge"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = (), read: Callable[[], Iterable[tuple[tuple[str, ...], float]]] | None = None):
        super().__init__(name, help, labels)
        self.read = read

    def lines(self) -> list[str]:
        rows = list(self.read()) if self.read else []
        return [f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in rows]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()):
        super().__init__(name, help, labels)
        self.buckets = buckets
        self.series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}  # labels -> (bucket counts, [sum, count])

    def observe(self, value: float, *labels: str) -> None:
        with self._lock:
            counts, total = self.series.setdefault(labels, ([0] * len(self.buckets), [0.0, 0]))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    counts[i] += 1  # cumulative buckets: every bound >= value counts it
            total[0] += value
            total[1] += 1

    def lines(self) -> list[str]:
        out = []
        with self._lock:
            for key, (counts, (total, count)) in sorted(self.series.items()):
                for bound, c in [*zip(map(_number, self.buckets), counts), ("+Inf", int(count))]:
                    le = 'le="' + bound + '"'
                    out.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {c}")
                out.append(f"{self.name}_sum{_labels(self.label_names, key)} {_number(total)}")
                out.append(f"{self.name}_count{_labels(self.label_names, key)} {int(count)}")
        return out


class ServerMetrics:
    """Every series the server exports. `queue_depth` is read from the batcher at render time."""

    def __init__(self, queue_depth: Callable[[], int] = lambda: 0, batcher_counts: Callable[[], dict[str, int]] = dict):
        self.requests = Counter("medmoe_requests_total", "HTTP requests by endpoint and status code.", ("endpoint", "status"))
        self.latency = Histogram("medmoe_request_latency_seconds", "End-to-end latency of answered requests.", LATENCY_BUCKETS_S, ("endpoint",))
        self.queue_wait = Histogram("medmoe_queue_wait_seconds", "Time requests waited in the batching queue.", LATENCY_BUCKETS_S)
        self.batch_size = Histogram("medmoe_batch_size", "Requests per micro-batch.", BATCH_BUCKETS)
        self.expert_answers = Counter("medmoe_expert_answers_total", "Answers by the expert that produced them.", ("expert",))
        self.rejected = Counter("medmoe_rejected_total", "Requests refused or abandoned, by reason.", ("reason",))
        self.expert_share = Gauge("medmoe_expert_share", "Share of answers given by each expert (0-1).", ("expert",), self._shares)
        self.queue = Gauge("medmoe_queue_depth", "Requests waiting for a micro-batch.", (), lambda: [((), queue_depth())])
        self.batcher = Gauge(  # the exactly-once ledger: accepted == answered + timed_out + cancelled + failed
            "medmoe_batcher_requests", "Batcher ledger since start, by outcome (duplicates must stay 0).", ("outcome",),
            lambda: [((k,), v) for k, v in batcher_counts().items()])

    def _shares(self) -> list[tuple[tuple[str, ...], float]]:
        with self.expert_answers._lock:
            counts = dict(self.expert_answers.values)
        total = sum(counts.values())
        return [(k, v / total) for k, v in sorted(counts.items())] if total else []

    def render(self) -> str:
        metrics = [self.requests, self.latency, self.queue_wait, self.batch_size, self.expert_answers, self.expert_share, self.queue, self.rejected, self.batcher]
        lines: list[str] = []
        for metric in metrics:
            lines += metric.header() + metric.lines()
        return "\n".join(lines) + "\n"

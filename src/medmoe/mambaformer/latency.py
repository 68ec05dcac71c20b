"""Measured latency model of an expert: C_e(n) = a n^2 + b n + c with a, b, c >= 0.

`profile` times any callable over a grid of input lengths on this machine; `fit_latency_model`
fits the quadratic by non-negative least squares (NNLS). With three coefficients NNLS is solved
exactly by trying every support set (the optimum is the unconstrained least-squares solution on
one of the 7 non-empty subsets of {a, b, c} that is non-negative), so no solver dependency is needed.

`gate_cost_ms` measures the router's own cost per query (tokenizing, features, gate: what a served
query pays before its expert starts); it is saved in the checkpoint (`RouterCheckpoint.gate_ms`) and
added to every routed latency by calibration.
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medmoe.data.record import Record
from medmoe.errors import MedmoeError
from medmoe.mambaformer.features import GateFeaturizer
from medmoe.mambaformer.gate import TokenGate, torch_threads
from medmoe.mambaformer.queries import query_features
from medmoe.paths import atomic_write_text


@dataclass(frozen=True)
class LatencyModel:
    """C(n) = a n^2 + b n + c milliseconds for an input of n tokens, fitted on `machine`."""

    a: float
    b: float
    c: float
    expert: str = ""
    machine: str = ""
    lengths: tuple[int, ...] = ()
    median_ms: tuple[float, ...] = ()
    extra: dict = field(default_factory=dict)

    def __call__(self, n: np.ndarray | float) -> np.ndarray:
        n = np.asarray(n, dtype=np.float64)
        return self.a * n * n + self.b * n + self.c

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lengths"], d["median_ms"] = list(self.lengths), list(self.median_ms)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LatencyModel:
        try:
            return cls(float(d["a"]), float(d["b"]), float(d["c"]), d.get("expert", ""), d.get("machine", ""),
                       tuple(int(x) for x in d.get("lengths", ())), tuple(float(x) for x in d.get("median_ms", ())),
                       dict(d.get("extra", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise MedmoeError(f"latency model: malformed entry ({exc}); need numbers a, b, c") from exc

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> LatencyModel:
        path = Path(path)
        if not path.is_file():
            raise MedmoeError(f"{path}: no such latency model file")
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))


def nnls(A: np.ndarray, y: np.ndarray) -> np.ndarray:
    """argmin_{x >= 0} ||A x - y||^2 for a design with few columns (exact, by support enumeration).

    A: (m, k) with small k (k <= 6), y: (m,) -> x: (k,)
    """
    A, y = np.asarray(A, dtype=np.float64), np.asarray(y, dtype=np.float64)
    m, k = A.shape
    if k > 6:
        raise MedmoeError(f"nnls: support enumeration is meant for few columns, got {k}")
    best_x, best_r = np.zeros(k), float(np.sum(y * y))
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            cols = list(support)
            sol, *_ = np.linalg.lstsq(A[:, cols], y, rcond=None)
            if (sol < 0).any():
                continue
            x = np.zeros(k)
            x[cols] = sol
            r = float(np.sum((A @ x - y) ** 2))
            if r < best_r - 1e-12 * max(1.0, best_r):
                best_x, best_r = x, r
    return best_x


def fit_latency_model(lengths: Sequence[float], latency_ms: Sequence[float], expert: str = "",
                      machine: str = "") -> LatencyModel:
    """Fit C(n) = a n^2 + b n + c (a, b, c >= 0) to measured (length, ms) points by NNLS.

    Columns are scaled to unit norm before solving (n^2 dwarfs 1 at n = 4096), then unscaled.
    """
    n = np.asarray(lengths, dtype=np.float64)
    y = np.asarray(latency_ms, dtype=np.float64)
    if n.shape != y.shape or n.ndim != 1 or len(n) < 2:
        raise MedmoeError("fit_latency_model: need two equal-length 1-D sequences with at least 2 points")
    if (n <= 0).any() or not np.isfinite(y).all():
        raise MedmoeError("fit_latency_model: lengths must be positive and latencies finite")
    A = np.stack([n * n, n, np.ones_like(n)], axis=1)                       # (m, 3)
    scale = np.linalg.norm(A, axis=0)
    coef = nnls(A / scale, y) / scale
    return LatencyModel(float(coef[0]), float(coef[1]), float(coef[2]), expert, machine,
                        tuple(int(x) for x in n), tuple(float(x) for x in y))


def machine_description() -> str:
    import os
    import platform
    try:
        import torch
        torch_part = f", torch {torch.__version__}, {torch.get_num_threads()} threads"
    except ImportError:
        torch_part = ""
    return f"{platform.machine()} {platform.processor() or platform.system()}, {os.cpu_count()} cores{torch_part}"


def profile(fn: Callable[[int], object], lengths: Sequence[int], repeats: int = 5, warmup: int = 1,
            expert: str = "", clock: Callable[[], float] = time.perf_counter) -> LatencyModel:
    """Time `fn(n)` for each n in `lengths` (median of `repeats` after `warmup` calls) and fit C(n).

    fn builds and runs one input of n tokens (e.g. an expert's forward pass on n token ids); the
    lengths are visited in interleaved order (all lengths once per repeat) so drift on a shared
    machine spreads over every length instead of biasing one.
    """
    lengths = [int(n) for n in lengths]
    if not lengths or min(lengths) < 1 or repeats < 1:
        raise MedmoeError("profile: need a non-empty grid of positive lengths and repeats >= 1")
    for n in lengths:
        for _ in range(warmup):
            fn(n)
    times: dict[int, list[float]] = {n: [] for n in lengths}
    for _ in range(repeats):
        for n in lengths:
            start = clock()
            fn(n)
            times[n].append((clock() - start) * 1000.0)
    medians = [statistics.median(times[n]) for n in lengths]
    return fit_latency_model(lengths, medians, expert=expert, machine=machine_description())


def gate_cost_ms(featurizer: GateFeaturizer, gate: TokenGate, tokenizer: Any, records: Sequence[Record],
                 repeats: int = 5, limit: int = 50) -> float:
    """The gate's own cost in ms per query, as served: one query at a time, tokenizing + features
    (`queries.query_features`) + gate forward in one torch thread; the median over `repeats` passes
    over the first `limit` records. The cost depends on the featurizer and the gate's shape, not on its
    weights, so a gate not yet trained measures the same."""
    sample = list(records[:limit])
    if not sample or repeats < 1:
        raise MedmoeError("gate cost: need at least one query and repeats >= 1")
    times = []
    with torch.no_grad(), torch_threads(1):
        for _ in range(repeats):
            start = time.perf_counter()
            for record in sample:
                gate(query_features(featurizer, tokenizer, [record]))
            times.append((time.perf_counter() - start) * 1000 / len(sample))
    return float(np.median(times))

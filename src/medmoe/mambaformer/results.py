"""The per-example table of expert results that every router component consumes.

The routed pipeline runs each (frozen) expert once over a split and fills one `ExpertResults`;
training the gate, calibration, baselines and the Pareto sweep then work on this table alone, so
they never need the experts themselves.

Conventions used across `medmoe.mambaformer`:
- experts are named "transformer" (E_T) and "mamba" (E_M), in that order (`EXPERTS`);
- a routing decision is a bool array of shape (N,): True = send to E_M, False = send to E_T;
- latencies are milliseconds per query.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medmoe.errors import DataError, MedmoeError
from medmoe.paths import atomic_write_text

EXPERTS: tuple[str, str] = ("transformer", "mamba")
FIELDS = ("loss", "correct", "pred", "label_probs", "latency_ms")


def as_correct(values: Any, expert: str) -> np.ndarray:
    """`correct` as bool (0/1 outcomes: bool or integer input) or float64 (a quality score, about [0, 1])."""
    array = np.asarray(values)
    if array.dtype == bool or np.issubdtype(array.dtype, np.integer):
        return array.astype(bool)
    array = array.astype(np.float64)
    if not np.isfinite(array).all():  # a quality may leave [0, 1] a little: BERTScore without rescaling can be < 0
        raise MedmoeError(f"ExpertResults: {expert}.correct must be bool or a finite quality score")
    return array


@dataclass
class ExpertOutcome:
    """One expert's results on N examples (arrays aligned with `ExpertResults.ids`).

    loss:        (N,) float, the expert's per-example loss l_e (e.g. NLL of the gold label)
    correct:     (N,) bool, whether its prediction is right; or (N,) float, a generation's quality q in
                 [0, 1] (the generative setting, experiments/generative_routing.py): every consumer reads
                 it through means, stacks and comparisons, so "accuracy" is then the mean quality
    pred:        N predictions (labels or letters as strings)
    label_probs: (N, K) float or None, its probabilities over the K labels/options
    latency_ms:  (N,) float, measured wall time of the expert on that example
    """

    loss: np.ndarray
    correct: np.ndarray
    pred: list[str]
    latency_ms: np.ndarray
    label_probs: np.ndarray | None = None

    def take(self, index: np.ndarray) -> ExpertOutcome:
        probs = None if self.label_probs is None else self.label_probs[index]
        return ExpertOutcome(self.loss[index], self.correct[index], [self.pred[i] for i in index],
                             self.latency_ms[index], probs)


@dataclass
class ExpertResults:
    """Per-example results of both experts on one split.

    ids:      N example ids (unique)
    n_tokens: (N,) int, the query's length in gate tokens (n in the latency model C_e(n))
    experts:  {"transformer": ExpertOutcome, "mamba": ExpertOutcome}
    """

    ids: list[str]
    n_tokens: np.ndarray
    experts: dict[str, ExpertOutcome]

    def __post_init__(self) -> None:
        self.n_tokens = np.asarray(self.n_tokens, dtype=np.int64)
        n = len(self.ids)
        if len(set(self.ids)) != n:
            raise MedmoeError("ExpertResults: example ids are not unique")
        if self.n_tokens.shape != (n,):
            raise MedmoeError(f"ExpertResults: n_tokens has shape {self.n_tokens.shape}, expected ({n},)")
        if (self.n_tokens < 1).any():
            raise MedmoeError("ExpertResults: every example needs n_tokens >= 1")
        missing = [e for e in EXPERTS if e not in self.experts]
        if missing:
            raise MedmoeError(f"ExpertResults: no results for expert(s) {missing}; need {list(EXPERTS)}")
        for name, out in self.experts.items():
            out.loss = np.asarray(out.loss, dtype=np.float64)
            out.correct = as_correct(out.correct, name)
            out.latency_ms = np.asarray(out.latency_ms, dtype=np.float64)
            if out.label_probs is not None:
                out.label_probs = np.asarray(out.label_probs, dtype=np.float64)
            for field in ("loss", "correct", "latency_ms"):
                if getattr(out, field).shape != (n,):
                    raise MedmoeError(f"ExpertResults: {name}.{field} has shape {getattr(out, field).shape}, expected ({n},)")
            if len(out.pred) != n:
                raise MedmoeError(f"ExpertResults: {name}.pred has {len(out.pred)} entries, expected {n}")
            if not np.isfinite(out.loss).all() or not np.isfinite(out.latency_ms).all():
                raise MedmoeError(f"ExpertResults: {name} has non-finite loss or latency values")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def transformer(self) -> ExpertOutcome:
        return self.experts["transformer"]

    @property
    def mamba(self) -> ExpertOutcome:
        return self.experts["mamba"]

    def stacked(self, field: str) -> np.ndarray:
        """(N, 2) array of a numeric field, column 0 = E_T, column 1 = E_M."""
        return np.stack([getattr(self.experts[e], field) for e in EXPERTS], axis=1)

    def take(self, index: Sequence[int] | np.ndarray) -> ExpertResults:
        """The sub-table of the given row indices."""
        index = np.asarray(index, dtype=np.int64)
        return ExpertResults([self.ids[i] for i in index], self.n_tokens[index],
                             {name: out.take(index) for name, out in self.experts.items()})

    def select(self, ids: Iterable[str]) -> ExpertResults:
        """The sub-table of the given ids, in that order."""
        position = {id_: i for i, id_ in enumerate(self.ids)}
        wanted = list(ids)
        unknown = [i for i in wanted if i not in position]
        if unknown:
            raise MedmoeError(f"ExpertResults: {len(unknown)} unknown ids, e.g. {unknown[:3]}")
        return self.take([position[i] for i in wanted])

    # ---- JSONL: one example per line ------------------------------------------------------------
    def to_rows(self) -> list[dict[str, Any]]:
        rows = []
        for i, id_ in enumerate(self.ids):
            row: dict[str, Any] = {"id": id_, "n_tokens": int(self.n_tokens[i])}
            for name, out in self.experts.items():
                row[name] = {
                    "loss": float(out.loss[i]), "correct": out.correct[i].item(), "pred": out.pred[i],
                    "latency_ms": float(out.latency_ms[i]),
                    "label_probs": None if out.label_probs is None else out.label_probs[i].tolist(),
                }
            rows.append(row)
        return rows

    @classmethod
    def from_rows(cls, rows: Sequence[dict[str, Any]], source: str = "<rows>") -> ExpertResults:
        if not rows:
            raise DataError.single(source, "no rows: an ExpertResults table needs at least one example")
        experts = {}
        for name in EXPERTS:
            try:
                cells = [row[name] for row in rows]
                probs = [c.get("label_probs") for c in cells]
                experts[name] = ExpertOutcome(
                    loss=np.array([c["loss"] for c in cells], dtype=np.float64),
                    correct=np.array([c["correct"] for c in cells]),
                    pred=[str(c["pred"]) for c in cells],
                    latency_ms=np.array([c["latency_ms"] for c in cells], dtype=np.float64),
                    label_probs=None if any(p is None for p in probs) else np.array(probs, dtype=np.float64),
                )
            except (KeyError, TypeError) as exc:
                raise DataError.single(source, f"expert {name!r}: missing or malformed field {exc}") from exc
        try:
            return cls([str(r["id"]) for r in rows], np.array([r["n_tokens"] for r in rows]), experts)
        except KeyError as exc:
            raise DataError.single(source, f"a row lacks field {exc}") from exc

    def save_jsonl(self, path: str | Path) -> None:
        """Write one JSON object per example, atomically."""
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in self.to_rows())
        atomic_write_text(Path(path), text)

    @classmethod
    def load_jsonl(cls, path: str | Path) -> ExpertResults:
        path = Path(path)
        if not path.is_file():
            raise DataError.single(path, "no such file")
        rows = []
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError.single(path, f"invalid JSON: {exc.msg}", line=line_no) from exc
        return cls.from_rows(rows, source=str(path))

"""Training pools: every record medmoe may train or tune on for a bundled benchmark, never its test.

`training_pool(name)` is the union of the sources below, in this order, each record once:

  benchmark  sources                                                  records
  pubmedqa   pubmedqa train + dev (the 500 non-test PQA-L questions)  400 + 100 = 500
  dental     dental train + dev                                       718 + 100
             + MedMCQA dev rows of every other subject                + 2,865    = 3,683
  medmcqa    dental train + dev (the rows medmcqa test leaves out)    718 + 100 = 818
  cmexam     cmexam train + dev                                       4,995 + 304 = 5,299
  cmmlu-med  cmmlu dev, all 67 subjects (few-shot exemplars)          330
             + cmexam train + dev (out-of-benchmark Chinese medicine) + 5,299    = 5,629

Decontamination: train and dev splits come decontaminated from `load_splits` (5 CMExam and 5 CMMLU
dev questions equal bundled test questions and are already left out). Every pool record is checked
again here against the test questions (normalized text, `splits.question_key`) of every bundled
dataset, and one that matches is dropped (`pool_sources` reports how many; none are, today).

The one exception, `SHARES_TEST_WITH`: the dental pool's non-Dental MedMCQA rows are MedMCQA dev
rows, and medmcqa's test split is MedMCQA dev minus the Dental train/dev rows, so each of them is a
medmcqa test question. They are checked against every other test split (Dental test included),
not against medmcqa's. A model trained or tuned on the dental pool must not be evaluated on medmcqa.
The medmcqa pool is what medmcqa's test split leaves out: the Dental train/dev rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from medmoe.data.datasets import DATASETS, load_splits
from medmoe.data.record import Record
from medmoe.data.splits import question_key
from medmoe.errors import DataError


def _not_dental(record: Record) -> bool:
    return record.metadata.get("subject") != "Dental"


@dataclass(frozen=True)
class PoolSource:
    dataset: str
    split: str
    keep: Callable[[Record], bool] | None = None  # a row filter, None for the whole split
    note: str = ""

    def records(self) -> list[Record]:
        rows = load_splits(self.dataset)[self.split]
        return [r for r in rows if self.keep is None or self.keep(r)]

    def label(self) -> str:
        return f"{self.dataset} {self.split}" + (f" ({self.note})" if self.note else "")


_DENTAL = (PoolSource("dental", "train"), PoolSource("dental", "dev"))
_CMEXAM = (PoolSource("cmexam", "train"), PoolSource("cmexam", "dev"))

POOLS: dict[str, tuple[PoolSource, ...]] = {
    "pubmedqa": (PoolSource("pubmedqa", "train"), PoolSource("pubmedqa", "dev")),
    "dental": (*_DENTAL, PoolSource("medmcqa", "validation", _not_dental, "subjects other than Dental")),
    "medmcqa": _DENTAL,
    "cmexam": _CMEXAM,
    "cmmlu-med": (PoolSource("cmmlu", "dev", note="all 67 subjects"), *_CMEXAM),
}

# Benchmarks whose test questions a pool may hold (module docstring): never evaluate a model tuned
# on pool P on a benchmark in SHARES_TEST_WITH[P].
SHARES_TEST_WITH: dict[str, tuple[str, ...]] = {"dental": ("medmcqa",)}


def _test_questions(skip: tuple[str, ...]) -> frozenset[str]:
    return frozenset(question_key(r) for name in DATASETS if name not in skip for r in load_splits(name).get("test", []))


@cache
def _pool(name: str) -> tuple[tuple[Record, ...], tuple[tuple[str, int, int], ...]]:
    if name not in POOLS:
        raise DataError.single(name, f"no training pool; pools: {', '.join(POOLS)} (cmb-clin and cmmlu have no training data of their own)")
    banned = _test_questions(SHARES_TEST_WITH.get(name, ()))
    records: list[Record] = []
    report = []
    seen: set[str] = set()
    for source in POOLS[name]:
        rows = [r for r in source.records() if r.id not in seen]
        kept = [r for r in rows if question_key(r) not in banned]
        seen.update(r.id for r in kept)
        records.extend(kept)
        report.append((source.label(), len(kept), len(rows) - len(kept)))
    return tuple(records), tuple(report)


def training_pool(name: str) -> list[Record]:
    """Every record medmoe may train or tune on for bundled benchmark `name` (module docstring)."""
    return list(_pool(name)[0])


def pool_sources(name: str) -> list[tuple[str, int, int]]:
    """(source, records kept, records dropped as test questions) for each source of `name`'s pool."""
    return list(_pool(name)[1])

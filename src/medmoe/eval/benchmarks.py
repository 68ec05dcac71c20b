"""Benchmarks by name: which records are evaluated, where few-shot examples come from, how to score.

  name        evaluated split            few-shot pool (never the evaluated split)      notes
  pubmedqa    test (official 500)        pubmedqa train                                  yes/no/maybe
  medmcqa     test (dev minus Dental     dental train (MedMCQA dev rows kept out of      4 options
              train/dev rows)            medmcqa's test; MedMCQA's train is not bundled)
  dental      test                       dental train                                    4 options
  cmmlu-med   test, 9 subjects           cmmlu-med dev, same subject (5 per subject)     per subject, micro and macro
  cmexam      test                       cmexam train                                    5 options, some multi-answer
  cmb-clin    test (208 QA pairs)        none: no train/dev split, always zero-shot      open-ended: ROUGE-L, BERTScore
  cmb-exam:PATH  the user's CMB-Exam JSON  --shots-from FILE, else zero-shot              question_type says multi
  PATH        any file the generic loader reads   --shots-from FILE, else zero-shot

Shots are the first k records of the pool in its fixed split order (of the question's subject for
CMMLU), so every question of a benchmark (or subject) gets the same shots: reproducible, and a
shared prompt prefix. Subsamples (`--limit N`) are the first N records after ordering the evaluated
split by sha256("medmoe-eval-v1:" + id): fixed, documented, and the same on every machine.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from medmoe.data import load_dataset
from medmoe.data.record import Record
from medmoe.errors import DataError

SUBSAMPLE_SALT = "medmoe-eval-v1"
BENCHMARKS = ("pubmedqa", "medmcqa", "dental", "cmmlu-med", "cmexam", "cmb-clin")
# name -> (evaluated split, (pool dataset, pool split) or None, several answers possible)
_SPECS: dict[str, tuple[str, tuple[str, str] | None, bool]] = {
    "pubmedqa": ("test", ("pubmedqa", "train"), False),
    "medmcqa": ("test", ("dental", "train"), False),
    "dental": ("test", ("dental", "train"), False),
    "cmmlu-med": ("test", ("cmmlu-med", "dev"), False),
    "cmexam": ("test", ("cmexam", "train"), True),
    "cmb-clin": ("test", None, False),
}


@dataclass
class Benchmark:
    name: str
    records: list[Record]
    shot_pool: list[Record] = field(default_factory=list)
    multi: bool = False  # questions may have several correct answers (from the benchmark, not the key)
    group_by: str | None = None  # metadata field with per-group scores (CMMLU's subject)

    @property
    def task(self) -> str:
        return "choice" if all(r.is_choice for r in self.records) else "open"

    def shots_for(self, record: Record, k: int) -> list[Record]:
        """The first k pool records (of the same group when grouped); never the record itself."""
        if k <= 0:
            return []
        pool = self.shot_pool
        if self.group_by:
            pool = [r for r in pool if r.metadata.get(self.group_by) == record.metadata.get(self.group_by)]
        return [r for r in pool if r.id != record.id][:k]


def subsample(records: list[Record], limit: int | None) -> list[Record]:
    """The fixed subsample: the first `limit` records by sha256(salt + id), kept in that order."""
    if limit is None or limit >= len(records):
        return records
    rank = lambda r: hashlib.sha256(f"{SUBSAMPLE_SALT}:{r.id}".encode()).hexdigest()  # noqa: E731
    return sorted(records, key=rank)[:limit]


def load_benchmark(name: str, limit: int | None = None, shots_from: str | None = None) -> Benchmark:
    """A benchmark by name (table above), `cmb-exam:PATH`, or a file path for the generic loader."""
    if name in _SPECS:
        split, pool_spec, multi = _SPECS[name]
        pool = load_dataset(*pool_spec) if pool_spec else []
        records = subsample(load_dataset(name, split), limit)
        group_by = "subject" if name == "cmmlu-med" else None
        bench = Benchmark(name, records, pool, multi, group_by)
    elif name.startswith("cmb-exam:") or Path(name).suffix or Path(name).exists():
        records = subsample(load_dataset(name), limit)
        pool = load_dataset(shots_from) if shots_from else []
        group_by = "exam_subject" if name.startswith("cmb-exam:") else None
        bench = Benchmark(name, records, pool, multi=False, group_by=group_by if pool else None)
    else:
        raise DataError.single(name, f"unknown benchmark; benchmarks: {', '.join(BENCHMARKS)}, cmb-exam:PATH, or a file path")
    evaluated = {r.id for r in bench.records}
    leaked = [r.id for r in bench.shot_pool if r.id in evaluated]
    if leaked:
        raise DataError.single(name, f"few-shot pool overlaps the evaluated records (e.g. {leaked[0]})")
    return bench

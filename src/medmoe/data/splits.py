"""Fixed, documented splits for datasets that publish no train/test split of their own.

Rule (docs/data.md): group records whose normalized question text is the same (so a repeated
question never lands on both sides), order the groups by a hash of their text (stable across
machines and Python versions), and cut: the first `test` groups' records are test, the next `dev`,
the rest train. Sizes count groups, which equal records when questions do not repeat.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Sequence

from medmoe.data.record import Record

SPLIT_SALT = "medmoe-split-v1"


def question_key(record: Record) -> str:
    """Whitespace- and case-normalized question text: the identity used for leakage checks."""
    return re.sub(r"\s+", " ", record.question).strip().lower()


def _rank(key: str) -> str:
    return hashlib.sha256(f"{SPLIT_SALT}:{key}".encode()).hexdigest()


def hashed_split(records: Sequence[Record], test: int, dev: int) -> dict[str, list[Record]]:
    """{"train", "dev", "test"} by the rule above; record order inside each split is kept."""
    groups: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        groups[question_key(record)].append(index)
    ordered = sorted(groups, key=_rank)
    side = {}
    for position, key in enumerate(ordered):
        name = "test" if position < test else "dev" if position < test + dev else "train"
        for index in groups[key]:
            side[index] = name
    out: dict[str, list[Record]] = {"train": [], "dev": [], "test": []}
    for index, record in enumerate(records):
        out[side[index]].append(record)
    return out

"""Turning raw rows into Records, checking every field and collecting problems with their location."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medmoe.data.readers import Location
from medmoe.data.record import LETTERS, Record
from medmoe.errors import DataError, Problem

FULLWIDTH_TO_ASCII = str.maketrans({chr(0xFF21 + i): LETTERS[i] for i in range(26)})


class RowChecker:
    """Collects problems for one file; each check names the field, the location and the problem."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.problems: list[Problem] = []
        self.seen_ids: dict[str, Location] = {}  # id -> where it first appeared

    def add(self, loc: Location, message: str) -> None:
        self.problems.append(Problem(self.path, message, **loc))

    def field(self, row: dict[str, Any], name: str, loc: Location, required: bool = True) -> Any:
        """row[name]; a missing field is a problem, with the closest existing field suggested."""
        if name in row and row[name] is not None:
            return row[name]
        if required:
            close = difflib.get_close_matches(name, list(row), n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (fields present: {', '.join(map(str, row)) or 'none'})"
            self.add(loc, f"missing field '{name}'{hint}")
        return None

    def unique_id(self, id: str, loc: Location) -> bool:
        """False, and a problem naming both places, when an earlier valid record has this id: results are
        keyed by id, so the second record would silently take the first one's place in every score.
        Only valid records count: a row with a broken field gets that problem, not a second one."""
        if id in self.seen_ids:
            self.add(loc, f"duplicate id {id!r} (also {_where(self.seen_ids[id])}); ids must be unique: eval results are keyed by id")
            return False
        self.seen_ids[id] = loc
        return True

    def raise_if_any(self) -> None:
        if self.problems:
            raise DataError(self.problems)


def _where(loc: Location) -> str:
    """'line 2' or 'record 17': a location in words, for a message about another place."""
    return f"line {loc['line']}" if "line" in loc else f"record {loc.get('record')}"


def normalize_letters(answer: str) -> str:
    """'a c', 'C,A', 'ＡＣ' -> 'AC' (sorted, unique, upper case, full-width letters folded)."""
    cleaned = answer.translate(FULLWIDTH_TO_ASCII).upper()
    return "".join(sorted({ch for ch in cleaned if ch.isalpha()}))


def make_record(
    check: RowChecker,
    loc: Location,
    *,
    id: str,
    question: Any,
    answer: Any,
    options: Sequence[Any] = (),
    context: Any = None,
    explanation: Any = None,
    metadata: dict[str, Any] | None = None,
) -> Record | None:
    """A validated Record, or None after adding every problem found to `check`."""
    before = len(check.problems)
    if question is None:
        pass  # already reported as a missing field
    elif not isinstance(question, str) or not question.strip():
        check.add(loc, "empty question")
    texts = tuple("" if o is None else str(o).strip() for o in options)
    for i, text in enumerate(texts):
        if not text:
            check.add(loc, f"option {LETTERS[i]} is empty")
    gold = None
    if answer is None:
        pass
    elif texts:
        gold = normalize_letters(str(answer))
        valid = LETTERS[: len(texts)]
        if not gold:
            check.add(loc, f"answer {answer!r} names no option letter (options are {', '.join(valid)})")
        elif any(letter not in valid for letter in gold):
            check.add(loc, f"answer {answer!r} is not an option: options are {', '.join(valid)}")
    else:
        gold = str(answer).strip()
        if not gold:
            check.add(loc, "empty answer")
    if len(check.problems) > before or question is None or gold is None:  # gold is None exactly when answer is
        return None
    if not check.unique_id(id, loc):
        return None
    return Record(
        id=id,
        question=question.strip(),
        answer=gold,
        context=str(context).strip() if context not in (None, "") else None,
        options=texts,
        explanation=str(explanation).strip() if explanation not in (None, "") else None,
        metadata=metadata or {},
    )

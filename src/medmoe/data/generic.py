"""The generic loader for a user's own JSONL / JSON / CSV file, with a field mapping.

Default field names are the Record's own (id, question, context, options, answer, explanation), so
a file written from `Record.to_dict()` loads back unchanged. A mapping renames them, e.g.
`{"question": "Q", "answer": "label", "options": "opa,opb,opc,opd"}`.

options may be: a list of texts, an object {"A": text, ...}, or several columns named with commas.
answer may be: letter(s) ("B", "A,C"), or the exact text of one option.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medmoe.data.build import RowChecker, make_record
from medmoe.data.readers import iter_rows
from medmoe.data.record import LETTERS, Record
from medmoe.errors import DataError

FIELDS = ("id", "question", "context", "options", "answer", "explanation")


def parse_mapping(spec: str | None) -> dict[str, str]:
    """'question=Q,answer=label,options=opa|opb' -> {"question": "Q", ...} (options columns split by |)."""
    if not spec:
        return {}
    mapping = {}
    for item in spec.split(","):
        if "=" not in item:
            raise DataError.single("--map", f"'{item}' is not of the form field=column")
        key, value = (part.strip() for part in item.split("=", 1))
        if key not in FIELDS:
            raise DataError.single("--map", f"unknown field '{key}'; fields are {', '.join(FIELDS)}")
        mapping[key] = value.replace("|", ",")
    return mapping


def _options(row: dict[str, Any], column: str, check: RowChecker, loc: dict[str, Any]) -> list[Any]:
    if "," in column:
        return [check.field(row, name.strip(), loc) for name in column.split(",")]
    value = row.get(column)
    if value is None:
        return []
    if isinstance(value, dict):
        return [value[k] for k in sorted(value)]
    if isinstance(value, list):
        return value
    check.add(loc, f"field '{column}' must be a list or an object of options, got {type(value).__name__}")
    return []


def _metadata(row: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """Unmapped columns, plus the contents of a 'metadata' object (as Record.to_dict writes it)."""
    extra = {k: v for k, v in row.items() if k not in names.values() and k != "metadata"}
    return extra | (row["metadata"] if isinstance(row.get("metadata"), dict) else {})


def load_file(path: str | Path, mapping: dict[str, str] | None = None) -> list[Record]:
    """Every record of a user's file, validated; raises one DataError listing every problem."""
    names = {field: field for field in FIELDS} | (mapping or {})
    check = RowChecker(path)
    records = []
    stem = Path(path).stem
    for loc, row in iter_rows(path, check.problems):
        options = _options(row, names["options"], check, loc)
        answer = check.field(row, names["answer"], loc)
        if options and isinstance(answer, str) and answer.strip() in [str(o).strip() for o in options]:
            answer = LETTERS[[str(o).strip() for o in options].index(answer.strip())]
        record = make_record(
            check,
            loc,
            id=str(row.get(names["id"], f"{stem}/{loc.get('line', loc.get('record'))}")),
            question=check.field(row, names["question"], loc),
            answer=answer,
            options=options,
            context=row.get(names["context"]),
            explanation=row.get(names["explanation"]),
            metadata=_metadata(row, names),
        )
        if record:
            records.append(record)
    check.raise_if_any()
    if not records:
        raise DataError.single(path, "the file holds no records")
    return records

"""`medmoe data validate`: every problem in a file, at once, without stopping at the first."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from medmoe.data import formats
from medmoe.data.generic import load_file
from medmoe.data.readers import iter_rows
from medmoe.data.record import Record
from medmoe.errors import DataError, Problem

FORMATS: dict[str, Callable[..., list[Record]]] = {
    "generic": load_file,
    "pubmedqa": formats.load_pubmedqa,
    "medmcqa": formats.load_medmcqa,
    "cmexam": formats.load_cmexam,
    "cmmlu": formats.load_cmmlu,
    "cmb-clin": formats.load_cmb_clin,
    "cmb-exam": formats.load_cmb_exam,
}

# Field names that identify a source format in a file's first row.
SIGNATURES = {
    "medmcqa": {"cop", "opa"},
    "cmexam": {"Question", "Options", "Answer"},
    "cmb-exam": {"question", "option", "exam_type"},
    "cmb-clin": {"QA_pairs"},
    "pubmedqa": {"QUESTION", "final_decision"},
}


def detect_format(path: str | Path) -> str:
    """The source format of a file, from the fields of its first row; 'generic' otherwise."""
    path = Path(path)
    if path.is_dir():
        return "cmmlu"
    if path.suffix == ".json":
        from medmoe.data.readers import read_json

        data = read_json(path)
        first = next(iter(data.values())) if isinstance(data, dict) and data else (data[0] if isinstance(data, list) and data else {})
    else:
        first = next((row for _, row in iter_rows(path, [])), {})
    keys = set(first) if isinstance(first, dict) else set()
    for name, signature in SIGNATURES.items():
        if signature <= keys:
            return name
    return "generic"


def validate(path: str | Path, fmt: str = "auto", mapping: dict[str, str] | None = None) -> tuple[int, list[Problem]]:
    """(number of valid records, every problem found) for a file in format `fmt` ('auto' detects)."""
    try:
        fmt = detect_format(path) if fmt == "auto" else fmt
        if fmt not in FORMATS:
            raise DataError.single(path, f"unknown format '{fmt}'; formats: auto, {', '.join(FORMATS)}")
        records = FORMATS[fmt](path, mapping) if fmt == "generic" else FORMATS[fmt](path)
    except DataError as exc:
        return 0, exc.problems
    return len(records), []

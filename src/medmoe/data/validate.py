"""`medmoe data validate`: every problem in a file, at once, without stopping at the first."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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


# Characters above which a text is worth a warning: the server's input limits (medmoe.serve.config).
# Such records are valid, but `medmoe eval` cuts their prompts to the model's window (docs/evaluation.md).
LONG_TEXT_CHARS = {"question": 4000, "context": 20000, "option": 1000}


@dataclass
class Validation:
    """What `medmoe data validate` reports: valid records, problems (the file cannot be loaded) and
    warnings (it loads, but some records will not be seen whole by a model)."""

    count: int
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)


def long_text_warnings(path: str | Path, records: list[Record]) -> list[Problem]:
    """One warning per record whose question, context or longest option is over LONG_TEXT_CHARS."""
    warnings = []
    for record in records:
        lengths = {"question": len(record.question), "context": len(record.context or ""),
                   "option": max((len(o) for o in record.options), default=0)}
        for name, length in lengths.items():
            if length > LONG_TEXT_CHARS[name]:
                warnings.append(Problem(str(path), f"{name} is {length:,} characters (over {LONG_TEXT_CHARS[name]:,}); "
                                        "`medmoe eval` cuts prompts longer than the model's window, context first, "
                                        "then the start of the question", record=record.id))
    return warnings


def check_file(path: str | Path, fmt: str = "auto", mapping: dict[str, str] | None = None) -> Validation:
    """Problems and warnings of a file in format `fmt` ('auto' detects)."""
    try:
        fmt = detect_format(path) if fmt == "auto" else fmt
        if fmt not in FORMATS:
            raise DataError.single(path, f"unknown format '{fmt}'; formats: auto, {', '.join(FORMATS)}")
        records = FORMATS[fmt](path, mapping) if fmt == "generic" else FORMATS[fmt](path)
    except DataError as exc:
        return Validation(0, exc.problems)
    return Validation(len(records), warnings=long_text_warnings(path, records))


def validate(path: str | Path, fmt: str = "auto", mapping: dict[str, str] | None = None) -> tuple[int, list[Problem]]:
    """(number of valid records, every problem found) for a file in format `fmt` ('auto' detects)."""
    result = check_file(path, fmt, mapping)
    return result.count, result.problems

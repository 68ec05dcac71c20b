"""Reading raw files: UTF-8 text, JSON, JSON Lines and CSV, with errors that name file and line.

Readers collect problems instead of stopping at the first one, so `medmoe data validate` can list
every problem in a file at once; loaders raise them together as one DataError.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medmoe.errors import DataError, Problem


def read_text(path: str | Path) -> str:
    """The whole file as text; a missing file or bytes that are not UTF-8 raise a DataError."""
    path = Path(path)
    if not path.exists():
        raise DataError.single(path, "file does not exist")
    if path.is_dir():
        raise DataError.single(path, "is a folder, not a file")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError.single(
            path, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); re-save the file as UTF-8", line=line
        ) from None


def read_json(path: str | Path) -> Any:
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError.single(path, f"malformed JSON: {exc.msg} (column {exc.colno})", line=exc.lineno) from None


Location = dict[str, Any]  # Problem keyword arguments: {"line": 3} or {"record": "17"}
Rows = Iterator[tuple[Location, dict[str, Any]]]


def iter_jsonl(path: str | Path, problems: list[Problem]) -> Rows:
    """(location, object) for each non-blank line; malformed lines are added to `problems`."""
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(Problem(str(path), f"malformed JSON: {exc.msg} (column {exc.colno})", line=number))
            continue
        if not isinstance(obj, dict):
            problems.append(Problem(str(path), f"expected a JSON object, got {type(obj).__name__}", line=number))
            continue
        yield {"line": number}, obj


def iter_csv(path: str | Path, problems: list[Problem]) -> Rows:
    """(location, row as dict by header) for each data row; ragged rows go to `problems`."""
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    try:
        header = next(reader)
    except StopIteration:
        problems.append(Problem(str(path), "empty CSV file (no header row)"))
        return
    header = [h.strip() for h in header]
    for row in reader:
        number = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            problems.append(Problem(str(path), f"row has {len(row)} cells, the header has {len(header)}", line=number))
            continue
        yield {"line": number}, dict(zip(header, row))


def iter_rows(path: str | Path, problems: list[Problem]) -> Rows:
    """Rows of a JSONL, JSON (a list of objects) or CSV file, chosen by extension."""
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        yield from iter_jsonl(path, problems)
    elif suffix == ".csv":
        yield from iter_csv(path, problems)
    elif suffix == ".json":
        data = read_json(path)
        if not isinstance(data, list):
            raise DataError.single(path, f"expected a JSON list of records, got {type(data).__name__}")
        for index, obj in enumerate(data, start=1):
            if not isinstance(obj, dict):
                problems.append(Problem(str(path), f"expected a JSON object, got {type(obj).__name__}", record=str(index)))
                continue
            yield {"record": str(index)}, obj
    else:
        raise DataError.single(path, f"unsupported file type '{suffix}': use .jsonl, .json or .csv")

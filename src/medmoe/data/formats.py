"""One loader per source format. Each reads a file (or folder) and returns validated Records.

A loader either returns every record of its file or raises one DataError listing every problem:
nothing is half-loaded silently.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medmoe.data.build import RowChecker, make_record
from medmoe.data.readers import iter_csv, iter_jsonl, read_json
from medmoe.data.record import LETTERS, Record
from medmoe.errors import DataError

PUBMEDQA_OPTIONS = ("yes", "no", "maybe")


def load_pubmedqa(path: str | Path) -> list[Record]:
    """PubMedQA PQA-L `ori_pqal.json`: {PMID: {QUESTION, CONTEXTS, final_decision, MESHES, ...}}."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError.single(path, f"expected a JSON object keyed by PMID, got {type(data).__name__}")
    check = RowChecker(path)
    records = []
    for pmid, row in data.items():
        loc = {"record": pmid}
        if not isinstance(row, dict):
            check.add(loc, f"expected an object, got {type(row).__name__}")
            continue
        decision = check.field(row, "final_decision", loc)
        contexts = check.field(row, "CONTEXTS", loc)
        if decision is not None and decision not in PUBMEDQA_OPTIONS:
            check.add(loc, f"final_decision {decision!r} is not one of yes/no/maybe")
            continue
        if contexts is not None and not isinstance(contexts, list):
            check.add(loc, "CONTEXTS must be a list of abstract sections")
            continue
        record = make_record(
            check,
            loc,
            id=f"pubmedqa/{pmid}",
            question=check.field(row, "QUESTION", loc),
            answer=None if decision is None else LETTERS[PUBMEDQA_OPTIONS.index(decision)],
            options=PUBMEDQA_OPTIONS,
            context=" ".join(contexts or []),
            explanation=row.get("LONG_ANSWER"),
            metadata={"pmid": pmid, "meshes": list(row.get("MESHES") or []), "year": row.get("YEAR"),
                      "labels": list(row.get("LABELS") or [])},
        )
        if record:
            records.append(record)
    check.raise_if_any()
    return records


def load_medmcqa(path: str | Path) -> list[Record]:
    """MedMCQA JSON Lines: {id, question, opa..opd, cop (1-based), exp, subject_name, choice_type}."""
    check = RowChecker(path)
    records = []
    for loc, row in iter_jsonl(path, check.problems):
        cop = check.field(row, "cop", loc)
        if cop is not None and cop not in (1, 2, 3, 4):
            check.add(loc, f"cop {cop!r} is not an option number 1-4")
            continue
        record = make_record(
            check,
            loc,
            id=f"medmcqa/{check.field(row, 'id', loc)}",
            question=check.field(row, "question", loc),
            answer=None if cop is None else LETTERS[cop - 1],
            options=[check.field(row, f"op{k}", loc) for k in "abcd"],
            explanation=row.get("exp"),
            metadata={"subject": row.get("subject_name"), "topic": row.get("topic_name"),
                      "choice_type": row.get("choice_type")},
        )
        if record:
            records.append(record)
    check.raise_if_any()
    return records


def load_cmmlu(folder: str | Path, subjects: list[str] | None = None) -> list[Record]:
    """A CMMLU split folder of `<subject>.csv` files with header `,Question,A,B,C,D,Answer`."""
    folder = Path(folder)
    files = sorted(folder.glob("*.csv"))
    if not files:
        raise DataError.single(folder, "no CMMLU .csv files in this folder")
    if subjects is not None:
        known = {f.stem for f in files}
        unknown = sorted(set(subjects) - known)
        if unknown:
            raise DataError.single(folder, f"unknown CMMLU subject(s) {', '.join(unknown)}")
        files = [f for f in files if f.stem in subjects]
    records, problems = [], []
    for file in files:
        check = RowChecker(file)
        for index, (loc, row) in enumerate(iter_csv(file, check.problems)):
            record = make_record(
                check,
                loc,
                id=f"cmmlu/{folder.name}/{file.stem}/{index}",
                question=check.field(row, "Question", loc),
                answer=check.field(row, "Answer", loc),
                options=[check.field(row, k, loc) for k in "ABCD"],
                metadata={"subject": file.stem},
            )
            if record:
                records.append(record)
        problems += check.problems
    if problems:
        raise DataError(problems)
    return records


def load_cmexam(path: str | Path, skip_lines: frozenset[int] = frozenset()) -> list[Record]:
    """CMExam rows {Question, Options ("A text\\nB text..." with a literal backslash-n), Answer, Explanation}.

    skip_lines: line numbers of known upstream defects to leave out (see datasets.py).
    """
    check = RowChecker(path)
    records = []
    for loc, row in iter_jsonl(path, check.problems):
        if loc["line"] in skip_lines:
            continue
        raw_options = check.field(row, "Options", loc)
        options: list[str] = []
        if raw_options is not None:
            for i, part in enumerate(str(raw_options).replace("\\n", "\n").split("\n")):
                part = part.strip()
                if not part.startswith(LETTERS[i]):
                    check.add(loc, f"option {i + 1} does not start with its letter {LETTERS[i]}: {part[:30]!r}")
                options.append(part[1:].strip())
        answer = check.field(row, "Answer", loc)
        record = make_record(
            check,
            loc,
            id=f"cmexam/{loc.get('line', loc.get('record'))}",
            question=check.field(row, "Question", loc),
            answer=answer,
            options=options,
            explanation=row.get("Explanation"),
            metadata={"multi_answer": answer is not None and len(str(answer).strip()) > 1},
        )
        if record:
            records.append(record)
    check.raise_if_any()
    return records


def load_cmb_clin(path: str | Path) -> list[Record]:
    """CMB-Clin: [{id, title, description, QA_pairs: [{question, answer|solution}]}]; one record per pair."""
    data = read_json(path)
    if not isinstance(data, list):
        raise DataError.single(path, f"expected a JSON list of cases, got {type(data).__name__}")
    check = RowChecker(path)
    records = []
    for case in data:
        case_id = str(case.get("id")) if isinstance(case, dict) else "?"
        loc = {"record": case_id}
        pairs = check.field(case, "QA_pairs", loc) if isinstance(case, dict) else None
        for j, pair in enumerate(pairs or []):
            pair_loc = {"record": f"{case_id}/QA_pairs[{j}]"}
            answer = pair.get("answer", pair.get("solution"))
            if answer is None:
                check.add(pair_loc, "missing field 'answer' (or 'solution')")
            record = make_record(
                check,
                pair_loc,
                id=f"cmb-clin/{case_id}/{j}",
                question=check.field(pair, "question", pair_loc),
                answer=answer,
                context=f"{case.get('title', '')}\n{case.get('description', '')}".strip(),
                metadata={"case": case_id, "title": case.get("title")},
            )
            if record:
                records.append(record)
    check.raise_if_any()
    return records


def load_cmb_exam(path: str | Path) -> list[Record]:
    """CMB-Exam's public JSON: [{question, option: {A: .., B: ..}, answer, exam_type, exam_class, ...}].

    The questions are not bundled (not openly available offline); this reads a user's own copy with
    answers (CMB's val split, or test merged with its answer file).
    """
    data = read_json(path)
    if not isinstance(data, list):
        raise DataError.single(path, f"expected a JSON list of questions, got {type(data).__name__}")
    check = RowChecker(path)
    records = []
    for index, row in enumerate(data, start=1):
        loc = {"record": str(row.get("id", index)) if isinstance(row, dict) else str(index)}
        if not isinstance(row, dict):
            check.add(loc, f"expected an object, got {type(row).__name__}")
            continue
        option_map: Any = check.field(row, "option", loc)
        if option_map is not None and not isinstance(option_map, dict):
            check.add(loc, "field 'option' must map letters to option texts")
            continue
        option_map = option_map or {}
        keys = sorted(option_map)
        if keys and keys != list(LETTERS[: len(keys)]):
            check.add(loc, f"option letters {''.join(keys)} are not consecutive from A")
            continue
        record = make_record(
            check,
            loc,
            id=f"cmb-exam/{row.get('id', index)}",
            question=check.field(row, "question", loc),
            answer=check.field(row, "answer", loc),
            options=[option_map[k] for k in keys],
            explanation=row.get("explanation"),
            metadata={k: row.get(k) for k in ("exam_type", "exam_class", "exam_subject", "question_type")},
        )
        if record:
            records.append(record)
    check.raise_if_any()
    return records

"""Scoring a model on a list of records: per-example JSONL (resumable) and a summary.

Each finished example is appended to the predictions file at once, so an interrupted run keeps what
it did; running again with the same output skips the ids already there.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from medmoe.data.record import Record
from medmoe.eval.metrics import accuracy, bootstrap_interval, macro_f1, percentile
from medmoe.eval.prompts import build_prompt
from medmoe.eval.scoring import score_options
from medmoe.errors import DataError


def progress_bar(description: str) -> Progress:
    """The one progress-bar style of medmoe's long steps."""
    return Progress(
        TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
    )


def read_done(path: Path) -> dict[str, dict[str, Any]]:
    """Examples already in a predictions file, by id (a torn last line from a crash is ignored)."""
    done: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return done
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break  # the write that was interrupted
            raise DataError.single(path, "malformed JSON in a predictions file; delete it to start over", line=number) from None
        done[row["id"]] = row
    return done


def score_record(model: Any, tokenizer: Any, record: Record, shots: Sequence[Record] = ()) -> dict[str, Any]:
    """One example: per-option log-likelihoods, prediction, correctness and wall-clock latency."""
    prompt = build_prompt(record, tokenizer, shots)
    start = time.perf_counter()
    scores = score_options(model, tokenizer, prompt.context, prompt.continuations)
    latency_ms = (time.perf_counter() - start) * 1000
    probs = scores.probabilities()
    best = max(range(len(probs)), key=probs.__getitem__)
    prediction = record.letters[best]
    return {
        "id": record.id,
        "prediction": prediction,
        "gold": record.answer,
        "correct": prediction == record.answer,
        "option_logprobs": scores.logprobs,
        "option_probs": probs,
        "latency_ms": latency_ms,
        "tokens": scores.context_tokens,
    }


def run_records(
    model: Any, tokenizer: Any, records: Sequence[Record], output: Path, description: str = "scoring"
) -> list[dict[str, Any]]:
    """Score every record not yet in `output` (appending as it goes); return all rows in record order."""
    output.parent.mkdir(parents=True, exist_ok=True)
    done = read_done(output)
    todo = [r for r in records if r.id not in done]
    with progress_bar(description) as bar, output.open("a", encoding="utf-8") as sink:
        task = bar.add_task(description, total=len(records), completed=len(records) - len(todo))
        for record in todo:
            row = score_record(model, tokenizer, record)
            sink.write(json.dumps(row, ensure_ascii=False) + "\n")
            sink.flush()
            done[record.id] = row
            bar.advance(task)
    return [done[r.id] for r in records]


@dataclass
class Summary:
    examples: int
    accuracy: float
    accuracy_ci: tuple[float, float]
    macro_f1: float
    macro_f1_ci: tuple[float, float]
    latency_p50_ms: float
    latency_p95_ms: float


def summarize(rows: Iterable[dict[str, Any]]) -> Summary:
    rows = list(rows)
    gold = [r["gold"] for r in rows]
    pred = [r["prediction"] for r in rows]
    latency = [r["latency_ms"] for r in rows]
    return Summary(
        examples=len(rows),
        accuracy=accuracy(gold, pred),
        accuracy_ci=bootstrap_interval(accuracy, gold, pred),
        macro_f1=macro_f1(gold, pred),
        macro_f1_ci=bootstrap_interval(macro_f1, gold, pred),
        latency_p50_ms=percentile(latency, 50),
        latency_p95_ms=percentile(latency, 95),
    )

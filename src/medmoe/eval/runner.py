"""Running a model on a benchmark: per-example JSONL rows, written as they finish (resumable).

Each finished example is appended to `<folder>/<benchmark>/predictions.jsonl` at once, so an
interrupted run keeps what it did; running again with the same output skips the ids already there.
A run folder remembers its settings (run.json); resuming with different settings is an error rather
than a silent mix of two runs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from medmoe.data.record import Record
from medmoe.errors import DataError, MedmoeError
from medmoe.eval.benchmarks import Benchmark
from medmoe.eval.model import EvalModel
from medmoe.eval.prompts import build_prompt, language_of
from medmoe.eval.rules import CONTINUATIONS, Outcome, apply_rule, check_rule
from medmoe.eval.textmetrics import BertScorer, load_bertscorer, rouge_l
from medmoe.eval.window import PromptFitter
from medmoe.paths import atomic_write_json

OPEN_MAX_NEW_TOKENS = 128


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


def end_cleanly(path: Path) -> None:
    """Make a predictions file end with a newline before rows are appended to it: a torn last line from
    a crash is cut off (read_done ignores it), a complete one missing its newline gets it."""
    data = path.read_bytes() if path.exists() else b""
    if not data or data.endswith(b"\n"):
        return
    start = data.rfind(b"\n") + 1
    try:
        json.loads(data[start:])
    except ValueError:
        with path.open("r+b") as handle:
            handle.truncate(start)
        return
    with path.open("ab") as handle:
        handle.write(b"\n")


_CLAIMS: dict[Path, Any] = {}  # folder -> open lock file, held until the process exits


def claim_folder(folder: Path) -> None:
    """Take an exclusive lock on a run folder: two processes appending to one run would mix rows."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    if folder.resolve() in _CLAIMS:
        return
    handle = (folder / ".lock").open("w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise DataError.single(folder, "another medmoe eval is writing to this folder; wait for it or use another --output") from None
    _CLAIMS[folder.resolve()] = handle


PLACEMENT_SETTINGS = {"dtype": "float32", "device": "cpu"}  # what a run.json written before these keys was computed in


def check_settings(folder: Path, settings: dict[str, Any]) -> None:
    """Write run.json, or check that a resumed run uses the same settings as the one it continues.
    A run.json without dtype/device (written before `medmoe eval --dtype/--device`) holds float32 rows
    computed on the CPU (PLACEMENT_SETTINGS); rows of another dtype or device are never mixed into them."""
    path = folder / "run.json"
    if path.exists():
        before = json.loads(path.read_text(encoding="utf-8"))
        was = {k: before.get(k, PLACEMENT_SETTINGS.get(k)) for k in settings}
        changed = {k: (was[k], v) for k, v in settings.items() if was[k] != v}
        if changed:
            what = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            flags = " ".join(f"--{k} {a}" for k, (a, _) in changed.items() if k in PLACEMENT_SETTINGS)
            hint = f"use another --output, or {flags} to add to its rows" if flags else "use another --output"
            raise DataError.single(path, f"this folder holds a run with other settings ({what}); {hint}")
        return
    atomic_write_json(path, settings)


def check_counts(shots: int = 0, batch_size: int = 1, max_new_tokens: int = 1, limit: int | None = None) -> None:
    """The run's integer settings, each in its range: -5 as a limit silently meant 'all but 5'."""
    for name, value, least in (("shots", shots, 0), ("batch_size", batch_size, 1), ("max_new_tokens", max_new_tokens, 1),
                               ("limit", 1 if limit is None else limit, 1)):
        if value < least:
            raise MedmoeError(f"{name} must be >= {least}, got {value}")


def check_unique_ids(bench: Benchmark) -> None:
    """Rows are keyed by id: two records sharing one would both be scored by the second's row."""
    seen: set[str] = set()
    for record in bench.records:
        if record.id in seen:
            raise DataError.single(bench.name, f"duplicate id {record.id!r}: ids must be unique, eval results are keyed by id")
        seen.add(record.id)


def _choice_row(record: Record, bench: Benchmark, rule: str, k: int, outcome: Outcome, truncated: int) -> dict[str, Any]:
    row = {
        "id": record.id,
        "benchmark": bench.name,
        "group": record.metadata.get(bench.group_by) if bench.group_by else None,
        "rule": rule,
        "shots": k,
        "prediction": outcome.prediction,
        "gold": record.answer,
        "correct": outcome.prediction == record.answer,
        "scores": outcome.scores,
        "probs": outcome.probs,
        "generation": outcome.generation,
        "extraction": outcome.extraction,
        "latency_ms": outcome.latency_ms,
        "prompt_tokens": outcome.prompt_tokens,
        "new_tokens": outcome.new_tokens,
        "truncated_tokens": truncated,
    }
    if outcome.route is not None:
        row["route"] = outcome.route
    return row


def _open_row(model: EvalModel, record: Record, bench: Benchmark, scorer: BertScorer, max_new_tokens: int) -> dict[str, Any]:
    record, truncated = PromptFitter(model, "none", new_tokens=max_new_tokens).fit(record)
    prompt = build_prompt(record, model.tokenizer, (), "none")
    start = time.perf_counter()
    gen = model.generate(prompt.context, max_new_tokens)
    latency_ms = (time.perf_counter() - start) * 1000
    precision, recall, f1 = scorer.score(gen.text, record.answer)
    row: dict[str, Any] = {
        "id": record.id, "benchmark": bench.name, "group": None, "rule": "generate", "shots": 0,
        "prediction": gen.text, "gold": record.answer,
        "rouge_l": rouge_l(gen.text, record.answer),
        "bertscore_p": precision, "bertscore_r": recall, "bertscore_f1": f1, "bertscore_encoder": scorer.name,
        "latency_ms": latency_ms, "prompt_tokens": gen.prompt_tokens, "new_tokens": gen.new_tokens,
        "truncated_tokens": truncated,
    }
    route = model.last_route()
    if route is not None:
        row["route"] = route
    return row


def run_benchmark(
    model: EvalModel,
    bench: Benchmark,
    output: Path,
    rule: str = "letter",
    shots: int = 0,
    batch_size: int = 1,
    max_new_tokens: int = 32,
    bertscorer: Callable[[str], BertScorer] = load_bertscorer,
) -> list[dict[str, Any]]:
    """Score every record of `bench` not yet in `output` (appending as it goes); rows in record order.

    Option questions use `rule`; open-ended ones (CMB-Clin) are generated (OPEN_MAX_NEW_TOKENS) and
    scored with ROUGE-L and BERTScore, whose encoder `bertscorer(language)` loads once per language.
    Prompts longer than the model's window are cut first (medmoe.eval.window; rows say by how much).
    """
    check_rule(rule)
    check_counts(shots, batch_size, max_new_tokens)
    check_unique_ids(bench)
    if hasattr(model, "reset"):
        model.reset()  # start cold: identical runs give identical scores, bit for bit
    output.parent.mkdir(parents=True, exist_ok=True)
    done = read_done(output)
    end_cleanly(output)
    todo = [r for r in bench.records if r.id not in done]
    scorers: dict[str, BertScorer] = {}
    step = batch_size if rule != "generate" and bench.task != "open" else 1  # open questions: one at a time
    fitter = PromptFitter(model, CONTINUATIONS[rule], bench.multi, max_new_tokens if rule == "generate" else 0)
    with progress_bar(bench.name) as bar, output.open("a", encoding="utf-8") as sink:
        task = bar.add_task(bench.name, total=len(bench.records), completed=len(bench.records) - len(todo))
        for start in range(0, len(todo), step):
            chunk = todo[start:start + step]
            if bench.task == "open":
                language = language_of(chunk[0])
                if language not in scorers:
                    scorers[language] = bertscorer(language)
                rows = [_open_row(model, chunk[0], bench, scorers[language], OPEN_MAX_NEW_TOKENS)]
            else:
                shot_lists = [bench.shots_for(r, shots) for r in chunk]
                fitted, truncated = zip(*(fitter.fit(r, s) for r, s in zip(chunk, shot_lists)))
                outcomes = apply_rule(model, fitted, rule, shot_lists, bench.multi, max_new_tokens)
                rows = [_choice_row(r, bench, rule, len(s), o, t) for r, s, o, t in zip(chunk, shot_lists, outcomes, truncated)]
            for row in rows:
                sink.write(json.dumps(row, ensure_ascii=False) + "\n")
                done[row["id"]] = row
            sink.flush()
            bar.advance(task, len(rows))
    return [done[r.id] for r in bench.records]


def run_records(model: EvalModel, records: Sequence[Record], output: Path, name: str = "records", rule: str = "letter") -> list[dict[str, Any]]:
    """Zero-shot scoring of plain records (what `medmoe run` does)."""
    return run_benchmark(model, Benchmark(name, list(records)), output, rule)

"""One evaluation run: a model on several benchmarks -> a folder of results.

  <output>/run.json                      the settings (a resumed run must match them)
  <output>/<benchmark>/predictions.jsonl per-example rows (resumable)
  <output>/summary.json                  per-benchmark summaries (report.py)
  <output>/report.md                     markdown table with 95% bootstrap intervals
  <output>/results.png                   bar chart of the headline metrics with intervals
"""

from __future__ import annotations

import datetime
import platform
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medmoe.errors import MedmoeError
from medmoe.eval.benchmarks import load_benchmark
from medmoe.eval.model import EvalModel
from medmoe.eval.report import markdown_table, plot, summarize_rows
from medmoe.eval.runner import check_counts, check_settings, claim_folder, run_benchmark
from medmoe.eval.textmetrics import load_bertscorer
from medmoe.eval.window import check_room
from medmoe.paths import atomic_write_bytes, atomic_write_json


def folder_name(benchmark: str) -> str:
    """A benchmark's subfolder: its name, or a file's stem for cmb-exam:PATH and user files."""
    if benchmark.startswith("cmb-exam:") or "/" in benchmark or "." in benchmark:
        return "file-" + re.sub(r"[^A-Za-z0-9_-]+", "_", Path(benchmark.split(":", 1)[-1]).stem)
    return benchmark


def truncation_warnings(summaries: dict[str, dict[str, Any]]) -> list[str]:
    """One line per benchmark some of whose prompts were cut to the model's window (medmoe.eval.window)."""
    return [f"{name}: {s['truncated_prompts']} of {s['examples']} prompts were longer than the model's window and were cut "
            "(context first, then the start of the question; rows say how many tokens: truncated_tokens)"
            for name, s in summaries.items() if s.get("truncated_prompts")]


def evaluate(
    model: EvalModel,
    benchmarks: list[str],
    output: Path,
    rule: str = "letter",
    shots: int = 0,
    limit: int | None = None,
    batch_size: int = 1,
    max_new_tokens: int = 32,
    shots_from: str | None = None,
    settings: dict[str, Any] | None = None,
    bertscorer: Callable[[str], Any] = load_bertscorer,
) -> dict[str, Any]:
    """Run every benchmark (resuming what `output` already holds); write and return the summary.

    Data problems (duplicate ids, bad rows) and settings out of range fail here, before anything is scored."""
    check_counts(shots, batch_size, max_new_tokens, limit)
    benches = {name: load_benchmark(name, limit, shots_from) for name in benchmarks}
    open_ended = [name for name, bench in benches.items() if bench.task == "open"]
    if open_ended and not hasattr(model, "generate"):
        raise MedmoeError(f"{model.name} answers option questions only; open-ended benchmarks: {', '.join(open_ended)}")
    check_room(model, max_new_tokens if rule == "generate" else 0)
    output.mkdir(parents=True, exist_ok=True)
    run = {"model": model.name, "rule": rule, "shots": shots, "limit": limit, "max_new_tokens": max_new_tokens,
           "shots_from": shots_from, **(settings or {})}
    claim_folder(output)
    check_settings(output, run)
    summaries: dict[str, dict[str, Any]] = {}
    for name, bench in benches.items():
        rows = run_benchmark(model, bench, output / folder_name(name) / "predictions.jsonl", rule, shots,
                             batch_size, max_new_tokens, bertscorer)
        summary = summarize_rows(rows)
        summary["shots"] = rows[0]["shots"] if rows else 0
        summary["rule"] = rows[0]["rule"] if rows else rule
        summary["truncated_prompts"] = sum(1 for row in rows if row.get("truncated_tokens"))
        summaries[name] = summary
    result = {
        "settings": run,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": platform.platform(),
        "benchmarks": summaries,
    }
    atomic_write_json(output / "summary.json", result)
    title = f"{model.name}, rule {rule}, {shots}-shot" + (f", subsample {limit}" if limit else "")
    table = f"# {title}\n\n" + markdown_table(summaries)
    table += "".join(f"\nWarning: {line}\n" for line in truncation_warnings(summaries))
    atomic_write_bytes(output / "report.md", table.encode("utf-8"))
    plot(summaries, output / "results.png", title)
    return result

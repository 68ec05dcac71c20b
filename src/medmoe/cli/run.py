"""`medmoe run`: the main job on the embedded default (bundled model and data)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def run(
    model: str = typer.Option("smollm2-135m", help="Bundled short name, Hugging Face hub id or local path."),
    dataset: str = typer.Option("pubmedqa", help="Bundled dataset (see `medmoe data list`) or a file."),
    split: str = typer.Option("test", help="Split to evaluate (the official test split by default)."),
    limit: Optional[int] = typer.Option(None, help="Score only the first N examples (for a quick look)."),
    output: Optional[Path] = typer.Option(None, help="Folder for predictions.jsonl and summary.json [default: runs/MODEL-DATASET-SPLIT]."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads [default: all cores]."),
) -> None:
    """Score a model zero-shot on a benchmark by option log-likelihood (PubMedQA yes/no/maybe by default).

    Prints accuracy, macro-F1 (with 95% bootstrap intervals) and latency; writes per-example
    predictions to JSONL. Interrupted runs resume: run the same command again.
    """
    import torch

    from medmoe.data import load_dataset
    from medmoe.eval.runner import run_records, summarize
    from medmoe.models import load_causal_lm

    if threads:
        torch.set_num_threads(threads)
    records = load_dataset(dataset, split)[:limit]
    folder = output or Path("runs") / f"{Path(model).name}-{Path(dataset).stem}-{split}"
    with console.status(f"loading {model} (the first time, bundled GGUF weights are dequantized and cached)..."):
        lm, tokenizer = load_causal_lm(model)
    rows = run_records(lm, tokenizer, records, folder / "predictions.jsonl", f"{dataset} {split}")
    summary = summarize(rows)
    (folder / "summary.json").write_text(json.dumps({"model": model, "dataset": dataset, "split": split, **asdict(summary)}, indent=2) + "\n")
    table = Table("metric", "value", "95% interval", title=f"{model} on {dataset} {split} ({summary.examples} examples, zero-shot)")
    table.add_row("accuracy", f"{summary.accuracy:.3f}", "{:.3f} - {:.3f}".format(*summary.accuracy_ci))
    table.add_row("macro-F1", f"{summary.macro_f1:.3f}", "{:.3f} - {:.3f}".format(*summary.macro_f1_ci))
    table.add_row("latency p50", f"{summary.latency_p50_ms:.0f} ms", "")
    table.add_row("latency p95", f"{summary.latency_p95_ms:.0f} ms", "")
    console.print(table)
    console.print(f"predictions: {folder / 'predictions.jsonl'}")


def register(app: typer.Typer) -> None:
    app.command("run")(run)

"""`medmoe run`: the main job on the embedded default (bundled model and data)."""

from __future__ import annotations

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

    from medmoe.paths import atomic_write_json

    from medmoe.data import load_dataset
    from medmoe.eval.model import HFEvalModel
    from medmoe.eval.report import summarize_rows
    from medmoe.eval.runner import run_records
    from medmoe.models import load_causal_lm

    if threads:
        torch.set_num_threads(threads)
    records = load_dataset(dataset, split)[:limit]
    folder = output or Path("runs") / f"{Path(model).name}-{Path(dataset).stem}-{split}"
    with console.status(f"loading {model} (the first time, bundled GGUF weights are dequantized and cached)..."):
        lm, tokenizer = load_causal_lm(model)
    rows = run_records(HFEvalModel(lm, tokenizer, model), records, folder / "predictions.jsonl", dataset)
    summary = summarize_rows(rows)
    atomic_write_json(folder / "summary.json", {"model": model, "dataset": dataset, "split": split, **summary})
    table = Table("metric", "value", "95% interval", title=f"{model} on {dataset} {split} ({summary['examples']} examples, zero-shot)")
    for key in ("accuracy", "macro_f1", "rouge_l", "bertscore_f1"):
        if key in summary:
            table.add_row(key, f"{summary[key]:.3f}", "{:.3f} - {:.3f}".format(*summary[f"{key}_ci"]))
    table.add_row("latency p50", f"{summary['latency_p50_ms']:.0f} ms", "")
    table.add_row("latency p95", f"{summary['latency_p95_ms']:.0f} ms", "")
    console.print(table)
    console.print(f"predictions: {folder / 'predictions.jsonl'}")


def register(app: typer.Typer) -> None:
    app.command("run")(run)

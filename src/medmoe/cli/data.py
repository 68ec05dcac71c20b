"""`medmoe data ...`: list, show, stats and validate medical QA datasets."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

console = Console()
data_app = typer.Typer(help="Bundled medical QA datasets and your own files: list, show, stats, validate.\n\nExample: medmoe data list",
                       no_args_is_help=True)


@data_app.command("list")
def list_datasets() -> None:
    """List the bundled datasets with their splits, language and licence.

    Example: medmoe data list
    """
    from medmoe.data import DATASETS, load_splits

    table = Table("name", "language", "task", "splits (records)", "licence", "description")
    for name, (info, _) in DATASETS.items():
        splits = ", ".join(f"{k} {len(v)}" for k, v in load_splits(name).items())
        table.add_row(name, info.language, info.task, splits, info.license, info.description)
    console.print(table)


@data_app.command()
def show(
    name: str = typer.Argument(..., help="Bundled dataset name (see `medmoe data list`) or a file path."),
    split: str = typer.Option("test", help="Split to show."),
    n: int = typer.Option(3, "-n", min=1, help="How many records."),
    id: str | None = typer.Option(None, "--id", help="Show the record with this id."),
) -> None:
    """Print records as JSON, to see exactly what a model is given.

    Example: medmoe data show dental --split train -n 2
    """
    from medmoe.data import load_dataset
    from medmoe.errors import DataError

    records = load_dataset(name, split)
    if id is not None:
        records = [r for r in records if r.id == id]
        if not records:
            raise DataError.single(name, f"no record with id '{id}' in split '{split}'")
    for record in records[:n]:
        console.print_json(json.dumps(record.to_dict(), ensure_ascii=False))


@data_app.command()
def stats(name: str = typer.Argument(..., help="Bundled dataset name or a file path.")) -> None:
    """Records per split, option and answer distributions, lengths (words for English, characters for Chinese).

    Example: medmoe data stats pubmedqa
    """
    from medmoe.data import DATASETS, load_dataset, load_splits
    from medmoe.data.stats import split_stats

    splits = load_splits(name) if name in DATASETS else {"file": load_dataset(name)}
    table = Table("split", "statistic", "value", title=f"{name}")
    for split, records in splits.items():
        for key, value in split_stats(records).items():
            table.add_row(split, key, str(value))
    console.print(table)


@data_app.command()
def validate(
    path: str = typer.Argument(..., help="A JSONL, JSON or CSV file (or a CMMLU folder)."),
    format: str = typer.Option("auto", "--format", help="auto, generic, pubmedqa, medmcqa, cmexam, cmmlu, cmb-clin, cmb-exam."),
    map: str | None = typer.Option(None, "--map", help="Generic format field mapping, e.g. 'question=Q,answer=label,options=opa|opb|opc|opd'."),
) -> None:
    """List every problem in a file at once (file, line or record, and what is wrong). Exit 1 if any.

    Warnings (very long questions, contexts or options) do not fail the file.

    Example: medmoe data validate my_questions.jsonl --map "question=Q,answer=label,options=opa|opb|opc|opd"
    """
    from medmoe.data import parse_mapping
    from medmoe.data.validate import check_file

    result = check_file(path, format, parse_mapping(map))
    for problem in result.problems:
        console.print(f"[red]{problem}[/]", highlight=False, soft_wrap=True)
    if result.problems:
        console.print(f"{len(result.problems)} problem(s) in {path}")
        raise typer.Exit(1)
    for warning in result.warnings:
        console.print(f"[yellow]warning: {warning}[/]", highlight=False, soft_wrap=True)
    console.print(f"[green]ok[/]: {result.count} valid records in {path}"
                  + (f", {len(result.warnings)} warning(s)" if result.warnings else ""))


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")

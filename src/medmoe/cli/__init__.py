"""The `medmoe` command. Thin: parses arguments and calls the core.

Each area of the command lives in its own module here, exposing `register(app)`. Heavy imports
(torch, transformers) happen inside commands, so `medmoe --help` stays fast.
"""

from __future__ import annotations

import importlib
import sys

import typer
from rich.console import Console
from rich.markup import escape

from medmoe.errors import MedmoeError

app = typer.Typer(
    name="medmoe",
    help=(
        "Efficient clinical question answering with mixture-of-experts routing.\n\n"
        "Start with `medmoe run` (the main job on the bundled model and data), `medmoe data list` "
        "and `medmoe models list`."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# One module per area; each defines register(app). Add a new area by adding its module name here.
COMMAND_MODULES = ["mambaformer", "eval", "data", "models", "distill", "router", "train", "finetune", "serve"]

for _name in COMMAND_MODULES:
    importlib.import_module(f"medmoe.cli.{_name}").register(app)

err_console = Console(stderr=True)


def main() -> None:
    """Entry point: user-facing errors print as one red line and exit 2, not as tracebacks."""
    try:
        app()
    except MedmoeError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)  # "medmoe[serve]" is not markup
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        sys.exit(130)

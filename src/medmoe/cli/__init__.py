"""The `medmoe` command. Thin: parses arguments and calls the core.

The tree, by method (litgpt-style); the everyday commands also sit at the top level:

    medmoe run | ask                      the routed MambaFormer system (= `medmoe mambaformer run | ask`)
    medmoe finetune                       LoRA-MoE, LoRA or full fine-tuning (= `medmoe loramoe finetune`)
    medmoe eval | export-lm-eval | serve  any model, or the routed system
    medmoe export                         an adapter in PEFT's layout with its model card; --merge a plain LoRA
    medmoe heads train                    an expert's output head or calibration for a benchmark
    medmoe data ... | models ...          datasets and the model zoo
    medmoe mambaformer run | ask | distill | distill-task | expert | profile | calibrate | gate {lexicon, train, calibrate, pareto}
    medmoe loramoe finetune | routing

One flag vocabulary: `--model` (a model), `--data` (datasets or a file), `--output/-o` (what a
command writes); `--router` is always a MambaFormer gate checkpoint folder. `run`, `finetune`,
`mambaformer distill`, `mambaformer distill-task` and `mambaformer expert` take `--config FILE.yaml` (cli/config_file.py).
Old command and flag names still work for one release, hidden, with a notice (cli/deprecated.py).

Each area lives in its own module here, exposing `register(app)`. Heavy imports (torch,
transformers) happen inside commands, so `medmoe --help` stays fast.
"""

from __future__ import annotations

import importlib
import sys
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from medmoe.errors import MedmoeError
from medmoe.paths import DiskFull, is_disk_full

app = typer.Typer(
    name="medmoe",
    help=(
        "Efficient clinical question answering with mixture-of-experts routing.\n\n"
        "Start with `medmoe run` (the main job on the bundled model and data), `medmoe data list` "
        "and `medmoe models list`; the methods' own commands are under `medmoe mambaformer` and `medmoe loramoe`."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# One module per area; each defines register(app), in the order of `medmoe --help`.
COMMAND_MODULES = ["mambaformer", "finetune", "eval", "export", "heads", "serve", "data", "models", "deprecated"]

for _name in COMMAND_MODULES:
    importlib.import_module(f"medmoe.cli.{_name}").register(app)

err_console = Console(stderr=True)


def fail(message: str) -> NoReturn:
    """Print a user-facing error as one red line and exit 2."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)  # "medmoe[serve]" is not markup
    sys.exit(2)


def main() -> None:
    """Entry point: user-facing errors print as one red line and exit 2, not as tracebacks."""
    try:
        app()
    except (MedmoeError, DiskFull) as exc:
        fail(str(exc))
    except Exception as exc:  # a write that filled the device outside medmoe's atomic writers (e.g. a JSONL append)
        if not is_disk_full(exc):
            raise
        fail(f"no space left on the device while writing {getattr(exc, 'filename', None) or 'a file'}: free some space, or write elsewhere "
             "(--output, $MEDMOE_HOME), and run the command again; resumable runs keep every step already saved")
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        sys.exit(130)

"""`--dtype` and `--device` for any command that loads a model: one parser (medmoe.models.placement).

    dtype: str = dtype_option("auto", help="...")     # auto | float32 | bfloat16 | float16 (bf16, fp32 ...)
    device: str = device_option("auto", help="...")   # auto | cpu | cuda | cuda:N | mps

Each checks its value while the command line is parsed, so a bad one is a usage error naming the
flag and the choices before anything loads; the value comes through normalised ("bf16" -> "bfloat16").
`auto` is resolved where the model is loaded (`placement.resolve_device` / `resolve_dtype`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import typer

from medmoe.errors import ModelError
from medmoe.models.placement import DTYPES, parse_device, parse_dtype

DTYPE_HELP = ("Model dtype: " + ", ".join(DTYPES) + " (auto: bfloat16 on a CUDA GPU that has it and on CPUs with "
              "AVX512-BF16 or AMX, else float32).")
DEVICE_HELP = "torch device: auto (cuda when torch sees a GPU, else cpu), cpu, cuda, cuda:N or mps."


def _checked(parse: Callable[[str], str], flag: str) -> Callable[[Any], str | None]:
    def callback(value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return parse(value)
        except ModelError as exc:
            raise typer.BadParameter(str(exc), param_hint=flag) from None

    return callback


def dtype_option(default: str | None = "auto", help: str = DTYPE_HELP, rich_help_panel: str | None = None) -> Any:
    """A `--dtype` typer option, checked and normalised by `placement.parse_dtype` (default None: not given)."""
    return typer.Option(default, "--dtype", help=help, callback=_checked(parse_dtype, "--dtype"),
                        rich_help_panel=rich_help_panel)


def device_option(default: str | None = "auto", help: str = DEVICE_HELP, rich_help_panel: str | None = None) -> Any:
    """A `--device` typer option, checked by `placement.parse_device` (default None: not given)."""
    return typer.Option(default, "--device", help=help, callback=_checked(parse_device, "--device"),
                        rich_help_panel=rich_help_panel)

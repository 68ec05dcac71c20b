"""`--config FILE.yaml`: a command's option values from a YAML file; flags on the command line win.

The file is a flat mapping of option names, spelled as the flags without `--`, with `-` or `_`
(`batch-size: 8` or `batch_size: 8`; `resume: false` for `--no-resume`). Unknown keys are an error
naming the key and the file. Relative paths in it are read from the current folder, as on the
command line. Used by `finetune`, `mambaformer expert`, `mambaformer distill`, `mambaformer distill-task`
and `run`:

    medmoe finetune --config recipes/finetune_loramoe_pubmedqa.yaml --steps 20   # --steps wins

It works through click's `default_map`: the eager `--config` option is processed before every other
one and fills `ctx.default_map`, which click reads for each option not given on the command line
(before the option's own default), so a required option given in the file is satisfied.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any

import typer

HELP = ("YAML file of option values (keys as the flags: `batch-size: 8`, `resume: false`); "
        "flags given on the command line override it. Examples in recipes/.")


def option_keys(command: Any) -> dict[str, str]:
    """Accepted keys (dashes as underscores) -> parameter names: each long flag and the parameter name."""
    keys: dict[str, str] = {}
    for param in command.params:
        if param.name is None or param.name == "config":
            continue
        for name in [param.name, *(opt[2:] for opt in param.opts if opt.startswith("--"))]:
            keys[name.replace("-", "_")] = param.name
    return keys


def read_config(path: Path, command: Any, command_path: str = "") -> dict[str, Any]:
    """The file's values by parameter name; BadParameter (naming the file, and the key) when it is wrong."""
    import yaml

    def bad(message: str) -> typer.BadParameter:
        return typer.BadParameter(f"{path}: {message}", param_hint="--config")

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise bad(f"{where}not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise bad(f"expected a mapping of option names to values, got a YAML {type(data).__name__}")
    keys = option_keys(command)
    params = {p.name: p for p in command.params}
    values: dict[str, Any] = {}
    for key, value in data.items():
        normal = str(key).replace("-", "_")
        if normal not in keys:
            close = difflib.get_close_matches(normal, list(keys), n=1)
            hint = f" (did you mean {close[0].replace('_', '-')!r}?)" if close else ""
            raise bad(f"unknown key {key!r}: not an option of `{command_path or command.name}`{hint}")
        name = keys[normal]
        if name in values:
            raise bad(f"key {key!r} sets an option already set in the file under another name")
        param = params[name]
        if isinstance(value, dict) or (isinstance(value, list) and not getattr(param, "multiple", False)
                                       and param.nargs == 1):
            raise bad(f"key {key!r}: expected one value, got a YAML {type(value).__name__}"
                      " (comma-separated lists are one string: 'pubmedqa,dental')")
        values[name] = value
    return values


def apply_config(ctx: typer.Context, value: Path | None) -> Path | None:
    """Eager callback of --config: the file's values become the defaults of this command's options."""
    if value is not None and not ctx.resilient_parsing:
        ctx.default_map = {**(ctx.default_map or {}), **read_config(value, ctx.command, ctx.command_path)}
    return value


ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help=HELP, is_eager=True, callback=apply_config, exists=True, dir_okay=False,
                 show_default=False),
]

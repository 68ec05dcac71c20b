"""Old command and flag names, kept for one release so scripts do not break (CHANGELOG.md, Unreleased).

Each old name still works, hidden from `--help`, and prints one line on stderr naming its new
spelling. Commands: `router ...` (now `mambaformer gate ...`), `train expert` (`mambaformer expert`),
`train router` (`mambaformer gate train`), `distill`, `profile`, `calibrate` (`mambaformer ...`) and
`routing` (`loramoe routing`). Flags: `renamed_flags` below, given to each command as its `cls`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import typer
from typer.core import TyperCommand

DEPRECATED_COMMANDS = {  # old -> new, after `medmoe `
    "router": "mambaformer gate",
    "train expert": "mambaformer expert",
    "train router": "mambaformer gate train",
    "distill": "mambaformer distill",
    "profile": "mambaformer profile",
    "calibrate": "mambaformer calibrate",
    "routing": "loramoe routing",
}


def notice(old: str, new: str) -> None:
    typer.echo(f"note: {old} is now {new}; the old name goes away in the next release", err=True)


def rename_flags(args: list[str], renames: dict[str, str]) -> list[str]:
    """Old flag spellings (`--base`, `--base=X`) replaced by the new ones, up to a `--`."""
    out = list(args)
    for i, arg in enumerate(args):
        if arg == "--":
            break
        flag, eq, value = arg.partition("=")
        if flag in renames:
            notice(flag, renames[flag])
            out[i] = renames[flag] + eq + value
    return out


def renamed_flags(renames: dict[str, str]) -> type[TyperCommand]:
    """A command class that accepts the old flag names in `renames` (old -> new) with a notice."""

    class RenamedFlags(TyperCommand):
        renamed = dict(renames)

        def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
            return super().parse_args(ctx, rename_flags(args, self.renamed))

    return RenamedFlags


def deprecated_command(func: Callable[..., Any], old: str) -> Callable[..., Any]:
    """`func` (same options) printing the notice for `medmoe OLD` first."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        notice(f"`medmoe {old}`", f"`medmoe {DEPRECATED_COMMANDS[old]}`")
        return func(*args, **kwargs)

    return wrapper


def _router_notice() -> None:
    notice("`medmoe router`", f"`medmoe {DEPRECATED_COMMANDS['router']}`")


def _train_notice(ctx: typer.Context) -> None:
    old = f"train {ctx.invoked_subcommand}"
    notice(f"`medmoe {old}`", f"`medmoe {DEPRECATED_COMMANDS[old]}`")


def register(app: typer.Typer) -> None:
    from medmoe.cli import distill, finetune, gate, mambaformer

    app.add_typer(gate.gate_app, name="router", hidden=True, callback=_router_notice)
    train_app = typer.Typer(no_args_is_help=True, callback=_train_notice, help="Deprecated: see `medmoe mambaformer`.")
    train_app.command("expert", cls=renamed_flags(finetune.EXPERT_FLAGS))(finetune.expert_command)  # the group prints the notice
    train_app.command("router", cls=renamed_flags(gate.TRAIN_FLAGS))(gate.train_gate)
    app.add_typer(train_app, name="train", hidden=True)
    for old, func, flags in (("distill", distill.distill_command, distill.DISTILL_FLAGS),
                             ("profile", mambaformer.profile, {}),
                             ("calibrate", mambaformer.calibrate, {}),
                             ("routing", finetune.routing_command, finetune.ROUTING_FLAGS)):
        app.command(old, hidden=True, cls=renamed_flags(flags))(deprecated_command(func, old))

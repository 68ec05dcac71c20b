"""scripts/gpu_check.sh (the GPU paths end to end, for whenever a GPU is there): on this CPU machine, every
command it would run names a medmoe subcommand and flags that exist, and without a GPU it stops at once."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest
import typer

from medmoe.cli import app

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.sh"


def dry_commands() -> list[list[str]]:
    out = subprocess.run(["bash", str(SCRIPT)], env={**os.environ, "GPU_CHECK_DRY": "1"}, capture_output=True,
                         text=True, check=True).stdout
    return [shlex.split(line) for line in out.splitlines() if line.strip()]


def medmoe_part(argv: list[str]) -> list[str]:
    """The arguments after the last `-m medmoe` of a command line."""
    at = max(i for i, token in enumerate(argv[:-1]) if token == "-m" and argv[i + 1] == "medmoe")
    return argv[at + 2:]


def test_every_command_of_the_check_uses_flags_medmoe_has():
    commands = [medmoe_part(argv) for argv in dry_commands()]
    assert {c[0] for c in commands} >= {"eval", "finetune", "mambaformer", "run", "serve"}
    for argv in commands:
        first_flag = next(i for i, token in enumerate(argv) if token.startswith("--"))
        sub, flags = argv[:first_flag], {t for t in argv[first_flag:] if t.startswith("--")}
        command = typer.main.get_command(app)
        for name in sub:
            command = command.commands[name]  # a KeyError names a subcommand medmoe does not have
        known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
        assert flags <= known, f"medmoe {' '.join(sub)}: unknown {sorted(flags - known)}"
        assert "cuda" in argv, f"medmoe {' '.join(sub)} does not run on the GPU"


def test_without_a_gpu_it_stops_with_exit_3(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the check would run for real")
    result = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 3
    assert "torch sees no CUDA GPU" in result.stderr and not (tmp_path / "out").exists()

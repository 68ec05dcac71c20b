"""Training checkpoints: written atomically, holding everything an exact resume needs.

A checkpoint is one file `checkpoints/step-<N>.pt` with the trainable tensors (plus the LoRA-MoE
memory queues), optimizer and scheduler state, the step, and every RNG state. It is written to a
temporary file in the same folder and renamed with os.replace, so a kill never leaves a torn file.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medmoe.errors import ModelError
from medmoe.paths import atomic_write_file

STEP_FILE = re.compile(r"^step-(\d+)\.pt$")


def training_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors that change during training: trainable parameters and the expert memory queues."""
    state = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    state.update({name: b.detach().clone() for name, b in model.named_buffers() if ".queue." in name})
    return state


def load_training_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    missing = [name for name in state if name not in own]
    if missing:
        raise ModelError(f"checkpoint tensors not in this model, e.g. {missing[:3]}; was it written by another method or base?")
    with torch.no_grad():
        for name, tensor in state.items():
            own[name].copy_(tensor)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_checkpoint(directory: Path, step: int, model: nn.Module, optimizer, scheduler, extra: dict | None = None, keep: int = 2) -> Path:
    """Write checkpoint `step-<step>.pt` atomically and keep only the newest `keep` checkpoints."""
    path = Path(directory) / f"step-{step}.pt"
    state = {
        "step": step,
        "model": training_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "extra": extra or {},
    }
    atomic_write_file(path, lambda tmp: torch.save(state, tmp))
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoints in the folder, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler) -> dict:
    """Restore model tensors, optimizer, scheduler and RNG; returns the checkpoint (step, extra)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a torn or foreign file
        raise ModelError(f"{path}: cannot read checkpoint ({exc})") from exc
    load_training_state(model, ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    set_rng_state(ckpt["rng"])
    return ckpt

"""Training checkpoints: safetensors + JSON, written atomically, holding everything an exact resume needs.

A checkpoint is a pair of files in `checkpoints/`:

  step-<N>.safetensors   tensors only: `model.<name>` (trainable tensors and the LoRA-MoE memory
                         queues), `optimizer.state.<i>.<key>` (AdamW's exp_avg, exp_avg_sq, step),
                         `rng.torch`, `rng.cuda.<d>`, `rng.numpy.keys`
  step-<N>.json          the manifest: step, scheduler state, optimizer param_groups, python `random`
                         state, numpy RNG metadata, `extra`, and the tensor file's name and size

Neither file is ever unpickled, so a file planted in a run folder cannot run code. Each file is
written to a temporary file and renamed (medmoe.paths.atomic_write_file), the manifest last: a kill
between the two leaves a tensor file without a manifest, which is never picked as a checkpoint.
A `step-<N>.pt` (the pickle format of older medmoe versions) is refused, never loaded.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from medmoe.errors import ModelError
from medmoe.paths import atomic_write_file, atomic_write_json

MANIFEST = re.compile(r"^step-(\d+)\.json$")
TENSORS = re.compile(r"^step-(\d+)\.safetensors$")
LEGACY = re.compile(r"^step-(\d+)\.pt$")
FORMAT = "medmoe-train-checkpoint/1"


def training_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors that change during training: trainable parameters and the expert memory queues."""
    state = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    state.update({name: b.detach().clone() for name, b in model.named_buffers() if ".queue." in name})
    return state


def load_training_state(model: nn.Module, state: dict[str, torch.Tensor], where: str = "checkpoint") -> None:
    """Copy the checkpoint's tensors into the model; they must be exactly the model's training state."""
    own: dict[str, torch.Tensor] = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    expected = set(training_state(model))
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise ModelError(f"{where}: its tensors do not match this model (not in the model: {extra[:3]}, not in the "
                         f"checkpoint: {missing[:3]}); was it written by another method, base or adapter settings?")
    wrong = [f"{n} {tuple(t.shape)} vs {tuple(own[n].shape)}" for n, t in state.items() if t.shape != own[n].shape]
    if wrong:
        raise ModelError(f"{where}: tensor shapes differ from this model (checkpoint vs model: {', '.join(wrong[:3])})")
    with torch.no_grad():
        for name, tensor in state.items():
            own[name].copy_(tensor)


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Every RNG stream as (tensors, JSON): torch (CPU and each CUDA device), python, numpy."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{d}": s for d, s in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())  # the legacy tuple
    tensors["rng.numpy.keys"] = torch.from_numpy(keys.astype(np.int64))
    meta = {"python": [version, list(internal), gauss],
            "numpy": {"bit_generator": name, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[f"rng.cuda.{d}"] for d in range(torch.cuda.device_count()) if f"rng.cuda.{d}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = meta["numpy"]
    keys = tensors["rng.numpy.keys"].numpy().astype(np.uint32)
    np.random.set_state((numpy["bit_generator"], keys, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"]))


def _optimizer_tensors(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state split into named tensors and the JSON rest (param_groups, non-tensor entries)."""
    saved = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in saved["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.state.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": saved["param_groups"], "state_scalars": scalars}


def _optimizer_state_dict(optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Rebuild a state_dict for optimizer.load_state_dict; tuples (betas) come back as tuples."""
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name[len("optimizer.state."):].split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, entries in meta["state_scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    groups = []
    for fresh, saved in zip(optimizer.param_groups, meta["param_groups"]):
        groups.append({k: tuple(v) if isinstance(fresh.get(k), tuple) and isinstance(v, list) else v for k, v in saved.items()})
    return {"state": state, "param_groups": groups}


def save_checkpoint(directory: Path, step: int, model: nn.Module, optimizer, scheduler, extra: dict | None = None, keep: int = 2) -> Path:
    """Write checkpoint step-<step> (tensors, then the manifest) and keep only the newest `keep`. Returns the manifest."""
    directory = Path(directory)
    tensors = {f"model.{name}": t for name, t in training_state(model).items()}
    optimizer_tensors, optimizer_meta = _optimizer_tensors(optimizer)
    rng_tensors, rng_meta = rng_state()
    tensors.update(optimizer_tensors)
    tensors.update(rng_tensors)
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    tensor_file = directory / f"step-{step}.safetensors"
    atomic_write_file(tensor_file, lambda tmp: save_file(tensors, tmp))
    manifest = {"format": FORMAT, "step": step, "tensors": tensor_file.name, "tensors_bytes": tensor_file.stat().st_size,
                "scheduler": scheduler.state_dict(), "optimizer": optimizer_meta, "rng": rng_meta, "extra": extra or {}}
    path = directory / f"step-{step}.json"
    atomic_write_json(path, manifest)
    prune_checkpoints(directory, keep)
    return path


def prune_checkpoints(directory: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (manifest first), and tensor files no manifest names."""
    directory = Path(directory)
    manifests = list_checkpoints(directory)
    for old in manifests[: -keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
        old.with_suffix(".safetensors").unlink(missing_ok=True)
    newest = _step_of(manifests[-1]) if manifests else None
    for path in directory.iterdir():
        m = TENSORS.match(path.name)
        if m and newest is not None and int(m.group(1)) < newest and not path.with_suffix(".json").exists():
            path.unlink(missing_ok=True)


def _step_of(path: Path) -> int:
    return int(cast(re.Match[str], MANIFEST.match(path.name)).group(1))  # only called on manifest names


def refuse_legacy(directory: Path) -> None:
    """Raise on any `step-<N>.pt`: an older medmoe's pickle, which could run code when loaded."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    legacy = sorted(p for p in directory.iterdir() if LEGACY.match(p.name))
    if legacy:
        raise ModelError(f"{legacy[0]}: written by an older medmoe (a pickle); it is not loaded, for safety. Delete it "
                         "(and the folder's other step-*.pt files) or start a new --output")


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint manifests (`step-<N>.json`) in the folder, oldest first. Refuses legacy pickles."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    refuse_legacy(directory)
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := MANIFEST.match(p.name))]
    return [p for _, p in sorted(found)]


def read_manifest(path: Path) -> dict:
    """The checkpoint's JSON, checked for the fields a resume reads; errors name the file and field."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}:{exc.lineno}: not a checkpoint manifest (invalid JSON: {exc.msg}); "
                         "delete this checkpoint to resume from an earlier one, or start a new --output") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: cannot read the checkpoint manifest ({exc})") from None
    fields = {"format": str, "step": int, "tensors": str, "tensors_bytes": int, "scheduler": dict, "optimizer": dict, "rng": dict, "extra": dict}
    if not isinstance(manifest, dict):
        raise ModelError(f"{path}: not a checkpoint manifest (a JSON {type(manifest).__name__}, not an object)")
    for name, kind in fields.items():
        if not isinstance(manifest.get(name), kind):
            raise ModelError(f"{path}: field {name!r} is missing or not a {kind.__name__}; not a medmoe training checkpoint")
    if manifest["format"] != FORMAT:
        raise ModelError(f"{path}: checkpoint format {manifest['format']!r}, this medmoe reads {FORMAT!r}")
    if manifest["step"] != _step_of(path) or manifest["tensors"] != path.with_suffix(".safetensors").name:
        raise ModelError(f"{path}: field 'step' or 'tensors' does not match the file name")
    return manifest


def read_tensors(path: Path, expected_bytes: int) -> dict[str, torch.Tensor]:
    """The checkpoint's tensor file (safetensors only: nothing in it can run code)."""
    if not path.is_file():
        raise ModelError(f"{path}: missing; its manifest {path.with_suffix('.json').name} names it")
    if path.stat().st_size != expected_bytes:
        raise ModelError(f"{path}: {path.stat().st_size} bytes, its manifest says {expected_bytes}; torn or replaced file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{path}: not a safetensors file ({exc}); it is not loaded. Delete this checkpoint "
                         "(and its .json) to resume from an earlier one, or start a new --output") from None


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler) -> dict:
    """Restore model tensors, optimizer, scheduler and RNG from a manifest; returns {"step", "extra"}."""
    path = Path(path)
    manifest = read_manifest(path)
    tensors = read_tensors(path.with_suffix(".safetensors"), manifest["tensors_bytes"])
    groups = {prefix: {k: v for k, v in tensors.items() if k.startswith(prefix)} for prefix in ("model.", "optimizer.", "rng.")}
    try:
        load_training_state(model, {k[len("model."):]: v for k, v in groups["model."].items()}, where=str(path))
        optimizer.load_state_dict(_optimizer_state_dict(optimizer, groups["optimizer."], manifest["optimizer"]))
        scheduler.load_state_dict(manifest["scheduler"])
        set_rng_state(groups["rng."], manifest["rng"])
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise ModelError(f"{path}: the checkpoint does not fit this run ({type(exc).__name__}: {exc})") from None
    return {"step": manifest["step"], "extra": manifest["extra"]}

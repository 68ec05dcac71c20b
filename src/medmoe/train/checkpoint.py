"""Training checkpoints: safetensors + JSON, written atomically, holding everything an exact resume needs.

A checkpoint is a pair of files in `checkpoints/`:

  step-<N>.safetensors   tensors only: `model.<name>` (trainable tensors and the LoRA-MoE memory
                         queues), `optimizer.state.<i>.<key>` (AdamW's exp_avg, exp_avg_sq, step),
                         `rng.torch`, `rng.cuda` (the current GPU's; older files: `rng.cuda.<d>`
                         for every GPU), `rng.numpy.keys`
  step-<N>.json          the manifest: step, scheduler state, optimizer param_groups, python `random`
                         state, numpy RNG metadata, `extra`, and the tensor file's name and size

With more than one process, what differs between ranks is saved per rank: every rank r > 0 writes

  step-<N>.rank-<r>.safetensors   its RNG streams (`rng.*` as above; python and numpy metadata in the
                                  safetensors header's `rng` entry, JSON) and its LoRA-MoE memory queues
                                  (`model.<name>.queue.*`: each rank pushes its own batches)

before rank 0 writes its own state into the two files above (after a barrier), the manifest listing
the rank files and their sizes under `ranks`. Parameters, optimizer and scheduler are the same on every
rank (the gradients are all-reduced) and are written once. On resume each rank restores its own RNG
and queues. A checkpoint without `ranks` (one process, or written before per-rank state) gives rank 0's
state to every rank, as medmoe did before: the data order does not depend on it, but dropout and token
sub-sampling on ranks > 0 then differ from an uninterrupted run (a warning says so).

Neither file is ever unpickled, so a file planted in a run folder cannot run code. Each file is
written to a temporary file and renamed (medmoe.paths.atomic_write_file), the manifest last: a kill
between the two leaves a tensor file without a manifest, which is never picked as a checkpoint.
A `step-<N>.pt` (the pickle format of older medmoe versions) is refused, never loaded.
"""

from __future__ import annotations

import json
import random
import re
import warnings
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from medmoe.errors import ModelError
from medmoe.paths import atomic_write_file, atomic_write_json
from medmoe.train.distributed import barrier

MANIFEST = re.compile(r"^step-(\d+)\.json$")
TENSORS = re.compile(r"^step-(\d+)\.safetensors$")
RANK_TENSORS = re.compile(r"^step-(\d+)\.rank-(\d+)\.safetensors$")
LEGACY = re.compile(r"^step-(\d+)\.pt$")
FORMAT = "medmoe-train-checkpoint/1"
RANK_FORMAT = "medmoe-train-rank-state/1"


def is_queue(name: str) -> bool:
    """A LoRA-MoE memory queue buffer: per rank, unlike the parameters."""
    return ".queue." in name


def training_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors that change during training: trainable parameters and the expert memory queues."""
    state = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    state.update({name: b.detach().clone() for name, b in model.named_buffers() if is_queue(name)})
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
    """Every RNG stream of this process as (tensors, JSON): torch's CPU generator, the current GPU's
    (when this process has used CUDA), python, numpy."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())  # the legacy tuple
    tensors["rng.numpy.keys"] = torch.from_numpy(keys.astype(np.int64))
    meta = {"python": [version, list(internal), gauss],
            "numpy": {"bit_generator": name, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        if "rng.cuda" in tensors:  # this process's GPU (one per rank)
            torch.cuda.set_rng_state(tensors["rng.cuda"], torch.cuda.current_device())
        cuda = [tensors[f"rng.cuda.{d}"] for d in range(torch.cuda.device_count()) if f"rng.cuda.{d}" in tensors]
        if cuda:  # older checkpoints: every GPU's
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


def rank_file(directory: Path, step: int, rank: int) -> Path:
    return Path(directory) / f"step-{step}.rank-{rank}.safetensors"


def save_checkpoint(directory: Path, step: int, model: nn.Module, optimizer, scheduler, extra: dict | None = None, keep: int = 2,
                    rank: int = 0, world: int = 1) -> Path:
    """Write checkpoint step-<step> (tensors, then the manifest) and keep only the newest `keep`. Returns the manifest
    (rank 0) or this rank's file. With world > 1 every rank calls it: ranks > 0 write their own state first
    (module docstring), then rank 0 writes the rest and the manifest."""
    directory = Path(directory)
    if world > 1 and rank > 0:
        written = _save_rank_state(directory, step, model, rank)
        barrier(world)
        return written
    barrier(world)  # every rank's file is written before the manifest that names them
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
    if world > 1:
        manifest["ranks"] = [{"rank": r, "tensors": rank_file(directory, step, r).name,
                              "tensors_bytes": rank_file(directory, step, r).stat().st_size} for r in range(1, world)]
    path = directory / f"step-{step}.json"
    atomic_write_json(path, manifest)
    prune_checkpoints(directory, keep)
    return path


def _save_rank_state(directory: Path, step: int, model: nn.Module, rank: int) -> Path:
    """Rank r's own state: its RNG streams and LoRA-MoE queues (step-<N>.rank-<r>.safetensors)."""
    tensors, meta = rng_state()
    tensors.update({f"model.{name}": t for name, t in training_state(model).items() if is_queue(name)})
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    header = {"format": RANK_FORMAT, "step": str(step), "rank": str(rank), "rng": json.dumps(meta)}
    path = rank_file(directory, step, rank)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_file(path, lambda tmp: save_file(tensors, tmp, metadata=header))
    return path


def prune_checkpoints(directory: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (manifest first), and tensor files (the ranks' too) no manifest names."""
    directory = Path(directory)
    manifests = list_checkpoints(directory)
    for old in manifests[: -keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
        old.with_suffix(".safetensors").unlink(missing_ok=True)
    newest = _step_of(manifests[-1]) if manifests else None
    for path in directory.iterdir():
        m = TENSORS.match(path.name) or RANK_TENSORS.match(path.name)
        if m and newest is not None and int(m.group(1)) < newest and not (directory / f"step-{m.group(1)}.json").exists():
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


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, rank: int = 0) -> dict:
    """Restore model tensors, optimizer, scheduler and RNG from a manifest; returns {"step", "extra"}.
    Rank r > 0 then restores its own RNG and queues from its rank file, when the checkpoint has one."""
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
    if rank > 0:
        _load_rank_state(path, manifest, model, rank)
    return {"step": manifest["step"], "extra": manifest["extra"]}


def _load_rank_state(path: Path, manifest: dict, model: nn.Module, rank: int) -> None:
    """Rank r's RNG and queues from the file the manifest names for it; rank 0's (already loaded) when
    it names none (a checkpoint written before per-rank state), with a warning."""
    entries = [e for e in manifest.get("ranks", []) if isinstance(e, dict) and e.get("rank") == rank]
    if not entries:
        warnings.warn(f"{path}: no state of rank {rank} (a checkpoint written before per-rank RNG): rank {rank} resumes "
                      "with rank 0's RNG streams and memory queues, so its dropout and token sub-sampling differ from "
                      "an uninterrupted run (the data order does not)", stacklevel=3)
        return
    file = path.parent / str(entries[0].get("tensors"))
    read_tensors(file, int(entries[0].get("tensors_bytes", -1)))  # the size check and a clear error on a bad file
    try:
        with safe_open(str(file), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if header.get("format") != RANK_FORMAT or header.get("step") != str(manifest["step"]) or header.get("rank") != str(rank):
            raise ModelError(f"{file}: not the rank-{rank} state of step {manifest['step']} (header {header.get('format')!r}, "
                             f"step {header.get('step')!r}, rank {header.get('rank')!r})")
        queues = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        own = {name: b for name, b in model.named_buffers() if is_queue(name)}
        if set(queues) != set(own):
            raise ModelError(f"{file}: its queues do not match this model's ({sorted(set(queues) ^ set(own))[:3]})")
        with torch.no_grad():
            for name, tensor in queues.items():
                own[name].copy_(tensor)
        set_rng_state({k: v for k, v in tensors.items() if k.startswith("rng.")}, json.loads(header["rng"]))
    except (KeyError, ValueError, TypeError, RuntimeError, SafetensorError) as exc:
        raise ModelError(f"{file}: the rank state does not fit this run ({type(exc).__name__}: {exc})") from None

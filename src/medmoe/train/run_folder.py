"""A fine-tuning run folder holds one run: its settings, checkpoints, log and result never mix runs.

`finetune_config.json` is written when a run starts. Resuming compares the new settings with it
and refuses any change to what is trained (the same idea as `medmoe eval`'s run.json); only the
fields in RESUMABLE_CHANGES may differ, since they change neither the weights nor the data order.
On resume the log is cut back to the checkpoint's step, so a retrained step is logged once.
`--no-resume` never deletes a previous run: it refuses a folder that holds one (nothing already done is
lost), and otherwise starts a fresh run there.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from medmoe.errors import MedmoeError
from medmoe.paths import atomic_write_json, atomic_write_text
from medmoe.train.checkpoint import LEGACY, MANIFEST, TENSORS, list_checkpoints

SETTINGS_FILE = "finetune_config.json"
LOG_FILE = "train_log.jsonl"
RESULT_FOLDERS = ("adapter", "model")
# May change between a run and its resume: none of them changes the trained weights or the data order
# (evaluation runs in eval mode and draws no random numbers; saving draws none either).
RESUMABLE_CHANGES = ("output", "resume", "progress", "eval_every", "save_every", "keep_checkpoints")
_UNSET = "(not set)"


def run_settings(config: dict[str, Any], examples: list, world: int) -> dict[str, Any]:
    """What training depends on: the config, the number of processes and the training examples
    themselves (count and SHA-256, so an edited data file under the same name is noticed)."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps([example.prompt, example.completion], ensure_ascii=False).encode("utf-8") + b"\n")
    settings = {**config, "world_size": world, "examples": {"count": len(examples), "sha256": digest.hexdigest()}}
    return json.loads(json.dumps(settings))  # as it reads back from the file (tuples become lists)


def _flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_settings(before: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{field: (old, new)} for every field that differs, nested dicts as `loramoe.num_experts`."""
    old, new = _flatten(before), _flatten(now)
    return {key: (old.get(key, _UNSET), new.get(key, _UNSET)) for key in sorted(set(old) | set(new))
            if key.split(".")[0] not in RESUMABLE_CHANGES and old.get(key, _UNSET) != new.get(key, _UNSET)}


def read_settings(path: Path) -> dict[str, Any]:
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MedmoeError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}); cannot check the run's settings. "
                          "Use a new --output, or delete the folder to start it over") from None
    if not isinstance(settings, dict):
        raise MedmoeError(f"{path}: not a settings object (a JSON {type(settings).__name__})")
    return settings


def check_run_settings(out_dir: Path, settings: dict[str, Any], has_checkpoints: bool) -> None:
    """Refuse to resume a run with other settings; every changed field is named, old -> new."""
    path = Path(out_dir) / SETTINGS_FILE
    if not path.exists():
        if has_checkpoints:
            raise MedmoeError(f"{path}: missing, but the folder has checkpoints; their settings are unknown, so they are "
                              "not resumed. Use a new --output, or delete the folder to start it over")
        return
    changed = changed_settings(read_settings(path), settings)
    if changed:
        what = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items())
        raise MedmoeError(f"{path}: this folder holds a run with other settings ({what}). Rerun with the folder's "
                          "settings to resume it, or use a new --output")


def truncate_log(path: Path, step: int) -> None:
    """Keep the log's records of steps <= `step`: the steps after the checkpoint are trained (and
    logged) again. Lines that do not parse can only be a write torn by a kill; they are dropped."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


def refuse_previous_run(out_dir: Path) -> None:
    """--no-resume into a folder that holds a run: refuse rather than delete anything."""
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    found = [p.name for p in ckpt_dir.iterdir()
             if MANIFEST.match(p.name) or TENSORS.match(p.name) or LEGACY.match(p.name)] if ckpt_dir.is_dir() else []
    found += [name for name in (LOG_FILE, SETTINGS_FILE, *RESULT_FOLDERS) if (out_dir / name).exists()]
    if found:
        raise MedmoeError(f"{out_dir}: holds a previous run ({', '.join(sorted(found)[:4])}); --no-resume does not "
                          "delete it. Use a new --output, or delete the folder yourself to start it over")


def open_run(out_dir: Path, settings: dict[str, Any], resume: bool, rank: int = 0) -> Path | None:
    """Check (resume) or refuse a used (no resume) run folder and record the settings; returns the
    newest checkpoint manifest to resume from, or None. Only rank 0 writes."""
    out_dir = Path(out_dir)
    existing = list_checkpoints(out_dir / "checkpoints") if resume else []
    if resume:
        check_run_settings(out_dir, settings, bool(existing))
    elif rank == 0:
        refuse_previous_run(out_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not (out_dir / SETTINGS_FILE).exists():
            atomic_write_json(out_dir / SETTINGS_FILE, settings)
    return existing[-1] if existing else None


def read_cache_manifest(path: Path, fmt: str, key: dict[str, Any], what: str, made_with: str, otherwise: str) -> dict[str, Any]:
    """The manifest.json of a safetensors cache (`fmt`, a `key` of everything its tensors depend on, and
    the files with their sizes), or a MedmoeError naming the file: not JSON, another format, another key
    (each field old -> new: `what` was made with `made_with`), or a file missing or of another size."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MedmoeError(f"{path}: invalid JSON ({exc}); delete {path.parent} to build the {what} again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt or not isinstance(manifest.get("files"), list):
        raise MedmoeError(f"{path}: not a {fmt} manifest; delete {path.parent} to build the {what} again")
    old = manifest.get("key", {})
    changed = {k: (old.get(k), key.get(k)) for k in sorted(set(old) | set(key)) if old.get(k) != key.get(k)}
    if changed:
        changes = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise MedmoeError(f"{path}: this {what} was made with {made_with} ({changes}); "
                          f"delete {path.parent} to build it again, or {otherwise}")
    for f in manifest["files"]:
        file = path.parent / f["name"]
        size = file.stat().st_size if file.is_file() else None
        if size != f["bytes"]:
            raise MedmoeError(f"{file}: {'missing' if size is None else f'{size:,} bytes'}, the manifest says "
                              f"{f['bytes']:,}; delete {path.parent} to build the {what} again")
    return manifest

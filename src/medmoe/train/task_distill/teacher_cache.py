"""The teacher cache of task-level distillation (`TeacherCache`): the teacher's side of every prompt, on disk.

The teacher runs once per prompt, with forward hooks (mamba/align.py `AttentionCapture`), and what
the losses (losses.py) need is stored: the prompt's token ids, the option tokens, log p_T, and for
training prompts u_j and a_j of every replaced layer (when delta > 0) and the teacher's top-k
next-token log-probs at each position (when gamma > 0). Safetensors chunks of RECORDS_PER_FILE
prompts plus `manifest.json` (format, the key, the files and their sizes), rewritten after each chunk,
so an interrupted build resumes; the key (`cache_key`) is everything the cache depends on (teacher
source, weights fingerprint and dtype, head and the SHA-256 of its files, the records' fingerprint,
the layers, top_k, the storage dtype), and a cache with another key is refused naming each change.
Nothing is pickled. A student step then costs only the student: one forward and backward over the
prompt, plus each mixer over u_j.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from medmoe.data.record import Record
from medmoe.errors import MedmoeError
from medmoe.eval.model import HFEvalModel
from medmoe.eval.prompts import build_prompt
from medmoe.eval.window import PromptFitter
from medmoe.mamba.align import AttentionCapture
from medmoe.paths import atomic_write_file, atomic_write_json
from medmoe.train.run_folder import read_cache_manifest
from medmoe.train.task_distill.prompts import TaskTeacher, prompt_tokens, records_fingerprint, weights_fingerprint

CACHE_FORMAT = "medmoe-task-distill-cache/1"
CACHE_MANIFEST = "manifest.json"


CACHE_FOLDER = "teacher_cache"
CACHE_DTYPES = ("float16", "bfloat16", "float32")


RECORDS_PER_FILE = 8


def storage_dtype(name: str) -> torch.dtype:
    if name not in CACHE_DTYPES:
        raise MedmoeError(f"cache dtype must be one of {', '.join(CACHE_DTYPES)}, got {name!r}")
    return getattr(torch, name)


def cache_key(teacher: TaskTeacher, records: Sequence[Record], active: int, layers: Sequence[int],
              top_k: int, cache_dtype: str) -> dict[str, Any]:
    """Everything the cached tensors depend on; a cache with another key is refused."""
    storage_dtype(cache_dtype)
    return {"teacher": teacher.source, "teacher_weights_sha256": weights_fingerprint(teacher.model),
            "teacher_dtype": str(next(teacher.model.parameters()).dtype).removeprefix("torch."),
            "head": teacher.head, "head_sha256": teacher.head_sha256, "prompt": "letter, zero-shot, cut to the window",
            "records": len(records), "records_sha256": records_fingerprint(records), "active": active,
            "layers": list(layers), "top_k": top_k, "cache_dtype": cache_dtype}


class TeacherCache:
    """The teacher's side of every prompt, on disk (module docstring). `entry(i)` holds, for record i:

      ids (n,) int32, options (K,) int32, logp (K,) float32 = log p_T
      in.<j>, out.<j> (n, D)     u_j and a_j for each cached teacher layer j (training records only)
      topk_idx (n, k) int32, topk_logp (n, k) float32   the teacher's top-k next-token log-probs
    """

    def __init__(self, folder: Path, manifest: dict[str, Any]):
        self.folder, self.manifest = Path(folder), manifest
        self.key = manifest["key"]
        self.per_file = int(manifest["records_per_file"])

    def __len__(self) -> int:
        return int(self.key["records"])

    @property
    def layers(self) -> list[int]:
        return list(self.key["layers"])

    @property
    def bytes(self) -> int:
        """The chunk files' total size on disk."""
        return sum(int(f["bytes"]) for f in self.manifest["files"])

    @classmethod
    def build_or_open(cls, folder: str | Path, teacher: TaskTeacher, records: Sequence[Record], active: int,
                      layers: Sequence[int] = (), top_k: int = 0, cache_dtype: str = "float16",
                      progress: Callable[[int, int], None] | None = None) -> TeacherCache:
        """Open the cache in `folder`, computing the chunks it lacks. The first `active` records (the
        training prompts) get the activations of `layers` and, with top_k > 0, the top-k log-probs;
        the others only their answer. progress(done, total) is called after each chunk."""
        folder = Path(folder)
        key = cache_key(teacher, records, active, layers, top_k, cache_dtype)
        path = folder / CACHE_MANIFEST
        manifest: dict[str, Any] = cls._read_manifest(path, key) if path.exists() else \
            {"format": CACHE_FORMAT, "key": key, "records_per_file": RECORDS_PER_FILE, "files": [], "complete": False,
             "build_seconds": 0.0}
        per_file = int(manifest["records_per_file"])
        done = {int(f["first"]) for f in manifest["files"]}
        todo = [first for first in range(0, len(records), per_file) if first not in done]
        store = storage_dtype(cache_dtype)
        fitter = PromptFitter(HFEvalModel(teacher.model, teacher.tokenizer, teacher.source, share_prefix=False), "letter")
        folder.mkdir(parents=True, exist_ok=True)
        with AttentionCapture(teacher.model, layers, final_norm=top_k > 0) as capture:
            for first in todo:
                began = time.monotonic()
                tensors: dict[str, torch.Tensor] = {}
                for i in range(first, min(first + per_file, len(records))):
                    capture.enabled = i < active
                    tensors.update(_teacher_entry(teacher, fitter, capture, records[i], i, layers, top_k, store))
                name = f"chunk-{first // per_file:05d}.safetensors"
                _write(folder / name, tensors)
                manifest["files"].append({"name": name, "first": first, "bytes": (folder / name).stat().st_size})
                manifest["files"].sort(key=lambda f: f["first"])
                manifest["build_seconds"] = round(manifest["build_seconds"] + time.monotonic() - began, 3)
                atomic_write_json(path, manifest)  # after the file: a listed file is always whole
                if progress is not None:
                    progress(min(first + per_file, len(records)), len(records))
        if not manifest["complete"]:
            manifest["complete"] = True
            atomic_write_json(path, manifest)
        return cls(folder, manifest)

    @staticmethod
    def _read_manifest(path: Path, key: dict[str, Any]) -> dict[str, Any]:
        return read_cache_manifest(path, CACHE_FORMAT, key, "teacher cache", "another teacher, head, student layers, data or settings", "use another cache folder")

    def entry(self, i: int, fields: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Record i's tensors (class docstring), all of them or the named `fields`."""
        from safetensors import safe_open

        if not 0 <= i < len(self):
            raise IndexError(i)
        path = self.folder / f"chunk-{i // self.per_file:05d}.safetensors"
        prefix = f"{i}."
        try:
            with safe_open(str(path), framework="pt") as f:
                names = [n for n in f.keys() if n.startswith(prefix)]  # noqa: SIM118  (safe_open has no __iter__)
                return {n[len(prefix):]: f.get_tensor(n) for n in names if fields is None or n[len(prefix):] in fields}
        except Exception as exc:  # safetensors' SafetensorError, OSError
            raise MedmoeError(f"{path}: cannot read record {i} of the teacher cache ({type(exc).__name__}: {exc}); "
                              f"delete {self.folder} to build it again") from exc


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    atomic_write_file(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", "cache": CACHE_FORMAT}))


@torch.inference_mode()
def _teacher_entry(teacher: TaskTeacher, fitter: PromptFitter, capture: AttentionCapture, record: Record, i: int,
                   layers: Sequence[int], top_k: int, store: torch.dtype) -> dict[str, torch.Tensor]:
    fitted, _ = fitter.fit(record)
    prompt = build_prompt(fitted, teacher.tokenizer, (), "letter")
    ids, options = prompt_tokens(teacher.tokenizer, prompt)
    capture.clear()
    logp = teacher.scorer(record, prompt).float().reshape(-1)
    if logp.shape != (len(options),) or not torch.isfinite(logp).all():
        raise MedmoeError(f"{record.id}: the teacher's answer has shape {tuple(logp.shape)} (finite: "
                          f"{bool(torch.isfinite(logp).all())}), expected {len(options)} finite log-probs")
    out = {f"{i}.ids": torch.tensor(ids, dtype=torch.int32), f"{i}.options": torch.tensor(options, dtype=torch.int32),
           f"{i}.logp": torch.log_softmax(logp, dim=-1).cpu()}
    if not capture.enabled:
        return out
    for j in layers:
        u, a = capture.inputs.get(j), capture.outputs.get(j)
        if u is None or a is None or u.shape[:2] != (1, len(ids)):
            raise MedmoeError(f"{record.id}: the teacher's scorer did not run layer {j} once over the prompt's {len(ids)} "
                              f"tokens (captured {None if u is None else tuple(u.shape)})")
        out[f"{i}.in.{j}"] = u[0].to(store).cpu().contiguous()
        out[f"{i}.out.{j}"] = a[0].to(store).cpu().contiguous()
    if top_k:
        if capture.final is None or capture.final.shape[1] != len(ids):
            raise MedmoeError(f"{record.id}: the teacher's final norm did not run over the prompt's {len(ids)} tokens")
        logits = teacher.model.get_output_embeddings()(capture.final[0])  # (n, V): the LM head at every position
        values, index = torch.log_softmax(logits.float(), dim=-1).topk(min(top_k, logits.shape[-1]), dim=-1)
        out[f"{i}.topk_idx"] = index.to(torch.int32).cpu().contiguous()
        out[f"{i}.topk_logp"] = values.cpu().contiguous()
    return out

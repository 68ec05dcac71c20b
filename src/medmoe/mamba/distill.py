"""Distil a Transformer teacher into a Mamba hybrid student: KL(teacher || student) on next-token logits.

    L = (1 / #tokens) * sum_t  T^2 * KL( softmax(z_teacher_t / T) || softmax(z_student_t / T) )

Training text: medical text from train splits only (`medical_corpus`), tokenized into one stream and
cut into blocks of `seq_len`; block order is a fixed permutation per epoch (seeded), so step k always
sees the same batch and an interrupted run resumes exactly.

Checkpoints: `out/ckpt-<step>/` holds the student (model.safetensors, config.json of type medmoe_mamba_hybrid,
tokenizer) and the trainer state (optimizer.safetensors + trainer_state.json); when that folder is
complete, `out/latest.json` is replaced atomically to point at it, and older checkpoints are removed.
A run killed at any moment resumes from the last complete checkpoint.

Placement (`DistillConfig.device`, `.dtype`): teacher and student run on `device` (a resolved one: cpu,
cuda, cuda:N, mps); token blocks stay on the CPU and each batch moves there. The student trains in float32
always (master weights and forward: the fused CPU scan kernel is float32-only, and training uses the
differentiable chunked scan); `dtype` is autocast for the teacher's no-grad forward only (bfloat16 or
float16; float32: none), whose logits the loss casts back to float32. Checkpoints are written from the
CPU copy safetensors makes, so a run may resume on another device (its numbers then differ slightly).
"""

from __future__ import annotations

import functools
import json
import math
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from medmoe.errors import ModelError
from medmoe.mamba.transfer import AttentionMamba, HybridSpec, load_hybrid, save_hybrid
from medmoe.paths import atomic_write_file

LATEST = "latest.json"
TRAINER_STATE = "trainer_state.json"


@dataclass
class DistillConfig:
    seq_len: int = 256
    batch_size: int = 4
    lr: float = 3e-4
    weight_decay: float = 0.0
    temperature: float = 1.0
    train: str = "all"             # "all" parameters, or "mixers" only (the new AttentionMamba layers)
    max_steps: int = 1000
    max_minutes: float | None = None
    save_every: int = 25           # steps
    seed: int = 0
    device: str = "cpu"            # a resolved torch device (medmoe.models.placement.resolve_device): teacher and student
    dtype: str = "float32"         # autocast of the teacher's forward: float32 (none), bfloat16 or float16


def medical_corpus() -> list[str]:
    """Bundled English medical text from training splits only: PubMedQA train contexts and the
    explanations of the Dental (MedMCQA) train split. Dev/test splits are never used."""
    from medmoe.data import load_dataset

    texts = [r.context for r in load_dataset("pubmedqa", split="train") if r.context]
    texts += [r.explanation for r in load_dataset("dental", split="train") if r.explanation]
    return texts


def tokenize_blocks(texts: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """One EOS-separated token stream cut into (num_blocks, seq_len) blocks (the tail is dropped)."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
    n = len(stream) // seq_len
    if n == 0:
        raise ModelError(f"the corpus has {len(stream)} tokens, fewer than one block of seq_len={seq_len}")
    return torch.tensor(stream[: n * seq_len]).view(n, seq_len)


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of T^2 KL(p_teacher || p_student), logits (..., V)."""
    t = temperature
    log_q = F.log_softmax(student_logits.float().flatten(0, -2) / t, dim=-1)
    log_p = F.log_softmax(teacher_logits.float().flatten(0, -2) / t, dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean") * t * t


def batch_indices(step: int, num_blocks: int, batch: int, seed: int) -> torch.Tensor:
    """Blocks of `step`: a seeded permutation per epoch, walked in order."""
    per_epoch = max(num_blocks // batch, 1)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return perm[k * batch:(k + 1) * batch]


def _trainable(student, mode: str) -> list[tuple[str, torch.nn.Parameter]]:
    if mode not in ("all", "mixers"):
        raise ModelError(f"train must be 'all' or 'mixers', got {mode!r}")
    mixer_names = {f"{n}." for n, m in student.named_modules() if isinstance(m, AttentionMamba)}
    chosen = []
    for name, p in student.named_parameters():
        keep = mode == "all" or any(name.startswith(m) for m in mixer_names)
        p.requires_grad_(keep)
        if keep:
            chosen.append((name, p))
    return chosen


def _save(out: Path, step: int, student, spec, tokenizer, opt, names, cfg: DistillConfig, history: list) -> None:
    save_checkpoint(out, step, student, spec, tokenizer, opt, names,
                    {"step": step, "config": asdict(cfg), "history": history})


def save_checkpoint(out: Path, step: int, student, spec, tokenizer, opt, names: list[str], state: dict,
                    extra_files: dict[str, dict] | None = None) -> Path:
    """Write `out/ckpt-<step>/` (the hybrid, optimizer.safetensors, trainer_state.json = `state`, and
    each of `extra_files` as JSON), then point `out/latest.json` at it and remove older checkpoints.
    Every file is written atomically and latest.json last, so a kill leaves the previous checkpoint.
    names: the parameter names of `opt.param_groups[0]["params"]`, in order."""
    from safetensors.torch import save_file

    ckpt = out / f"ckpt-{step:06d}"
    if ckpt.exists():
        shutil.rmtree(ckpt)
    save_hybrid(student, spec, ckpt, tokenizer)
    opt_state = {}  # AdamW's per-parameter exp_avg, exp_avg_sq and step, keyed "<param>::<field>"
    for name, param in zip(names, opt.param_groups[0]["params"]):
        for key, value in opt.state.get(param, {}).items():
            value = value.detach().float()
            opt_state[f"{name}::{key}"] = (value.reshape(1) if key == "step" else value).contiguous()
    atomic_write_file(ckpt / "optimizer.safetensors", lambda p: save_file(opt_state, p))
    for file_name, content in {TRAINER_STATE: state, **(extra_files or {})}.items():
        atomic_write_file(ckpt / file_name, functools.partial(_write_text, json.dumps(content, indent=1)))
    atomic_write_file(out / LATEST, lambda p: Path(p).write_text(json.dumps({"checkpoint": ckpt.name, "step": step})))
    for old in out.glob("ckpt-*"):
        if old != ckpt:
            shutil.rmtree(old, ignore_errors=True)
    return ckpt


def _write_text(text: str, path: str) -> None:
    Path(path).write_text(text)


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file as an object; anything else is a ModelError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}); not a medmoe distill checkpoint") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: cannot read it ({exc})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: a JSON {type(data).__name__}, not an object; not a medmoe distill checkpoint")
    return data


def latest_checkpoint(out: str | Path) -> Path | None:
    """The last complete checkpoint folder of a distillation run, or None. latest.json may only name
    a `ckpt-<step>` folder inside `out` (never a path elsewhere)."""
    pointer = Path(out) / LATEST
    if not pointer.exists():
        return None
    name = read_json(pointer).get("checkpoint")
    if not isinstance(name, str) or not re.fullmatch(r"ckpt-\d+", name) or not (Path(out) / name).is_dir():
        raise ModelError(f"{pointer}: field 'checkpoint' must name a ckpt-<step> folder in {out}, got {name!r}")
    return Path(out) / name


def restore_optimizer(opt, names: list[str], folder: Path) -> None:
    """AdamW's state saved by `save_checkpoint` in `folder`, put back on the same parameters (by name)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        saved = load_file(str(folder / "optimizer.safetensors"))
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"{folder / 'optimizer.safetensors'}: not a readable safetensors file ({exc}); it is not loaded") from None
    params = opt.param_groups[0]["params"]
    for i, name in enumerate(names):
        entries = {k.split("::", 1)[1]: v.to(params[i].device) for k, v in saved.items() if k.startswith(f"{name}::")}
        if entries:
            entries["step"] = entries["step"].reshape(())
            opt.state[params[i]] = entries


def load_student(folder: Path):
    """load_hybrid, with an unreadable weights file reported as a ModelError naming the folder."""
    from safetensors import SafetensorError

    try:
        return load_hybrid(folder)
    except SafetensorError as exc:
        raise ModelError(f"{folder / 'model.safetensors'}: not a readable safetensors file ({exc}); it is not loaded") from None


def distill(teacher, student, spec: HybridSpec, blocks: torch.Tensor, out: str | Path, cfg: DistillConfig,
            tokenizer=None, resume: bool = True,
            on_step: Callable[[int, float, float], None] | None = None) -> dict:
    """Train `student` against `teacher` on token `blocks` (N, seq_len); checkpoints in `out`.

    With `resume` and a checkpoint in `out`, the student weights, optimizer and step are restored
    from it (the `student` passed in is replaced). Returns {"step", "history", "checkpoint"}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    start: int = 0
    history: list = []
    found = latest_checkpoint(out) if resume else None
    if found is not None:
        student, _, spec = load_student(found)
        state = read_json(found / TRAINER_STATE)
        step, past = state.get("step"), state.get("history")
        if not isinstance(step, int) or not isinstance(past, list):
            raise ModelError(f"{found / 'trainer_state.json'}: fields 'step' (a number) and 'history' (a list) are required")
        start, history = step, past
    device = torch.device(cfg.device)
    teacher.to(device).eval()
    student.to(device).train()
    named = _trainable(student, cfg.train)
    names = [n for n, _ in named]
    opt = torch.optim.AdamW([p for _, p in named], lr=cfg.lr, weight_decay=cfg.weight_decay)
    if found is not None:
        restore_optimizer(opt, names, found)
    began = time.monotonic()
    step = start
    while step < cfg.max_steps:
        if cfg.max_minutes is not None and time.monotonic() - began > 60 * cfg.max_minutes:
            break
        ids = blocks[batch_indices(step, len(blocks), cfg.batch_size, cfg.seed)].to(device)
        with torch.no_grad(), teacher_autocast(device, cfg.dtype):
            teacher_logits = teacher(input_ids=ids, use_cache=False).logits
        loss = kl_loss(student(input_ids=ids, use_cache=False).logits, teacher_logits, cfg.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        opt.step()
        step += 1
        history.append({"step": step, "kl": round(loss.item(), 5), "seconds": round(time.monotonic() - began, 2)})
        if on_step is not None:
            on_step(step, loss.item(), time.monotonic() - began)
        if step % cfg.save_every == 0 or step == cfg.max_steps:
            _save(out, step, student, spec, tokenizer, opt, names, cfg, history)
    if not history or latest_checkpoint(out) is None or json.loads((out / LATEST).read_text())["step"] != step:
        _save(out, step, student, spec, tokenizer, opt, names, cfg, history)
    return {"step": step, "history": history, "checkpoint": str(latest_checkpoint(out)), "student": student}


def teacher_autocast(device: torch.device, dtype: str):
    """Autocast for the teacher's forward in `dtype` (float32: disabled) on `device`'s kind."""
    name = str(dtype)
    if name not in ("float32", "bfloat16", "float16"):  # the CLI resolves auto and aliases (medmoe.models.placement)
        raise ModelError(f"DistillConfig.dtype {dtype!r}: give float32, bfloat16 or float16 (resolve 'auto' first: "
                         "medmoe.models.placement.resolve_dtype)")
    return torch.autocast(device.type, dtype=getattr(torch, name), enabled=name != "float32")


def perplexity(model, blocks: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token cross-entropy) over (N, L) token blocks."""
    total, count = 0.0, 0
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(blocks), batch_size):
            ids = blocks[i:i + batch_size].to(device)
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
            total += F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum").item()
            count += ids[:, 1:].numel()
    return math.exp(total / count)

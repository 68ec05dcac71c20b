"""The training loop of task-level distillation (`run_task_distill`, `task_distill`) and its evaluation.

Training: AdamW at a constant learning rate after a linear warm-up (so extending the budget later
changes nothing already trained), `batch_size` prompts per step (gradients accumulated, one prompt at
a time: no padding), prompts in a seeded permutation per epoch, gradient clipping; each prompt's loss
is losses.py's L(x) over the teacher cache's entry (teacher_cache.py). The budget is `minutes` of
training time over the whole run, across resumes (evaluation and checkpoint writes are not counted),
and/or `max_steps`. An optional first phase (`align_only_minutes` / `align_only_steps`) trains on the
alignment term alone (only the mixers receive gradients), as MOHAWK's stage 2 before end-to-end
distillation; it ends at the first step at which both thresholds are reached, and the step is
recorded, so a resumed run switches where the original did.

Checkpoints are mamba/distill.py's (`out/ckpt-<step>/`, the hybrid + optimizer.safetensors +
trainer_state.json, then `out/latest.json`), so the run folder loads with
`medmoe.models.load_causal_lm(out)` and `medmoe run --mamba out`; the run folder's settings, the
resume check and each checkpoint's provenance are settings.py's. `evaluate` scores E_M against E_T
on the held-out records (agreement, E_M and E_T accuracy), logged per evaluation in `log.jsonl`,
what the report plots against minutes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from medmoe.data.record import Record
from medmoe.errors import MedmoeError
from medmoe.mamba.distill import batch_indices, latest_checkpoint, load_student, read_json, restore_optimizer, save_checkpoint
from medmoe.mamba.hybrid import HybridSpec
from medmoe.mamba.transfer import AttentionMamba
from medmoe.models.loader import TRAINING_FILE
from medmoe.paths import atomic_write_json
from medmoe.train.run_folder import truncate_log
from medmoe.train.task_distill.config import TaskDistillConfig, cache_layers
from medmoe.train.task_distill.losses import answer_kl, prompt_loss, student_option_logits
from medmoe.train.task_distill.prompts import TaskData, TaskTeacher
from medmoe.train.task_distill.settings import (
    LOG_FILE,
    append_log,
    checkpoint_provenance,
    load_student_source,
    open_task_run,
    run_settings,
)
from medmoe.train.task_distill.teacher_cache import CACHE_FOLDER, TeacherCache


@torch.no_grad()
def evaluate(student: Any, cache: TeacherCache, indices: Sequence[int], records: Sequence[Record]) -> dict[str, Any]:
    """E_M against E_T on cached records: agreement (same argmax), E_M's and E_T's accuracy (the
    answer equals the single gold letter; multi-answer questions count as wrong), mean KL(p_T || p_M),
    and how often E_M gives each answer."""
    was = student.training
    student.eval()
    agree = correct = teacher_correct = 0
    kl = 0.0
    counts: dict[str, int] = {}
    try:
        for i, record in zip(indices, records):
            e = cache.entry(i, ("ids", "options", "logp"))
            option_logits, _ = student_option_logits(student, e["ids"], e["options"])
            m, t = int(option_logits.argmax()), int(e["logp"].argmax())
            gold = record.gold_indices
            agree += m == t
            correct += gold == (m,)
            teacher_correct += gold == (t,)
            kl += float(answer_kl(e["logp"], option_logits))
            letter = record.letters[m]
            counts[letter] = counts.get(letter, 0) + 1
    finally:
        student.train(was)
    n = max(len(indices), 1)
    return {"examples": len(indices), "agreement": agree / n, "accuracy": correct / n,
            "teacher_accuracy": teacher_correct / n, "answer_kl": kl / n, "answers": dict(sorted(counts.items()))}


def _trainable(student: Any, mode: str) -> list[tuple[str, torch.nn.Parameter]]:
    mixers = tuple(f"{n}." for n, m in student.named_modules() if isinstance(m, AttentionMamba))
    chosen = []
    for name, p in student.named_parameters():
        keep = mode == "all" or name.startswith(mixers)
        p.requires_grad_(keep)
        if keep:
            chosen.append((name, p))
    return chosen


def task_distill(student: Any, spec: HybridSpec, cache: TeacherCache, data: TaskData, out: str | Path,
                 cfg: TaskDistillConfig, *, tokenizer: Any = None, settings: dict[str, Any] | None = None,
                 teacher: str = "", head: str | None = None, student_source: str = "", student_folder: Path | None = None,
                 resume: bool = True, on_step: Callable[[int, dict[str, float], float], None] | None = None,
                 on_eval: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Distil `student` on the cache's prompts (0..len(data.train)-1 train, then the held-out ones);
    checkpoints, log and settings in `out`. With `resume` and a checkpoint there, the student, optimizer,
    step, budget spent and phase come from it (the `student` passed in is replaced).
    Returns {"step", "minutes", "history", "evals", "checkpoint", "student"}."""
    out = Path(out)
    n_train = len(data.train)
    if len(cache) != n_train + len(data.heldout) or int(cache.key["active"]) != n_train:
        raise MedmoeError(f"{cache.folder}: the teacher cache holds {len(cache)} records ({cache.key['active']} with "
                          f"activations), the data {n_train} training + {len(data.heldout)} held-out prompts")
    if cache.layers != cache_layers(spec, cfg):
        raise MedmoeError(f"{cache.folder}: the cache holds activations of teacher layers {cache.layers}, this student "
                          f"replaced {cache_layers(spec, cfg)}")
    if cfg.gamma and int(cache.key["top_k"]) != cfg.top_k:
        raise MedmoeError(f"{cache.folder}: the cache holds the teacher's top {cache.key['top_k']} tokens, --gamma needs {cfg.top_k}")
    found = open_task_run(out, settings if settings is not None else {"config": cfg.trained_settings()}, resume)
    step, seconds, history, evals, align_until = 0, 0.0, [], [], None
    if found is not None:
        student, _, spec = load_student(found)
        student = student.float()
        saved_state = read_json(found / "trainer_state.json")
        if not isinstance(saved_state.get("step"), int) or not isinstance(saved_state.get("history"), list):
            raise MedmoeError(f"{found / 'trainer_state.json'}: fields 'step' (a number) and 'history' (a list) are required")
        step, history = saved_state["step"], saved_state["history"]
        seconds, evals = float(saved_state.get("train_seconds", 0.0)), list(saved_state.get("evals", []))
        align_until = saved_state.get("align_until")
        truncate_log(out / LOG_FILE, step)
    student.train()
    named = _trainable(student, cfg.train)
    names = [n for n, _ in named]
    params = [p for _, p in named]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if found is not None:
        restore_optimizer(opt, names, found)
    heldout = list(range(n_train, n_train + len(data.heldout)))
    phased = bool(cfg.align_only_minutes or cfg.align_only_steps)
    saved = (step, len(evals)) if found is not None else None  # what the newest checkpoint holds

    def state() -> dict[str, Any]:
        return {"step": step, "config": asdict(cfg), "history": history, "train_seconds": seconds, "evals": evals,
                "align_until": align_until}

    def save() -> None:
        nonlocal saved
        latest = latest_checkpoint(out)
        if latest is not None and latest.name == f"ckpt-{step:06d}":  # same weights, one more evaluation:
            atomic_write_json(latest / "trainer_state.json", state())  # replace that file only, never the folder
        else:
            provenance = checkpoint_provenance(data, teacher, head, student_source, student_folder, cfg, step, seconds)
            save_checkpoint(out, step, student, spec, tokenizer, opt, names, state(), {TRAINING_FILE: provenance})
        saved = (step, len(evals))

    def run_eval() -> None:
        began = time.monotonic()
        metrics = evaluate(student, cache, heldout, data.heldout)
        metrics = {"event": "eval", "step": step, "minutes": round(seconds / 60, 4), **metrics,
                   "seconds": round(time.monotonic() - began, 2)}
        evals.append(metrics)
        append_log(out, metrics)
        if on_eval is not None:
            on_eval(step, metrics)

    if step == 0 and not evals:
        run_eval()
    while step < cfg.max_steps and (cfg.minutes is None or seconds < 60 * cfg.minutes):
        if phased and align_until is None and step >= cfg.align_only_steps and seconds >= 60 * cfg.align_only_minutes:
            align_until = step
        align_only = phased and (align_until is None or step < align_until)
        began = time.monotonic()
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
        sums: dict[str, float] = {}
        total = 0.0
        for i in batch_indices(step, n_train, cfg.batch_size, cfg.seed).tolist():
            loss, terms = prompt_loss(student, spec, cache.entry(i), cfg, align_only)
            if loss.requires_grad:  # not when nothing trainable is in the loss (an align phase without mixers)
                (loss / cfg.batch_size).backward()
            total += loss.item() / cfg.batch_size
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v / cfg.batch_size
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        seconds += time.monotonic() - began
        entry = {"event": "step", "step": step, "minutes": round(seconds / 60, 4), "phase": "align" if align_only else "task",
                 "loss": total, **sums}
        history.append({k: v for k, v in entry.items() if k != "event"})
        append_log(out, entry)
        if on_step is not None:
            on_step(step, sums | {"loss": total}, seconds)
        if step % cfg.eval_every == 0:
            run_eval()
        if step % cfg.save_every == 0:
            save()
    if not evals or evals[-1]["step"] != step:
        run_eval()
    if saved != (step, len(evals)):
        save()
    return {"step": step, "minutes": seconds / 60, "history": history, "evals": evals,
            "checkpoint": str(latest_checkpoint(out)), "student": student}


def run_task_distill(teacher: TaskTeacher, student_source: str | Path, data: TaskData, out: str | Path,
                     cfg: TaskDistillConfig, *, cache_folder: str | Path | None = None, resume: bool = True,
                     on_cache: Callable[[int, int], None] | None = None,
                     on_step: Callable[[int, dict[str, float], float], None] | None = None,
                     on_eval: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Everything `medmoe mambaformer distill-task` does after loading the teacher: load the student,
    check the run folder's settings (before any teacher work), build or open the teacher cache
    (default `out/teacher_cache/`), then `task_distill`. Returns its result and the cache."""
    student, spec, folder = load_student_source(student_source)
    shapes = {k: (getattr(teacher.model.config, k, None), getattr(student.config, k, None))
              for k in ("hidden_size", "vocab_size", "num_attention_heads", "num_key_value_heads")}
    wrong = {k: v for k, v in shapes.items() if v[0] != v[1]}
    if wrong or max(spec.layers) >= teacher.model.config.num_hidden_layers:
        raise MedmoeError(f"--student {student_source} was built from {spec.teacher!r} (teacher layers {spec.layers}), which "
                          f"does not fit the teacher {teacher.source!r} ({teacher.model.config.num_hidden_layers} layers; "
                          + ", ".join(f"{k} {a} vs the student's {b}" for k, (a, b) in wrong.items()) + ")")
    settings = run_settings(teacher, str(student_source), student, data, cfg)
    open_task_run(out, settings, resume)
    cache = TeacherCache.build_or_open(Path(cache_folder) if cache_folder else Path(out) / CACHE_FOLDER, teacher,
                                       data.records, len(data.train), cache_layers(spec, cfg),
                                       cfg.top_k if cfg.gamma else 0, cfg.cache_dtype, on_cache)
    result = task_distill(student, spec, cache, data, out, cfg, tokenizer=teacher.tokenizer, settings=settings,
                          teacher=teacher.source, head=teacher.head, student_source=str(student_source),
                          student_folder=folder, resume=resume, on_step=on_step, on_eval=on_eval)
    return {**result, "cache": cache}

"""The run folder of a task distillation: its settings file, the resume check, provenance and the log.

`task_distill.json` (SETTINGS_FILE) records the settings (`run_settings`: teacher, head, student,
prompts and the trained settings): resuming with another teacher, head, student, data or loss
setting is refused naming old -> new (`open_task_run`); the budget (`minutes`, `max_steps`) and the
evaluation and save intervals may change. Each checkpoint also holds `medmoe_training.json`
(`checkpoint_provenance`: teacher, head, task, pool, minutes, steps; `skip_first` for the pipeline's
gate check). `log.jsonl` (LOG_FILE) has one line per step and one per evaluation (`append_log`).
`load_student_source` opens the student: a hybrid folder or a distill run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medmoe.errors import MedmoeError
from medmoe.mamba.distill import latest_checkpoint, load_student
from medmoe.mamba.hybrid import HybridSpec
from medmoe.models.loader import hybrid_folder, training_provenance
from medmoe.paths import atomic_write_json
from medmoe.train.run_folder import changed_settings, read_settings
from medmoe.train.task_distill.config import TaskDistillConfig
from medmoe.train.task_distill.prompts import TaskData, TaskTeacher, records_fingerprint, weights_fingerprint

SETTINGS_FILE = "task_distill.json"
LOG_FILE = "log.jsonl"


METHOD = "task-distill"


def open_task_run(out: str | Path, settings: dict[str, Any], resume: bool) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run (then `settings` are recorded). A run
    with checkpoints resumes only with the same settings (each change named old -> new), and
    --no-resume refuses it (nothing is deleted). A folder with checkpoints but no SETTINGS_FILE holds
    another kind of run (e.g. `mambaformer distill`): refused, never overwritten."""
    out = Path(out)
    settings = json.loads(json.dumps(settings))
    path = out / SETTINGS_FILE
    found = latest_checkpoint(out)
    if found is not None:
        if not path.is_file():
            raise MedmoeError(f"{out}: holds checkpoints of another run ({found.name}, no {SETTINGS_FILE}), e.g. a "
                              "`mambaformer distill` run; give the task distillation a new --output (and this run as --student)")
        if not resume:
            raise MedmoeError(f"{out}: holds a previous task distillation; --no-resume does not delete it. Use a new "
                              "--output, or delete the folder yourself to start it over")
        changed = changed_settings(read_settings(path), settings)
        if changed:
            what = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items())
            raise MedmoeError(f"{path}: this folder holds a task distillation with other settings ({what}). Rerun "
                              "with the folder's settings to resume it, or use a new --output")
        return found
    out.mkdir(parents=True, exist_ok=True)  # nothing trained yet: (re)start with these settings
    (out / LOG_FILE).unlink(missing_ok=True)
    atomic_write_json(path, settings)
    return None


def run_settings(teacher: TaskTeacher, student_source: str, student: Any, data: TaskData, cfg: TaskDistillConfig) -> dict[str, Any]:
    """What a run's weights depend on: the teacher, head and initial student, the prompts and the
    trained settings (task_distill.json)."""
    return {"teacher": teacher.source, "teacher_weights_sha256": weights_fingerprint(teacher.model),
            "head": teacher.head, "head_sha256": teacher.head_sha256,
            "student": student_source, "student_weights_sha256": weights_fingerprint(student),
            "task": data.task, "skip_first": data.skip_first, "train_prompts": len(data.train), "heldout": len(data.heldout),
            "records_sha256": records_fingerprint(data.records), "config": cfg.trained_settings()}


def load_student_source(source: str | Path) -> tuple[Any, HybridSpec, Path]:
    """(student in train mode, its spec, the hybrid folder) from a hybrid folder or a distill run."""
    folder = hybrid_folder(Path(source))
    if folder is None:
        raise MedmoeError(f"--student {source}: not a Mamba hybrid (a hybrid folder, or a `medmoe mambaformer distill` "
                          "or task distillation run folder)")
    student, _, spec = load_student(folder)
    return student.float(), spec, folder


def checkpoint_provenance(data: TaskData, teacher_source: str, head: str | None, student_source: str, student_folder: Path | None,
                          cfg: TaskDistillConfig, step: int, seconds: float) -> dict[str, Any]:
    """medmoe_training.json of a checkpoint. skip_first is what the pipeline's gate check reads: the
    first N train records of `data` were never trained on (the smaller N when the student itself was
    fine-tuned on the same task)."""
    earlier = training_provenance(student_folder) if student_folder is not None else None
    skip = data.skip_first
    if earlier and earlier.get("data") == data.task:
        skip = min(skip, int(earlier.get("skip_first", 0)))
    return {"method": METHOD, "data": data.task, "skip_first": skip, "teacher": teacher_source, "head": head,
            "student": student_source, "pool": {"name": data.task, "records": data.pool_records,
                                                 "train_prompts": len(data.train), "heldout": len(data.heldout), **data.notes},
            "losses": {"alpha": cfg.alpha, "gamma": cfg.gamma, "delta": cfg.delta, "top_k": cfg.top_k},
            "steps": step, "minutes": round(seconds / 60, 3), "student_training": earlier}


def append_log(out: Path, record: dict[str, Any]) -> None:
    with (out / LOG_FILE).open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")

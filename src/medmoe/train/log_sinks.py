"""Where a training loop's per-step records go: train_log.jsonl always, TensorBoard and wandb on request.

`report_to` (FinetuneConfig; like Hugging Face Trainer's) names the sinks, as a list or a comma-separated
string; None reads $MEDMOE_REPORT_TO, and without it only the JSONL log is written:

  jsonl        the run folder's train_log.jsonl, one JSON record per step, always written (resume cuts
               it back to the checkpoint; the model card reads it); "none" asks for nothing more
  tensorboard  OUTPUT/tensorboard/ event files (torch.utils.tensorboard; needs the `tensorboard`
               package). A resumed run's writer purges the events after its checkpoint, so TensorBoard
               shows each step once, as the JSONL log does
  wandb        a Weights & Biases run (needs the `wandb` package; project $WANDB_PROJECT, default
               medmoe; the run's id is kept in OUTPUT/wandb_id.txt, so a resume continues the same run;
               wandb ignores steps it has already seen, so after a resume the retrained steps keep the
               values of the first try there, while the JSONL log and TensorBoard hold the new ones)

A sink asked for whose package is missing is a MedmoeError naming the package, raised by
`parse_report_to` (FinetuneConfig calls it, so the run fails before anything is loaded).

Each record's numbers become scalars (`scalars`): loss, lr and epoch as train/<key>, the LoRA-MoE auxiliary
terms (record["aux"]) as train/aux/<name>, eval_loss as eval/loss, all at the record's step.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medmoe.errors import MedmoeError

SINKS = ("jsonl", "tensorboard", "wandb")
REPORT_TO_ENV = "MEDMOE_REPORT_TO"
TENSORBOARD_FOLDER = "tensorboard"
WANDB_ID_FILE = "wandb_id.txt"
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # sink -> the package it needs


def _names(value: str | Sequence[str]) -> list[str]:
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(item).strip().lower() for item in items if str(item).strip()]


def available(sink: str) -> bool:
    """Whether the package a sink needs can be imported (jsonl needs none)."""
    package = PACKAGES.get(sink)
    if package is None:
        return True
    try:
        return importlib.util.find_spec(package) is not None
    except ValueError:  # a module in sys.modules without a spec (a stand-in): importable
        return True


def parse_report_to(value: str | Sequence[str] | None) -> list[str]:
    """The sinks, jsonl first: from a list or "jsonl,tensorboard"; None: $MEDMOE_REPORT_TO, else jsonl.
    An unknown name, or a sink whose package is not installed, is a MedmoeError."""
    if value is None:
        value = os.environ.get(REPORT_TO_ENV, "jsonl")
    names = [name for name in _names(value) if name != "none"]
    unknown = [name for name in names if name not in SINKS]
    if unknown:
        raise MedmoeError(f"report_to: unknown sink {', '.join(map(repr, unknown))}; choose from {', '.join(SINKS)} (comma-separated)")
    for name in names:
        if not available(name):
            raise MedmoeError(f"report_to {name}: the `{PACKAGES[name]}` package is not installed "
                              f"(pip install {PACKAGES[name]}), or leave {name} out of report_to")
    return ["jsonl", *dict.fromkeys(name for name in names if name != "jsonl")]


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A log record's numbers as {tag: value}: eval_loss -> eval/loss, aux.<name> -> train/aux/<name>,
    every other number -> train/<key>; the step is the x axis, not a scalar."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            out.update({f"train/{key}/{k}": float(v) for k, v in value.items() if _is_number(v)})
        elif _is_number(value):
            out["eval/loss" if key == "eval_loss" else f"train/{key}"] = float(value)
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class MetricSinks:
    """The sinks of one run (rank 0 only): write(record) appends to the JSONL log and sends the record's
    scalars to TensorBoard / wandb; close() when the run ends. Usable as a context manager.

    resume_step: the checkpoint's step a resumed run starts after (TensorBoard events after it are purged).
    config: the run's settings (wandb's run config). run_name: the wandb run's name (default: the folder's).
    """

    def __init__(self, log_path: Path, report_to: str | Sequence[str] | None = None, *, resume_step: int = 0,
                 config: dict[str, Any] | None = None, run_name: str | None = None):
        self.log_path = Path(log_path)
        self.names = parse_report_to(report_to)
        folder = self.log_path.parent
        self.tensorboard: Any = None
        self.wandb: Any = None
        if "tensorboard" in self.names:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(folder / TENSORBOARD_FOLDER), purge_step=resume_step + 1 if resume_step else None)
        if "wandb" in self.names:
            self.wandb = _wandb_run(folder, config or {}, run_name or folder.resolve().name)

    def write(self, record: dict[str, Any]) -> None:
        with self.log_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is None and self.wandb is None:
            return
        step, values = int(record["step"]), scalars(record)
        if self.tensorboard is not None:
            for tag, value in values.items():
                self.tensorboard.add_scalar(tag, value, step)
            self.tensorboard.flush()  # on disk at every step: a killed run loses nothing it logged
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None

    def __enter__(self) -> MetricSinks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _wandb_run(folder: Path, config: dict[str, Any], name: str) -> Any:
    """A wandb run logging into `folder`, resumed when the folder names one (WANDB_ID_FILE)."""
    wandb = importlib.import_module("wandb")
    folder.mkdir(parents=True, exist_ok=True)
    id_file = folder / WANDB_ID_FILE
    run_id = id_file.read_text(encoding="utf-8").strip() if id_file.is_file() else ""
    if not run_id:
        run_id = uuid.uuid4().hex[:16]
        id_file.write_text(run_id + "\n", encoding="utf-8")
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "medmoe"), name=name, id=run_id, resume="allow",
                      dir=str(folder), config=config)

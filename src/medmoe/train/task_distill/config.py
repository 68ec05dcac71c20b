"""The settings of a task distillation run (`TaskDistillConfig`): the loss weights, the optimizer, the budget.

`trained_settings()` is what the trained weights depend on (a resumed run must match it, loop.py);
the budget and the intervals (RESUMABLE) may change between resumes. `cache_layers` are the teacher
layers whose attention activations the teacher cache holds for the alignment term.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from medmoe.errors import MedmoeError
from medmoe.mamba.hybrid import HybridSpec
from medmoe.train.task_distill.teacher_cache import storage_dtype


@dataclass
class TaskDistillConfig:
    """The loss weights (alpha, gamma, delta: losses.py), the optimizer and the budget."""

    alpha: float = 1.0             # answer-distribution KL
    gamma: float = 0.0             # prompt-token KL over the teacher's top_k tokens
    delta: float = 1.0             # layer-wise alignment of the mixers
    top_k: int = 64
    cache_dtype: str = "float16"   # storage of the cached activations
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    batch_size: int = 4            # prompts per optimizer step
    train: str = "all"             # "all" parameters, or "mixers" only
    max_grad_norm: float = 1.0
    align_only_minutes: float = 0.0  # first phase: the alignment term alone ...
    align_only_steps: int = 0        # ... until both are reached
    seed: int = 0
    minutes: float | None = None   # budget: training minutes of the whole run (across resumes)
    max_steps: int = 100_000
    eval_every: int = 25
    save_every: int = 25

    def __post_init__(self) -> None:
        if min(self.alpha, self.gamma, self.delta) < 0 or not (self.alpha or self.gamma or self.delta):
            raise MedmoeError(f"--alpha, --gamma, --delta must be >= 0 and not all 0 (got {self.alpha}, {self.gamma}, {self.delta})")
        if (self.align_only_minutes or self.align_only_steps) and not self.delta:
            raise MedmoeError("an align-only phase trains the alignment term: it needs --delta > 0")
        if self.gamma and self.top_k < 1:
            raise MedmoeError(f"--gamma needs --top-k >= 1 teacher tokens per position, got {self.top_k}")
        if self.train not in ("all", "mixers"):
            raise MedmoeError(f"train must be 'all' or 'mixers', got {self.train!r}")
        if self.batch_size < 1 or self.eval_every < 1 or self.save_every < 1:
            raise MedmoeError("batch size, eval-every and save-every must be >= 1")
        storage_dtype(self.cache_dtype)

    @property
    def aligns(self) -> bool:
        return self.delta > 0

    def trained_settings(self) -> dict[str, Any]:
        """What the trained weights depend on (everything but the budget and the intervals)."""
        return {k: v for k, v in asdict(self).items() if k not in RESUMABLE}


RESUMABLE = ("minutes", "max_steps", "eval_every", "save_every")


def cache_layers(spec: HybridSpec, cfg: TaskDistillConfig) -> list[int]:
    """The teacher layers whose attention activations the cache holds: those the student replaced."""
    return [j for _, j in spec.mixer_layers()] if cfg.aligns else []

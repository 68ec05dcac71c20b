"""Task-level distillation of the Mamba expert: E_M learns E_T's answers on the task's own prompts.

`medmoe mambaformer distill` teaches a hybrid student general text; this teaches it the task
(`medmoe mambaformer distill-task`, docs/mamba.md). One job per file:

  prompts.py        the teacher E_T (`TaskTeacher`, `lm_teacher`), the prompts' tokens, the task's
                    training and held-out prompts (`TaskData`, `task_records`), the fingerprints
  teacher_cache.py  `TeacherCache`: the teacher's answers, activations and top-k log-probs on disk
  config.py         `TaskDistillConfig`: loss weights, optimizer, budget; `cache_layers`
  losses.py         the loss L(x) = alpha * answer KL + gamma * prompt-token KL + delta * alignment
  settings.py       the run folder: settings and the resume check, provenance, the log, the student
  loop.py           `run_task_distill`, `task_distill` (the training loop) and `evaluate`

Every name other code imports is re-exported here: import from `medmoe.train.task_distill`.
"""

from medmoe.train.task_distill.config import RESUMABLE, TaskDistillConfig, cache_layers
from medmoe.train.task_distill.loop import evaluate, run_task_distill, task_distill
from medmoe.train.task_distill.losses import answer_kl, prompt_loss, student_option_logits, topk_token_kl
from medmoe.train.task_distill.prompts import (
    TaskData,
    TaskTeacher,
    TeacherScorer,
    lm_teacher,
    prompt_tokens,
    records_fingerprint,
    task_records,
    weights_fingerprint,
)
from medmoe.train.task_distill.settings import (
    LOG_FILE,
    METHOD,
    SETTINGS_FILE,
    load_student_source,
    open_task_run,
    run_settings,
)
from medmoe.train.task_distill.teacher_cache import (
    CACHE_DTYPES,
    CACHE_FOLDER,
    CACHE_FORMAT,
    CACHE_MANIFEST,
    RECORDS_PER_FILE,
    TeacherCache,
    cache_key,
)

__all__ = [
    "CACHE_DTYPES", "CACHE_FOLDER", "CACHE_FORMAT", "CACHE_MANIFEST", "LOG_FILE", "METHOD", "RECORDS_PER_FILE",
    "RESUMABLE", "SETTINGS_FILE", "TaskData", "TaskDistillConfig", "TaskTeacher", "TeacherCache", "TeacherScorer",
    "answer_kl", "cache_key", "cache_layers", "evaluate", "lm_teacher", "load_student_source", "open_task_run",
    "prompt_loss", "prompt_tokens", "records_fingerprint", "run_settings", "run_task_distill", "student_option_logits",
    "task_distill", "task_records", "topk_token_kl", "weights_fingerprint",
]

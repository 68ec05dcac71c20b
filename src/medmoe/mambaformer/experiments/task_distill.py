"""E_T as task-level distillation reads it (train/task_distill/): the Transformer expert answering
with its own option log-probs, or through an option head from `medmoe heads train`, whose
probabilities are then the "calibrated answer distribution" p_T the Mamba expert learns.

It sits here, above both `train` and `heads` in the layers (docs/architecture.md), because a head's
answer is computed by `heads.answerer.head_logits`, the one code path every head answers with
(`medmoe eval --head`, the quality report, the server): the distillation target is exactly what the
head answers, not a re-implementation of it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from medmoe.data.record import Record
from medmoe.errors import MedmoeError
from medmoe.eval.prompts import Prompt
from medmoe.train.task_distill import TaskTeacher, lm_teacher

DEFAULT_TEACHER = "smollm2-135m"


def head_sha256(folder: str | Path) -> str:
    """SHA-256 of a head folder's config and weights (what its answers depend on)."""
    from medmoe.models.head import HEAD_CONFIG, HEAD_WEIGHTS

    digest = hashlib.sha256()
    for name in (HEAD_CONFIG, HEAD_WEIGHTS):
        digest.update((Path(folder) / name).read_bytes())
    return digest.hexdigest()


def load_teacher(model: str | None = None, head: str | Path | None = None) -> TaskTeacher:
    """E_T from `model` (bundled name, hub id or folder; default smollm2-135m), or from an option head
    folder, which names its own expert (then `model`, when given, must be that expert)."""
    if head is None:
        from medmoe.models import load_causal_lm

        source = model or DEFAULT_TEACHER
        network, tokenizer = load_causal_lm(source)
        return lm_teacher(network, tokenizer, source)
    from medmoe.heads.answerer import HeadAnswerer, head_logits

    answerer = HeadAnswerer.load(head)
    base = answerer.config.base
    if model is not None and model != base:
        raise MedmoeError(f"--head {head} answers for the expert {base!r}, not --model {model!r}: leave --model out, "
                          "or train a head for that model")
    network, tokenizer = answerer.lm.model, answerer.lm.tokenizer
    letters = answerer.head.letters

    def score(record: Record, prompt: Prompt) -> torch.Tensor:
        if len(record.options) > letters:
            raise MedmoeError(f"{record.id}: {len(record.options)} options, the head {head} answers at most {letters}")
        extra = None if answerer.option_extra is None else answerer.option_extra([record])
        logits, _, _ = head_logits(network, tokenizer, answerer.head, answerer.config, prompt, len(record.options), extra)
        return torch.log_softmax(logits.float(), dim=-1)

    return TaskTeacher(network, tokenizer, base, score, head=str(head), head_sha256=head_sha256(head))

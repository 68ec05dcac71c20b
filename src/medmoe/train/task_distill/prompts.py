"""The teacher and the task's prompts of task-level distillation.

`TaskTeacher` is E_T as the distillation reads it (its network, tokenizer and the scorer giving
log p_T over a prompt's options); `lm_teacher` makes one from a plain causal LM (with an option head:
mambaformer/experiments/task_distill.py). `prompt_tokens` tokenizes the zero-shot `letter` prompt the
experts answer with in the pipeline (eval/prompts.py `build_prompt(record, tokenizer, (), "letter")`)
as option scoring does. `TaskData` / `task_records` are a task's training and held-out prompts, all
from its training pool. `weights_fingerprint` and `records_fingerprint` are what the teacher cache's
key and the run folder's settings record of the teacher, the student and the prompts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from medmoe.data.record import Record
from medmoe.errors import MedmoeError
from medmoe.eval.prompts import Prompt
from medmoe.eval.scoring import accepts_logits_to_keep, bos_ids, encode_pair

TeacherScorer = Callable[[Record, Prompt], torch.Tensor]  # -> (K,) log p_T over the record's options, normalised


# ---- the teacher --------------------------------------------------------------------------------

@dataclass
class TaskTeacher:
    """E_T as the distillation reads it: the network (hooks go on it), its tokenizer, and `scorer`,
    which runs ONE forward pass of `model` on a prompt and returns log p_T over the options."""

    model: Any
    tokenizer: Any
    source: str
    scorer: TeacherScorer
    head: str | None = None
    head_sha256: str | None = None


def prompt_tokens(tokenizer: Any, prompt: Prompt) -> tuple[list[int], list[int]]:
    """(the prompt's token ids as the model reads them, each option's single continuation token), as
    option scoring and heads/features.py tokenize them; multi-token options are refused."""
    pairs = [encode_pair(tokenizer, prompt.context, c) for c in prompt.continuations]
    if not pairs:
        raise MedmoeError("a task prompt needs options")
    if any(len(c) != 1 or p != pairs[0][0] for p, c in pairs):
        raise MedmoeError("task distillation needs single-token option continuations after a common prompt "
                          f"(got {[len(c) for _, c in pairs]} tokens for {list(prompt.continuations)})")
    return bos_ids(tokenizer, pairs[0][0]) + pairs[0][0], [c[0] for _, c in pairs]


def lm_teacher(model: Any, tokenizer: Any, source: str) -> TaskTeacher:
    """E_T answering with its own option log-probs: p_T(k | x) = softmax_k z_T(x)[c_k]."""
    keep = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}

    @torch.inference_mode()
    def score(record: Record, prompt: Prompt) -> torch.Tensor:
        ids, options = prompt_tokens(tokenizer, prompt)
        x = torch.tensor([ids], device=next(model.parameters()).device)
        logits = model(input_ids=x, use_cache=False, **keep).logits[0, -1].float()
        return torch.log_softmax(logits[options], dim=-1).cpu()

    return TaskTeacher(model, tokenizer, source, score)


def weights_fingerprint(model: Any) -> str:
    """SHA-256 over name, shape, dtype and 1,024 strided values of every parameter and buffer."""
    digest = hashlib.sha256()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)][:1024].to(torch.float32).cpu().numpy()
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode() + sample.tobytes())
    return digest.hexdigest()


def records_fingerprint(records: Sequence[Record]) -> str:
    """SHA-256 over each record's id and every text its prompt shows, in order."""
    digest = hashlib.sha256()
    for r in records:
        digest.update(json.dumps([r.id, r.question, r.context, list(r.options)], ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()


# ---- the data -----------------------------------------------------------------------------------

@dataclass
class TaskData:
    """The prompts of a task: `train` (distilled on) and `heldout` (evaluated on, never trained on)."""

    task: str
    train: list[Record]
    heldout: list[Record]
    skip_first: int = 0
    pool_records: int = 0
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def records(self) -> list[Record]:
        """Cache order: the training prompts, then the held-out ones."""
        return self.train + self.heldout


def task_records(task: str, skip_first: int = 150, limit: int = 0, heldout_limit: int = 100) -> TaskData:
    """The prompts of bundled benchmark `task`, all from its training pool (data/pools.py: never a test
    question), option questions only:

      held out  the task's dev split (at most heldout_limit of it); a task without a dev split holds out
                the 10% of its pool first in SHA-256 order of the record ids
      left out  the first `skip_first` records of the task's train split: the MambaFormer gate learns
                from the experts' outcomes on them (as `mambaformer expert --skip-first`)
      train     the rest of the pool, in pool order (at most `limit`, 0 = all), labelled or not: for
                pubmedqa its train split; for dental also every MedMCQA question of another subject
    """
    from medmoe.data.datasets import load_splits
    from medmoe.data.pools import training_pool

    pool = [r for r in training_pool(task) if r.is_choice]
    splits = load_splits(task)
    gate = {r.id for r in splits.get("train", [])[:skip_first]}
    dev_ids = {r.id for r in splits.get("dev", [])}
    held = [r for r in pool if r.id in dev_ids]
    if not held:
        order = sorted(pool, key=lambda r: hashlib.sha256(r.id.encode()).hexdigest())
        held_ids = {r.id for r in order[: max(1, len(pool) // 10)]}
        held = [r for r in pool if r.id in held_ids]
    held_ids = {r.id for r in held}
    train = [r for r in pool if r.id not in gate and r.id not in held_ids]
    if not train:
        raise MedmoeError(f"{task}: leaving out the first {skip_first} train records and the held-out ones leaves no "
                          "training prompts")
    train = train[:limit] if limit else train
    held = held[:heldout_limit] if heldout_limit else held
    notes = {"heldout": "dev split" if dev_ids & held_ids else "10% of the pool by id hash",
             "left_out_for_gate": len(gate & {r.id for r in pool})}
    return TaskData(task, train, held, skip_first, len(pool), notes)

"""Task-level distillation of the Mamba expert: E_M learns E_T's answers on the task's own prompts.

`medmoe mambaformer distill` teaches a hybrid student general text; this teaches it the task. For each
prompt x, the zero-shot `letter` prompt the experts answer with in the pipeline (eval/prompts.py
`build_prompt(record, tokenizer, (), "letter")`, cut to the window as `medmoe eval` cuts it), with
K options whose continuation tokens are c_1..c_K:

    L(x) = alpha * KL( p_T(. | x) || p_M(. | x) )                         answer distribution
         + gamma * (1/n) sum_t KL( p_T^k(. | x_<=t) || p_M^k(. | x_<=t) ) prompt tokens
         + delta * (1/|R|) sum_{p in R} e_p(x)                             layer-wise alignment

  p_M(k | x)  = softmax_k( z_M(x)[c_k] ): the student's next-token logits z_M at the prompt's last
                position, renormalised over the K option tokens (what option scoring reads)
  p_T(k | x)  = the teacher's answer: softmax_k of its option head's logits when a head is given
                (`medmoe heads train`: its calibrated distribution), else of E_T's own z_T(x)[c_k]
  p^k(. | x_<=t) the next-token distribution at prompt position t (t = 1..n, the prompt's n tokens)
                coarsened to k + 1 bins: the teacher's k most likely tokens there and "the rest"
                (KL of the binned distributions, a lower bound of the full-vocabulary KL that the
                general distillation uses: full teacher logits, n x 49,152 values per prompt, are too
                big to cache; k = `top_k`, 64)
  R           the student layers whose attention was replaced, p <- teacher layer j (HybridSpec)
  e_p(x)      || Mixer_p(u_j) - a_j ||^2 / || a_j ||^2, the student mixer fed the teacher's own input
                u_j of layer j's attention (after its input norm) against that attention's output
                a_j (mamba/align.py; MOHAWK's hidden-state alignment). A mean over R, so delta does
                not depend on how many layers were replaced.

The answer loss never reads a label, only the teacher's distribution; labels score the held-out
evaluation only. An optional first phase (`align_only_minutes` / `align_only_steps`) trains on the
alignment term alone (only the mixers receive gradients), as MOHAWK's stage 2 before end-to-end
distillation; it ends at the first step at which both thresholds are reached, and the step is
recorded, so a resumed run switches where the original did.

Teacher cache (`TeacherCache`): the teacher runs once per prompt, with forward hooks, and what the
losses need is stored: the prompt's token ids, the option tokens, log p_T, and for training prompts
u_j and a_j of every replaced layer (when delta > 0) and the teacher's top-k next-token log-probs at
each position (when gamma > 0). Safetensors chunks of RECORDS_PER_FILE prompts plus `manifest.json`
(format, the key, the files and their sizes), rewritten after each chunk, so an interrupted build
resumes; the key is everything the cache depends on (teacher source, weights fingerprint and dtype,
head and the SHA-256 of its files, the records' fingerprint, the layers, top_k, the storage dtype),
and a cache with another key is refused naming each change. Nothing is pickled. A student step then
costs only the student: one forward and backward over the prompt, plus each mixer over u_j.

Training: AdamW at a constant learning rate after a linear warm-up (so extending the budget later
changes nothing already trained), `batch_size` prompts per step (gradients accumulated, one prompt at
a time: no padding), prompts in a seeded permutation per epoch, gradient clipping. The budget is
`minutes` of training time over the whole run, across resumes (evaluation and checkpoint writes are
not counted), and/or `max_steps`. Checkpoints are mamba/distill.py's (`out/ckpt-<step>/`, the hybrid
+ optimizer.safetensors + trainer_state.json, then `out/latest.json`), so the run folder loads with
`medmoe.models.load_causal_lm(out)` and `medmoe run --mamba out`; each checkpoint also holds
`medmoe_training.json` (teacher, head, task, pool, minutes, steps; `skip_first` for the pipeline's
gate check). `task_distill.json` in the run folder records the settings: resuming with another
teacher, head, student, data or loss setting is refused naming old -> new; the budget (`minutes`,
`max_steps`) and the evaluation and save intervals may change. `log.jsonl` has one line per step
(each loss term, cumulative training minutes) and one per evaluation (E_M/E_T agreement, E_M and E_T
accuracy on the held-out records), what the report plots against minutes.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from medmoe.data.record import Record
from medmoe.errors import MedmoeError
from medmoe.eval.model import HFEvalModel
from medmoe.eval.prompts import Prompt, build_prompt
from medmoe.eval.scoring import accepts_logits_to_keep, bos_ids, encode_pair
from medmoe.eval.window import PromptFitter
from medmoe.mamba.align import AttentionCapture, alignment_error
from medmoe.mamba.distill import (
    batch_indices,
    latest_checkpoint,
    load_student,
    read_json,
    restore_optimizer,
    save_checkpoint,
)
from medmoe.mamba.hybrid import HybridSpec
from medmoe.mamba.transfer import AttentionMamba
from medmoe.models.loader import TRAINING_FILE, hybrid_folder, training_provenance
from medmoe.paths import atomic_write_file, atomic_write_json
from medmoe.train.run_folder import changed_settings, read_cache_manifest, read_settings, truncate_log

CACHE_FORMAT = "medmoe-task-distill-cache/1"
CACHE_MANIFEST = "manifest.json"
CACHE_FOLDER = "teacher_cache"
CACHE_DTYPES = ("float16", "bfloat16", "float32")
RECORDS_PER_FILE = 8
SETTINGS_FILE = "task_distill.json"
LOG_FILE = "log.jsonl"
METHOD = "task-distill"

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


# ---- the teacher cache --------------------------------------------------------------------------

def _dtype(name: str) -> torch.dtype:
    if name not in CACHE_DTYPES:
        raise MedmoeError(f"cache dtype must be one of {', '.join(CACHE_DTYPES)}, got {name!r}")
    return getattr(torch, name)


def cache_key(teacher: TaskTeacher, records: Sequence[Record], active: int, layers: Sequence[int],
              top_k: int, cache_dtype: str) -> dict[str, Any]:
    """Everything the cached tensors depend on; a cache with another key is refused."""
    _dtype(cache_dtype)
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
        store = _dtype(cache_dtype)
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


# ---- losses ---------------------------------------------------------------------------------------

def answer_kl(teacher_logp: torch.Tensor, student_option_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_T || p_M) over the K options: teacher_logp (K,) log p_T, student_option_logits (K,) z_M[c_k]."""
    log_q = torch.log_softmax(student_option_logits.float(), dim=-1)
    p = teacher_logp.float().exp()
    return (p * (teacher_logp.float() - log_q)).sum()


def topk_token_kl(student_logits: torch.Tensor, topk_idx: torch.Tensor, topk_logp: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL between the (k + 1)-bin distributions: the teacher's top-k tokens at
    that position and the rest. student_logits (n, V); topk_idx, topk_logp (n, k)."""
    log_q = torch.log_softmax(student_logits.float(), dim=-1)
    log_qk = log_q.gather(-1, topk_idx.long())                                   # (n, k)
    log_p = topk_logp.float()
    p_rest = (1 - log_p.exp().sum(-1)).clamp_min(0)                              # (n,)
    q_rest = (-torch.expm1(torch.logsumexp(log_qk, dim=-1))).clamp_min(1e-12)    # 1 - sum_k q_k
    rest = torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(1e-12).log() - q_rest.log()), torch.zeros_like(p_rest))
    return ((log_p.exp() * (log_p - log_qk)).sum(-1) + rest).mean()


def student_option_logits(model: Any, ids: torch.Tensor, options: torch.Tensor, all_positions: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_M[c_k] at the last position (K,), the logits (n or 1, V)) of one prompt."""
    keep = {} if all_positions or not accepts_logits_to_keep(model) else {"logits_to_keep": 1}
    device = next(model.parameters()).device
    logits = model(input_ids=ids.long().to(device)[None], use_cache=False, **keep).logits[0]
    return logits[-1, options.long().to(device)], logits


@dataclass
class TaskDistillConfig:
    """The loss weights (module docstring), the optimizer and the budget."""

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
        _dtype(self.cache_dtype)

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


def prompt_loss(student: Any, spec: HybridSpec, entry: dict[str, torch.Tensor], cfg: TaskDistillConfig,
                align_only: bool) -> tuple[torch.Tensor, dict[str, float]]:
    """L(x) of one prompt (module docstring) and its terms."""
    terms: dict[str, float] = {}
    total = torch.zeros(())
    if not align_only and (cfg.alpha or cfg.gamma):
        option_logits, logits = student_option_logits(student, entry["ids"], entry["options"], all_positions=cfg.gamma > 0)
        if cfg.alpha:
            kl = answer_kl(entry["logp"], option_logits)
            total = total + cfg.alpha * kl
            terms["answer_kl"] = kl.item()
        if cfg.gamma:
            tok = topk_token_kl(logits, entry["topk_idx"], entry["topk_logp"])
            total = total + cfg.gamma * tok
            terms["token_kl"] = tok.item()
    mixers = spec.mixer_layers()
    if cfg.aligns and mixers:
        errors = [alignment_error(student, p, entry[f"in.{j}"], entry[f"out.{j}"]) for p, j in mixers]
        align = torch.stack(errors).mean()
        total = total + cfg.delta * align
        terms["align"] = align.item()
    return total, terms


# ---- evaluation ------------------------------------------------------------------------------------

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


# ---- the run folder ----------------------------------------------------------------------------------

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


def _trainable(student: Any, mode: str) -> list[tuple[str, torch.nn.Parameter]]:
    mixers = tuple(f"{n}." for n, m in student.named_modules() if isinstance(m, AttentionMamba))
    chosen = []
    for name, p in student.named_parameters():
        keep = mode == "all" or name.startswith(mixers)
        p.requires_grad_(keep)
        if keep:
            chosen.append((name, p))
    return chosen


def _provenance(data: TaskData, teacher_source: str, head: str | None, student_source: str, student_folder: Path | None,
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


def _log(out: Path, record: dict[str, Any]) -> None:
    with (out / LOG_FILE).open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


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
            provenance = _provenance(data, teacher, head, student_source, student_folder, cfg, step, seconds)
            save_checkpoint(out, step, student, spec, tokenizer, opt, names, state(), {TRAINING_FILE: provenance})
        saved = (step, len(evals))

    def run_eval() -> None:
        began = time.monotonic()
        metrics = evaluate(student, cache, heldout, data.heldout)
        metrics = {"event": "eval", "step": step, "minutes": round(seconds / 60, 4), **metrics,
                   "seconds": round(time.monotonic() - began, 2)}
        evals.append(metrics)
        _log(out, metrics)
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
        _log(out, entry)
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

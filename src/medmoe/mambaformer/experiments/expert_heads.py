"""The main job's experts answering through target-specific output heads (`medmoe run --answers heads`).

Each expert answers an option question from one forward pass over its zero-shot `letter` prompt:
the pass gives the head its hidden states and the expert's own option log-probs (heads/features.py),
and the head (models/head.py) turns them into the answer. Per expert:

  1. features of the run's train, dev and test records, once (cached in the run folder,
     `<out>/<dataset>/features/<role>/`; an interrupted run resumes with the records it lacks);
  2. the head chosen by 5-fold cross-validation on the run's own train + dev records (the pool P:
     zero-shot, a per-option bias, or a hidden-state head; `heads.fit.score_candidates`), and its
     answers cross-fitted (`head_tables.cross_fitted`): a pool question is answered by the head
     fitted without its fold, so the gate learns from, and tau is calibrated on, what the expert does
     on questions its head has not seen; a test question by the head fitted on all of P (what is
     deployed, and saved with the router: `RouterCheckpoint.heads`);
  3. the latency of that pass, measured one question at a time on TIMED dev questions (a fixed
     sha256 subsample; `timing.json` in the run folder keeps them for later runs) and fitted as
     C_e(n) = a n^2 + b n + c over the prompt's tokens n (`latency.fit_latency_model`): every
     question's latency is C_e(n_i), since the features pass itself is not timed per question.

The results are written as the zero-shot runner's rows (`<out>/<dataset>/<split>/heads/<role>.jsonl`:
id, prediction, probs, correct, latency_ms, prompt_tokens, and the expert's own answer as
`lm_prediction`), so everything after them (`pipeline.table_from_rows`, the gate, calibration,
`cached_table` for `medmoe mambaformer calibrate` and the server's latency budgets) is the same code
for both ways of answering. No test question is used to choose or fit a head.

Shapes: P pool records, M test records, K option slots; probabilities (P, K) and (M, K).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medmoe.data.record import Record
from medmoe.errors import MedmoeError
from medmoe.eval.model import HFEvalModel
from medmoe.heads.answerer import letter_prompts
from medmoe.heads.bundled import question_format
from medmoe.heads.features import Features, extract_features, forward_prompt, letter_plan
from medmoe.heads.fit import fit_candidate, training_set
from medmoe.heads.train import pool_fingerprint
from medmoe.mambaformer.experiments.head_tables import HeadAnswers, cross_fitted
from medmoe.mambaformer.experts import Expert
from medmoe.mambaformer.latency import LatencyModel, fit_latency_model, machine_description
from medmoe.models.head import HeadConfig, OptionHead
from medmoe.paths import atomic_write_json, atomic_write_text

ANSWERS = ("heads", "zero-shot")  # how the run's experts answer (PipelineConfig.answers)
RULE = "letter"
TIMED = 20  # dev questions timed one at a time per expert, for its latency model
TIMING_FILE = "timing.json"  # <out>/<dataset>/: the timed questions and their wall times, per expert


@dataclass
class ExpertHead:
    """One expert's head for the run: the whole-pool head (saved with the router), the CV choice and the
    cross-fitted answers the rows hold, and the latency model the rows' latencies come from."""

    head: OptionHead
    config: HeadConfig
    answers: HeadAnswers
    latency: LatencyModel


def heads_folder(out: Path, split: str) -> Path:
    """Where a heads run keeps a split's per-example rows: <out>/<dataset>/<split>/heads/."""
    return out / split / "heads"


def check_pool(pool: Sequence[Record], dataset: str) -> None:
    """A head answers one option, and rows are keyed by id: the pool must be single-answer, unique ids."""
    multi = [r.id for r in pool if len(r.gold_indices) != 1]
    if multi:
        raise MedmoeError(f"{dataset}: --answers heads needs single-answer questions; {len(multi)} train/dev records "
                        f"have several answers (first: {multi[0]}); use --answers zero-shot")
    counts = Counter(r.id for r in pool)
    dups = [i for i, n in counts.items() if n > 1]
    if dups:
        raise MedmoeError(f"{dataset}: the record id {dups[0]!r} is in train and dev {counts[dups[0]]} times; "
                          "the run's rows are keyed by id")


def sha_order(records: Sequence[Record]) -> list[Record]:
    """Records in a fixed order that does not follow the split's (the timed subsample)."""
    return sorted(records, key=lambda r: hashlib.sha256(r.id.encode()).hexdigest())


def prompt_token_counts(lm: HFEvalModel, records: Sequence[Record]) -> list[int]:
    """n_i: the tokens of each record's head pass (BOS included), the latency model's input."""
    return [len(letter_plan(lm.tokenizer, p.context, p.continuations)[0]) for p in letter_prompts(lm, records)]


@torch.inference_mode()
def time_head_pass(lm: HFEvalModel, records: Sequence[Record]) -> tuple[list[int], list[float]]:
    """(prompt tokens, wall ms) of the head's forward pass (prompt -> hidden states and option scores),
    one question at a time, after one untimed warm-up: what a served question costs its expert."""
    prompts = letter_prompts(lm, records)
    forward_prompt(lm.model, lm.tokenizer, prompts[0].context, prompts[0].continuations)
    tokens, ms = [], []
    for p in prompts:
        start = time.perf_counter()
        forward_prompt(lm.model, lm.tokenizer, p.context, p.continuations)
        ms.append((time.perf_counter() - start) * 1000)
        tokens.append(len(letter_plan(lm.tokenizer, p.context, p.continuations)[0]))
    return tokens, ms


def timed_latency_model(lm: HFEvalModel, role: str, expert: Expert, dev: Sequence[Record], out: Path,
                        timed: int = TIMED) -> LatencyModel:
    """The expert's latency model from `timed` dev questions, timed now or read from <out>/TIMING_FILE
    when the same expert (source, dtype, device) timed the same questions there before."""
    records = sha_order(dev)[:timed]
    if not records:
        raise MedmoeError("--answers heads times each expert on dev questions; the dev split is empty")
    path = out / TIMING_FILE
    saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    key = {"source": expert.source, "dtype": expert.dtype, "device": expert.device, "ids": [r.id for r in records]}
    entry = saved.get(role)
    if not (isinstance(entry, dict) and all(entry.get(k) == v for k, v in key.items())):
        tokens, ms = time_head_pass(lm, records)
        entry = {**key, "tokens": tokens, "ms": ms, "machine": machine_description()}
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {**saved, role: entry})
    return fit_latency_model(entry["tokens"], entry["ms"], expert=expert.source, machine=entry["machine"])


def expert_head(lm: HFEvalModel, role: str, expert: Expert, dataset: str, splits: dict[str, list[Record]],
                features: Features, out: Path, log: Callable[[str], None] = print) -> ExpertHead:
    """Steps 2-3 of the module docstring for one expert, on its features of every split (step 1)."""
    pool, test = splits["train"] + splits["dev"], splits["test"]
    pool_features, test_features = features.select([r.id for r in pool]), features.select([r.id for r in test])
    answers = cross_fitted(pool, pool_features, test_features)
    c = answers.candidate
    ts = training_set(pool_features, pool)
    config = HeadConfig(
        kind=c.kind, base=expert.source, letters=ts.letters, layer=c.layer, pooling=c.pooling, dtype=expert.dtype,
        questions=question_format(pool[0]),
        trained_on={"pool": f"{dataset} train+dev", "records": len(pool), "single_answer": len(ts.ids),
                    "fingerprint": pool_fingerprint(pool)},
        selection={"family": "head", "chosen": c.name, "cv_accuracy": c.accuracy, "cross_fitted": True,
                   "candidates": [asdict(x) | {"name": x.name} for x in answers.candidates]})
    latency = timed_latency_model(lm, role, expert, splits["dev"], out)
    log(f"{dataset} {role}: head {c.name} (CV accuracy {c.accuracy:.3f} on {len(ts.ids)} train+dev questions); "
        f"latency model from {len(latency.lengths)} timed dev questions, median {np.median(latency.median_ms):.0f} ms")
    return ExpertHead(fit_candidate(ts, c), config, answers, latency)


def head_rows(records: Sequence[Record], probs: np.ndarray, lm_logprobs: np.ndarray, tokens: Sequence[int],
              latency: LatencyModel) -> list[dict[str, Any]]:
    """The zero-shot runner's row layout for head answers: probs (N, K), the expert's own option
    log-probs (N, K) for `lm_prediction`, latency C_e(n_i)."""
    rows = []
    for rec, p, s, n in zip(records, probs, lm_logprobs, tokens):
        k = len(rec.letters)
        pred = rec.letters[int(np.argmax(p[:k]))]
        rows.append({"id": rec.id, "prediction": pred, "probs": dict(zip(rec.letters, map(float, p[:k]))),
                     "correct": pred == rec.answer, "latency_ms": float(latency(n)), "prompt_tokens": int(n),
                     "lm_prediction": rec.letters[int(np.argmax(s[:k]))]})
    return rows


def answer_with_heads(experts: dict[str, Expert], dataset: str, splits: dict[str, list[Record]], out: Path,
                      log: Callable[[str], None] = print) -> dict[str, ExpertHead]:
    """Every expert's head (`expert_head`), and every split's rows written under `heads_folder`."""
    check_pool(splits["train"] + splits["dev"], dataset)
    heads = {}
    for role, expert in experts.items():
        lm = HFEvalModel(expert.model, expert.tokenizer, expert.source, share_prefix=False)
        every = splits["train"] + splits["dev"] + splits["test"]  # step 1: one features pass (cached, resumable)
        features = extract_features(lm, every, out / "features" / role, expert.source)
        heads[role] = found = expert_head(lm, role, expert, dataset, splits, features, out, log)
        offset, rows = 0, []
        for split in ("train", "dev", "test"):  # the pool's order (train, then dev); test last
            records = splits[split]
            if split == "test":
                probs = found.answers.test_probs
            else:  # the pool's out-of-fold answers: train first, then dev (the pool's order)
                probs = found.answers.pool_probs[offset:offset + len(records)]
                offset += len(records)
            lm_logprobs = features.select([r.id for r in records]).option_logprobs.numpy()
            rows = head_rows(records, probs, lm_logprobs, prompt_token_counts(lm, records), found.latency)
            path = heads_folder(out, split) / f"{role}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        test = splits["test"]  # `rows` are the test split's, written last
        log(f"{dataset} {role}: test accuracy {np.mean([r['correct'] for r in rows]):.3f} through its head, "
            f"{np.mean([r['lm_prediction'] == rec.answer for r, rec in zip(rows, test)]):.3f} by its own option likelihoods")
    return heads

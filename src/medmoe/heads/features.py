"""Cached features of one model on one set of records: what heads and calibrations train on.

One forward pass per record over its zero-shot `letter` prompt (eval/prompts.py, cut to the model's
window as `medmoe eval` cuts it) gives both things a head needs, for N records, L + 1 hidden-state
layers (the embeddings, then each block) and width D:

  last      (N, L+1, D)  the hidden state at the prompt's last token, every layer
  mean      (N, L+1, D)  the mean over the prompt's tokens, every layer
  option_logprobs (N, K) log p(option letter | prompt), the LM's own zero-shot answer (K = max
                         options; -inf where a record has fewer)

Decoder-only models (HF causal LMs, the Mamba hybrid, HF Mamba, a base with a LoRA-MoE adapter)
give their hidden states with `output_hidden_states`; T5-family models give their encoder's, and
their option scores come from the decoder (`score_options_seq2seq`).

The cache (`feature_folder`: one per model and dtype, shared by every split and pool) is a folder of
chunk files (`chunk-<hash of its keys>.safetensors`, up to CHUNK records each, their record keys in the file's
metadata) plus `features.json` (the model, dtype and prompt they came from). A record's key is a
fingerprint of its id and texts, so an interrupted extraction resumes with the records it lacks, an
edited record is computed again, and a folder made by another model or dtype is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medmoe.data.record import Record
from medmoe.errors import MedmoeError
from medmoe.eval.model import HFEvalModel
from medmoe.eval.prompts import build_prompt
from medmoe.eval.scoring import accepts_logits_to_keep, bos_ids, encode_pair, is_encoder_decoder, score_options_seq2seq
from medmoe.eval.window import PromptFitter
from medmoe.paths import atomic_write_json, medmoe_home

CHUNK = 32
FORMAT = 1
MAX_OPTIONS = 5
POOLINGS = ("last", "mean")


@dataclass
class Features:
    """Features of N records (module docstring for the shapes)."""

    ids: list[str]
    last: torch.Tensor  # (N, L+1, D) float16
    mean: torch.Tensor  # (N, L+1, D) float16
    option_logprobs: torch.Tensor  # (N, K) float32, -inf for absent options

    @property
    def layers(self) -> int:
        return int(self.last.shape[1])

    def pooled(self, layer: int, pooling: str) -> torch.Tensor:
        """(N, D) float32 features of one layer (negative counts from the last) and pooling."""
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; one of {POOLINGS}")
        return (self.last if pooling == "last" else self.mean)[:, layer].float()

    def select(self, ids: Sequence[str]) -> Features:
        """The rows of `ids`, in that order."""
        index = {i: n for n, i in enumerate(self.ids)}
        missing = [i for i in ids if i not in index]
        if missing:
            raise MedmoeError(f"no cached features for {len(missing)} records (first: {missing[0]})")
        rows = torch.tensor([index[i] for i in ids])
        return Features(list(ids), self.last[rows], self.mean[rows], self.option_logprobs[rows])


def record_key(record: Record) -> str:
    """The cache key of a record's features: a fingerprint of its id and every text its prompt shows."""
    text = json.dumps([record.id, record.question, record.context, list(record.options)], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def forward_prompt(model: Any, tokenizer: Any, context: str, continuations: Sequence[str]) -> tuple[tuple, list[float]]:
    """(hidden states: L+1 tensors of (1, n, D), log p(continuation_i | context)) for one prompt."""
    if is_encoder_decoder(model):
        ids = tokenizer(context, add_special_tokens=True)["input_ids"]
        x = torch.tensor([ids], device=next(model.parameters()).device)
        enc = model.get_encoder()(input_ids=x, output_hidden_states=True)
        scores = score_options_seq2seq(model, tokenizer, context, continuations).logprobs
        return enc.hidden_states, scores
    pairs = [encode_pair(tokenizer, context, c) for c in continuations]
    ctx = bos_ids(tokenizer, pairs[0][0]) + pairs[0][0]
    if any(len(c) != 1 or p != pairs[0][0] for p, c in pairs):
        raise MedmoeError("features need single-token option letters after a common prompt "
                          f"(got {[len(c) for _, c in pairs]} tokens)")
    x = torch.tensor([ctx], device=next(model.parameters()).device)
    keep = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}  # the LM head at the last position only
    out = model(input_ids=x, output_hidden_states=True, use_cache=False, **keep)
    last = torch.log_softmax(out.logits[0, -1].float(), dim=-1)  # (V,)
    return out.hidden_states, [float(last[c[0]]) for _, c in pairs]


def option_scores(model: Any, tokenizer: Any, context: str, continuations: Sequence[str]) -> list[float]:
    return forward_prompt(model, tokenizer, context, continuations)[1]


def pool(hidden: Sequence[torch.Tensor], layer: int, pooling: str) -> torch.Tensor:
    """(1, D) one prompt's pooled hidden state, as the cache stores it (rounded through float16)."""
    states = hidden[layer][0].float()  # (n, D)
    pooled = states[-1] if pooling == "last" else states.mean(dim=0)
    return pooled.half().float().unsqueeze(0)


@torch.inference_mode()
def _extract_chunk(lm: HFEvalModel, fitter: PromptFitter, records: Sequence[Record]) -> dict[str, torch.Tensor]:
    lasts, means, scores = [], [], []
    for record in records:
        fitted, _ = fitter.fit(record)
        prompt = build_prompt(fitted, lm.tokenizer, (), "letter")
        hidden, logprobs = forward_prompt(lm.model, lm.tokenizer, prompt.context, prompt.continuations)
        stack = torch.cat([h.float() for h in hidden], dim=0)  # (L+1, n, D)
        lasts.append(stack[:, -1].half())
        means.append(stack.mean(dim=1).half())  # what pool() computes for one layer
        scores.append(logprobs + [float("-inf")] * (MAX_OPTIONS - len(logprobs)))
    return {"last": torch.stack(lasts), "mean": torch.stack(means), "option_logprobs": torch.tensor(scores)}


def feature_folder(source: str, dtype: Any) -> Path:
    """The shared cache of one model's features: $MEDMOE_HOME/features/<source>-<dtype>/."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", source.strip("/"))[-80:]
    return medmoe_home() / "features" / f"{slug}-{str(dtype).replace('torch.', '')}"


def _read_store(folder: Path) -> dict[str, tuple[Path, int]]:
    """record key -> (chunk file, row) over every complete chunk in `folder`."""
    from safetensors import safe_open

    index: dict[str, tuple[Path, int]] = {}
    for path in sorted(folder.glob("chunk-*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            keys = json.loads((handle.metadata() or {}).get("keys", "[]"))
        for row, key in enumerate(keys):
            index[key] = (path, row)
    return index


def extract_features(lm: HFEvalModel, records: Sequence[Record], folder: Path, source: str,
                     progress: bool = True) -> Features:
    """Features of `records` from `lm`, from the cache in `folder`; missing ones are computed and added
    in chunks of CHUNK records (an interrupted run resumes; other records' features stay).

    source: what the model is (bundled name, path, adapter), written into features.json; a folder
    made for another source, dtype or format is refused.
    """
    from safetensors.torch import load_file, save_file

    from medmoe.eval.runner import progress_bar

    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "source": source, "prompt": "letter, zero-shot",
            "dtype": str(next(lm.model.parameters()).dtype).replace("torch.", "")}
    meta_file = folder / "features.json"
    if meta_file.is_file():
        old = json.loads(meta_file.read_text(encoding="utf-8"))
        changed = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
        if changed:
            raise MedmoeError(f"{folder}: a feature cache of something else ("
                              + "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items())
                              + "); use another folder")
    else:
        atomic_write_json(meta_file, meta)
    keys = [record_key(r) for r in records]
    index = _read_store(folder)
    todo = [r for r, k in zip(records, keys) if k not in index]
    fitter = PromptFitter(lm, "letter")
    with progress_bar(f"features {source}") as bar:
        task = bar.add_task("", total=len(todo)) if progress and todo else None
        for start in range(0, len(todo), CHUNK):
            chunk = todo[start:start + CHUNK]
            tensors = _extract_chunk(lm, fitter, chunk)
            chunk_keys = [record_key(r) for r in chunk]
            name = hashlib.sha256("".join(chunk_keys).encode()).hexdigest()[:16]  # never another chunk's name
            path = folder / f"chunk-{name}.safetensors"
            save_file(tensors, str(path) + f".tmp-{os.getpid()}", metadata={"keys": json.dumps(chunk_keys)})
            Path(str(path) + f".tmp-{os.getpid()}").replace(path)
            if task is not None:
                bar.advance(task, len(chunk))
    index = _read_store(folder)
    loaded: dict[Path, dict[str, torch.Tensor]] = {}
    rows = []
    for record, key in zip(records, keys):
        if key not in index:
            raise MedmoeError(f"{folder}: the features of {record.id} are missing after extraction (a chunk deleted meanwhile?)")
        path, row = index[key]
        if path not in loaded:
            loaded[path] = load_file(str(path))
        rows.append((loaded[path], row))
    if not rows:
        return Features([], torch.empty(0), torch.empty(0), torch.empty(0))
    return Features(
        ids=[r.id for r in records],
        last=torch.stack([t["last"][i] for t, i in rows]),
        mean=torch.stack([t["mean"][i] for t, i in rows]),
        option_logprobs=torch.stack([t["option_logprobs"][i] for t, i in rows]),
    )

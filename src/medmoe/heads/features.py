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

import copy
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medmoe.data.record import Record
from medmoe.errors import MedmoeError
from medmoe.eval.batch_scoring import MAX_PADDING_WASTE, MIN_SHARED_PREFIX, keeps_every_layer, length_groups, right_padded
from medmoe.eval.model import HFEvalModel
from medmoe.eval.prompts import Prompt, build_prompt
from medmoe.eval.scoring import accepts_logits_to_keep, bos_ids, encode_pair, is_encoder_decoder, score_options_seq2seq
from medmoe.eval.window import PromptFitter
from medmoe.hf_compat import output_cache, with_cache
from medmoe.paths import atomic_write_file, atomic_write_json, medmoe_home

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


def letter_plan(tokenizer: Any, context: str, continuations: Sequence[str]) -> tuple[list[int], list[int]]:
    """(prompt ids incl. BOS, one token id per option) of a letter prompt: what a feature pass runs and
    reads; MedmoeError when an option letter is not one token after the common prompt."""
    pairs = [encode_pair(tokenizer, context, c) for c in continuations]
    if any(len(c) != 1 or p != pairs[0][0] for p, c in pairs):
        raise MedmoeError("features need single-token option letters after a common prompt "
                          f"(got {[len(c) for _, c in pairs]} tokens)")
    return bos_ids(tokenizer, pairs[0][0]) + pairs[0][0], [c[0] for _, c in pairs]


def forward_prompt(model: Any, tokenizer: Any, context: str, continuations: Sequence[str]) -> tuple[tuple, list[float]]:
    """(hidden states: L+1 tensors of (1, n, D), log p(continuation_i | context)) for one prompt."""
    if is_encoder_decoder(model):
        ids = tokenizer(context, add_special_tokens=True)["input_ids"]
        x = torch.tensor([ids], device=next(model.parameters()).device)
        enc = model.get_encoder()(input_ids=x, output_hidden_states=True)
        scores = score_options_seq2seq(model, tokenizer, context, continuations).logprobs
        return enc.hidden_states, scores
    ctx, letters = letter_plan(tokenizer, context, continuations)
    x = torch.tensor([ctx], device=next(model.parameters()).device)
    keep = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}  # the LM head at the last position only
    out = model(input_ids=x, output_hidden_states=True, use_cache=False, **keep)
    last = torch.log_softmax(out.logits[0, -1].float(), dim=-1)  # (V,)
    return out.hidden_states, [float(last[c]) for c in letters]


def option_scores(model: Any, tokenizer: Any, context: str, continuations: Sequence[str]) -> list[float]:
    return forward_prompt(model, tokenizer, context, continuations)[1]


def pool(hidden: Sequence[torch.Tensor], layer: int, pooling: str) -> torch.Tensor:
    """(1, D) one prompt's pooled hidden state, as the cache stores it (rounded through float16)."""
    return pool_states(hidden[layer][0], pooling)


def pool_states(states: torch.Tensor, pooling: str) -> torch.Tensor:
    """(1, D) on the CPU: one prompt's hidden states of one layer (n, D; its real tokens only) at the
    last token or averaged, rounded through float16 as the cache stores them. `pool` and the batched
    pass (`pooled_prompts`) both pool here, so a batched row is pooled as it would be alone."""
    states = states.float()
    pooled = states[-1] if pooling == "last" else states.mean(dim=0)
    return pooled.half().float().unsqueeze(0).cpu()


@torch.inference_mode()
def pooled_prompts(model: Any, tokenizer: Any, prompts: Sequence[Prompt], pools: Sequence[tuple[int, str] | None],
                   max_waste: float = MAX_PADDING_WASTE, share_prefix: bool = True
                   ) -> list[tuple[torch.Tensor | None, list[float], int]]:
    """What `forward_prompt` then `pool` give each prompt alone, for many prompts in few passes:
    per prompt (its hidden state pooled at pools[i] = (layer, pooling), (1, D) on the CPU, or None
    where pools[i] is None; log p(option letter | prompt); prompt tokens).

    The prompts are batched as the likelihood path batches them (eval/batch_scoring.py), with one
    change: rows are first split by their first MIN_SHARED_PREFIX tokens (a question format's
    instruction), and each set's longest common token prefix (~38 tokens of a SmolLM2 prompt) runs
    once, with its hidden states, as a KV cache its rows continue (where the model's cache keeps
    every layer; share_prefix=False never). The rest of each prompt is right-padded into groups
    sorted by length that waste at most `max_waste` on pads (inf: one pass per set; rows without a
    prefix are padded together). Right padding keeps every row's positions k..k+n_i-1 (HF Llama,
    Qwen2 and Gemma-3 number positions from the cache length, whatever the attention mask says, so
    left padding would shift them) and the causal mask keeps real tokens from seeing the pads, so a
    row's states over its real tokens, and the LM head at its last one, are an unbatched pass's up to
    float summation order. A row is pooled by `pool_states` over its real tokens (the prefix's states,
    then its own), so it is rounded as `pool` rounds it. Each pass keeps only the hidden-state layers
    its rows' heads read (transformers selects them by index; a model that returns them all is read
    the same way) and runs the LM head at the rows' last positions only where the model supports
    `logits_to_keep`. Encoder-decoder models run one prompt at a time (`forward_prompt`)."""
    if len(pools) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(pools)} poolings")
    if is_encoder_decoder(model):
        out = []
        for prompt, want in zip(prompts, pools):
            hidden, logprobs = forward_prompt(model, tokenizer, prompt.context, prompt.continuations)
            out.append((None if want is None else pool(hidden, *want), logprobs, int(hidden[0].shape[1])))
        return out
    plans = [letter_plan(tokenizer, p.context, p.continuations) for p in prompts]
    results: list[tuple[torch.Tensor | None, list[float], int]] = [(None, [], 0)] * len(prompts)

    def run(members: list[int], prefix: _Prefix) -> None:
        for group in length_groups([len(plans[i][0]) - prefix.k for i in members], max_waste):
            rows = [members[j] for j in group]
            for i, row in zip(rows, _padded_pass(model, tokenizer, [plans[i] for i in rows], [pools[i] for i in rows], prefix)):
                results[i] = row

    # rows by their first tokens (a question format's instruction): each set shares its own prefix
    starts: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, _) in enumerate(plans):
        starts.setdefault(tuple(ctx[:MIN_SHARED_PREFIX]) if share_prefix else (), []).append(i)
    rest: list[int] = []  # the rows that share no prefix: padded together
    cacheable = share_prefix
    for members in starts.values():
        means = sorted({want[0] for want in (pools[i] for i in members) if want is not None and want[1] == "mean"})
        prefix = _prefix_pass(model, [plans[i][0] for i in members], means) if cacheable else _Prefix()
        if prefix is None:  # the model's cache cannot carry a prefix: try no other
            cacheable, prefix = False, _Prefix()
        if prefix.k:
            run(members, prefix)
        else:
            rest.extend(members)
    if rest:
        run(sorted(rest), _Prefix())
    return results


@dataclass
class _Prefix:
    """The prompts' first k tokens, run once: their KV cache and hidden states (layer -> (k, D)) at
    the layers a mean reads (the last token is always a row's own)."""

    k: int = 0
    cache: Any = None
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)


def _hidden_states(model: Any, layers: list[int], **inputs: Any) -> tuple[Any, Sequence[Any]]:
    """(model output, its hidden states: at least `layers`, by index) for one forward pass."""
    out = model(**inputs, output_hidden_states=layers or False)
    if not layers:
        return out, ()
    if out.hidden_states is None or any(out.hidden_states[layer] is None for layer in layers):
        out = model(**inputs, output_hidden_states=True)  # a model that does not select layers by index: all of them
    return out, out.hidden_states


def _prefix_pass(model: Any, contexts: list[list[int]], layers: list[int]) -> _Prefix | None:
    """The contexts' longest common prefix, stopping one token short of the shortest (its last
    position always runs per row), run once when it is worth a pass (at least MIN_SHARED_PREFIX
    tokens, else no prefix: k = 0); None when the model's cache does not keep all of it for every
    layer (eval.batch_scoring's check: a Mamba without a recurrent cache, a sliding window shorter
    than k)."""
    shortest = min(len(c) for c in contexts)
    if len(contexts) < 2 or shortest <= MIN_SHARED_PREFIX:
        return _Prefix()
    ids = torch.tensor([c[:shortest] for c in contexts])  # (b, n_min)
    differs = (ids != ids[0]).any(dim=0).nonzero()
    k = min(int(differs[0]) if len(differs) else shortest, shortest - 1)
    if k < MIN_SHARED_PREFIX:
        return _Prefix()
    device = next(model.parameters()).device
    out, hidden = _hidden_states(model, layers, input_ids=ids[:1, :k].to(device), use_cache=True)
    cache = output_cache(out)
    if not keeps_every_layer(model, cache, k):
        return None
    return _Prefix(k, cache, {layer: hidden[layer][0] for layer in layers})


def _padded_pass(model: Any, tokenizer: Any, plans: Sequence[tuple[list[int], list[int]]],
                 pools: Sequence[tuple[int, str] | None], prefix: _Prefix) -> list[tuple[torch.Tensor | None, list[float], int]]:
    """One right-padded (g, m) forward pass over the rest of each plan (`letter_plan`) after the
    prefix, continuing its cache when there is one: `pooled_prompts` for its rows."""
    device = next(model.parameters()).device
    k = prefix.k
    rows = [ctx[k:] for ctx, _ in plans]
    ids, mask, lengths = right_padded(rows, k, tokenizer)
    layers = sorted({want[0] for want in pools if want is not None})
    last_index = torch.tensor(lengths, device=device) - 1  # (g,)
    keep = torch.unique(last_index)  # (j,), sorted: the only positions whose logits are needed
    kwargs: dict[str, Any] = {"use_cache": False}
    if prefix.cache is not None:
        cache = copy.deepcopy(prefix.cache)
        cache.batch_repeat_interleave(len(rows))
        kwargs = {**with_cache(cache), "use_cache": True}
    if accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = keep
    out, hidden = _hidden_states(model, layers, input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
    column = torch.searchsorted(keep, last_index) if "logits_to_keep" in kwargs else last_index  # row's last position in `logits`
    logprobs = torch.log_softmax(out.logits[torch.arange(len(rows), device=device), column].float(), dim=-1)  # (g, V)
    results = []
    for row, ((_, letters), want, n) in enumerate(zip(plans, pools, lengths)):
        pooled = None
        if want is not None:
            states = hidden[want[0]][row, :n]  # (n, D): the row's own real tokens
            if k and want[1] == "mean":
                states = torch.cat([prefix.hidden[want[0]].to(states.dtype), states])  # (k + n, D): the whole prompt
            pooled = pool_states(states, want[1])
        results.append((pooled, [float(logprobs[row, c]) for c in letters], k + n))
    return results


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
    from safetensors.torch import save_file

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
            atomic_write_file(path, lambda tmp: save_file(tensors, tmp, metadata={"keys": json.dumps(chunk_keys)}))  # noqa: B023 (called at once)
            if task is not None:
                bar.advance(task, len(chunk))
    return read_features(folder, records)


def read_features(folder: Path, records: Sequence[Record]) -> Features:
    """The cached features of `records` in `folder` (no model needed); a record without them is an error
    that names it (extract them first: `extract_features`)."""
    from safetensors.torch import load_file

    index = _read_store(folder)
    loaded: dict[Path, dict[str, torch.Tensor]] = {}
    rows = []
    for record in records:
        key = record_key(record)
        if key not in index:
            raise MedmoeError(f"{folder}: no cached features of {record.id} (extracted meanwhile deleted, or never extracted)")
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

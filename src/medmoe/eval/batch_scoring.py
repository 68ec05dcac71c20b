"""Option log-likelihood for many questions at once (the server's micro-batches, `score_batch`).

`score_options` (scoring.py) scores one question, sharing its context across its options. When
every option of every question is one token after its context (letters, yes/no/maybe), a batch of
b questions needs only the next-token log-probs after each context. Scoring is a prefill: its cost
grows with the tokens run, so a batch is arranged to run as few tokens as possible:

  shared prefix   the contexts' longest common token prefix (the system prompt and instruction,
                  ~30 tokens of a ~90-token SmolLM2 dental prompt) runs once, as a (1, k) pass whose
                  KV cache every row then attends to. Used only when the model keeps keys/values for
                  every layer in a repeatable cache (checked after the prefix pass; a Mamba hybrid
                  qualifies, its mixers keep their recurrent state on the cache); else k = 0.
  length groups   the rest of each context (its suffix) is sorted by length and cut into sub-batches
                  whose padding stays within `max_waste` of their real tokens (`length_groups`); one
                  padded batch of 16 wasted ~30% of its compute on pads.

Each sub-batch is right-padded to (g, m): right padding keeps each row's positions k..k+n_i-1, and
the causal mask keeps real tokens from seeing the pads, so row i's logits at its last position equal
an unbatched run's (up to float reduction order). The LM head runs only at the rows' last positions
(`logits_to_keep`, where the model supports it). Questions with multi-token options fall back to
`score_options`, one at a time.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, cast

import torch

from medmoe.eval.prompts import Prompt
from medmoe.eval.scoring import (
    OptionScores,
    accepts_logits_to_keep,
    bos_ids,
    encode_pair,
    is_encoder_decoder,
    option_lengths,
    score_options,
)
from medmoe.hf_compat import output_cache, with_cache

MAX_PADDING_WASTE = 0.15  # a sub-batch may run at most this fraction more tokens than its rows hold
MIN_SHARED_PREFIX = 8  # a shorter common prefix is not worth a separate pass


def _single_token_plan(tokenizer: Any, prompt: Prompt) -> tuple[list[int], list[int]] | None:
    """(context ids incl. BOS, one token id per option) when every option is one token, else None."""
    pairs = [encode_pair(tokenizer, prompt.context, c) for c in prompt.continuations]
    if any(ctx != pairs[0][0] for ctx, _ in pairs) or any(len(cont) != 1 for _, cont in pairs):
        return None
    return bos_ids(tokenizer, pairs[0][0]) + pairs[0][0], [cont[0] for _, cont in pairs]


def length_groups(lengths: Sequence[int], max_waste: float = MAX_PADDING_WASTE) -> list[list[int]]:
    """Indices in ascending length, cut into consecutive groups whose padded size (count x longest)
    is at most (1 + max_waste) x their real tokens. Greedy: a group grows until the next (longer)
    row would break the bound. max_waste = inf gives one group (pad everything to the longest)."""
    if max_waste < 0:
        raise ValueError(f"max_waste must be >= 0, got {max_waste}")
    groups: list[list[int]] = []
    tokens = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        n = lengths[i]  # the longest so far: rows come in ascending length
        if groups and tokens and (len(groups[-1]) + 1) * n <= (1 + max_waste) * (tokens + n):
            groups[-1].append(i)
            tokens += n
        else:
            groups.append([i])
            tokens = n
    return groups


@torch.inference_mode()
def score_options_batch(model: Any, tokenizer: Any, prompts: Sequence[Prompt], max_waste: float = MAX_PADDING_WASTE) -> list[OptionScores]:
    """`score_options` for each prompt, batching every prompt whose options are single tokens
    (decoder-only models; an encoder-decoder model scores one prompt at a time)."""
    if is_encoder_decoder(model):
        return [score_options(model, tokenizer, p.context, p.continuations) for p in prompts]
    results: list[OptionScores | None] = [None] * len(prompts)
    plans = [_single_token_plan(tokenizer, p) for p in prompts]
    planned = {i: plan for i, plan in enumerate(plans) if plan is not None}  # (context ids, option ids)
    batch = list(planned)
    for i, prompt in enumerate(prompts):
        if plans[i] is None:
            results[i] = score_options(model, tokenizer, prompt.context, prompt.continuations)
    if batch:
        contexts = [planned[i][0] for i in batch]
        last = _next_token_logprobs(model, tokenizer, contexts, max_waste)
        for row, i in enumerate(batch):
            option_ids = planned[i][1]
            results[i] = OptionScores(
                logprobs=last[row][option_ids].tolist(),
                num_tokens=[1] * len(option_ids),
                num_chars=option_lengths(prompts[i].continuations),
                context_tokens=len(contexts[row]),
            )
    return cast(list[OptionScores], results)  # every slot is filled now


def _next_token_logprobs(model: Any, tokenizer: Any, contexts: list[list[int]], max_waste: float) -> list[torch.Tensor]:
    """log p(. | context) for each context, (V,) each: shared prefix once, then length groups."""
    device = next(model.parameters()).device
    k, cache = _shared_prefix(model, contexts, device)
    suffixes = [ids[k:] for ids in contexts]
    out: list[torch.Tensor] = [torch.empty(0)] * len(contexts)
    for group in length_groups([len(s) for s in suffixes], max_waste):
        logprobs = _padded_forward(model, tokenizer, [suffixes[i] for i in group], cache, k, device)  # (g, V)
        for row, i in enumerate(group):
            out[i] = logprobs[row]
    return out


def _shared_prefix(model: Any, contexts: list[list[int]], device: Any) -> tuple[int, Any]:
    """(k, KV cache of the contexts' first k tokens) for their longest common prefix, or (0, None).
    k stops one token short of the shortest context: its last position is always run per row."""
    shortest = min(len(c) for c in contexts)
    if len(contexts) < 2 or shortest <= MIN_SHARED_PREFIX:
        return 0, None
    ids = torch.tensor([c[:shortest] for c in contexts])  # (b, n_min)
    differs = (ids != ids[0]).any(dim=0).nonzero()
    k = min(int(differs[0]) if len(differs) else shortest, shortest - 1)
    if k < MIN_SHARED_PREFIX:
        return 0, None
    cache = output_cache(model(input_ids=ids[:1, :k].to(device), use_cache=True))
    return (k, cache) if keeps_every_layer(model, cache, k) else (0, None)


def keeps_every_layer(model: Any, cache: Any, k: int) -> bool:
    """Whether the cache holds keys/values of all k positions for every layer and can be repeated
    per row: false for layers that ignore the cache (a Mamba mixer without a recurrent state) or
    drop positions (a sliding window shorter than k), which would make the rows' logits wrong."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = getattr(cache, "layers", None)
    if layers is None or not hasattr(cache, "batch_repeat_interleave") or len(layers) != getattr(config, "num_hidden_layers", -1):
        return False
    return all(getattr(layer, "keys", None) is not None and layer.keys.shape[-2] == k for layer in layers)


def right_padded(rows: list[list[int]], k: int, tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(ids (g, m) right-padded with the pad id, attention mask (g, k + m) covering a k-token shared
    prefix and each row's own tokens, each row's length) for g token rows continuing one prefix."""
    lengths = [len(r) for r in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), max(lengths)), pad, dtype=torch.long)  # (g, m), right-padded
    mask = torch.zeros(len(rows), k + max(lengths), dtype=torch.long)  # (g, k + m): prefix, then row
    mask[:, :k] = 1
    for row, r in enumerate(rows):
        ids[row, : len(r)] = torch.tensor(r)
        mask[row, k : k + len(r)] = 1
    return ids, mask, lengths


def _padded_forward(model: Any, tokenizer: Any, rows: list[list[int]], prefix: Any, k: int, device: Any) -> torch.Tensor:
    """Next-token log-probs (g, V) after each row, the rows right-padded into one (g, m) batch that
    continues the prefix cache (k positions, shared by every row) when there is one."""
    ids, mask, lengths = right_padded(rows, k, tokenizer)
    kwargs: dict[str, Any] = {"use_cache": False}
    if prefix is not None:
        cache = copy.deepcopy(prefix)
        cache.batch_repeat_interleave(len(rows))
        kwargs = {**with_cache(cache), "use_cache": True}
    last_index = torch.tensor(lengths, device=device) - 1  # (g,)
    keep = torch.unique(last_index)  # (j,), sorted: the only positions whose logits are needed
    if accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = keep
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs).logits
    column = torch.searchsorted(keep, last_index) if "logits_to_keep" in kwargs else last_index  # row's last position in `logits`
    rows_index = torch.arange(len(rows), device=device)
    return torch.log_softmax(logits[rows_index, column].float(), dim=-1)  # (g, V)

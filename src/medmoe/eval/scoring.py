"""Option log-likelihood scoring: log p(continuation_i | context) for each option i.

The context (the prompt, ~375 tokens for PubMedQA) is run once; all options are then scored in one
batched forward over the cached keys/values, instead of one full forward per option. When every
option is a single token (yes/no/maybe, letters) the context's last logits are all that is needed.

Tokenization follows lm-evaluation-harness: whole = tok(context + continuation), and the
continuation's tokens are whole[len(tok(context)):], so scores match lm-eval's on the same prompt.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from medmoe.hf_compat import output_cache, with_cache


@dataclass
class OptionScores:
    """Per option: summed log-probability, its token count, and the option's length in characters
    (the continuation without its leading separator space, as lm-eval's `acc_norm` counts it)."""

    logprobs: list[float]
    num_tokens: list[int]
    num_chars: list[int]
    context_tokens: int

    def normalized(self) -> list[float]:
        """Log-probability per character of the option (lm-eval's acc_norm rule)."""
        return [lp / max(n, 1) for lp, n in zip(self.logprobs, self.num_chars)]

    def probabilities(self, normalize: bool = False) -> list[float]:
        """Softmax over the options' (normalized) log-probabilities: a distribution over options."""
        scores = torch.tensor(self.normalized() if normalize else self.logprobs, dtype=torch.float64)
        return torch.softmax(scores, dim=0).tolist()


def accepts_logits_to_keep(model: Any) -> bool:
    """HF causal LMs that can compute the LM head at chosen positions only (saves ~20% for SmolLM2:
    its 49k-word head costs a fifth of the forward pass when run at every position)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def is_encoder_decoder(model: Any) -> bool:
    """T5-family models: the context goes to the encoder, the option to the decoder."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def option_lengths(continuations: Sequence[str]) -> list[int]:
    """Characters of each option, without the separator space a plain prompt puts before it."""
    return [len(c[1:] if c.startswith(" ") else c) for c in continuations]


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) the lm-eval way; a trailing space moves to the continuation."""
    if context.endswith(" "):
        context, continuation = context[:-1], " " + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    if whole[: len(ctx)] != ctx:  # the boundary merged into one token: fall back to separate encoding
        return ctx, tokenizer(continuation, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx):]


def bos_ids(tokenizer: Any, ids: Sequence[int] = ()) -> list[int]:
    """[BOS] to put before `ids` when the tokenizer itself adds one (Gemma), else [].

    The tokenizer's own convention decides (what the model was trained with): Gemma's tokenizer
    adds <bos> with special tokens, SmolLM2's adds nothing. Never doubled when `ids` (e.g. a chat
    template's text) already start with it.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None or (len(ids) and ids[0] == bos):
        return []
    return [bos] if tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos] else []


class PrefixCache:
    """The KV cache of the previous context, reused when the next context starts the same way.

    Few-shot prompts put the same instruction and shots before every question of a benchmark (or
    CMMLU subject), so only the question's own tokens need a forward pass. The reused cache is a
    cropped copy: keys/values of positions < n_shared are identical to recomputing them. The cache is
    a plain DynamicCache (every layer keeps every position), which stays correct for models with
    sliding-window layers (Gemma-3): the window is applied by the attention mask, not by the cache.
    """

    def __init__(self, min_tokens: int = 16):
        self.min_tokens = min_tokens
        self.ids: list[int] = []
        self.cache: Any = None

    def reuse(self, ids: list[int]) -> tuple[Any, int]:
        """(cache holding the first n ids, n); n < len(ids) so the last position is always recomputed."""
        from transformers import DynamicCache

        n = 0
        if self.cache is not None:
            m = min(len(ids) - 1, len(self.ids))
            a, b = torch.tensor(ids[:m]), torch.tensor(self.ids[:m])
            differ = (a != b).nonzero()
            n = int(differ[0]) if len(differ) else m
        if n < self.min_tokens:
            return DynamicCache(), 0
        cache = copy.deepcopy(self.cache)
        if len(self.ids) > n:
            cache.crop(n - len(self.ids))  # a negative argument removes that many trailing positions
        return cache, n

    def remember(self, ids: list[int], cache: Any) -> None:
        self.ids, self.cache = list(ids), copy.deepcopy(cache)


@torch.inference_mode()
def score_options(
    model: Any, tokenizer: Any, context: str, continuations: Sequence[str], prefix: PrefixCache | None = None
) -> OptionScores:
    """Log-likelihood of each continuation after `context`, sharing the context's computation.

    prefix: reuse the KV cache of a previous context's shared beginning (few-shot prompts).
    Encoder-decoder models (T5 family) score through `score_options_seq2seq`.
    """
    if is_encoder_decoder(model):
        return score_options_seq2seq(model, tokenizer, context, continuations)
    pairs = [encode_pair(tokenizer, context, c) for c in continuations]
    ctx_ids = bos_ids(tokenizer, pairs[0][0]) + pairs[0][0]
    conts = [cont for _, cont in pairs]
    if any(pair[0] != pairs[0][0] for pair in pairs) or not all(conts):
        raise ValueError("option continuations must tokenize after a common context and be non-empty")
    device = next(model.parameters()).device
    ctx = torch.tensor([ctx_ids], device=device)  # (1, n)
    single = all(len(c) == 1 for c in conts)
    # single-token options need the LM head at the last position only (a fifth of SmolLM2's forward)
    keep = {"logits_to_keep": 1} if single and accepts_logits_to_keep(model) else {}
    if prefix is None:
        out = model(input_ids=ctx, use_cache=not single, **keep)
    else:
        cache, start = prefix.reuse(ctx_ids)
        out = model(input_ids=ctx[:, start:], **with_cache(cache), use_cache=True, **keep)  # (1, n - start | 1, V)
        prefix.remember(ctx_ids, output_cache(out))
    last = torch.log_softmax(out.logits[0, -1].float(), dim=-1)  # (V,): next-token log-probs after the context
    if single:
        logprobs = [last[c[0]].item() for c in conts]
    else:
        logprobs = _score_multi_token(model, output_cache(out), last, conts, len(ctx_ids), device)
    return OptionScores(
        logprobs=logprobs,
        num_tokens=[len(c) for c in conts],
        num_chars=option_lengths(continuations),
        context_tokens=len(ctx_ids),
    )


def _right_padded(rows: list[list[int]], device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as one right-padded (k, m) id tensor (pad 0) and its 0/1 mask."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    for i, r in enumerate(rows):  # a loop over options, not tokens
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def _score_multi_token(model: Any, cache: Any, last: torch.Tensor, conts: list[list[int]], n: int, device: Any) -> list[float]:
    """Score k multi-token continuations in one batch over the context's KV cache (repeated k times)."""
    k = len(conts)
    ids, mask = _right_padded(conts, device)  # (k, m) each
    cache.batch_repeat_interleave(k)
    attention = torch.cat([torch.ones(k, n, dtype=torch.long, device=device), mask], dim=1)  # (k, n + m)
    logits = model(input_ids=ids, **with_cache(cache), attention_mask=attention, use_cache=True).logits
    logp = torch.log_softmax(logits.float(), dim=-1)  # (k, m, V); position j predicts token j + 1
    first = last[ids[:, 0]]  # (k,): the first token comes from the context's last position
    later = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0] * mask[:, 1:]  # (k, m - 1)
    return (first + later.sum(dim=1)).tolist()


@torch.inference_mode()
def score_options_seq2seq(model: Any, tokenizer: Any, context: str, continuations: Sequence[str]) -> OptionScores:
    """Option log-likelihood for an encoder-decoder model (T5 family), as lm-eval scores seq2seq models:
    the encoder reads the context (with the tokenizer's special tokens, T5's closing </s>) once, and the
    decoder scores each option's tokens from the decoder start token, all options in one batch:

        log p(option | context) = sum_j log p_dec(o_j | o_<j, encoder(context))

    The option is tokenized on its own, without the separator space a causal prompt puts before it."""
    device = next(model.parameters()).device
    enc_ids = tokenizer(context, add_special_tokens=True)["input_ids"]
    conts = [tokenizer(c.removeprefix(" "), add_special_tokens=False)["input_ids"] for c in continuations]
    if not all(conts):
        raise ValueError("option continuations must be non-empty")
    k = len(conts)
    start = model.config.decoder_start_token_id
    labels, mask = _right_padded(conts, device)  # (k, m) each
    decoder_ids = torch.cat([torch.full((k, 1), start, dtype=torch.long, device=device), labels[:, :-1]], dim=1)  # shifted right
    encoded = model.get_encoder()(input_ids=torch.tensor([enc_ids], device=device))  # (1, n, d), run once
    hidden = encoded.last_hidden_state.expand(k, -1, -1)  # (k, n, d): a view, not k copies
    logits = model(encoder_outputs=(hidden,), decoder_input_ids=decoder_ids, decoder_attention_mask=mask).logits
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels[..., None])[..., 0] * mask  # (k, m)
    return OptionScores(logprobs=logp.sum(dim=1).tolist(), num_tokens=[len(c) for c in conts],
                        num_chars=option_lengths(continuations), context_tokens=len(enc_ids))

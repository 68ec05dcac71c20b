"""Option log-likelihood for many questions in one forward pass (the server's micro-batches).

`score_options` (scoring.py) scores one question, sharing its context across its options. When
every option of every question is one token after its context (letters, yes/no/maybe), a batch of
b questions needs only the last context logits of each: the contexts are right-padded into one
(b, n_max) tensor and run once. Right padding keeps each row's positions 0..n_i-1 and the causal
mask keeps real tokens from seeing the pads, so row i's logits at position n_i - 1 are the same as
an unbatched run's (up to float reduction order). The LM head runs only at the rows' last positions
(`logits_to_keep`, where the model supports it). Questions with multi-token options fall back to
`score_options`, one at a time.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from medmoe.eval.prompts import Prompt
from medmoe.eval.scoring import OptionScores, accepts_logits_to_keep, bos_ids, encode_pair, option_lengths, score_options


def _single_token_plan(tokenizer: Any, prompt: Prompt) -> tuple[list[int], list[int]] | None:
    """(context ids incl. BOS, one token id per option) when every option is one token, else None."""
    pairs = [encode_pair(tokenizer, prompt.context, c) for c in prompt.continuations]
    if any(ctx != pairs[0][0] for ctx, _ in pairs) or any(len(cont) != 1 for _, cont in pairs):
        return None
    return bos_ids(tokenizer, pairs[0][0]) + pairs[0][0], [cont[0] for _, cont in pairs]


@torch.inference_mode()
def score_options_batch(model: Any, tokenizer: Any, prompts: Sequence[Prompt]) -> list[OptionScores]:
    """`score_options` for each prompt, batching every prompt whose options are single tokens."""
    results: list[OptionScores | None] = [None] * len(prompts)
    plans = [_single_token_plan(tokenizer, p) for p in prompts]
    batch = [i for i, plan in enumerate(plans) if plan is not None]
    for i, prompt in enumerate(prompts):
        if plans[i] is None:
            results[i] = score_options(model, tokenizer, prompt.context, prompt.continuations)
    if batch:
        device = next(model.parameters()).device
        lengths = [len(plans[i][0]) for i in batch]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(batch), max(lengths)), pad, dtype=torch.long)  # (b, n_max), right-padded
        mask = torch.zeros_like(ids)
        for row, i in enumerate(batch):
            ids[row, : lengths[row]] = torch.tensor(plans[i][0])
            mask[row, : lengths[row]] = 1
        last_index = torch.tensor(lengths, device=device) - 1  # (b,)
        rows = torch.arange(len(batch), device=device)
        keep = torch.unique(last_index)  # (k,), sorted: the only positions whose logits are needed
        kwargs = {"logits_to_keep": keep} if accepts_logits_to_keep(model) else {}
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, **kwargs).logits
        column = torch.searchsorted(keep, last_index) if kwargs else last_index  # row i's last position in `logits`
        last = torch.log_softmax(logits[rows, column].float(), dim=-1)  # (b, V): next-token log-probs
        for row, i in enumerate(batch):
            option_ids = plans[i][1]
            results[i] = OptionScores(
                logprobs=last[row, option_ids].tolist(),
                num_tokens=[1] * len(option_ids),
                num_chars=option_lengths(prompts[i].continuations),
                context_tokens=lengths[row],
            )
    return results  # type: ignore[return-value]

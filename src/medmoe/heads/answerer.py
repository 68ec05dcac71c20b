"""An expert with its option head, answering option questions: what `medmoe eval --head`, the quality
benchmark and the server use.

One forward pass per question gives the head its hidden state z and the expert's own answer s
(heads/features.py), so the head costs one (K, D) product on top of the expert's prompt pass (the LM
head runs at the last position only). The same pass also yields the expert's zero-shot answer, kept
in each row's `route` as `lm_prediction`, so a run reports the head beside the likelihood rule.
`head_logits_batch` answers many questions (the server's micro-batch, each row with its own head)
from shared right-padded passes, with the same logits up to float reduction order; `head_outcomes_batch`
turns them into the harness's rows (the routed MambaFormer answerer's heads).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from medmoe.data.record import Record
from medmoe.errors import MedmoeError
from medmoe.eval.batch_scoring import MAX_PADDING_WASTE
from medmoe.eval.model import Generation, HFEvalModel
from medmoe.eval.prompts import Prompt, build_prompt
from medmoe.eval.rules import Outcome
from medmoe.eval.scoring import OptionScores
from medmoe.eval.window import PromptFitter
from medmoe.heads.features import MAX_OPTIONS, forward_prompt, pool, pooled_prompts
from medmoe.models.head import HeadConfig, OptionHead, lm_option_feature, load_head

RULE = "letter"


@torch.inference_mode()
def head_logits(model: Any, tokenizer: Any, head: OptionHead, config: HeadConfig, prompt: Any, options: int,
                extra: torch.Tensor | None = None) -> tuple[torch.Tensor, list[float], int]:
    """(the head's logits (options,), the expert's own option log-probs, prompt tokens) for one
    prompt (eval.prompts.build_prompt, letter kind); extra: (1, K, F') retrieval features if the head reads them."""
    hidden, logprobs = forward_prompt(model, tokenizer, prompt.context, prompt.continuations)
    h = None
    if config.layer is not None and config.pooling is not None:
        h = pool(hidden, config.layer, config.pooling)  # (1, D)
    return head_output(head, h, logprobs, options, extra), logprobs, int(hidden[0].shape[1])


@torch.inference_mode()
def head_logits_batch(model: Any, tokenizer: Any, items: Sequence[tuple[OptionHead, HeadConfig, Prompt, int]],
                      max_waste: float = MAX_PADDING_WASTE) -> list[tuple[torch.Tensor, list[float], int]]:
    """`head_logits` for many (head, config, prompt, options) at once: every prompt's hidden states and
    option log-probs come from shared right-padded passes (heads.features.pooled_prompts: one per
    length group, all of them in one with max_waste = inf), whatever layer and pooling each row's head
    reads. Each row's pooled state is rounded as `pool` rounds it, so the logits are `head_logits`'
    up to float reduction order. No retrieval features here (the server refuses heads that read them;
    `head_logits` takes them)."""
    pools = [(c.layer, c.pooling) if c.layer is not None and c.pooling is not None else None for _, c, _, _ in items]
    rows = pooled_prompts(model, tokenizer, [prompt for _, _, prompt, _ in items], pools, max_waste)
    return [(head_output(head, h, logprobs, options), logprobs, tokens)
            for (head, _, _, options), (h, logprobs, tokens) in zip(items, rows)]


def letter_prompts(lm: HFEvalModel, records: Sequence[Record]) -> list[Prompt]:
    """Each record's zero-shot letter prompt, cut to the model's window (what a head reads)."""
    fitter = PromptFitter(lm, RULE)
    return [build_prompt(fitter.fit(r)[0], lm.tokenizer, (), RULE) for r in records]


def head_outcome(record: Record, config: HeadConfig, logits: torch.Tensor, logprobs: Sequence[float], tokens: int,
                 latency_ms: float) -> Outcome:
    """The harness's row for a head's answer: prediction, logits as scores, softmax probabilities, and
    the head's kind and the expert's own answer (`lm_prediction`) in `route`."""
    letters, probs = record.letters, torch.softmax(logits, dim=0)
    return Outcome(prediction=letters[int(logits.argmax())], scores=dict(zip(letters, logits.tolist())),
                   probs=dict(zip(letters, probs.tolist())), prompt_tokens=tokens, latency_ms=latency_ms,
                   route={"head": config.kind, "lm_prediction": letters[int(torch.tensor(logprobs).argmax())]})


@torch.inference_mode()
def head_outcomes_batch(lm: HFEvalModel, records: Sequence[Record],
                        found: Sequence[tuple[OptionHead, HeadConfig]]) -> list[Outcome]:
    """`records` answered through their own heads (found[i] for records[i]) from shared padded passes
    (`head_logits_batch`); latency_ms = the batch's time per question."""
    items = [(head, config, prompt, len(r.options)) for r, (head, config), prompt in zip(records, found, letter_prompts(lm, records))]
    start = time.perf_counter()
    rows = head_logits_batch(lm.model, lm.tokenizer, items)
    ms = (time.perf_counter() - start) * 1000 / max(len(records), 1)
    return [head_outcome(r, config, logits, logprobs, tokens, ms)
            for r, (_, config), (logits, logprobs, tokens) in zip(records, found, rows)]


def head_output(head: OptionHead, h: torch.Tensor | None, logprobs: Sequence[float], options: int,
                extra: torch.Tensor | None = None) -> torch.Tensor:
    """The head's logits (options,) from one prompt's pooled state h (1, D) or None and the expert's
    option log-probs; extra: (1, K, F') retrieval features."""
    k = head.letters
    s = torch.full((1, MAX_OPTIONS), float("-inf"))
    s[0, : len(logprobs)] = torch.tensor(list(logprobs))
    s = s[:, :k]
    f = lm_option_feature(s)  # (1, K, 1)
    if extra is not None:
        f = torch.cat([f, extra[:, :k].float()], dim=-1)
    return head(h, f, torch.isfinite(s))[0, :options]


class HeadAnswerer:
    """`lm` answering through `head` (config: its HeadConfig); an EvalModel via score_records."""

    def __init__(self, lm: HFEvalModel, head: OptionHead, config: HeadConfig, option_extra: Any = None):
        self.lm, self.head, self.config = lm, head, config
        self.tokenizer = lm.tokenizer
        self.name = f"{lm.name}+head({config.kind})"
        self.option_extra = option_extra  # records -> (N, K, F') retrieval features, when the head uses them
        self._route: dict[str, Any] | None = None

    @classmethod
    def load(cls, folder: str | Path, dtype: Any = None, device: str = "cpu") -> HeadAnswerer:
        from medmoe.models import load_causal_lm

        head, config = load_head(folder)
        dtype = dtype if dtype is not None else getattr(torch, config.dtype)
        model, tokenizer = load_causal_lm(config.base, dtype=dtype, device=device, adapter=config.adapter)
        extra = None
        if config.retrieval:
            from medmoe.data.pools import training_pool
            from medmoe.heads.train import retrieval_extra

            pool_name = config.retrieval["pool"]
            pool = training_pool(pool_name)
            if len(pool) != config.retrieval.get("records", len(pool)):
                raise MedmoeError(f"{folder}: its retrieval features came from {config.retrieval['records']} records "
                                  f"of the {pool_name} pool, which now has {len(pool)}; train the head again")
            extra, _ = retrieval_extra(pool_name, pool, config.retrieval["encoder"])
        return cls(HFEvalModel(model, tokenizer, config.base, share_prefix=False), head, config, extra)

    @torch.inference_mode()
    def answer(self, records: Sequence[Record]) -> list[Outcome]:
        """The head's answer to each option question (zero-shot prompt, cut to the window)."""
        fitter = PromptFitter(self.lm, RULE)
        k = self.head.letters
        outcomes = []
        for record in records:
            if len(record.options) > k:
                raise MedmoeError(f"{record.id}: {len(record.options)} options, this head answers at most {k}")
            start = time.perf_counter()
            fitted, _ = fitter.fit(record)
            prompt = build_prompt(fitted, self.tokenizer, (), RULE)
            extra = None if self.option_extra is None else self.option_extra([record])
            logits, logprobs, tokens = head_logits(self.lm.model, self.tokenizer, self.head, self.config,
                                                   prompt, len(record.options), extra)
            outcomes.append(head_outcome(record, self.config, logits, logprobs, tokens,
                                         (time.perf_counter() - start) * 1000))
        return outcomes

    # --- EvalModel ----------------------------------------------------------------------------------
    def score_records(self, records: Sequence[Record], rule: str, shots: Sequence[Sequence[Record]],
                      multi: bool = False, max_new_tokens: int = 32) -> list[Outcome]:
        if rule != RULE or any(shots):
            raise MedmoeError(f"a head answers from its zero-shot {RULE} prompt: use --rule {RULE} --shots 0")
        return self.answer(records)

    def score_options(self, context: str, continuations: Sequence[str]) -> OptionScores:
        raise MedmoeError("a head answers records (score_records), not raw prompts")

    def score_batch(self, requests: Sequence[tuple[str, Sequence[str]]]) -> list[OptionScores]:
        raise MedmoeError("a head answers records (score_records), not raw prompts")

    def generate(self, context: str, max_new_tokens: int) -> Generation:
        return self.lm.generate(context, max_new_tokens)

    def last_route(self) -> dict[str, Any] | None:
        return self._route

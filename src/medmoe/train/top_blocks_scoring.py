"""`medmoe eval`'s letter scoring over cached lower-block states: adapters on the top N blocks, evaluated cheaply.

In medmoe.train, not medmoe.eval: it runs training's ActivationCache and top-blocks machinery, and eval sits
below train in the layers (docs/architecture.md).

Adapters trained with `medmoe finetune --top-blocks N` (PEFT LoRA or LoRA-MoE) sit on the last N of the
model's L blocks only, so the lower L - N blocks compute the same states for a prompt whichever adapter
is loaded, or none. Those states are computed once per test prompt into an `ActivationCache`
(medmoe.train.top_blocks; the same files, manifest and key as a training cache), and each system then runs
only the top N blocks, the final norm and the LM head at the prompt's last position:

    features = prompt_features(lm, tokenizer, bench)            # per record: the context ids score_options runs
    cache = ActivationCache.build_or_open(folder, lm, features, N, pad_id)   # once, with the bare base
    model = TopBlocksEvalModel(lm_with_adapter, tokenizer, cache, features, N)
    rows = run_benchmark(model, bench, output, rule="letter")   # medmoe eval's rows, resumable

`TopBlocksEvalModel` is an EvalModel (eval/model.py) whose `score_options` / `score_batch` give what
`HFEvalModel`'s give for single-token continuations (the letters "A".."E" of a chat prompt, yes/no/maybe):
log p(option token | context) = log_softmax(z)[option], z (V,) the logits after the context, here
`last_position_logits(model, h, mask, N)` from the cached states h (T, D). Prompt building, the window
rule, the decision rule (argmax over the option letters, ties to the first) and the row layout are
medmoe eval's own (`apply_rule`, `run_benchmark`); so is correctness: the prediction must equal the gold
answer exactly, and a multi-answer gold ("AB", CMExam) is never matched by one letter.

A context is found in the cache by its token ids, so a prompt built otherwise (other template, shots or
record text) is refused rather than scored on another prompt's states. The cache's key, checked on
open against the model being scored, covers the lower blocks' weights (adapters on the top blocks do not
change it) and the dtype: build the cache in the dtype the adapters were trained in (fp32 on CPU).
Multi-token continuations (loglik rules) and generation are not supported: use the full model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from medmoe.errors import MedmoeError
from medmoe.eval.batch_scoring import _single_token_plan, length_groups
from medmoe.eval.benchmarks import Benchmark
from medmoe.eval.model import Generation, HFEvalModel
from medmoe.eval.prompts import Prompt, build_prompt
from medmoe.eval.rules import CONTINUATIONS
from medmoe.eval.scoring import OptionScores, option_lengths
from medmoe.eval.window import PromptFitter
from medmoe.train.top_blocks import ActivationCache, last_position_logits

RULE = "letter"  # the one rule whose options are single tokens for every benchmark this serves


def prompt_features(model: Any, tokenizer: Any, bench: Benchmark, shots: int = 0) -> list[dict]:
    """Per record of `bench`, in order, {"input_ids": the context ids (BOS included when the tokenizer adds
    one), "labels": all -100}: the tokens `medmoe eval --rule letter` runs for the record's prompt (the
    window rule of run_benchmark applied first), as ActivationCache features. A MedmoeError names a
    record whose options are not single tokens after its prompt."""
    fitter = PromptFitter(HFEvalModel(model, tokenizer, share_prefix=False), CONTINUATIONS[RULE], bench.multi)
    features = []
    for record in bench.records:
        shot_list = bench.shots_for(record, shots)
        fitted, _ = fitter.fit(record, shot_list)
        prompt = build_prompt(fitted, tokenizer, shot_list, CONTINUATIONS[RULE], bench.multi)
        ids = _context_ids(tokenizer, prompt, record.id)
        features.append({"input_ids": ids, "labels": [-100] * len(ids)})
    return features


def _context_ids(tokenizer: Any, prompt: Prompt, where: str) -> list[int]:
    plan = _single_token_plan(tokenizer, prompt)  # (context ids incl. BOS, option ids), as score_options_batch
    if plan is None:
        raise MedmoeError(f"{where}: an option is not one token after the prompt; scoring over cached lower-block "
                          "states supports single-token options only (--rule letter); use the full model")
    return plan[0]


class TopBlocksEvalModel:
    """An EvalModel scoring single-token options from cached lower-block states (the module docstring).

    model: the base with its adapter (or none) on the top n_top blocks, in eval mode; cache, features: the
    ActivationCache and the features it was built from (prompt_features), matched by token ids."""

    def __init__(self, model: Any, tokenizer: Any, cache: ActivationCache, features: Sequence[dict], n_top: int,
                 name: str = "model"):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.cache, self.n_top = cache, n_top
        self.index = {tuple(f["input_ids"]): i for i, f in enumerate(features)}

    def score_options(self, context: str, continuations: Sequence[str]) -> OptionScores:
        return self.score_batch([(context, continuations)])[0]

    @torch.inference_mode()
    def score_batch(self, requests: Sequence[tuple[str, Sequence[str]]]) -> list[OptionScores]:
        """The requests' option scores; rows of similar length run as one right-padded batch (length_groups)."""
        prompts = [Prompt(context, tuple(conts), ()) for context, conts in requests]
        plans = []
        for prompt in prompts:
            plan = _single_token_plan(self.tokenizer, prompt)
            if plan is None:
                raise MedmoeError(f"{self.name}: an option is not one token after the prompt; scoring over cached "
                                  "lower-block states supports single-token options only (--rule letter)")
            plans.append(plan)
        rows = [self._cached(ids, prompt.context) for (ids, _), prompt in zip(plans, prompts)]
        results: list[OptionScores | None] = [None] * len(prompts)
        for group in length_groups([len(ids) for ids, _ in plans]):
            logprobs = self.next_token_logprobs([rows[i] for i in group], [len(plans[i][0]) for i in group])  # (g, V)
            for row, i in enumerate(group):
                ids, option_ids = plans[i]
                results[i] = OptionScores(logprobs=logprobs[row, option_ids].tolist(), num_tokens=[1] * len(option_ids),
                                          num_chars=option_lengths(prompts[i].continuations), context_tokens=len(ids))
        return [r for r in results if r is not None]

    def next_token_logprobs(self, indices: list[int], lengths: list[int]) -> torch.Tensor:
        """(g, V): log p(. | context) after each of the cached contexts `indices` (their token counts `lengths`)."""
        width = max(lengths)
        states = self.cache.states(indices, width)  # (g, width, D), right-padded
        mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()  # (g, width)
        device = next(self.model.parameters()).device
        logits = last_position_logits(self.model, states.to(device), mask.to(device), self.n_top)  # (g, V)
        return torch.log_softmax(logits.float(), dim=-1)

    def _cached(self, ids: list[int], context: str) -> int:
        index = self.index.get(tuple(ids))
        if index is None:
            start = " ".join(context.split())[:80]
            raise MedmoeError(f"{self.cache.folder}: the prompt {start!r}... ({len(ids)} tokens) is not in this top-blocks "
                              "cache; build the cache from the same benchmark, model and settings")
        return index

    def generate(self, context: str, max_new_tokens: int) -> Generation:
        raise MedmoeError(f"{self.name}: scoring over cached lower-block states scores options only (--rule letter); "
                          "generation needs the full model")

    def last_route(self) -> dict[str, Any] | None:
        return None

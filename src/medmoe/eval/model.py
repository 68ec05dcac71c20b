"""What the harness needs from a model: the `EvalModel` protocol, and its plain Hugging Face version.

Every system medmoe evaluates implements the same three things, so `medmoe eval` treats them alike:
  score_options(context, continuations) -> OptionScores   log p(continuation_i | context)
  score_batch(requests)                  -> [OptionScores]  the same for many examples at once
  generate(context, max_new_tokens)      -> Generation       greedy text after the context
  tokenizer                                                 for prompts and chat templates
and may report per call what the router did (`last_route()`: expert, gate probability, expert load),
which the harness writes into each example's JSONL row. Plain models report nothing.

Plugging in: LoRA, LoRA-MoE and full fine-tunes load with `--adapter PATH`. The routed MambaFormer
system (`medmoe.mambaformer.answerer.RoutedAnswerer`, `--router DIR`) picks its expert from each question's
record, which a prompt string does not carry: it provides `score_records(records, ...)` instead of the
scoring calls, and `medmoe.eval.rules.apply_rule` asks it through that (option questions only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from medmoe.errors import ModelError
from medmoe.eval.batch_scoring import score_options_batch
from medmoe.eval.prompts import Prompt
from medmoe.eval.scoring import OptionScores, PrefixCache, bos_ids, is_encoder_decoder, score_options


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    new_tokens: int


class EvalModel(Protocol):
    name: str
    tokenizer: Any

    def score_options(self, context: str, continuations: Sequence[str]) -> OptionScores: ...

    def score_batch(self, requests: Sequence[tuple[str, Sequence[str]]]) -> list[OptionScores]: ...

    def generate(self, context: str, max_new_tokens: int) -> Generation: ...

    def last_route(self) -> dict[str, Any] | None: ...


class HFEvalModel:
    """A Hugging Face causal LM (optionally with a PEFT LoRA adapter merged in) as an EvalModel.

    share_prefix: keep the previous context's KV cache and reuse the part the next context shares
    with it (few-shot shots); scores are unchanged (tests/test_scoring_rules.py).
    """

    def __init__(self, model: Any, tokenizer: Any, name: str = "model", share_prefix: bool = True):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.placement: dict[str, str] = {}  # {dtype, device} it was loaded in, when load_eval_model loaded it
        recurrent = any(getattr(m, "is_recurrent", False) for m in model.modules())  # a cropped SSM state is wrong
        self.prefix = PrefixCache() if share_prefix and not recurrent else None

    def score_options(self, context: str, continuations: Sequence[str]) -> OptionScores:
        return score_options(self.model, self.tokenizer, context, continuations, self.prefix)

    def reset(self) -> None:
        """Forget the cached prefix, so a run does not depend on what this model scored before."""
        if self.prefix is not None:
            self.prefix = PrefixCache(self.prefix.min_tokens)

    def score_batch(self, requests: Sequence[tuple[str, Sequence[str]]]) -> list[OptionScores]:
        """Many examples at once: one padded forward for those whose continuations are single tokens."""
        return score_options_batch(self.model, self.tokenizer, [Prompt(c, tuple(conts), ()) for c, conts in requests])

    @torch.inference_mode()
    def generate(self, context: str, max_new_tokens: int) -> Generation:
        """Greedy decoding (deterministic), stopping at EOS or the chat template's end of turn.
        An encoder-decoder model reads the context in its encoder and returns only new tokens."""
        if is_encoder_decoder(self.model):
            return self._generate_seq2seq(context, max_new_tokens)
        ids = self.tokenizer(context, add_special_tokens=False)["input_ids"]
        ids = bos_ids(self.tokenizer, ids) + ids
        input_ids = torch.tensor([ids], device=next(self.model.parameters()).device)
        out = self.model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=self.tokenizer.pad_token_id,
        )
        new = out[0, len(ids):]
        return Generation(self.tokenizer.decode(new, skip_special_tokens=True).strip(), len(ids), int(new.numel()))

    def _generate_seq2seq(self, context: str, max_new_tokens: int) -> Generation:
        ids = self.tokenizer(context, add_special_tokens=True)["input_ids"]  # T5: with its closing </s>
        input_ids = torch.tensor([ids], device=next(self.model.parameters()).device)
        out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                  max_new_tokens=max_new_tokens, do_sample=False)
        new = out[0, 1:]  # after the decoder start token
        specials = {self.model.config.pad_token_id, self.model.config.eos_token_id}
        count = int(sum(1 for t in new.tolist() if t not in specials))
        return Generation(self.tokenizer.decode(new, skip_special_tokens=True).strip(), len(ids), count)

    def last_route(self) -> dict[str, Any] | None:
        return None


def load_eval_model(name: str, adapter: str | None = None, dtype: str = "float32", device: str = "cpu") -> HFEvalModel:
    """A bundled name, hub id or local folder (optionally with a `medmoe finetune` adapter) as an EvalModel,
    loaded in `dtype` (auto | float32 | bfloat16 | float16) on `device` (auto | cpu | cuda | cuda:N | mps;
    `medmoe.models.placement`); a Mamba hybrid on CPU stays float32, as `medmoe run` loads it
    (`medmoe.models.placement.load_dtype`). The model's `placement` says what was resolved."""
    if name.startswith("routed:"):
        raise ModelError(f"'{name}': evaluate the routed MambaFormer system with `medmoe eval --router DIR` "
                         "(DIR: the gate folder written by `medmoe run`)")
    from medmoe.models import hybrid_folder, load_causal_lm
    from medmoe.models.placement import load_dtype, resolve_device, torch_dtype

    device = resolve_device(device)
    dtype = load_dtype(dtype, device, hybrid=adapter is None and hybrid_folder(Path(name)) is not None)
    # LoRA-MoE, PEFT LoRA or a full fine-tune, by its files
    model, tokenizer = load_causal_lm(name, dtype=torch_dtype(dtype), device=device, adapter=adapter)
    lm = HFEvalModel(model, tokenizer, name if adapter is None else f"{name}+{Path(adapter).name}")
    lm.placement = {"dtype": dtype, "device": device}
    return lm

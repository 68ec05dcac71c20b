"""Answerers the server can load. The default, `load_causal_lm_answerer` (serve/config.py
DEFAULT_FACTORY), serves one causal LM as `medmoe.answer.causal_lm.CausalLMAnswerer`; the routed
MambaFormer system (`medmoe.mambaformer.answerer:load_routed_answerer`) drops in the same way.

The answerer protocol the server relies on (`answer_batch`, and the optional `fit`, `batch_key` and
`sinks`) and the request faults (`RequestRejected`, `InputTooLong`: 4xx for that request alone) are
defined in the answer layer (medmoe.answer.types), below both the server and the routed system; they
are re-exported here for the server's modules.
"""

from __future__ import annotations

from typing import Any

from medmoe.answer.causal_lm import CausalLMAnswerer, open_prompt
from medmoe.answer.types import InputTooLong, RequestRejected
from medmoe.eval.window import cut_context  # the long-input rule CausalLMAnswerer.fit applies (as `medmoe eval`)

__all__ = ["CausalLMAnswerer", "InputTooLong", "RequestRejected", "cut_context", "load_causal_lm_answerer", "open_prompt"]


def load_causal_lm_answerer(config: Any) -> CausalLMAnswerer:
    """Factory named by the default server config: `config.model` (any kind the model zoo loads:
    bundled name, hub id, HF folder, GGUF, Mamba hybrid, fine-tuned model), with `config.adapter`."""
    from medmoe.models import load_causal_lm

    model, tokenizer = load_causal_lm(config.model, adapter=getattr(config, "adapter", None))
    return CausalLMAnswerer(
        model, tokenizer, name=config.model_label or config.model,
        max_new_tokens=config.max_new_tokens, max_input_tokens=config.max_input_tokens,
    )

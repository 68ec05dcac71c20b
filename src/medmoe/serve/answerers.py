"""Answerers the server can load. The default, `load_causal_lm_answerer` (serve/config.py
DEFAULT_FACTORY), serves one causal LM as `medmoe.answer.causal_lm.CausalLMAnswerer`; with
`engine: llama.cpp`, `load_llamacpp_answerer` serves its GGUF file through llama.cpp
(`medmoe.answer.llamacpp.LlamaCppAnswerer`); the routed MambaFormer system
(`medmoe.mambaformer.answerer:load_routed_answerer`) drops in the same way.

The answerer protocol the server relies on (`answer_batch`, and the optional `fit`, `batch_key` and
`sinks`) and the request faults (`RequestRejected`, `InputTooLong`: 4xx for that request alone) are
defined in the answer layer (medmoe.answer.types), below both the server and the routed system; they
are re-exported here for the server's modules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from medmoe.answer.causal_lm import CausalLMAnswerer, open_prompt
from medmoe.answer.types import InputTooLong, RequestRejected
from medmoe.eval.window import cut_context  # the long-input rule CausalLMAnswerer.fit applies (as `medmoe eval`)
from medmoe.heads.bundled import HeadSet

if TYPE_CHECKING:
    from medmoe.answer.llamacpp import LlamaCppAnswerer

__all__ = ["CausalLMAnswerer", "InputTooLong", "RequestRejected", "cut_context", "load_causal_lm_answerer",
           "load_llamacpp_answerer", "open_prompt"]


def load_causal_lm_answerer(config: Any) -> CausalLMAnswerer:
    """Factory named by the default server config: `config.model` (any kind the model zoo loads:
    bundled name, hub id, HF folder, GGUF, Mamba hybrid, fine-tuned model), with `config.adapter`,
    in `config.dtype` on `config.device` (float32 and auto when the config has none; a Mamba hybrid on
    CPU stays float32, as `medmoe run` loads it)."""
    from pathlib import Path

    from medmoe.models import hybrid_folder, load_causal_lm
    from medmoe.models.placement import load_dtype, resolve_device, torch_dtype

    adapter = getattr(config, "adapter", None)
    device = resolve_device(getattr(config, "device", "auto"))
    hybrid = adapter is None and hybrid_folder(Path(config.model)) is not None
    dtype = load_dtype(getattr(config, "dtype", "float32"), device, hybrid=hybrid)
    model, tokenizer = load_causal_lm(config.model, dtype=torch_dtype(dtype), device=device, adapter=adapter)
    return CausalLMAnswerer(
        model, tokenizer, name=config.model_label or config.model,
        max_new_tokens=config.max_new_tokens, max_input_tokens=config.max_input_tokens,
        heads=server_heads(getattr(config, "heads", "none"), config.model, adapter),
    )


def load_llamacpp_answerer(config: Any) -> LlamaCppAnswerer:
    """Factory for `engine: llama.cpp`: the GGUF file of `config.model` (a bundled name that ships as GGUF,
    or a path to a .gguf file; anything else is a ModelError) run quantized by llama.cpp on
    `config.threads` CPU threads [os.cpu_count()]. No option heads: `heads: bundled` and `none` both
    answer by the model's own option likelihoods (ServeConfig refuses head folders, adapters, a dtype)."""
    import logging

    from medmoe.answer.llamacpp import LlamaCppAnswerer
    from medmoe.heads.bundled import bundled_head_folders

    if getattr(config, "heads", "none") == "bundled" and bundled_head_folders(config.model):
        logging.getLogger(__name__).info("engine llama.cpp serves %s without its bundled option heads (they read the "
                                         "torch model's hidden states)", config.model)
    return LlamaCppAnswerer.load(config.model, name=config.model_label or config.model, max_new_tokens=config.max_new_tokens,
                                 max_input_tokens=config.max_input_tokens, threads=config.threads)


def server_heads(heads: list[str] | str, model: str, adapter: str | None) -> HeadSet | None:
    """The option heads the server answers through: medmoe's bundled ones for `model` ("bundled";
    none exist for a model with an adapter, whose features differ), none ("none"), or the named
    folders, each of which must read `model` without an adapter or with this one."""
    from medmoe.errors import MedmoeError
    from medmoe.models.head import load_head

    if heads == "none":
        return None
    if heads == "bundled":
        return None if adapter else HeadSet.bundled(model)
    if isinstance(heads, str):
        raise MedmoeError(f"server config: heads must be 'bundled', 'none' or a list of head folders, got {heads!r}")
    loaded = [load_head(folder) for folder in heads]
    for folder, (_, head_config) in zip(heads, loaded):
        if head_config.base != model or head_config.adapter != adapter:
            raise MedmoeError(f"server config: the head {folder} reads {head_config.base} (adapter {head_config.adapter}), "
                              f"the server runs {model} (adapter {adapter})")
        if head_config.retrieval:
            raise MedmoeError(f"server config: the head {folder} uses retrieval features, which the server does not build; "
                              "train one without --retrieval")
    return HeadSet(loaded)

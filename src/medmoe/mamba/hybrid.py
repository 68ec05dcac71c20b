"""The Mamba hybrid as a Hugging Face model type of its own: `medmoe_mamba_hybrid`.

A hybrid is a Llama-family causal LM whose attention blocks, except a chosen few, are `AttentionMamba`
mixers. Its `config.json` says `"model_type": "medmoe_mamba_hybrid"` and carries the hybrid's spec
(`config.hybrid`: the teacher, which teacher layers were kept, which keep attention), so a saved
hybrid is never mistaken for a plain Llama:

  * with this module imported (any medmoe command does), `AutoConfig` / `AutoModelForCausalLM`
    know the type, and `AutoModelForCausalLM.from_pretrained(folder)` builds the hybrid exactly;
  * stock transformers without medmoe refuses the folder ("does not recognize this architecture")
    instead of loading a Llama whose attention layers are freshly initialised.

Decoding state: `MambaHybridModel.forward` gives every call that uses a cache a `HybridCache`
(medmoe.mamba.hybrid_cache), including the empty `DynamicCache` that `generate` makes first; the
model returns that cache, and `generate` carries it on from the output.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.models.llama.modeling_llama import LlamaPreTrainedModel

from medmoe.errors import ModelError
from medmoe.hf_compat import cache_kwarg
from medmoe.mamba.attention_mixer import AttentionMamba
from medmoe.mamba.hybrid_cache import HybridCache

MODEL_TYPE = "medmoe_mamba_hybrid"


@dataclass
class HybridSpec:
    """What was built: which teacher layers survive, which keep attention, the mixers' shapes."""

    teacher: str
    layers: list[int]                       # teacher layer indices kept, in order
    attention_layers: list[int] = field(default_factory=list)  # subset of `layers` that keep attention
    d_conv: int = 4
    dt_rank: int | None = None
    version: int = 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def mixer_layers(self) -> list[tuple[int, int]]:
        """(student position, teacher layer) of every layer whose attention was replaced by a Mamba
        mixer: student layer p is teacher layer layers[p] (a shallow student keeps a subset, in order)."""
        return [(p, j) for p, j in enumerate(self.layers) if j not in self.attention_layers]


@strict
class MambaHybridConfig(LlamaConfig):
    """A Llama config (the student's own layers) plus `hybrid`: its HybridSpec as a dict."""

    model_type = MODEL_TYPE
    hybrid: dict | None = None

    def attention_positions(self) -> list[int]:
        """Decoder positions (0..num_hidden_layers-1) that keep attention."""
        spec = self.hybrid or {}
        layers = spec.get("layers") or list(range(self.num_hidden_layers))
        return [layers.index(i) for i in spec.get("attention_layers", [])]


class MambaHybridModel(LlamaModel):
    """LlamaModel with AttentionMamba mixers; every cached call gets a HybridCache."""

    config_class = MambaHybridConfig

    def __init__(self, config: MambaHybridConfig):
        super().__init__(config)
        keep = set(config.attention_positions())
        spec = config.hybrid or {}
        for idx, layer in enumerate(self.layers):
            if idx in keep:
                continue
            heads, kv = config.num_attention_heads, config.num_key_value_heads
            layer.self_attn = AttentionMamba(config.hidden_size, heads, kv, config.head_dim,  # type: ignore[arg-type]  # LlamaConfig sets both
                                             d_conv=spec.get("d_conv", 4), dt_rank=spec.get("dt_rank"),
                                             bias=config.attention_bias)
            layer.self_attn.layer_idx = idx

    def forward(self, *args: Any, **kwargs: Any):
        cache = kwargs.pop("cache", None)
        legacy = kwargs.pop("past_key_values", None)
        cache = cache if cache is not None else legacy
        use_cache = kwargs.get("use_cache")
        if use_cache is None:  # as transformers resolves it: the config's default, off under checkpointing
            use_cache = bool(self.config.use_cache) and not (self.gradient_checkpointing and self.training)
        kwargs["use_cache"] = use_cache
        if cache is not None and not isinstance(cache, HybridCache):
            if cache.get_seq_length() > 0:
                raise ModelError(f"a Mamba hybrid cannot continue a {type(cache).__name__} that holds tokens: "
                                 "its mixers' states are only in a HybridCache")
            cache = HybridCache()  # the empty cache `generate` makes before the first forward
        if cache is None and use_cache:
            cache = HybridCache()
        return super().forward(*args, **{cache_kwarg(): cache}, **kwargs)


class MambaHybridForCausalLM(LlamaForCausalLM):
    """The hybrid causal LM: MambaHybridModel + the LM head (weights named as in LlamaForCausalLM)."""

    config_class = MambaHybridConfig

    def __init__(self, config: MambaHybridConfig):
        LlamaPreTrainedModel.__init__(self, config)
        self.model = MambaHybridModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @property
    def hybrid_spec(self) -> HybridSpec:
        """The HybridSpec this model was built from (lets a fine-tuning run save it back as a hybrid)."""
        return HybridSpec(**self.config.hybrid)


def _register() -> None:
    try:
        AutoConfig.register(MODEL_TYPE, MambaHybridConfig)
        AutoModelForCausalLM.register(MambaHybridConfig, MambaHybridForCausalLM)
    except ValueError as exc:  # registered twice (module reloaded): fine if it is ours
        if "already" not in str(exc):
            raise ModelError(f"cannot register {MODEL_TYPE} with transformers: {exc}") from exc


_register()

"""Configuration of a Mamba-1 language model (the fields of Hugging Face's MambaConfig that matter)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path


@dataclass
class MambaConfig:
    """Shapes of a Mamba-1 LM. Symbols: D = d_model, E = expand, d_inner = E * D, N = d_state,
    K = d_conv (causal conv width), R = dt_rank (rank of the Delta projection)."""

    vocab_size: int = 50280
    d_model: int = 768
    n_layer: int = 24
    d_state: int = 16
    expand: int = 2
    d_conv: int = 4
    dt_rank: int | None = None        # None: ceil(d_model / 16), as in the paper and HF ("auto")
    conv_bias: bool = True
    bias: bool = False                # bias of in_proj / out_proj
    norm_eps: float = 1e-5
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.dt_rank is None:
            self.dt_rank = math.ceil(self.d_model / 16)
        for name in ("vocab_size", "d_model", "n_layer", "d_state", "expand", "d_conv", "dt_rank"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"MambaConfig.{name} must be a positive integer, got {getattr(self, name)!r}")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    # --- Hugging Face MambaConfig <-> ours -------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, hf: dict) -> MambaConfig:
        """Map a Hugging Face `MambaConfig` (config.json of MambaForCausalLM) onto ours."""
        if hf.get("model_type", "mamba") != "mamba":
            raise ValueError(f"not a Mamba-1 config: model_type={hf.get('model_type')!r} (Mamba-2 is not supported)")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported Mamba activation {act!r}; only 'silu' is implemented")
        rank = hf.get("time_step_rank", "auto")
        return cls(
            vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layer=hf["num_hidden_layers"],
            d_state=hf.get("state_size", 16), expand=hf.get("expand", 2), d_conv=hf.get("conv_kernel", 4),
            dt_rank=None if rank == "auto" else int(rank), conv_bias=hf.get("use_conv_bias", True),
            bias=hf.get("use_bias", False), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            tie_embeddings=hf.get("tie_word_embeddings", True),
        )

    def to_hf_dict(self) -> dict:
        return {
            "model_type": "mamba", "architectures": ["MambaForCausalLM"], "vocab_size": self.vocab_size,
            "hidden_size": self.d_model, "num_hidden_layers": self.n_layer, "state_size": self.d_state,
            "expand": self.expand, "conv_kernel": self.d_conv, "time_step_rank": self.dt_rank,
            "intermediate_size": self.d_inner, "use_conv_bias": self.conv_bias, "use_bias": self.bias,
            "layer_norm_epsilon": self.norm_eps, "hidden_act": "silu", "tie_word_embeddings": self.tie_embeddings,
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> MambaConfig:
        data = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

"""One interface over MambaFormer's experts: a Transformer (any HF causal LM) and a Mamba hybrid.

Both are Hugging Face-style causal LMs (the Mamba expert is a SmolLM2 whose attention blocks were
replaced by Mamba mixers, `medmoe.mamba.transfer`), so option scoring and generation are shared:
the classification head of either expert is option log-likelihood over its LM head (yes/no/maybe,
or option letters), and generation is greedy decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medmoe.errors import ModelError


@dataclass
class Expert:
    name: str  # "transformer", "mamba", or a baseline's name
    source: str  # what it was loaded from
    model: Any
    tokenizer: Any
    trained_on: dict | None = None  # a fine-tuned expert's data provenance (medmoe_training.json)
    dtype: str = "float32"  # what it was loaded in (resolved: never "auto")
    device: str = "cpu"

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def load_expert(name: str, source: str, tokenizer_source: str | None = None, dtype: str = "float32",
                device: str = "cpu") -> Expert:
    """Load an expert from a bundled name, hub id, local folder, or a `medmoe mambaformer distill` run folder
    (through the model zoo, which knows every kind); a hybrid saved without a tokenizer takes
    `tokenizer_source`'s, else its teacher's. dtype: auto | float32 | bfloat16 | float16 and device:
    auto | cpu | cuda | cuda:N | mps (`medmoe.models.placement`); a hybrid on CPU loads in float32."""
    from medmoe.models import hybrid_folder, load_causal_lm, training_provenance
    from medmoe.models.placement import load_dtype, resolve_device, torch_dtype

    hybrid = hybrid_folder(Path(source))
    device = resolve_device(device)
    dtype = load_dtype(dtype, device, hybrid=hybrid is not None)
    saved_tokenizer = hybrid is not None and (hybrid / "tokenizer_config.json").exists()
    model, tokenizer = load_causal_lm(str(hybrid or source), dtype=torch_dtype(dtype), device=device,
                                      tokenizer=None if saved_tokenizer else tokenizer_source)
    return Expert(name, str(hybrid or source), model, tokenizer, training_provenance(hybrid or Path(source)), dtype, device)


def check_gate_records(experts: dict[str, Expert], dataset: str, n_gate: int) -> None:
    """The gate learns from each expert's outcomes on the first n_gate train records, so no expert may
    have been fine-tuned on those records (its outcomes there would be memorised, not predictive)."""
    for expert in experts.values():
        seen = expert.trained_on
        if seen and seen.get("data") == dataset and n_gate > int(seen.get("skip_first", 0)):
            raise ModelError(
                f"{expert.source}: fine-tuned on {dataset} train records from #{seen.get('skip_first', 0)} on, but the "
                f"gate would train on the first {n_gate}; use --train-limit {seen.get('skip_first', 0)} or less")

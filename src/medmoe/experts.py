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

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def mamba_folder(path: str | Path) -> Path | None:
    """The hybrid folder for a path: the folder itself, or the latest checkpoint of a distill run."""
    from medmoe.mamba.distill import latest_checkpoint
    from medmoe.mamba.transfer import SPEC_FILE

    folder = Path(path)
    if (folder / SPEC_FILE).exists():
        return folder
    return latest_checkpoint(folder)


def load_expert(name: str, source: str, tokenizer_source: str | None = None) -> Expert:
    """Load an expert from a bundled name, hub id, local folder, or a `medmoe distill` run folder."""
    from medmoe.models import load_causal_lm, load_tokenizer

    hybrid = mamba_folder(source) if Path(source).exists() else None
    if hybrid is None:
        model, tokenizer = load_causal_lm(source)
        return Expert(name, source, model, tokenizer)
    from medmoe.mamba.transfer import load_hybrid

    model, tokenizer, spec = load_hybrid(hybrid)
    if tokenizer is None:
        tokenizer = load_tokenizer(tokenizer_source or spec.teacher)
    if tokenizer is None:
        raise ModelError(f"{hybrid}: no tokenizer saved and none given")
    return Expert(name, str(hybrid), model, tokenizer)

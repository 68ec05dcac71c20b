"""One interface over MambaFormer's experts: a Transformer (any HF causal LM) and a Mamba hybrid.

Both are Hugging Face-style causal LMs (the Mamba expert is a SmolLM2 whose attention blocks were
replaced by Mamba mixers, `medmoe.mamba.transfer`), so option scoring and generation are shared:
the classification head of either expert is option log-likelihood over its LM head (yes/no/maybe,
or option letters), and generation is greedy decoding.
"""

from __future__ import annotations

import json
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

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def mamba_folder(path: str | Path) -> Path | None:
    """The hybrid folder for a path: the folder itself, or the latest checkpoint of a distill run."""
    from medmoe.mamba.distill import latest_checkpoint
    from medmoe.mamba.transfer import is_hybrid_folder

    folder = Path(path)
    if is_hybrid_folder(folder):
        return folder
    return latest_checkpoint(folder)


def load_expert(name: str, source: str, tokenizer_source: str | None = None) -> Expert:
    """Load an expert from a bundled name, hub id, local folder, or a `medmoe distill` run folder."""
    from medmoe.models import load_causal_lm, load_tokenizer

    hybrid = mamba_folder(source) if Path(source).exists() else None
    if hybrid is None:
        model, tokenizer = load_causal_lm(source)
        return Expert(name, source, model, tokenizer, _provenance(Path(source)))
    from medmoe.mamba.transfer import load_hybrid

    model, tokenizer, spec = load_hybrid(hybrid)
    if tokenizer is None:
        tokenizer = load_tokenizer(tokenizer_source or spec.teacher)
    if tokenizer is None:
        raise ModelError(f"{hybrid}: no tokenizer saved and none given")
    return Expert(name, str(hybrid), model, tokenizer, _provenance(hybrid))


def _provenance(folder: Path) -> dict | None:
    from medmoe.train.finetune import TRAINING_FILE

    path = folder / TRAINING_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def check_gate_records(experts: dict[str, Expert], dataset: str, n_gate: int) -> None:
    """The gate learns from each expert's outcomes on the first n_gate train records, so no expert may
    have been fine-tuned on those records (its outcomes there would be memorised, not predictive)."""
    for expert in experts.values():
        seen = expert.trained_on
        if seen and seen.get("data") == dataset and n_gate > int(seen.get("skip_first", 0)):
            raise ModelError(
                f"{expert.source}: fine-tuned on {dataset} train records from #{seen.get('skip_first', 0)} on, but the "
                f"gate would train on the first {n_gate}; use --train-limit {seen.get('skip_first', 0)} or less")

"""Load the base model a fine-tuning run starts from, through the model zoo."""

from __future__ import annotations


def load_base(name: str):
    """(model, tokenizer): a zoo name (smollm2-135m, gemma3-270m), a local folder or a hub id; fp32."""
    from medmoe.models import load_causal_lm

    return load_causal_lm(name)

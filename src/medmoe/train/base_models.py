"""Load the base model a fine-tuning run starts from, through the model zoo."""

from __future__ import annotations


def load_base(name: str):
    """(model, tokenizer), fp32: a zoo name (smollm2-135m, gemma3-270m), a local folder, a hub id, or a
    Mamba hybrid (a `medmoe distill` run or hybrid folder; fine-tuned with --method full, it is saved
    again as a hybrid that `medmoe run --mamba` loads)."""
    from medmoe.experts import load_expert

    expert = load_expert("base", name)
    return expert.model, expert.tokenizer

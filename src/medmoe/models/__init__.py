"""Model zoo: bundled offline models by short name, Hugging Face hub ids, local paths."""

from medmoe.models.registry import BUNDLED, BundledModel
from medmoe.models.zoo import info, load_causal_lm, load_encoder, load_tokenizer, pull, resolve

__all__ = ["BUNDLED", "BundledModel", "info", "load_causal_lm", "load_encoder", "load_tokenizer", "pull", "resolve"]

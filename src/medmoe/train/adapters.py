"""Load what `medmoe finetune` produced: a LoRA-MoE adapter, a PEFT LoRA adapter, or a full model."""

from __future__ import annotations

from pathlib import Path

from medmoe.errors import ModelError


def load_tuned(base: str, adapter: str | Path | None):
    """(model, tokenizer): the base with the adapter in `adapter` applied (kind detected from its files)."""
    from medmoe.train.base_models import load_base

    if adapter is None:
        return load_base(base)
    folder = Path(adapter)
    if (folder / "loramoe_config.json").is_file():
        from medmoe.loramoe import LoraMoeModel

        model, tokenizer = load_base(base)
        return LoraMoeModel.from_pretrained(model, folder).eval(), tokenizer
    if (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        from medmoe.models.files import safetensors_problem

        model, tokenizer = load_base(base)
        weights = folder / "adapter_model.safetensors"
        problem = safetensors_problem(weights) if weights.is_file() else None
        if problem:
            raise ModelError(problem)
        try:
            return PeftModel.from_pretrained(model, folder).eval(), tokenizer
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ModelError(f"{folder}: cannot load this PEFT adapter onto {base}: {type(exc).__name__}: {exc}") from exc
    if (folder / "config.json").is_file():  # --method full saved the whole model
        return load_base(str(folder))
    raise ModelError(f"{folder}: no loramoe_config.json, adapter_config.json or config.json; is this a finetune output's adapter/ or model/ folder?")

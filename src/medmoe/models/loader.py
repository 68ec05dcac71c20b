"""The one loader: every model artifact medmoe reads, told apart by its files.

    load_causal_lm(source, adapter=None, dtype=None, device="cpu", tokenizer=None) -> (model, tokenizer)

source                                   loads as
  bundled short name (smollm2-135m)      the zoo's cached safetensors (GGUF dequantized once)
  hub id, HF folder, .gguf file          the class its config names (seq2seq for the T5 family)
  Mamba hybrid folder                    MambaHybridForCausalLM (model type medmoe_mamba_hybrid, or
                                         the format before it: Llama config.json + medmoe_hybrid.json)
  `medmoe mambaformer distill` run folder            its latest complete checkpoint, a hybrid
  `medmoe finetune` model/ folder        any of the above; its provenance: `training_provenance`
  `medmoe heads train` folder            refused with a pointer to `medmoe eval --head`: a head is read
                                         by models/head.py's `load_head` (it names its expert)
adapter (applied on top of source)
  LoRA-MoE adapter folder                LoraMoeModel (loramoe_config.json + safetensors)
  PEFT LoRA adapter folder               PeftModel (adapter_config.json + adapter_model.safetensors)
  a full fine-tune's model/ folder       that model instead of the base

Every failure is a ModelError that names the file and what is wrong with it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medmoe.errors import ModelError
from medmoe.models.head import is_head_folder
from medmoe.models.zoo import load_hf_model, load_tokenizer, resolve

TRAINING_FILE = "medmoe_training.json"  # next to a fine-tuned model: its data, and what was left out


def load_causal_lm(name_or_path: str, dtype: Any = None, device: str = "cpu", tokenizer: str | None = None,
                   adapter: str | Path | None = None) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) for any source above, with `adapter` applied when given;
    `tokenizer` names another tokenizer source (default: the model's own, for a hybrid saved
    without one its teacher's)."""
    if adapter is not None:
        return _with_adapter(name_or_path, Path(adapter), dtype, device, tokenizer)
    source = resolve(name_or_path)
    if is_head_folder(source):
        raise ModelError(f"{source} is an option head (medmoe_head.json), not a model: evaluate it with "
                         "`medmoe eval --head` (it names its expert)")
    hybrid = hybrid_folder(Path(source))
    if hybrid is not None:
        return _load_hybrid(hybrid, dtype, device, tokenizer)
    return load_hf_model(source, dtype, device), load_tokenizer(tokenizer or name_or_path)


def hybrid_folder(path: str | Path) -> Path | None:
    """The saved Mamba hybrid `path` names: the folder itself, or a distill run's latest checkpoint."""
    from medmoe.mamba.distill import latest_checkpoint
    from medmoe.mamba.transfer import is_hybrid_folder

    path = Path(path)
    if not path.is_dir():
        return None
    if is_hybrid_folder(path):
        return path
    return latest_checkpoint(path)


def training_provenance(source: str | Path) -> dict | None:
    """What a `medmoe finetune` result was trained on (its TRAINING_FILE), or None."""
    path = Path(source) / TRAINING_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from exc


def _load_hybrid(folder: Path, dtype: Any, device: str, tokenizer_source: str | None) -> tuple[Any, Any]:
    from medmoe.mamba.transfer import load_hybrid

    model, tokenizer, spec = load_hybrid(folder)
    if tokenizer_source or tokenizer is None:  # asked for another, or saved without one: the teacher's
        tokenizer = load_tokenizer(tokenizer_source or spec.teacher)
    if dtype is not None:
        model.to(dtype)
    return model.to(device).eval(), tokenizer


def _with_adapter(base: str, folder: Path, dtype: Any, device: str, tokenizer: str | None) -> tuple[Any, Any]:
    """The base with the adapter in `folder` applied, its kind read from the folder's files."""
    if not folder.exists():
        raise ModelError(f"adapter '{folder}' does not exist")
    if (folder / "loramoe_config.json").is_file():
        from medmoe.loramoe import LoraMoeModel

        model, tok = load_causal_lm(base, dtype, device, tokenizer)
        return LoraMoeModel.from_pretrained(model, folder).eval(), tok
    if (folder / "adapter_config.json").is_file():
        return _with_peft(base, folder, dtype, device, tokenizer)
    if (folder / "config.json").is_file():  # --method full saved the whole model
        return load_causal_lm(str(folder), dtype, device, tokenizer)
    raise ModelError(f"{folder}: no loramoe_config.json, adapter_config.json or config.json; "
                     "is this a finetune output's adapter/ or model/ folder?")


def _with_peft(base: str, folder: Path, dtype: Any, device: str, tokenizer: str | None) -> tuple[Any, Any]:
    from peft import PeftModel

    from medmoe.file_checks import safetensors_problem

    weights = folder / "adapter_model.safetensors"
    problem = safetensors_problem(weights) if weights.is_file() else None
    if problem:
        raise ModelError(problem)
    model, tok = load_causal_lm(base, dtype, device, tokenizer)
    try:
        return PeftModel.from_pretrained(model, folder).eval(), tok
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"{folder}: cannot load this PEFT adapter onto {base}: {type(exc).__name__}: {exc}") from exc

"""The one loader: every model artifact medmoe reads, told apart by its files.

    load_causal_lm(source, adapter=None, dtype=None, device="cpu", tokenizer=None) -> (model, tokenizer)
    load_causal_lm(adapter=ADAPTER)          the base the adapter names (adapter_config.json)

source                                   loads as
  bundled short name (smollm2-135m)      the zoo's cached safetensors (GGUF dequantized once)
  hub id, HF folder, .gguf file          the class its config names (seq2seq for the T5 family)
  Mamba hybrid folder                    MambaHybridForCausalLM (model type medmoe_mamba_hybrid, or
                                         the format before it: Llama config.json + medmoe_hybrid.json)
  `medmoe mambaformer distill` run folder            its latest complete checkpoint, a hybrid
  `medmoe finetune` model/ folder        any of the above; its provenance: `training_provenance`
  `medmoe heads train` folder            refused with a pointer to `medmoe eval --head`: a head is read
                                         by models/head.py's `load_head` (it names its expert)
adapter (applied on top of source; a local folder, or a hub id downloaded when no such path exists)
  LoRA-MoE adapter folder                LoraMoeModel (adapter_config.json with peft_type MEDMOE_LORAMOE +
                                         adapter_model.safetensors; or the older loramoe_config.json +
                                         loramoe_adapter.safetensors, with a notice to re-export it)
  PEFT LoRA adapter folder               PeftModel (adapter_config.json + adapter_model.safetensors)
  a full fine-tune's model/ folder       that model instead of the base
  (models/adapters.py: the layouts, model cards, `medmoe export`)

Every failure is a ModelError that names the file and what is wrong with it.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from medmoe.errors import ModelError
from medmoe.models.adapters import TRAINING_FILE, adapter_base, adapter_kind, legacy_notice, resolve_adapter
from medmoe.models.head import is_head_folder
from medmoe.models.zoo import load_hf_model, load_tokenizer, resolve


def load_causal_lm(name_or_path: str | None = None, dtype: Any = None, device: str = "cpu", tokenizer: str | None = None,
                   adapter: str | Path | None = None) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) for any source above, with `adapter` applied when given;
    `tokenizer` names another tokenizer source (default: the model's own, for a hybrid saved
    without one its teacher's). name_or_path may be left out when the adapter names its base."""
    if adapter is not None:
        return _with_adapter(name_or_path, adapter, dtype, device, tokenizer)
    if name_or_path is None:
        raise ModelError("no model given: name a model, or an adapter that names its base")
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


def _with_adapter(base: str | None, adapter: str | Path, dtype: Any, device: str, tokenizer: str | None) -> tuple[Any, Any]:
    """The base with the adapter applied, its kind read from the adapter folder's files."""
    folder = resolve_adapter(adapter)
    kind = adapter_kind(folder)
    if kind == "model":
        return load_causal_lm(str(folder), dtype, device, tokenizer)
    if base is None:
        base = adapter_base(folder)
        if not base:
            raise ModelError(f"{folder}: the adapter names no base model; give it (`--model BASE`, "
                             "or load_causal_lm(BASE, adapter=...))")
    if kind in ("loramoe", "loramoe-legacy"):
        from medmoe.loramoe import LoraMoeModel

        if kind == "loramoe-legacy":
            legacy_notice(folder)
        model, tok = load_causal_lm(base, dtype, device, tokenizer)
        return LoraMoeModel.from_pretrained(model, folder).eval(), tok
    return _with_peft(base, folder, dtype, device, tokenizer)


def _with_peft(base: str, folder: Path, dtype: Any, device: str, tokenizer: str | None) -> tuple[Any, Any]:
    from peft import PeftModel

    from medmoe.file_checks import safetensors_problem

    weights = folder / "adapter_model.safetensors"
    problem = safetensors_problem(weights) if weights.is_file() else None
    if problem:
        raise ModelError(problem)
    model, tok = load_causal_lm(base, dtype, device, tokenizer)
    try:
        with warnings.catch_warnings(record=True) as caught:  # PEFT only warns about an adapter missing tensors
            warnings.simplefilter("always")
            peft_model = PeftModel.from_pretrained(model, folder).eval()
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"{folder}: cannot load this PEFT adapter onto {base}: {type(exc).__name__}: {exc}") from exc
    for warning in caught:
        if "missing adapter keys" in str(warning.message):
            raise ModelError(f"{weights}: the adapter lacks tensors of its own config ({warning.message}); "
                             "the file is incomplete or of another adapter")
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return peft_model, tok

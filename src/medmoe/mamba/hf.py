"""Load and save Hugging Face `MambaForCausalLM` checkpoints (config.json + safetensors).

`load_mamba("state-spaces/mamba-130m-hf")` downloads from the hub (users with access);
`load_mamba("/path/to/dir")` reads a local folder written by `save_pretrained` or by `save_mamba`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from medmoe.errors import ModelError
from medmoe.mamba.config import MambaConfig
from medmoe.mamba.model import MambaLM
from medmoe.paths import atomic_write_file

_WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]


def _resolve(name_or_path: str | Path) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelError(f"{path}: expected a folder with config.json and *.safetensors, got a file")
    if str(name_or_path).count("/") != 1 or str(name_or_path).startswith((".", "/", "~")):
        raise ModelError(f"{name_or_path}: no such folder, and not a hub id of the form owner/name")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name_or_path), allow_patterns=_WEIGHT_PATTERNS))
    except Exception as exc:
        raise ModelError(f"{name_or_path}: could not download from the Hugging Face hub ({exc}); "
                         "pass a local folder instead") from exc


def _read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        bins = sorted(folder.glob("pytorch_model*.bin"))
        if not bins:
            raise ModelError(f"{folder}: no *.safetensors or pytorch_model*.bin weights found")
        state = {}
        for f in bins:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
        return state
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def _rename(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Older checkpoints call the embedding `backbone.embedding`; some omit the tied lm_head."""
    out = {}
    for key, value in state.items():
        out[key.replace("backbone.embedding.", "backbone.embeddings.")] = value
    return out


def load_mamba(name_or_path: str | Path, dtype: torch.dtype = torch.float32, with_tokenizer: bool = True):
    """Load a MambaForCausalLM checkpoint as our MambaLM. Returns (model, tokenizer or None)."""
    folder = _resolve(name_or_path)
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise ModelError(f"{folder}: config.json is missing")
    try:
        config = MambaConfig.from_hf_dict(json.loads(cfg_path.read_text()))
    except (KeyError, ValueError) as exc:
        raise ModelError(f"{cfg_path}: {exc}") from exc
    model = MambaLM(config)
    state = _rename(_read_state_dict(folder))
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    expected = {k for k in model.state_dict() if not (config.tie_embeddings and k == "lm_head.weight")}
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise ModelError(f"{folder}: weights do not match the config (missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]})")
    model.load_state_dict(state, strict=False)
    model.to(dtype).eval()
    tokenizer = None
    if with_tokenizer and any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return model, tokenizer


def save_mamba(model: MambaLM, folder: str | Path) -> Path:
    """Write config.json + model.safetensors in Hugging Face's MambaForCausalLM format (atomically)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    for name, write in (("model.safetensors", lambda p: save_file(state, p, metadata={"format": "pt"})),
                        ("config.json", lambda p: Path(p).write_text(json.dumps(model.config.to_hf_dict(), indent=2)))):
        atomic_write_file(folder / name, write)
    return folder

"""Build a Mamba(-hybrid) LM from a Llama-family Transformer ("The Mamba in the Llama", Wang et al. 2024).

The student is a `MambaHybridForCausalLM` (medmoe.mamba.hybrid) with the teacher's tokenizer,
embeddings, MLPs, norms and LM head, in which the self-attention of each chosen layer is replaced by an
`AttentionMamba` mixer (medmoe.mamba.attention_mixer) initialised from that attention's weights:
value -> x, key -> B, query / sqrt(P) -> C, output -> out. A few layers may keep attention, and a
shallow student keeps only a subset of the layers. Distillation (`medmoe mambaformer distill`) then trains
everything against the teacher.

Saved as an ordinary Hugging Face folder of its own model type: config.json (`medmoe_mamba_hybrid`,
the spec inside) + model.safetensors (+ tokenizer files). Folders written before that type existed
(the teacher's Llama config.json + medmoe_hybrid.json) still load.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from medmoe.errors import ModelError
from medmoe.mamba.attention_mixer import AttentionMamba, key_padding  # noqa: F401  (re-exported)
from medmoe.mamba.hybrid import MODEL_TYPE, HybridSpec, MambaHybridConfig, MambaHybridForCausalLM
from medmoe.paths import atomic_write_file

SPEC_FILE = "medmoe_hybrid.json"  # the spec beside a Llama config.json: folders saved before MODEL_TYPE


def _decoder(model) -> Any:  # the Hugging Face decoder (LlamaModel and kin): its layers carry self_attn
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner.layers[0], "self_attn"):
        raise ModelError(f"{type(model).__name__}: transfer needs a Llama-family causal LM (model.layers[i].self_attn)")
    return inner


def build_hybrid(teacher, layers: list[int] | None = None, attention_layers: Sequence[int] = (),
                 teacher_name: str = "teacher") -> tuple[MambaHybridForCausalLM, HybridSpec]:
    """A student keeping teacher layers `layers` (default all), attention replaced by AttentionMamba
    except in `attention_layers` (teacher indices). The teacher is not modified."""
    source = _decoder(teacher).layers
    n = len(source)
    layers = list(range(n)) if layers is None else sorted(set(layers))
    bad = [i for i in list(layers) + list(attention_layers) if not 0 <= i < n]
    if bad or not layers:
        raise ModelError(f"layer indices {bad or layers} out of range: the teacher has {n} layers (0..{n - 1})")
    if set(attention_layers) - set(layers):
        raise ModelError(f"attention layers {sorted(set(attention_layers) - set(layers))} are not among the kept layers")
    if teacher.config.model_type != "llama":
        raise ModelError(f"{type(teacher).__name__}: hybrids are built from Llama-architecture teachers "
                         f"(model_type 'llama'), not '{teacher.config.model_type}'")
    spec = HybridSpec(teacher=teacher_name, layers=layers, attention_layers=sorted(attention_layers))
    config = hybrid_config(_cut_config(teacher.config.to_dict(), layers), spec)
    dtype = teacher.get_input_embeddings().weight.dtype
    student = MambaHybridForCausalLM(config).to(dtype)
    student.load_state_dict(_student_state(teacher, spec), strict=True)
    return student.train(teacher.training), spec


def _cut_config(teacher: dict, layers: list[int]) -> dict:
    """The teacher's config dict cut to the kept layers."""
    cut = dict(teacher, num_hidden_layers=len(layers))
    if cut.get("layer_types"):
        cut["layer_types"] = [cut["layer_types"][i] for i in layers]
    return cut


def hybrid_config(llama: dict, spec: HybridSpec) -> MambaHybridConfig:
    """A MambaHybridConfig from a Llama config dict already cut to the student's layers."""
    fields = {k: v for k, v in llama.items() if k not in ("model_type", "architectures", "transformers_version")}
    return MambaHybridConfig.from_dict({**fields, "hybrid": asdict(spec), "architectures": ["MambaHybridForCausalLM"]})


def _student_state(teacher, spec: HybridSpec) -> dict[str, torch.Tensor]:
    """The student's state dict: teacher tensors renamed to the student's layer positions, and for
    every replaced attention the mixer initialised from it (AttentionMamba.from_attention)."""
    source = _decoder(teacher).layers
    position = {j: p for p, j in enumerate(spec.layers)}
    state: dict[str, torch.Tensor] = {}
    for name, tensor in teacher.state_dict().items():
        if not name.startswith("model.layers."):
            state[name] = tensor
            continue
        j, rest = name[len("model.layers."):].split(".", 1)
        j = int(j)
        if j in position and not (rest.startswith("self_attn.") and j not in spec.attention_layers):
            state[f"model.layers.{position[j]}.{rest}"] = tensor
    for j in spec.layers:
        if j not in spec.attention_layers:
            mixer = AttentionMamba.from_attention(source[j].self_attn, teacher.config)
            state.update({f"model.layers.{position[j]}.self_attn.{k}": v for k, v in mixer.state_dict().items()})
    return state


def save_hybrid(student, spec: HybridSpec, folder: str | Path, tokenizer=None) -> Path:
    """config.json (model type medmoe_mamba_hybrid, the spec inside) + model.safetensors (+ tokenizer
    files), each written atomically."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = student.config if isinstance(student.config, MambaHybridConfig) else \
        hybrid_config(student.config.to_dict(), spec)
    state = {k: v.detach().contiguous() for k, v in student.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    atomic_write_file(folder / "model.safetensors", lambda p: save_file(state, p, metadata={"format": "pt"}))
    atomic_write_file(folder / "config.json", lambda p: Path(p).write_text(config.to_json_string()))
    (folder / SPEC_FILE).unlink(missing_ok=True)  # a legacy spec left from an earlier save would contradict it
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def is_hybrid_folder(folder: str | Path) -> bool:
    """Whether `folder` holds a saved hybrid (this format, or the one before MODEL_TYPE)."""
    folder = Path(folder)
    if (folder / SPEC_FILE).is_file():
        return True
    config = folder / "config.json"
    try:
        return config.is_file() and json.loads(config.read_text(encoding="utf-8")).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def load_hybrid(folder: str | Path):
    """(student, tokenizer or None, spec) from a folder written by `save_hybrid` (or by the format
    before it: the teacher's Llama config.json + medmoe_hybrid.json)."""
    folder = Path(folder)
    if not is_hybrid_folder(folder):
        raise ModelError(f"{folder}: not a medmoe Mamba hybrid (config.json with model_type {MODEL_TYPE} is missing)")
    config = _read_config(folder)
    student = MambaHybridForCausalLM(config)
    missing, unexpected = student.load_state_dict(_read_weights(folder), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ModelError(f"{folder}: weights do not match (missing {missing[:5]}, unexpected {unexpected[:5]})")
    if getattr(config, "tie_word_embeddings", False):
        student.tie_weights()
    tokenizer = None
    if (folder / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
    return student.eval(), tokenizer, student.hybrid_spec


def _read_config(folder: Path) -> MambaHybridConfig:
    try:
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        if (folder / SPEC_FILE).is_file() and raw.get("model_type") != MODEL_TYPE:  # the format before MODEL_TYPE
            spec = HybridSpec(**json.loads((folder / SPEC_FILE).read_text(encoding="utf-8")))
            return hybrid_config(raw, spec)
        return MambaHybridConfig.from_dict(raw)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError(f"{folder}: cannot read the hybrid's config.json / {SPEC_FILE} ({exc})") from exc


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = folder / "model.safetensors"
    if not path.is_file():
        raise ModelError(f"{path}: missing (a hybrid folder holds config.json and model.safetensors)")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for torn or foreign files
        raise ModelError(f"{path}: cannot read the weights, the file is truncated or corrupt ({exc})") from exc


def evenly_spaced(n_teacher: int, n_keep: int) -> list[int]:
    """n_keep layer indices spread over 0..n_teacher-1, always including the first and the last."""
    if not 1 <= n_keep <= n_teacher:
        raise ModelError(f"cannot keep {n_keep} of {n_teacher} layers")
    if n_keep == 1:
        return [n_teacher - 1]
    return sorted({round(i * (n_teacher - 1) / (n_keep - 1)) for i in range(n_keep)})

"""Wrap a stock Hugging Face model with LoRA-MoE layers in place; save and load adapters.

    wrapped = LoraMoeModel(model, LoraMoeConfig())   # replaces target nn.Linear modules in place
    out = wrapped(input_ids=..., attention_mask=..., labels=...)   # out.loss includes the aux losses
    with wrapped.routing(attention_mask): ...        # run part of the model (training: the body only), then
    wrapped.aux_loss()                               # ... read the aux losses of that forward
    wrapped.save_adapter("adapter/")                 # adapter_config.json + adapter_model.safetensors + README.md
    wrapped = LoraMoeModel.from_pretrained(fresh_model, "adapter/")   # this layout or the older one

Adapter files (docs/loramoe.md, "Adapter files"): PEFT's layout and file names, `peft_type` MEDMOE_LORAMOE
(config.py); the weights are `<module name>.lora_A` (E, r, d_in), `<module name>.lora_B` (E, d_out, r) and
`<module name>.router.<parameter>` for every wrapped linear, the module names those of the base model.

The model's source is never edited: modules are swapped with setattr on their parents.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from medmoe.errors import ModelError
from medmoe.loramoe.config import EXCLUDED_HEAD_NAMES, LoraMoeConfig, adapter_layout, read_json
from medmoe.loramoe.layer import LoraMoeLinear, RoutingContext

WEIGHTS_NAME = "adapter_model.safetensors"  # PEFT's name
LEGACY_WEIGHTS_NAME = "loramoe_adapter.safetensors"  # the layout before it (with loramoe_config.json)
CARD_NAME = "README.md"


def weights_path(directory: str | Path) -> Path:
    """The weights file of the adapter in `directory`, in whichever layout it is saved."""
    directory = Path(directory)
    return directory / (LEGACY_WEIGHTS_NAME if adapter_layout(directory) == "loramoe-legacy" else WEIGHTS_NAME)


def task_type(model: Any) -> str | None:
    """PEFT's task_type for the model an adapter wraps (CAUSAL_LM, SEQ_2_SEQ_LM, SEQ_CLS), or None."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return "SEQ_2_SEQ_LM"
    return task_type_of_class(type(model).__name__)


def task_type_of_class(name: str) -> str | None:
    """task_type from the model's class name alone (what the older layout recorded)."""
    if name.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    if name.endswith(("ForConditionalGeneration", "ForSeq2SeqLM")):
        return "SEQ_2_SEQ_LM"
    return "SEQ_CLS" if name.endswith("ForSequenceClassification") else None


def find_target_linears(model: Any, target_modules: str | list[str]) -> list[str]:
    """Names of the nn.Linear modules to wrap. "all-linear" skips output heads (lm_head, classifiers)."""
    output_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or isinstance(module, LoraMoeLinear):
            continue
        if target_modules == "all-linear":
            if module is output_head or any(part in EXCLUDED_HEAD_NAMES for part in name.split(".")):
                continue
            names.append(name)
        elif any(name == t or name.endswith("." + t) for t in target_modules):
            names.append(name)
    return names


class LoraMoeModel(nn.Module):
    """A Hugging Face model whose target linears are LoRA-MoE layers; forwards add the aux losses."""

    def __init__(self, model: nn.Module, config: LoraMoeConfig):
        super().__init__()
        self.model = model
        self.config = config
        self.context = RoutingContext()
        self.last_aux_losses: dict[str, torch.Tensor] = {}
        if config.seed is not None:
            torch.manual_seed(config.seed)
        names = find_target_linears(model, config.target_modules)
        if not names:
            raise ModelError(
                f"no nn.Linear in {type(model).__name__} matches target_modules={config.target_modules!r}; "
                f"linear layers are e.g. {[n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:6]}"
            )
        for param in model.parameters():
            param.requires_grad_(False)
        for name in names:
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, leaf, LoraMoeLinear(getattr(parent, leaf), config, self.context))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)

    # --- layers and parameters ------------------------------------------------------------------
    def moe_layers(self) -> dict[str, LoraMoeLinear]:
        return {name: m for name, m in self.model.named_modules() if isinstance(m, LoraMoeLinear)}

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for name, layer in self.moe_layers().items():
            state.update(layer.adapter_state_dict(prefix=f"{name}."))
        return state

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.adapter_state_dict().values())

    def print_trainable_parameters(self) -> None:
        total = sum(p.numel() for p in self.model.parameters())
        trainable = self.trainable_parameter_count()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    # --- forward ----------------------------------------------------------------------------------
    @contextmanager
    def routing(self, attention_mask: torch.Tensor | None):
        """Within the block, the LoRA-MoE layers leave padding out of routing statistics and, in a
        training forward with grad, compute their aux losses (read them after with aux_loss()).
        forward() runs the whole model in it; a caller running only the decoder body does the same."""
        is_seq2seq = bool(getattr(getattr(self.model, "config", None), "is_encoder_decoder", False))
        self.context.token_mask = attention_mask.reshape(-1) if attention_mask is not None and not is_seq2seq else None
        self.context.compute_aux = self.training and torch.is_grad_enabled()
        try:
            yield self
        finally:
            self.context.compute_aux = False
            self.context.token_mask = None

    def forward(self, *args, **kwargs):
        with self.routing(kwargs.get("attention_mask")):
            out = self.model(*args, **kwargs)
        aux = self.aux_loss()
        if aux is not None and getattr(out, "loss", None) is not None:
            out["loss"] = out.loss + aux
        elif aux is not None:  # no labels: the caller computes the task loss and adds this
            out["aux_loss"] = aux
        return out

    def aux_loss(self) -> torch.Tensor | None:
        """lambda_bal L_bal + lambda_z L_z + lambda_con L_con, each averaged over the MoE layers.

        Reads the terms the layers computed in the last training forward; stores the per-term
        averages (detached) in last_aux_losses for logging.
        """
        c = self.config
        weights = {"balance": c.balance_weight, "z": c.z_loss_weight, "contrastive": c.contrastive_weight}
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        for layer in self.moe_layers().values():
            for term, value in layer.aux_losses.items():
                sums[term] = sums.get(term, 0.0) + value
                counts[term] = counts.get(term, 0) + 1
            layer.aux_losses = {}
        if not sums:
            self.last_aux_losses = {}
            return None
        means = {term: sums[term] / counts[term] for term in sums}
        self.last_aux_losses = {term: v.detach() for term, v in means.items()}
        return cast(torch.Tensor, sum(weights[term] * v for term, v in means.items()))  # sums is not empty

    # --- routing analytics ------------------------------------------------------------------------
    @contextmanager
    def track_routing(self):
        """Within the block, every forward adds its top-k assignments to each layer's expert_load."""
        self.reset_expert_load()
        previous = self.context.track_load
        self.context.track_load = True
        try:
            yield self
        finally:
            self.context.track_load = previous

    def reset_expert_load(self) -> None:
        for layer in self.moe_layers().values():
            layer.expert_load.zero_()

    def expert_load(self) -> dict[str, list[int]]:
        """Per layer, the number of (token, slot) assignments to each expert since the last reset."""
        return {name: layer.expert_load.tolist() for name, layer in self.moe_layers().items()}

    # --- save / load ------------------------------------------------------------------------------
    def save_adapter(self, directory: str | Path, base_model: str | None = None) -> Path:
        """Write the adapter in PEFT's layout into directory: adapter_config.json, adapter_model.safetensors
        (the weights of adapter_state_dict) and a README.md model card (medmoe.loramoe.card; `medmoe
        finetune` rewrites it with the run's data and results). base_model: the name the config records
        as base_model_name_or_path (default: the base's config._name_or_path)."""
        from safetensors.torch import save_file

        from medmoe.loramoe.card import model_card

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if base_model is None:
            base_model = str(getattr(getattr(self.model, "config", None), "_name_or_path", "") or "")
        model_class = type(self.model).__name__
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.adapter_state_dict().items()}
        meta = {"format": "pt", "base_model": base_model, "model_class": model_class}
        tmp = directory / (WEIGHTS_NAME + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(directory / WEIGHTS_NAME)
        config_path = self.config.save(directory, base_model, task_type(self.model), model_class)
        card = model_card(read_json(config_path), trainable_parameters=sum(t.numel() for t in tensors.values()))
        (directory / CARD_NAME).write_text(card, encoding="utf-8")
        return directory

    save_pretrained = save_adapter  # as PEFT models do: saving a tuned model saves its adapter

    def load_adapter_weights(self, directory: str | Path) -> None:
        """Copy the saved weights into this model's adapter; every tensor must be there with its shape."""
        from safetensors.torch import load_file

        path = weights_path(directory)
        if not path.is_file():
            raise ModelError(f"{path}: no adapter weights here (expected {path.name})")
        try:
            loaded = load_file(str(path))
        except Exception as exc:  # safetensors' SafetensorError: "incomplete metadata, file not fully covered"
            from medmoe.file_checks import safetensors_problem

            raise ModelError(safetensors_problem(path) or f"{path}: cannot read the adapter weights "
                             f"({type(exc).__name__}: {exc}); the file is corrupt: save or copy it again") from exc
        own = self.adapter_state_dict()
        missing, unexpected = sorted(set(own) - set(loaded)), sorted(set(loaded) - set(own))
        if missing or unexpected:
            raise ModelError(
                f"{path}: adapter does not fit this model ({len(missing)} missing tensors, e.g. {missing[:3]}; "
                f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}); was it trained on another architecture?"
                f"{_base_hint(directory, self.model)}"
            )
        with torch.no_grad():
            for name, param in own.items():
                if param.shape != loaded[name].shape:
                    raise ModelError(f"{path}: {name} has shape {tuple(loaded[name].shape)}, model expects "
                                     f"{tuple(param.shape)}: the adapter was trained on another base{_base_hint(directory, self.model)}")
                param.copy_(loaded[name].to(param.dtype))

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | Path) -> LoraMoeModel:
        """Wrap a fresh base model with the adapter saved in directory (either layout)."""
        wrapped = cls(model, LoraMoeConfig.load(directory))
        wrapped.load_adapter_weights(directory)
        return wrapped


def saved_base(directory: str | Path) -> str:
    """The base model a saved adapter names: adapter_config.json's base_model_name_or_path, or for the
    older layout the weights file's `base_model` metadata ("" if neither names one)."""
    directory = Path(directory)
    if adapter_layout(directory) == "loramoe-legacy":
        return str(adapter_info(directory)["metadata"].get("base_model", ""))
    return str(read_json(directory / "adapter_config.json").get("base_model_name_or_path") or "")


def _base_hint(directory: str | Path, model: Any) -> str:
    try:
        named = saved_base(directory)
    except (ModelError, OSError, ValueError):
        return ""
    loaded = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    return f" (the adapter names its base {named!r}; the model loaded is {loaded!r})" if named else ""


def adapter_info(directory: str | Path) -> dict:
    """Config and safetensors metadata of a saved adapter (either layout), without loading a model."""
    from safetensors import safe_open

    config = LoraMoeConfig.load(directory)
    path = weights_path(directory)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        from medmoe.file_checks import safetensors_problem

        raise ModelError(safetensors_problem(path) or f"{path}: cannot read the adapter weights "
                         f"({type(exc).__name__}: {exc})") from exc
    return {"config": json.loads(config.to_json()), "metadata": meta}

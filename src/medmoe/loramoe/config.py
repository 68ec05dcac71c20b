"""LoraMoeConfig: every setting of the SparseDoctor tuner, serialisable to JSON.

Symbols (docs/loramoe.md): E = num_experts, k = top_k, r = rank, alpha, T = temperature,
d_q = router_dim, K = queue_size, lambda_con / lambda_bal / lambda_z = the loss weights.

A saved adapter's config is `adapter_config.json`, in PEFT's layout (docs/loramoe.md, "Adapter
files"): PEFT's keys where they mean the same (`r`, `lora_alpha`, `lora_dropout`, `target_modules`,
`base_model_name_or_path`, `task_type`), the other settings under their own names, and
`peft_type` MEDMOE_LORAMOE, a type stock PEFT does not know, so it refuses the folder instead of
loading it as a plain LoRA. The layout before it (`loramoe_config.json`: asdict of the config) still loads.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from medmoe.errors import ModelError

ADAPTER_CONFIG_NAME = "adapter_config.json"  # PEFT's name (the layout since format 1)
LEGACY_CONFIG_NAME = "loramoe_config.json"  # the layout before it: still read, never written
CONFIG_NAME = LEGACY_CONFIG_NAME  # the old constant's name, kept for callers
PEFT_TYPE = "MEDMOE_LORAMOE"  # not a PEFT type: stock PEFT fails on it (KeyError) rather than load a plain LoRA
ADAPTER_FORMAT = "medmoe-loramoe-adapter/1"
# LoraMoeConfig field -> its adapter_config.json key, where PEFT's LoraConfig has the same setting
PEFT_KEYS = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "target_modules": "target_modules"}
# adapter_config.json keys that describe the file, not the adapter's settings
FILE_KEYS = ("peft_type", "task_type", "base_model_name_or_path", "medmoe_format", "medmoe_version", "model_class")

ROUTER_KINDS = ("prototype", "linear")
CONTRASTIVE_KINDS = ("prototype", "expert_output", "none")
COMPUTE_KINDS = ("auto", "sparse", "dense", "gather", "loop")

# Linear layers wrapped when target_modules == "all-linear": every nn.Linear except output heads.
EXCLUDED_HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "cls", "pooler", "shared", "embed_out")


@dataclass
class LoraMoeConfig:
    """Settings of a LoRA mixture-of-experts adapter.

    target_modules: "all-linear", or a list of leaf names ("q_proj", "wi") or dotted suffixes
        ("self_attn.q_proj") of the nn.Linear modules to wrap.
    router_kind: "prototype" (q(x) = normalize(W_q x), logits q . c_i / T) or "linear" (W_g x).
    contrastive_kind: "prototype" (supervised InfoNCE on router embeddings, batch + queue),
        "expert_output" (active vs inactive experts' outputs, per token) or "none".
    contrastive_tokens: tokens per layer and step sub-sampled as contrastive anchors (and pushed
        into the queue); None uses every token (the in-batch alternative, memory grows as N^2).
    queue_size: K entries per layer in the expert memory queue; 0 disables the queue.
    compute: how the experts are evaluated: "sparse" (a C++ kernel computing only each token's top-k
        experts; CPU fp32), "dense" (all experts' A in one GEMM, gates zero for unselected experts;
        any device), "auto" (sparse where it runs, else dense), "gather" (gather the top-k experts'
        weights per token) or "loop" (reference per-expert Python loop; slow, for tests and benchmarks).
    """

    num_experts: int = 8
    top_k: int = 2
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    router_kind: str = "prototype"
    router_dim: int = 16
    temperature: float = 0.1
    contrastive_kind: str = "prototype"
    contrastive_weight: float = 0.1
    contrastive_tokens: int | None = 128
    balance_weight: float = 0.01
    z_loss_weight: float = 0.001
    queue_size: int = 1024
    compute: str = "auto"
    seed: int | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def scaling(self) -> float:
        """alpha / r, the LoRA scale."""
        return self.alpha / self.rank

    def validate(self) -> None:
        problems = []
        if self.num_experts < 1:
            problems.append(f"num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            problems.append(f"top_k must be in 1..num_experts ({self.num_experts}), got {self.top_k}")
        if self.rank < 1:
            problems.append(f"rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.router_kind not in ROUTER_KINDS:
            problems.append(f"router_kind must be one of {ROUTER_KINDS}, got {self.router_kind!r}")
        if self.contrastive_kind not in CONTRASTIVE_KINDS:
            problems.append(f"contrastive_kind must be one of {CONTRASTIVE_KINDS}, got {self.contrastive_kind!r}")
        if self.contrastive_kind == "prototype" and self.router_kind != "prototype":
            problems.append("contrastive_kind 'prototype' needs router_kind 'prototype' (it shapes the router embedding)")
        if self.compute not in COMPUTE_KINDS:
            problems.append(f"compute must be one of {COMPUTE_KINDS}, got {self.compute!r}")
        if self.temperature <= 0:
            problems.append(f"temperature must be > 0, got {self.temperature}")
        if self.queue_size < 0:
            problems.append(f"queue_size must be >= 0, got {self.queue_size}")
        if self.contrastive_tokens is not None and self.contrastive_tokens < 2:
            problems.append(f"contrastive_tokens must be >= 2 or None, got {self.contrastive_tokens}")
        if not isinstance(self.target_modules, (str, list)) or (isinstance(self.target_modules, str) and self.target_modules != "all-linear"):
            problems.append(f"target_modules must be 'all-linear' or a list of module names, got {self.target_modules!r}")
        for name in ("contrastive_weight", "balance_weight", "z_loss_weight"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if problems:
            raise ModelError("invalid LoRA-MoE config: " + "; ".join(problems))

    # --- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> LoraMoeConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelError(f"unknown LoRA-MoE config keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    def to_adapter_config(self, base_model: str = "", task_type: str | None = None, model_class: str = "") -> dict:
        """The adapter_config.json of an adapter with these settings (module docstring)."""
        from medmoe import __version__

        settings = {PEFT_KEYS.get(name, name): value for name, value in self.to_dict().items()}
        head = {"peft_type": PEFT_TYPE, "task_type": task_type, "base_model_name_or_path": base_model,
                "medmoe_format": ADAPTER_FORMAT, "medmoe_version": __version__, "model_class": model_class}
        return {**head, **settings}

    @classmethod
    def from_adapter_config(cls, data: dict, path: str | Path = ADAPTER_CONFIG_NAME) -> LoraMoeConfig:
        """The settings of an adapter_config.json written by to_adapter_config; errors name `path`."""
        if data.get("peft_type") != PEFT_TYPE:
            raise ModelError(f"{path}: peft_type is {data.get('peft_type')!r}, not {PEFT_TYPE!r}: not a LoRA-MoE adapter"
                             + (" (a plain PEFT adapter: load it with load_causal_lm(base, adapter=...))" if data.get("peft_type") else ""))
        fmt = str(data.get("medmoe_format", ""))
        if fmt != ADAPTER_FORMAT:
            raise ModelError(f"{path}: medmoe_format {fmt!r} is not {ADAPTER_FORMAT!r}; "
                             f"written by another medmoe version ({data.get('medmoe_version', 'unknown')})?")
        field_of = {key: name for name, key in PEFT_KEYS.items()}
        settings = {field_of.get(key, key): value for key, value in data.items() if key not in FILE_KEYS}
        try:
            return cls.from_dict(settings)
        except ModelError as exc:
            raise ModelError(f"{path}: {exc}") from exc

    def save(self, directory: str | Path, base_model: str = "", task_type: str | None = None, model_class: str = "") -> Path:
        """Write adapter_config.json (the adapter's weights are LoraMoeModel.save_adapter's)."""
        path = Path(directory) / ADAPTER_CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_adapter_config(base_model, task_type, model_class), indent=2) + "\n"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, directory: str | Path) -> LoraMoeConfig:
        """The config of a saved adapter in either layout (adapter_config.json, or the older loramoe_config.json)."""
        directory = Path(directory)
        layout = adapter_layout(directory)
        if layout == "loramoe":
            path = directory / ADAPTER_CONFIG_NAME
            return cls.from_adapter_config(read_json(path), path)
        if layout == "loramoe-legacy":
            return cls.from_dict(read_json(directory / LEGACY_CONFIG_NAME))
        if layout == "peft":
            raise ModelError(f"{directory / ADAPTER_CONFIG_NAME}: a PEFT adapter (peft_type "
                             f"{read_json(directory / ADAPTER_CONFIG_NAME).get('peft_type')!r}), not a LoRA-MoE adapter "
                             f"(peft_type {PEFT_TYPE})")
        raise ModelError(f"{directory}: no LoRA-MoE adapter config here (expected {ADAPTER_CONFIG_NAME} with peft_type "
                         f"{PEFT_TYPE}, or the older {LEGACY_CONFIG_NAME})")


def read_json(path: Path) -> dict:
    """A JSON object from `path`; a ModelError naming the file otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: cannot read it ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def adapter_layout(directory: str | Path) -> str | None:
    """What adapter `directory` holds, by its files: "loramoe" (adapter_config.json, peft_type
    MEDMOE_LORAMOE), "loramoe-legacy" (loramoe_config.json), "peft" (any other adapter_config.json),
    or None (no adapter config)."""
    directory = Path(directory)
    if (directory / ADAPTER_CONFIG_NAME).is_file():
        return "loramoe" if read_json(directory / ADAPTER_CONFIG_NAME).get("peft_type") == PEFT_TYPE else "peft"
    if (directory / LEGACY_CONFIG_NAME).is_file():
        return "loramoe-legacy"
    return None

"""LoraMoeConfig: every setting of the SparseDoctor tuner, serialisable to JSON.

Symbols (docs/loramoe.md): E = num_experts, k = top_k, r = rank, alpha, T = temperature,
d_q = router_dim, K = queue_size, lambda_con / lambda_bal / lambda_z = the loss weights.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from medmoe.errors import ModelError

CONFIG_NAME = "loramoe_config.json"

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

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> LoraMoeConfig:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise ModelError(f"{path}: no LoRA-MoE adapter config here (expected {CONFIG_NAME})")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ModelError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_dict(data)

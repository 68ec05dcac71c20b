"""Train the gate on cached per-example expert losses and the latency model (experts frozen).

Inputs: precomputed `GateFeatures` for the training queries (row i = table example i), the
`ExpertResults` table (l_T, l_M) and the experts' costs C_e(n) (from latency models, or the measured
per-example latencies). Minibatch AdamW on the multi-objective loss of `loss.py`; optionally
lambda_cost follows dual ascent toward a mean-latency budget, updated once per epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch

from medmoe.errors import MedmoeError
from medmoe.mambaformer.features import GateFeatures
from medmoe.mambaformer.gate import GateConfig, TokenGate
from medmoe.mambaformer.latency import LatencyModel
from medmoe.mambaformer.loss import DualCostWeight, LossConfig, routing_loss
from medmoe.mambaformer.results import EXPERTS, ExpertResults


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 64
    lr: float = 3e-3
    mode: str = "st"                       # decisions weighting the experts: "soft" or "st"
    temperature: float = 1.0               # Gumbel temperature for "st"
    seed: int = 0
    latency_budget_ms: float | None = None # set: lambda_cost follows dual ascent toward this mean latency
    dual_eta: float = 0.5

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def expert_costs(table: ExpertResults, latency_models: Mapping[str, LatencyModel] | None = None) -> np.ndarray:
    """(N, 2) cost in ms per example and expert: C_e(n_tokens) from the latency models, else measured."""
    if latency_models is None:
        return table.stacked("latency_ms")
    missing = [e for e in EXPERTS if e not in latency_models]
    if missing:
        raise MedmoeError(f"train: no latency model for {missing}")
    return np.stack([latency_models[e](table.n_tokens) for e in EXPERTS], axis=1)


def gate_scores(gate: TokenGate, features: GateFeatures, batch_size: int = 256) -> np.ndarray:
    """(N,) p_M for every query, in batches, without gradients."""
    gate.eval()
    out = []
    with torch.no_grad():
        for start in range(0, features.token.shape[0], batch_size):
            out.append(gate(features[start:start + batch_size]).p_mamba)
    return torch.cat(out).numpy().astype(np.float64)


def train_gate(features: GateFeatures, table: ExpertResults, costs: np.ndarray, loss_config: LossConfig,
               train_config: TrainConfig | None = None, gate_config: GateConfig | None = None,
               log: Callable[[dict], None] | None = None) -> tuple[TokenGate, list[dict]]:
    """Fit a fresh gate; return it and the per-epoch history (mean of each loss term, lambda_cost,
    share of hard decisions to E_M, expected cost in ms)."""
    cfg = train_config or TrainConfig()
    N = len(table)
    if features.token.shape[0] != N or costs.shape != (N, 2):
        raise MedmoeError(f"train: {features.token.shape[0]} feature rows and costs {costs.shape} "
                          f"for a table of {N} examples")
    if cfg.mode not in ("soft", "st"):
        raise MedmoeError(f"train: mode must be 'soft' or 'st', got {cfg.mode!r}")
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    gate = TokenGate(gate_config)
    gate.fit_normalizer(features)
    optimizer = torch.optim.AdamW(gate.parameters(), lr=cfg.lr, weight_decay=0.0)   # L_reg is in the loss
    loss_t = torch.tensor(table.transformer.loss, dtype=torch.float32)
    loss_m = torch.tensor(table.mamba.loss, dtype=torch.float32)
    cost = torch.tensor(costs, dtype=torch.float32)                            # (N, 2) ms
    dual = (DualCostWeight(cfg.latency_budget_ms, loss_config.c_ref, cfg.dual_eta, loss_config.cost)
            if cfg.latency_budget_ms is not None else None)
    history = []
    for epoch in range(cfg.epochs):
        gate.train()
        order = torch.randperm(N, generator=generator)
        sums: dict[str, float] = {}
        expected_cost = hard_share = 0.0
        for start in range(0, N, cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            out = gate(features[idx])
            p_m = gate.decide(out, cfg.mode, temperature=cfg.temperature, generator=generator)
            total, terms = routing_loss(out.p_mamba, p_m, loss_t[idx], loss_m[idx], cost[idx, 0], cost[idx, 1],
                                        loss_config, gate.parameters(), dual.value if dual else None)
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            weight = len(idx) / N
            for name, value in {"total": total, **terms}.items():
                sums[name] = sums.get(name, 0.0) + weight * float(value.detach())
            with torch.no_grad():
                expected_cost += float(((1 - p_m) * cost[idx, 0] + p_m * cost[idx, 1]).sum()) / N
                hard_share += float((out.p_mamba > 0.5).float().sum()) / N
        lam = dual.update(expected_cost) if dual else loss_config.cost
        record = {"epoch": epoch, **sums, "lambda_cost": lam, "expected_cost_ms": expected_cost,
                  "share_mamba": hard_share}
        history.append(record)
        if log:
            log(record)
    gate.eval()
    return gate, history

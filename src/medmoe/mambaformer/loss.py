"""The utility-guided multi-objective routing loss (docs/methods.md 1.3; docs/router.md has the equations).

Per example x of n tokens, with cached expert losses l_T, l_M and costs C_T(n), C_M(n) in ms:
  U_e    = -l_e - beta * C_e / C_ref                                       utility of expert e
  L_task = mean(p_T l_T + p_M l_M)                                         decisions
  L_cost = mean(p_T C_T + p_M C_M) / C_ref                                 computational cost
  L_util = mean BCE(q_M, y),  y = 1[U_M > U_T]                             utility guidance
  L_bal  = "switch": 2 * (f_T P_T + f_M P_M)  or  "target": (P_M - rho)^2  expert utilisation
  L_ent  = mean H(q_M),  H(q) = -q log q - (1 - q) log(1 - q)              decisive gates
  L_reg  = sum over gate parameters theta of theta^2                       router parameters
  L      = lambda_task L_task + lambda_cost L_cost + lambda_util L_util + lambda_bal L_bal
           + lambda_ent L_ent + lambda_reg L_reg
p_M is the decision used to weight the experts (soft q_M, or a straight-through sample), p_T = 1 - p_M;
q_M is the gate's probability; P_e = mean q_e; f_e = share of hard decisions (q_M > 1/2 for E_M).
A term with lambda = 0 is still reported but does not enter L.
Dual ascent ("adaptively regulating") on lambda_cost toward a mean-latency budget B (ms):
  lambda_cost <- max(0, lambda_cost + eta * (E[p_T C_T + p_M C_M] - B) / C_ref)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import cast

import torch
import torch.nn.functional as F

from medmoe.errors import MedmoeError

TERMS = ("task", "cost", "util", "bal", "ent", "reg")
BALANCE_KINDS = ("switch", "target")


@dataclass
class LossConfig:
    """The lambdas (0 switches a term off), utility beta, balance kind, target mix rho and C_ref (ms)."""

    task: float = 1.0
    cost: float = 0.1
    util: float = 0.5
    bal: float = 0.0
    ent: float = 0.0
    reg: float = 1e-4
    beta: float = 1.0
    balance: str = "target"
    target_mix: float = 0.5
    c_ref: float = 1.0

    def __post_init__(self) -> None:
        if self.balance not in BALANCE_KINDS:
            raise MedmoeError(f"loss: balance must be one of {BALANCE_KINDS}, got {self.balance!r}")
        if self.c_ref <= 0:
            raise MedmoeError(f"loss: C_ref must be positive, got {self.c_ref}")
        if not 0.0 <= self.target_mix <= 1.0:
            raise MedmoeError(f"loss: target mix rho must be in [0, 1], got {self.target_mix}")
        negative = [t for t in TERMS if getattr(self, t) < 0]
        if negative:
            raise MedmoeError(f"loss: lambdas must be >= 0, got negative {negative}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LossConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def binary_entropy(q: torch.Tensor) -> torch.Tensor:
    """H(q) in nats, elementwise, finite at q = 0 and q = 1."""
    q = q.clamp(1e-7, 1 - 1e-7)
    return -(q * q.log() + (1 - q) * (1 - q).log())


def utility_targets(loss_t: torch.Tensor, loss_m: torch.Tensor, cost_t: torch.Tensor, cost_m: torch.Tensor,
                    beta: float, c_ref: float) -> torch.Tensor:
    """y = 1[U_M > U_T] as float (B,): 1 where E_M has the higher utility."""
    u_t = -loss_t - beta * cost_t / c_ref
    u_m = -loss_m - beta * cost_m / c_ref
    return (u_m > u_t).to(loss_t.dtype)


def routing_loss(q_mamba: torch.Tensor, p_mamba: torch.Tensor, loss_t: torch.Tensor, loss_m: torch.Tensor,
                 cost_t: torch.Tensor, cost_m: torch.Tensor, config: LossConfig,
                 parameters: Iterable[torch.Tensor] = (), lambda_cost: float | None = None):
    """Return (L, terms) where terms maps each name in TERMS to its unweighted value (a 0-d tensor).

    q_mamba (B,): gate probability q_M; p_mamba (B,): the decision weighting the experts (= q_M for
    soft training, a straight-through sample otherwise); loss_e, cost_e (B,): cached l_e and C_e(n) in ms.
    lambda_cost overrides config.cost (the dual-ascent value).
    """
    shapes = {t.shape for t in (q_mamba, p_mamba, loss_t, loss_m, cost_t, cost_m)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise MedmoeError(f"routing_loss: inputs must all have the same (B,) shape, got {sorted(map(tuple, shapes))}")
    p_t = 1.0 - p_mamba
    c = config.c_ref
    terms = {
        "task": (p_t * loss_t + p_mamba * loss_m).mean(),
        "cost": (p_t * cost_t + p_mamba * cost_m).mean() / c,
        "util": F.binary_cross_entropy(q_mamba.clamp(1e-7, 1 - 1e-7),
                                       utility_targets(loss_t, loss_m, cost_t, cost_m, config.beta, c)),
        "ent": binary_entropy(q_mamba).mean(),
    }
    share_m = q_mamba.mean()                                                     # P_M
    if config.balance == "switch":
        f_m = (q_mamba.detach() > 0.5).to(q_mamba.dtype).mean()                  # f_M (no gradient)
        terms["bal"] = 2.0 * ((1 - f_m) * (1 - share_m) + f_m * share_m)
    else:
        terms["bal"] = (share_m - config.target_mix) ** 2
    params = list(parameters)
    terms["reg"] = cast(torch.Tensor, sum((p * p).sum() for p in params)) if params else q_mamba.new_zeros(())
    weights = {name: getattr(config, name) for name in TERMS}
    if lambda_cost is not None:
        weights["cost"] = float(lambda_cost)
    total = sum(weights[name] * terms[name] for name in TERMS if weights[name] != 0.0)
    if isinstance(total, int):                                                   # every lambda is 0
        total = q_mamba.new_zeros(()) * q_mamba.sum()
    return total, {name: terms[name] for name in TERMS}


class DualCostWeight:
    """lambda_cost by dual ascent toward a mean-latency budget (ms):
    lambda <- max(0, lambda + eta * (E[cost] - budget) / C_ref)."""

    def __init__(self, budget_ms: float, c_ref: float, eta: float = 0.5, initial: float = 0.0):
        if budget_ms <= 0 or c_ref <= 0 or eta <= 0:
            raise MedmoeError("dual ascent: the budget, C_ref and eta must be positive")
        self.budget_ms, self.c_ref, self.eta, self.value = budget_ms, c_ref, eta, max(0.0, initial)

    def update(self, expected_cost_ms: float) -> float:
        self.value = max(0.0, self.value + self.eta * (expected_cost_ms - self.budget_ms) / self.c_ref)
        return self.value

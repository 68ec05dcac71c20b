"""The MambaFormer gate: token scores pooled into the probability of sending a query to E_M.

For a query with token features f_t (B, T, F) and global features g (B, G):
  f~_t  = (f_t - mu) / sigma                    standardised with training statistics (buffers)
  phi_t = SiLU(W_phi f~_t + b_phi)              (B, T, H)   the token feature map phi(f_t)
  s_t   = w . phi_t + b_s                       (B, T)      token score
  z     = MLP([mean_t s_t, max_t s_t, g])       (B,)        masked mean and max pooling
  p_M   = sigmoid(z)                            probability of routing to E_M (Mamba)
Decisions (`decide`): "soft" uses p_M; "st" draws a straight-through Gumbel (logistic-noise) sample,
hard in the forward pass with the gradient of its relaxed sigmoid((z + g) / temperature); "hard" is
1[p_M > tau], the inference rule (tau: the router checkpoint's, RouterCheckpoint.tau).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import cast

import torch
import torch.nn as nn

from medmoe.errors import MedmoeError
from medmoe.mambaformer.features import GLOBAL_FEATURES, TOKEN_FEATURES, GateFeatures

DECISION_MODES = ("soft", "st", "hard")


@dataclass
class GateConfig:
    n_token_features: int = len(TOKEN_FEATURES)
    n_global_features: int = len(GLOBAL_FEATURES)
    phi_dim: int = 32          # H, width of phi(f_t)
    hidden: int = 32           # width of the pooled MLP
    temperature: float = 1.0   # Gumbel temperature for "st" decisions
    # No tau here: the inference threshold is stored once, as RouterCheckpoint.tau (router.json "tau").

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GateConfig:
        """From router.json's gate_config; a format-1 file's `tau` entry (a stale second copy) is ignored."""
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class GateOutput:
    """token_scores (B, T) (0 at padding), logit z (B,), p_mamba (B,)."""

    token_scores: torch.Tensor
    logit: torch.Tensor
    p_mamba: torch.Tensor


class TokenGate(nn.Module):
    feature_mean: torch.Tensor  # buffers (registered in __init__), declared for the type checker
    feature_std: torch.Tensor
    """The gate. Far below the ~50k-parameter budget (386 with the defaults)."""

    def __init__(self, config: GateConfig | None = None):
        super().__init__()
        self.config = config or GateConfig()
        F, G, H = self.config.n_token_features, self.config.n_global_features, self.config.phi_dim
        self.register_buffer("feature_mean", torch.zeros(F))
        self.register_buffer("feature_std", torch.ones(F))
        self.phi = nn.Sequential(nn.Linear(F, H), nn.SiLU())
        self.score = nn.Linear(H, 1)                                             # w, b_s
        self.mlp = nn.Sequential(nn.Linear(2 + G, self.config.hidden), nn.SiLU(), nn.Linear(self.config.hidden, 1))

    @torch.no_grad()
    def fit_normalizer(self, features: GateFeatures) -> None:
        """Set mu, sigma of the token features from (training) features, over real tokens only."""
        real = features.token[features.mask]                                     # (N_real, F)
        self.feature_mean.copy_(real.mean(0))
        self.feature_std.copy_(real.std(0).clamp_min(1e-4))

    def token_scores(self, token: torch.Tensor) -> torch.Tensor:
        """(B, T, F) -> (B, T): s_t = w . phi(f_t)."""
        normalised = (token - self.feature_mean) / self.feature_std
        return self.score(self.phi(normalised)).squeeze(-1)

    def forward(self, features: GateFeatures) -> GateOutput:
        if features.token.shape[-1] != self.config.n_token_features:
            raise MedmoeError(f"gate: expected {self.config.n_token_features} token features, "
                              f"got {features.token.shape[-1]}")
        mask = features.mask                                                     # (B, T)
        s = self.token_scores(features.token).masked_fill(~mask, 0.0)            # (B, T)
        mean_s = s.sum(1) / mask.sum(1).clamp_min(1)                             # (B,)
        max_s = s.masked_fill(~mask, float("-inf")).amax(1)                      # (B,)
        pooled = torch.cat([mean_s[:, None], max_s[:, None], features.global_], dim=-1)   # (B, 2 + G)
        z = self.mlp(pooled).squeeze(-1)                                         # (B,)
        return GateOutput(s, z, torch.sigmoid(z))

    def decide(self, output: GateOutput, mode: str = "hard", tau: float | None = None,
               temperature: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B,) decision d in [0, 1] (1 = E_M): "soft" p_M, "st" straight-through Gumbel, "hard" 1[p_M > tau]
        (tau required for "hard": the gate has no threshold of its own, its checkpoint has)."""
        if mode == "soft":
            return output.p_mamba
        if mode == "hard":
            if tau is None:
                raise MedmoeError("gate: hard decisions need tau (RouterCheckpoint.tau)")
            return (output.p_mamba > tau).to(output.p_mamba.dtype)
        if mode == "st":
            temperature = self.config.temperature if temperature is None else temperature
            u = torch.rand(output.logit.shape, generator=generator).clamp(1e-6, 1 - 1e-6)
            noise = torch.log(u) - torch.log1p(-u)                               # Logistic(0, 1) = G1 - G2
            soft = torch.sigmoid((output.logit + noise) / temperature)
            return _StraightThrough.apply(soft)
        raise MedmoeError(f"gate: unknown decision mode {mode!r}; choose one of {DECISION_MODES}")

    def explain(self, features: GateFeatures, tau: float, top_tokens: int = 5) -> list[dict]:
        """Why each query went where it went: p_M, decision, its highest-scoring tokens (position among the
        query's real tokens, score), every token score, and the
        features' attributions to the logit z (gradient x input; token features are standardised,
        so each attribution is relative to an average training token)."""
        token = ((features.token - self.feature_mean) / self.feature_std).detach().requires_grad_(True)
        global_ = features.global_.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            shifted = GateFeatures(token * self.feature_std + self.feature_mean, features.mask, global_,
                                   features.n_tokens)
            out = self(shifted)
            out.logit.sum().backward()
        token_grad, global_grad = cast(torch.Tensor, token.grad), cast(torch.Tensor, global_.grad)  # set by backward
        token_attr = (token_grad * token).masked_fill(~features.mask[..., None], 0.0).sum(1)   # (B, F)
        global_attr = global_grad * global_                                                    # (B, G)
        names = list(TOKEN_FEATURES) + list(GLOBAL_FEATURES)
        attributions = torch.cat([token_attr, global_attr], dim=-1).detach()
        p_mamba, scores_all = out.p_mamba.detach(), out.token_scores.detach()
        real_position = features.mask.long().cumsum(1) - 1                                     # (B, T)
        reports = []
        for b in range(features.token.shape[0]):
            scores = scores_all[b].masked_fill(~features.mask[b], float("-inf"))
            k = min(top_tokens, int(features.mask[b].sum()))
            top = scores.topk(k)
            order = attributions[b].abs().argsort(descending=True)
            p = float(p_mamba[b])
            reports.append({
                "p_mamba": p, "expert": "mamba" if p > tau else "transformer", "tau": tau,
                "top_features": [(names[i], float(attributions[b, i])) for i in order.tolist()],
                "top_tokens": [(int(real_position[b, i]), float(s)) for s, i in zip(top.values.tolist(), top.indices.tolist())],
                "token_scores": scores_all[b][features.mask[b]].tolist(),
            })
        return reports


class _StraightThrough(torch.autograd.Function):
    """Forward: exactly 1[y > 1/2] (no rounding residue); backward: the gradient of y (identity)."""

    @staticmethod
    def forward(ctx, soft: torch.Tensor) -> torch.Tensor:
        return (soft > 0.5).to(soft.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with n torch intra-op threads, then restore the previous count.

    Routing one query runs in 1 thread: its tensors are tiny, and on a busy machine a 2-thread pool
    waits on a descheduled thread (measured: reports/gate_overhead.md, ~1.4 ms vs ~100 ms)."""
    previous = torch.get_num_threads()
    if previous == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def parameter_count(gate: nn.Module) -> int:
    return sum(p.numel() for p in gate.parameters())

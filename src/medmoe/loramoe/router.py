"""Token-level routers, always computed in fp32.

Glossary (docs/loramoe.md, section "Router"):
    N   tokens (batch x sequence, flattened)      d_in  input width of the wrapped linear
    E   experts                                   d_q   router embedding width
    q   router embedding q(x) = normalize(W_q x)  c_i   expert key (learnable), normalised
    T   temperature                               logits_i = q . c_i / T
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PrototypeRouter(nn.Module):
    """Cosine-prototype router: logits = normalize(W_q x) . normalize(c_i) / T.

    The contrastive loss shapes the embedding q, and routing is nearest-key in that space, so the
    supervision acts on routing directly.
    """

    def __init__(self, d_in: int, num_experts: int, router_dim: int, temperature: float):
        super().__init__()
        self.temperature = temperature
        self.w_q = nn.Parameter(torch.empty(router_dim, d_in, dtype=torch.float32))  # W_q: d_q x d_in
        self.keys = nn.Parameter(torch.empty(num_experts, router_dim, dtype=torch.float32))  # c: E x d_q
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_q, std=1.0 / math.sqrt(self.w_q.shape[1]))
        nn.init.normal_(self.keys)

    @property
    def projection(self) -> torch.Tensor:
        """W_q (d_q, d_in): the router's only linear map of x (the layer may fuse it with A)."""
        return self.w_q

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """q(x) = normalize(W_q x): (N, d_in) -> (N, d_q), fp32."""
        return F.normalize(x.float() @ self.w_q.t(), dim=-1)

    def normalized_keys(self) -> torch.Tensor:
        return F.normalize(self.keys, dim=-1)  # (E, d_q)

    def head(self, projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """From W_q x (N, d_q) fp32 to (logits (N, E), embedding q (N, d_q)), both fp32."""
        q = F.normalize(projected, dim=-1)
        return q @ self.normalized_keys().t() / self.temperature, q

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (logits (N, E) fp32, embedding q (N, d_q) fp32)."""
        return self.head(x.float() @ self.w_q.t())


class LinearRouter(nn.Module):
    """Plain softmax gate: logits = W_g x (no embedding; the prototype contrastive loss is unavailable)."""

    def __init__(self, d_in: int, num_experts: int):
        super().__init__()
        self.w_g = nn.Parameter(torch.empty(num_experts, d_in, dtype=torch.float32))  # W_g: E x d_in
        nn.init.normal_(self.w_g, std=1.0 / math.sqrt(d_in))

    @property
    def projection(self) -> torch.Tensor:
        """W_g (E, d_in): the router's only linear map of x (the layer may fuse it with A)."""
        return self.w_g

    def head(self, projected: torch.Tensor) -> tuple[torch.Tensor, None]:
        """The projection W_g x (N, E) fp32 is the logits."""
        return projected, None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.head(x.float() @ self.w_g.t())


def build_router(kind: str, d_in: int, num_experts: int, router_dim: int, temperature: float) -> PrototypeRouter | LinearRouter:
    if kind == "prototype":
        return PrototypeRouter(d_in, num_experts, router_dim, temperature)
    if kind == "linear":
        return LinearRouter(d_in, num_experts)
    raise ValueError(f"unknown router kind {kind!r}")


def top_k_gates(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts and their gates renormalised over the top k.

    logits: (N, E) fp32 -> gates ghat (N, k) summing to 1 per token, indices (N, k), best first.
    ghat_i = g_i / sum_{j in TopK} g_j with g = softmax(logits) equals the softmax of the k selected
    logits (the partition function cancels), so the full softmax over E is not computed here; the
    balance loss computes g where it needs it.
    """
    top_logits, top_i = logits.topk(k, dim=-1)  # softmax is monotonic: the same experts as topk(g)
    return top_logits.softmax(dim=-1), top_i

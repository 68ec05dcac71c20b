"""LoraMoeLinear: a frozen nn.Linear plus E LoRA experts held as stacked tensors.

    y = W_0 x + b + (alpha / r) * sum_{i in TopK(g(x))} ghat_i(x) B_i A_i dropout(x)

Glossary (docs/loramoe.md): N tokens (flattened), d_in / d_out widths, E experts, r rank, k top-k,
A: (E, r, d_in), B: (E, d_out, r) initialised to zero, g router probabilities (N, E) in fp32,
ghat gates renormalised over the top-k (N, k).
Computation (config.compute; docs/loramoe.md, "Computation"), both with hand-written backward passes:
  "sparse" (sparse_kernel.py, CPU fp32): the whole layer in one autograd Function: the base GEMM and the
      router's projection, then a C++ kernel for the router's head, the top-k and only each token's k
      selected experts, accumulating into W_0 x + b in place;
  "dense" (fused.py, any device): one GEMM gives W_0 x + b, all experts' A x and the router's
      projection; the gates (alpha / r folded in) zero the unselected experts, and B's GEMM
      accumulates into W_0 x + b.
"auto" (the default) takes "sparse" where its kernel can run and "dense" elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn

from medmoe.errors import ModelError
from medmoe.loramoe import sparse_kernel
from medmoe.loramoe.config import LoraMoeConfig
from medmoe.loramoe.fused import ExpertMix, FusedProjection
from medmoe.loramoe.losses import (
    expert_output_contrastive_loss,
    prototype_contrastive_loss,
    router_z_loss,
    switch_balance_loss,
)
from medmoe.loramoe.queue import ExpertQueue
from medmoe.loramoe.router import LinearRouter, PrototypeRouter, build_router, top_k_gates


@dataclass
class RoutingContext:
    """State shared by all LoRA-MoE layers of one model, set by the wrapper around each forward.

    token_mask: (batch * seq,) bool of real (non-padding) tokens, or None; used only when its size
        matches a layer's token count (it does not for a seq2seq decoder, which then uses all tokens).
    compute_aux: compute the auxiliary losses in this forward (training).
    track_load: accumulate per-expert token counts (routing analytics).
    """

    token_mask: torch.Tensor | None = None
    compute_aux: bool = False
    track_load: bool = False
    _index_of: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    _index: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def real_token_index(self, n_tokens: int) -> torch.Tensor | None:
        """(n_real,) positions of the real tokens among n_tokens, or None when every token counts
        (no mask, a mask of another size, or no padding). Computed once per mask, not per layer."""
        mask = self.token_mask
        if mask is None or mask.numel() != n_tokens:
            return None
        if self._index_of is not mask:
            mask = mask.to(torch.bool)
            self._index = None if bool(mask.all()) else mask.nonzero().squeeze(1)
            self._index_of = self.token_mask
        return self._index


def dense_gates(top_i: torch.Tensor, gates: torch.Tensor, num_experts: int) -> torch.Tensor:
    """G (N, E): the gates at each token's top-k experts, exact zeros elsewhere."""
    zeros = torch.zeros(top_i.shape[0], num_experts, dtype=gates.dtype, device=gates.device)
    return zeros.scatter(1, top_i, gates)


def expert_mix_dense(x, a, b, top_i, gates, out):
    """out + sum_{i in TopK} gates_i B_i A_i x: all experts' A in one matmul, B accumulated into out.

    x (N, d_in), a (E, r, d_in), b (E, d_out, r), top_i/gates (N, k), out (N, d_out) -> (N, d_out).
    The dense path when the fused one (fused.py) does not apply (active dropout, bf16, a subclassed
    or hooked base). Costs one LoRA of rank E*r; unselected experts get exact zero gates, so this
    equals the sparse sum.
    """
    num_experts, rank, d_in = a.shape
    h = x @ a.reshape(num_experts * rank, d_in).t()  # H: (N, E*r)
    g = dense_gates(top_i, gates, num_experts)  # G: (N, E)
    h = (h.view(-1, num_experts, rank) * g[:, :, None]).view(-1, num_experts * rank)  # H': (N, E*r)
    b_flat = b.permute(1, 0, 2).reshape(b.shape[1], num_experts * rank)  # B_flat: (d_out, E*r)
    return torch.addmm(out, h, b_flat.t())  # out + H' B_flat^T in the same GEMM


def expert_mix_gather(x, a, b, top_i, gates, out):
    """Gather the top-k experts' weights per token and contract: (N, k, r, d_in) in memory."""
    h = torch.einsum("nd,nkrd->nkr", x, a[top_i])  # (N, k, r)
    h = h * gates[:, :, None]
    return out + torch.einsum("nkr,nkor->no", h, b[top_i])  # (N, d_out)


def expert_mix_loop(x, a, b, top_i, gates, out):
    """Reference: a Python loop over experts, each on the tokens routed to it, as LoRA-MoE code
    usually does (Mixtral / MixLoRA style: zeros, then index_add_ of each expert's gated output)."""
    delta = torch.zeros(x.shape[0], b.shape[1], dtype=x.dtype, device=x.device)
    for e in range(a.shape[0]):
        token_idx, slot = torch.where(top_i == e)
        if token_idx.numel() == 0:
            continue
        h = x[token_idx] @ a[e].t() @ b[e].t()  # (n_e, d_out): B_e A_e x for the tokens routed to e
        delta.index_add_(0, token_idx, h * gates[token_idx, slot, None])
    return out + delta


def expert_mix_sparse(x, a, b, top_i, gates, out):
    """The sparse kernel (sparse_kernel.py) outside the fused path: only the top-k experts, added into a
    copy of out (out comes from the base module, whose hooks' backward may need it unchanged)."""
    return sparse_kernel.SparseExpertMix.apply(out.clone(memory_format=torch.contiguous_format), x, a, b, top_i, gates)


EXPERT_MIX = {"dense": expert_mix_dense, "sparse": expert_mix_sparse, "gather": expert_mix_gather, "loop": expert_mix_loop}


class LoraMoeLinear(nn.Module):
    """Drop-in replacement for an nn.Linear; the original module is kept (frozen) as `base_layer`."""

    expert_load: torch.Tensor  # a buffer (registered in __init__), declared for the type checker

    def __init__(self, base_layer: nn.Linear, config: LoraMoeConfig, context: RoutingContext | None = None):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoraMoeLinear wraps nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.config = config
        self.context = context if context is not None else RoutingContext()
        d_in, d_out = base_layer.in_features, base_layer.out_features
        e, r = config.num_experts, config.rank
        weight = base_layer.weight
        self.lora_A = nn.Parameter(torch.empty(e, r, d_in, dtype=weight.dtype, device=weight.device))  # A: (E, r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(e, d_out, r, dtype=weight.dtype, device=weight.device))  # B: (E, d_out, r)
        self.router: PrototypeRouter | LinearRouter = build_router(config.router_kind, d_in, e, config.router_dim, config.temperature).to(weight.device)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.queue = (
            ExpertQueue(config.queue_size, config.router_dim).to(weight.device)
            if config.queue_size > 0 and config.contrastive_kind == "prototype" and config.contrastive_weight > 0
            else None
        )
        self.register_buffer("expert_load", torch.zeros(e, dtype=torch.long), persistent=False)
        self.aux_losses: dict[str, torch.Tensor] = {}
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A as PEFT initialises LoRA A (Kaiming uniform, a=sqrt(5)) per expert; B = 0."""
        for i in range(self.lora_A.shape[0]):
            nn.init.kaiming_uniform_(self.lora_A.data[i], a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:  # some model code reads .weight (dtype checks)
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def extra_repr(self) -> str:
        c = self.config
        return f"experts={c.num_experts}, top_k={c.top_k}, rank={c.rank}, router={c.router_kind}, compute={c.compute}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_flat = x.reshape(-1, x.shape[-1])  # (N, d_in)
        kind = self._mix_kind(x_flat)
        if kind in ("dense", "sparse") and self._fusable(x_flat):
            forward = self._forward_fused if torch.is_grad_enabled() else self._forward_inference
            return forward(x_flat, sparse=kind == "sparse").view(*x.shape[:-1], self.out_features)
        c = self.config
        y = self.base_layer(x)  # W_0 x + b
        dropout_on = self.training and isinstance(self.dropout, nn.Dropout)
        x_lora = self.dropout(x_flat) if dropout_on else x_flat  # dropout(x), the experts' input
        router_w = self.router.projection  # fp32 (routing in fp32 whatever the model dtype), unless cast on purpose
        router_proj = x_flat.to(router_w.dtype) @ router_w.t()
        x_lora = x_lora.to(self.lora_A.dtype)
        logits, q = self.router.head(router_proj)  # (N, E) fp32, (N, d_q) fp32 or None
        gates, top_i = top_k_gates(logits, c.top_k)
        scaled_gates = (gates * c.scaling).to(self.lora_A.dtype)  # (alpha / r) ghat: the scale rides on the gates
        y_flat = y.reshape(-1, y.shape[-1]).to(self.lora_A.dtype)  # (N, d_out), W_0 x + b
        y_flat = EXPERT_MIX[kind](x_lora, self.lora_A, self.lora_B, top_i, scaled_gates, y_flat)
        self._after_routing(x_lora, logits, gates, top_i, q)
        return y_flat.to(y.dtype).view(y.shape)

    def _mix_kind(self, x_flat: torch.Tensor) -> str:
        """config.compute, with "auto" resolved: "sparse" where the kernel can run (CPU, fp32, built), else "dense"."""
        kind = self.config.compute
        if kind in ("auto", "sparse"):
            runs = sparse_kernel.usable(x_flat, self.lora_A, self.lora_B)
            if kind == "sparse" and not runs:
                raise ModelError(f"LoRA-MoE compute='sparse' needs fp32 CPU tensors and the C++ kernel (got {x_flat.dtype} "
                                 f"on {x_flat.device}, kernel built: {sparse_kernel.available()}); use compute='auto' or 'dense'")
            kind = "sparse" if runs else "dense"
        return kind

    def _fusable(self, x_flat: torch.Tensor) -> bool:
        """The fused paths need no active dropout (the experts and the router must read the same x),
        a plain nn.Linear base without hooks, one dtype throughout, and no autocast: their hand-written
        backward runs outside it, in the dtype of the weights, while autocast made the forward's GEMMs
        bfloat16 / float16 (mixed-precision training takes the unfused path, whose ops autocast handles)."""
        base = self.base_layer
        return (
            not (self.training and isinstance(self.dropout, nn.Dropout))
            and not torch.is_autocast_enabled(x_flat.device.type)
            and type(base) is nn.Linear
            and not base._forward_hooks
            and not base._forward_pre_hooks
            and x_flat.dtype == base.weight.dtype == self.lora_A.dtype == self.router.projection.dtype
        )

    def _forward_fused(self, x_flat: torch.Tensor, sparse: bool) -> torch.Tensor:
        """x (N, d_in) -> y (N, d_out). Sparse: the whole layer in one autograd Function (sparse_kernel.py).
        Dense: three GEMMs forward and five backward (fused.py); docs/loramoe.md, "Computation"."""
        c, base = self.config, self.base_layer
        router_w = self.router.projection  # W_r: W_q (d_q, d_in) or W_g (E, d_in)
        if sparse:
            y, logits, q, gates, top_i = sparse_kernel.SparseLoraMoe.apply(
                x_flat, base.weight, base.bias, router_w, self._router_keys(), self.lora_A, self.lora_B, c.top_k, c.scaling,
                1.0 / c.temperature)
            self._after_routing(x_flat, logits, gates, top_i, q)
            return y
        e_r = c.num_experts * c.rank
        w_lora = torch.cat([self.lora_A.reshape(e_r, -1), router_w])  # W_lora = [A_flat ; W_r]
        y0, h, router_proj = FusedProjection.apply(x_flat, base.weight, base.bias, w_lora, router_w.shape[0])
        logits, q = self.router.head(router_proj)  # (N, E), (N, d_q) or None
        gates, top_i = top_k_gates(logits, c.top_k)  # ghat (N, k), indices (N, k)
        g = dense_gates(top_i, gates * c.scaling, c.num_experts)  # G (N, E): (alpha / r) ghat, 0 off the top-k
        b_t = self.lora_B.transpose(1, 2).reshape(e_r, -1)  # B_t (E*r, d_out): row e*r + j = B_e[:, j]
        y = ExpertMix.apply(y0, h, g, b_t)  # W_0 x + b + (H * G) B_t
        self._after_routing(x_flat, logits, gates, top_i, q)
        return y

    def _router_keys(self) -> torch.Tensor | None:
        """The prototype router's keys c (E, d_q), or None for the linear router (the sparse kernel normalises them)."""
        return cast(PrototypeRouter, self.router).keys if self.config.router_kind == "prototype" else None

    def _forward_inference(self, x_flat: torch.Tensor, sparse: bool) -> torch.Tensor:
        """The fused paths' equations without autograd (no gradient wanted): the stacked weights
        W_lora = [A_flat ; W_r] and B_t are kept between calls while the parameters are unchanged
        (their in-place version counters), and nothing is saved for a backward pass."""
        c, base = self.config, self.base_layer
        e_r = c.num_experts * c.rank
        w_lora, b_t = self._stacked_weights()  # (E*r + d_q, d_in), (E*r, d_out)
        if sparse:
            y, logits, q, gates, top_i, *_ = sparse_kernel.layer_forward(
                x_flat.contiguous(), base.weight, base.bias, self.router.projection, self._router_keys(), self.lora_A.detach(),
                b_t.view(c.num_experts, c.rank, -1), c.top_k, c.scaling, 1.0 / c.temperature)
            self._after_routing(x_flat, logits, gates, top_i, q)
            return y
        y0 = torch.nn.functional.linear(x_flat, base.weight, base.bias)  # W_0 x + b, bit-identical to the base layer
        projected = x_flat @ w_lora.t()  # [H | P] (N, E*r + d_q)
        logits, q = self.router.head(projected[:, e_r:])  # (N, E), (N, d_q) or None
        gates, top_i = top_k_gates(logits, c.top_k)
        g = dense_gates(top_i, gates * c.scaling, c.num_experts)  # G (N, E)
        h_gated = (projected[:, :e_r].unflatten(1, (c.num_experts, c.rank)) * g[:, :, None]).flatten(1)  # H' (N, E*r)
        y = torch.addmm(y0, h_gated, b_t)  # W_0 x + b + H' B_t
        self._after_routing(x_flat, logits, gates, top_i, q)
        return y

    def _stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_lora, B_t) for inference, rebuilt only when A, B or the router's projection changed."""
        router_w = self.router.projection
        key = tuple((t.data_ptr(), t._version) for t in (self.lora_A, self.lora_B, router_w))
        cached = getattr(self, "_stacked_cache", None)
        if cached is None or cached[0] != key:
            e_r = self.config.num_experts * self.config.rank
            with torch.no_grad():
                w_lora = torch.cat([self.lora_A.reshape(e_r, -1), router_w])
                b_t = self.lora_B.transpose(1, 2).reshape(e_r, -1)
            self._stacked_cache = cached = (key, w_lora, b_t)
        return cached[1], cached[2]

    # --- routing statistics and auxiliary losses ------------------------------------------------
    def _after_routing(self, x, logits, gates, top_i, q) -> None:
        """Expert load and auxiliary losses over the real tokens. x, gates, q are indexed only at
        the sampled contrastive anchors; logits, top_i (N, E or k: small) at every real token.
        The router probabilities g = softmax(logits) are computed here, only for the balance loss."""
        ctx = self.context
        if not (ctx.compute_aux or ctx.track_load):
            self.aux_losses = {}
            return
        real = ctx.real_token_index(logits.shape[0])  # None: every token is real
        if real is not None:
            logits, top_i_real = logits[real], top_i[real]
        else:
            top_i_real = top_i
        if ctx.track_load:
            with torch.no_grad():
                self.expert_load += torch.bincount(top_i_real.reshape(-1), minlength=self.config.num_experts).to(self.expert_load.device)
        if not ctx.compute_aux or logits.shape[0] == 0:
            self.aux_losses = {}
            return
        c = self.config
        losses: dict[str, torch.Tensor] = {}
        if c.balance_weight > 0:
            losses["balance"] = switch_balance_loss(logits.softmax(dim=-1), top_i_real)
        if c.z_loss_weight > 0:
            losses["z"] = router_z_loss(logits)
        if c.contrastive_weight > 0 and c.contrastive_kind != "none":
            sample = self._sample_tokens(logits.shape[0])  # among the real tokens
            rows = real[sample] if real is not None else sample  # the same anchors among all N tokens
            if c.contrastive_kind == "prototype":
                losses["contrastive"] = self._prototype_loss(q[rows], top_i[rows, 0])
            else:
                losses["contrastive"] = self._expert_output_loss(x[rows], gates[rows], top_i[rows])
        self.aux_losses = losses

    def _sample_tokens(self, n_tokens: int) -> torch.Tensor:
        """Indices of the contrastive anchors: a random subset of contrastive_tokens, or all tokens."""
        limit = self.config.contrastive_tokens
        if limit is None or n_tokens <= limit:
            return torch.arange(n_tokens, device=self.lora_A.device)
        return torch.randperm(n_tokens, device=self.lora_A.device)[:limit]

    def _prototype_loss(self, q: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.detach()
        queue_q, queue_labels = self.queue.entries() if self.queue is not None else (None, None)
        keys = cast(PrototypeRouter, self.router).normalized_keys()  # the prototype loss needs the prototype router
        loss = prototype_contrastive_loss(q, labels, keys, queue_q, queue_labels, self.config.temperature)
        if self.queue is not None:
            self.queue.push(q.detach(), labels)  # after use: this batch's entries are not their own negatives
        return loss

    def _expert_output_loss(self, x: torch.Tensor, gates: torch.Tensor, top_i: torch.Tensor) -> torch.Tensor:
        e, r, d_in = self.lora_A.shape
        h = (x @ self.lora_A.reshape(e * r, d_in).t()).view(-1, e, r)  # (n, E, r)
        outputs = torch.einsum("ner,eor->neo", h, self.lora_B)  # (n, E, d_out): every expert's B_i A_i x
        dense_gates = torch.zeros(x.shape[0], e, dtype=torch.float32, device=x.device).scatter(1, top_i, gates)
        return expert_output_contrastive_loss(outputs, dense_gates, self.config.temperature)

    def adapter_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The trained weights of this layer (experts and router), not the frozen base or the queue."""
        state: dict[str, torch.Tensor] = {f"{prefix}lora_A": self.lora_A, f"{prefix}lora_B": self.lora_B}
        for name, param in self.router.named_parameters():
            state[f"{prefix}router.{name}"] = param
        return state

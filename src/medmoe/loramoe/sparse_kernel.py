"""Sparse top-k LoRA-MoE layer on CPU: a C++ kernel (sparse_kernel.cpp) that computes only the experts each
token is routed to, with the router's head fused in.

The dense form (fused.py) computes all E experts' A x and masks the unselected ones with zero gates:
one rank-(E*r) LoRA, so its cost grows with E. This kernel touches only the k selected experts per
token, so its cost is that of a rank-(k*r) LoRA whatever E is.

Glossary (docs/loramoe.md): N tokens, d_in / d_out widths, E experts, r rank, k top-k, d_q router width,
W_0 (d_out, d_in) and b the frozen base, W_r (d_q, d_in) the router's projection, c (E, d_q) the
prototype keys and kn = c / |c| (per row), T the temperature, A (E, r, d_in), B (E, d_out, r), s = alpha / r.

Forward of the layer (SparseLoraMoe), per token n and slot j (e = top_i[n, j]):

    y_0 = W_0 x + b     (the base GEMM, by torch)         P = W_r x     (the kernel, from here on)
    q = P / |P|     logits = q kn^T / T     (linear router: logits = P)
    top_i, gates = top-k of logits, softmax over those k     G = s * gates
    h[n, j] = A_e x_n     y_n = y_0n + sum_j G[n, j] B_e h[n, j]

Backward, from dy and the upstream gradients of logits, q and gates (the auxiliary losses'):

    u = B_e^T dy_n    dG[n, j] = u . h[n, j]    dh = G u
    dgates = s dG + dgates_in -> dlogits (softmax over the top k) + dlogits_in
    dq = dq_in + dlogits kn / T -> dP = (dq - q (q . dq)) / |P|     (linear router: dP = dlogits)
    dx_n = dy_n W_0 + sum_j A_e^T dh[n, j] + W_r^T dP_n
    dA_e = sum_{(n, j) -> e} dh x_n^T    dB_e = sum_{(n, j) -> e} dy_n (G h)^T    dW_r = dP^T x
    dkn = dlogits^T q / T -> dc = (dkn - kn (kn . dkn)) / |c|

SparseExpertMix is the expert part alone (given top_i and gates), for the layer's unfused path.
Built by medmoe.native; `available()` is False without a compiler, and MEDMOE_LORAMOE_SPARSE_KERNEL=0
disables it (compute="auto" then uses the dense form).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F

from medmoe import native

_EMPTY = torch.empty(0)


@functools.cache
def _module():
    source = (Path(__file__).with_name("sparse_kernel.cpp")).read_text()
    return native.build("medmoe_sparse_loramoe_v2", source, "MEDMOE_LORAMOE_SPARSE_KERNEL", "the dense LoRA-MoE form")


def available() -> bool:
    """True when the kernel is built (building it now if needed)."""
    return _module() is not None


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernel can take these tensors: all fp32 on CPU, and the kernel built."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and available()


def _or_empty(t: torch.Tensor | None) -> torch.Tensor:
    return _EMPTY if t is None else t.contiguous()


def layer_forward(x, w0, bias, w_r, keys, a, b_t, top_k: int, scaling: float, inv_temperature: float):
    """The layer's forward without autograd. x (N, d_in) contiguous; keys c (E, d_q) or None (linear router);
    b_t (E, r, d_out) with b_t[e, j] = column j of B_e. Returns y (N, d_out), logits (N, E), q (N, d_q) or
    None, gates (N, k), top_i (N, k), and for the backward P (N, d_q), kn (E, d_q), h (N, k, r) and the plan."""
    y = F.linear(x, w0, bias)  # W_0 x + b, bit-identical to the base layer
    p, logits, q, gates, top_i, kn = _module().route(x, w_r.contiguous(), _or_empty(keys), inv_temperature, top_k)
    h, plan = _add_experts(y, x, a, b_t, top_i, gates, scaling)
    return y, logits, (q if keys is not None else None), gates, top_i, p, kn, h, plan


class SparseLoraMoe(torch.autograd.Function):
    """(x, W_0, b, W_r, c, A, B) -> (y, logits, q, gates, top_i): the whole LoRA-MoE layer (module docstring).
    logits, q and gates are outputs so that the auxiliary losses can use them; their gradients flow back."""

    @staticmethod
    def forward(ctx, x, w0, bias, w_r, keys, a, b, top_k: int, scaling: float, inv_temperature: float):
        x = x.contiguous()
        b_t = b.transpose(1, 2).contiguous()  # B_t (E, r, d_out)
        y, logits, q, gates, top_i, p, kn, h, plan = layer_forward(x, w0, bias, w_r, keys, a.contiguous(), b_t, top_k,
                                                                   scaling, inv_temperature)
        ctx.save_for_backward(x, w0, w_r, keys, kn, a, b_t, top_i, gates, p, q, h, *plan)
        ctx.scaling, ctx.inv_temperature = scaling, inv_temperature
        ctx.mark_non_differentiable(top_i)
        ctx.set_materialize_grads(False)
        return y, logits, q, gates, top_i

    @staticmethod
    def backward(ctx, dy, dlogits, dq, dgates, _):
        x, w0, w_r, keys, kn, a, b_t, top_i, gates, p, q, h, *plan = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dy = x.new_zeros(x.shape[0], w0.shape[0]) if dy is None else dy.contiguous()  # y unused: only the router's outputs
        dx = dy @ w0 if needs[0] else _EMPTY  # dy W_0; the kernel adds the experts' and the router's parts
        da, db, _, _, _, dw_r, dkeys = _module().backward(
            x, a, b_t, top_i, gates, ctx.scaling, h, dy, plan, dx, p, _or_empty(q), _or_empty(keys), kn, w_r,
            ctx.inv_temperature, _or_empty(dlogits), _or_empty(dq), _or_empty(dgates), needs[3])
        return (dx if needs[0] else None, dy.t() @ x if needs[1] else None, dy.sum(0) if needs[2] else None,
                dw_r if needs[3] else None, dkeys if keys is not None and needs[4] else None,
                da if needs[5] else None, db if needs[6] else None, None, None, None)


def _add_experts(y, x, a, b_t, top_i, gates, scaling: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """y += sum_j scaling * gates[n, j] B_e A_e x_n in place, without autograd. x (N, d_in) contiguous,
    a (E, r, d_in), b_t (E, r, d_out), top_i and gates (N, k). Returns h (N, k, r) and the plan (tokens
    grouped by expert set), both kept for the backward."""
    kernel = _module()
    plan = kernel.make_plan(top_i, a.shape[0])
    h = x.new_empty(x.shape[0], top_i.shape[1], a.shape[1])
    kernel.forward(x, a, b_t, top_i, gates, scaling, plan, y, h)
    return h, plan


class SparseExpertMix(torch.autograd.Function):
    """(Y_0, x, A, B, top_i, G) -> Y_0 + sum_j G[n, j] B_e A_e x_n, with Y_0 updated in place (its buffer
    is the output): the experts alone, for routing computed outside (the layer's unfused path).
    A (E, r, d_in) and B (E, d_out, r) are the layer's parameters as stored; G has the scale folded in."""

    @staticmethod
    def forward(ctx, y0, x, a, b, top_i, gates):
        x, a, top_i, gates = x.contiguous(), a.contiguous(), top_i.contiguous(), gates.contiguous()
        b_t = b.transpose(1, 2).contiguous()  # B_t (E, r, d_out)
        h, plan = _add_experts(y0, x, a, b_t, top_i, gates, 1.0)
        ctx.mark_dirty(y0)
        ctx.save_for_backward(x, a, b_t, top_i, gates, h, *plan)
        return y0

    @staticmethod
    def backward(ctx, dy):
        x, a, b_t, top_i, gates, h, *plan = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dx = torch.empty_like(x) if needs[1] else _EMPTY
        da, db, dgates, *_ = _module().backward(x, a, b_t, top_i, gates, 1.0, h, dy.contiguous(), plan, dx,
                                                _EMPTY, _EMPTY, _EMPTY, _EMPTY, _EMPTY, 1.0, _EMPTY, _EMPTY, _EMPTY, False)
        return (dy, dx if needs[1] else None, da if needs[2] else None, db if needs[3] else None, None,
                dgates if needs[5] else None)

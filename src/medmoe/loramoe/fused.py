"""The fused dense LoRA-MoE layer: two autograd Functions with hand-written backward passes.

Used by LoraMoeLinear (compute="dense", or "auto" where the sparse kernel cannot run) when the base is a plain nn.Linear, dropout is off and x, W_0,
A and the router share one dtype (fp32 training); docs/loramoe.md, "Computation", has the equations.

Glossary: N tokens, d_in / d_out widths, E experts, r rank, d_q router projection width,
W_0 (d_out, d_in) and b (d_out,) the base linear, A_flat (E*r, d_in) the experts' A stacked,
W_r (d_q, d_in) the router's projection, W_lora = [A_flat ; W_r] (E*r + d_q, d_in),
B_t (E*r, d_out) with row e*r + j = column j of B_e, G (N, E) the scaled gates (zero off the top-k).

    Y_0     = x W_0^T + b            the base GEMM (N, d_out), bit-identical to nn.Linear
    [H | P] = x W_lora^T             one GEMM: (N, E*r + d_q)
    H'      = H * G                  G broadcast over r: (N, E*r)
    y       = Y_0 + H' B_t           one addmm: (N, d_out)

Backward, from dy (N, d_out) and dP (N, d_q) (the router head's gradient, through autograd):

    dB_t = H'^T dy      dH' = dy B_t^T      dH = dH' * G      dG_e = sum_r dH'_{e,r} H_{e,r}
    dx   = dy W_0 + [dH | dP] W_lora        dW_lora = [dH | dP]^T x
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class FusedProjection(torch.autograd.Function):
    """x -> (Y_0, H, P): the base linear, then all experts' A and the router's projection in one GEMM;
    backward accumulates both paths' dx in one buffer."""

    @staticmethod
    def forward(ctx, x, w0, bias, w_lora, d_q: int):
        # x (N, d_in), w0 (d_out, d_in), bias (d_out,) or None, w_lora (E*r + d_q, d_in)
        y0 = F.linear(x, w0, bias)  # W_0 x + b (N, d_out): the base layer's own GEMM, bit-identical to it
        projected = x @ w_lora.t()  # [H | P] (N, E*r + d_q)
        ctx.save_for_backward(x, w0, w_lora)
        h = projected[:, :-d_q]  # H = x A_flat^T (N, E*r), a view
        p = projected[:, -d_q:].contiguous()  # P = W_r x (N, d_q), own storage (the router head saves it)
        return y0, h, p

    @staticmethod
    def backward(ctx, dy0, dh, dp):
        x, w0, w_lora = ctx.saved_tensors
        needs = ctx.needs_input_grad
        d_lora = torch.cat([dh, dp], dim=1)  # [dH | dP]: (N, E*r + d_q)
        dx = dw0 = dbias = dw_lora = None
        if needs[0]:
            dx = dy0 @ w0  # dy W_0: (N, d_in)
            dx.addmm_(d_lora, w_lora)  # + [dH | dP] W_lora, accumulated in place
        if needs[1]:
            dw0 = dy0.t() @ x
        if needs[2]:
            dbias = dy0.sum(dim=0)
        if needs[3]:
            dw_lora = d_lora.t() @ x  # (E*r + d_q, d_in)
        return dx, dw0, dbias, dw_lora, None


class ExpertMix(torch.autograd.Function):
    """(Y_0, H, G, B_t) -> y = Y_0 + (H * G) B_t: the gated experts' B, accumulated into the base output."""

    @staticmethod
    def forward(ctx, y0, h, gates, b_t):
        # y0 (N, d_out), h (N, E*r), gates G (N, E), b_t (E*r, d_out)
        num_experts = gates.shape[1]
        h = h.unflatten(1, (num_experts, -1))  # (N, E, r)
        h_gated = (h * gates[:, :, None]).flatten(1)  # H' (N, E*r)
        ctx.save_for_backward(h.contiguous(), gates, h_gated, b_t)
        return torch.addmm(y0, h_gated, b_t)  # Y_0 + H' B_t: (N, d_out)

    @staticmethod
    def backward(ctx, dy):
        h, gates, h_gated, b_t = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dh = dgates = db_t = None
        if needs[1] or needs[2]:
            dh_gated = (dy @ b_t.t()).unflatten(1, (gates.shape[1], -1))  # dH' (N, E, r)
            if needs[1]:
                dh = (dh_gated * gates[:, :, None]).flatten(1)  # dH = dH' * G: (N, E*r)
            if needs[2]:
                dgates = torch.linalg.vecdot(dh_gated, h)  # dG = sum_r dH' * H: (N, E)
        if needs[3]:
            db_t = h_gated.t() @ dy  # (E*r, d_out)
        return dy if needs[0] else None, dh, dgates, db_t

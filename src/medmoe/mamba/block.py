"""The Mamba-1 mixer (selective SSM block) with a parallel `forward` and a recurrent `step`.

Symbols as in scan.py: b batch, l length, D d_model, d d_inner, N d_state, K d_conv, R dt_rank.
Parameter names match Hugging Face's MambaMixer, so its state dict loads unchanged.

    x, z   = in_proj(hidden)                      (b, l, d) each
    x      = SiLU(causal depthwise conv_K(x))     (b, l, d)
    dt,B,C = x_proj(x)                            (b, l, R), (b, l, N), (b, l, N)
    delta  = softplus(dt_proj(dt))                (b, l, d)
    y      = selective_scan(x, delta, A=-exp(A_log), B, C, D)
    out    = out_proj(y * SiLU(z))                (b, l, D)

On CPU in inference (no gradient, fp32) `forward` runs `_forward_fused`: the conv, SiLU and mask in
one kernel that reads x straight from in_proj's output, and softplus(+bias), the D skip and the
SiLU(z) gate inside the scan kernel (cpu_kernel.py, docs/mamba.md). MEDMOE_MAMBA_FUSED=0, or
`mixer.fused = False`, keeps the unfused path below (which the chunked / reference scans use anyway).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from medmoe.mamba import cpu_kernel
from medmoe.mamba.config import MambaConfig
from medmoe.mamba.scan import selective_scan, selective_state_step


@dataclass
class LayerState:
    """Recurrent state of one mixer: the last K-1 conv inputs and the SSM state. Constant size."""

    conv: torch.Tensor  # (b, K-1, d)  inputs of the causal conv, oldest first
    ssm: torch.Tensor   # (b, d, N)


class MambaMixer(nn.Module):
    def __init__(self, config: MambaConfig):
        super().__init__()
        d, N, R, K = config.d_inner, config.d_state, cast(int, config.dt_rank), config.d_conv  # dt_rank: set by __post_init__
        self.d_inner, self.d_state, self.dt_rank, self.d_conv = d, N, R, K
        self.in_proj = nn.Linear(config.d_model, 2 * d, bias=config.bias)
        self.conv1d = nn.Conv1d(d, d, kernel_size=K, groups=d, padding=K - 1, bias=config.conv_bias)
        self.x_proj = nn.Linear(d, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, d, bias=True)
        # S4D-real initialisation A = -(1..N) per channel; checkpoints overwrite it.
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(d, 1))
        self.D = nn.Parameter(torch.ones(d))
        self.out_proj = nn.Linear(d, config.d_model, bias=config.bias)
        self.scan_backend = "auto"
        self.fused = True  # use the fused CPU inference path when it applies (cpu_kernel.use_fused)

    def new_state(self, batch: int, dtype=torch.float32, device=None) -> LayerState:
        return LayerState(conv=torch.zeros(batch, self.d_conv - 1, self.d_inner, dtype=dtype, device=device),
                          ssm=torch.zeros(batch, self.d_inner, self.d_state, dtype=dtype, device=device))

    def _ssm_inputs(self, x: torch.Tensor):
        """x (..., d) after conv+SiLU -> delta (..., d), B (..., N), C (..., N)."""
        dt, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.softplus(self.dt_proj(dt)), B, C

    def forward(self, hidden: torch.Tensor, state: LayerState | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (b, l, D) -> (b, l, D). With `state`, continues from it and leaves it updated.
        mask (b, l) of 0/1 zeroes padded positions (as Hugging Face does for left padding)."""
        if cpu_kernel.use_fused(self, hidden):
            return self._forward_fused(hidden, state, mask)
        b, l, _ = hidden.shape
        if mask is not None:
            hidden = hidden * mask[..., None].to(hidden.dtype)
        x, z = self.in_proj(hidden).chunk(2, dim=-1)                  # (b, l, d) each
        K = self.d_conv
        w = self.conv1d.weight                                        # (d, 1, K)
        if state is None:
            xc = F.conv1d(x.transpose(1, 2), w, self.conv1d.bias, padding=K - 1, groups=self.d_inner)[..., :l]
        else:
            xin = torch.cat([state.conv, x], dim=1)                   # (b, K-1+l, d)
            xc = F.conv1d(xin.transpose(1, 2), w, self.conv1d.bias, groups=self.d_inner)
            state.conv = xin[:, -(K - 1):].clone() if K > 1 else state.conv
        x = F.silu(xc.transpose(1, 2))                                # (b, l, d)
        if mask is not None:
            x = x * mask[..., None].to(x.dtype)
        delta, B, C = self._ssm_inputs(x)
        A = -torch.exp(self.A_log.float())                            # (d, N)
        y, h = selective_scan(x, delta, A, B[:, :, None], C[:, :, None], self.D,
                              h0=None if state is None else state.ssm, backend=self.scan_backend)
        if state is not None:
            state.ssm = h
        return self.out_proj(y * F.silu(z))

    def _forward_fused(self, hidden: torch.Tensor, state: LayerState | None, mask: torch.Tensor | None) -> torch.Tensor:
        """Same result as the unfused `forward` (tests/test_mamba_fused.py), fewer full-tensor passes:
        in_proj's output is never split into copies, and conv + bias + SiLU + mask, and softplus(dt + bias)
        + scan + D skip + SiLU(z) gate, each run as one kernel pass."""
        d, N, R, K = self.d_inner, self.d_state, self.dt_rank, self.d_conv
        keep = None if mask is None else mask.to(torch.float32)                   # (b, l)
        if keep is not None:
            hidden = hidden * keep[..., None]
        xz = self.in_proj(hidden)                                                 # (b, l, 2d)
        x, z = xz[..., :d], xz[..., d:]                                           # strided views, no copy
        u = cpu_kernel.causal_conv(x, self.conv1d.weight, self.conv1d.bias,
                                   None if state is None else state.conv, keep)   # (b, l, d) = SiLU(conv(x)) * mask
        if state is not None and K > 1:
            state.conv = torch.cat([state.conv, x[:, -(K - 1):]], dim=1)[:, -(K - 1):].contiguous()  # last K-1 inputs
        xdbl = self.x_proj(u)                                                     # (b, l, R + 2N)
        dt = F.linear(xdbl[..., :R], self.dt_proj.weight)                         # (b, l, d), bias added in the kernel
        B, C = xdbl[..., None, R:R + N], xdbl[..., None, R + N:]                  # (b, l, 1, N) views
        A = -torch.exp(self.A_log.float())                                        # (d, N)
        y, h = cpu_kernel.scan_gated(u, dt, self.dt_proj.bias, A, B, C, self.D, z,
                                     h0=None if state is None else state.ssm)     # (b, l, d) = (scan + D u) * SiLU(z)
        if state is not None:
            state.ssm = h
        return self.out_proj(y)

    @torch.no_grad()
    def step(self, hidden: torch.Tensor, state: LayerState) -> torch.Tensor:
        """One token: hidden (b, D) -> (b, D); updates `state` in place. Cost independent of position."""
        x, z = self.in_proj(hidden).chunk(2, dim=-1)                  # (b, d)
        window = torch.cat([state.conv, x[:, None]], dim=1)           # (b, K, d)
        xc = (window * self.conv1d.weight[:, 0].t()).sum(1)           # depthwise conv at the last position
        if self.conv1d.bias is not None:
            xc = xc + self.conv1d.bias
        state.conv = window[:, 1:]
        x = F.silu(xc)
        delta, B, C = self._ssm_inputs(x)
        A = -torch.exp(self.A_log.float())
        y = selective_state_step(state.ssm, x, delta, A, B[:, None], C[:, None], self.D)
        return self.out_proj(y * F.silu(z))


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps) (computed in fp32, as Hugging Face's MambaRMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class MambaLayer(nn.Module):
    """Pre-norm residual block: h + mixer(norm(h))."""

    def __init__(self, config: MambaConfig):
        super().__init__()
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.mixer = MambaMixer(config)

    def forward(self, hidden, state=None, mask=None):
        return hidden + self.mixer(self.norm(hidden), state, mask)

    def step(self, hidden, state):
        return hidden + self.mixer.step(self.norm(hidden), state)

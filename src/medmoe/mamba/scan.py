"""Selective scan (the S6 recurrence of Mamba-1) behind one interface, with swappable backends.

Glossary (Gu & Dao 2023, Algorithm 2; shapes use b batch, l length, d channels, g groups, n state):
    u      (b, l, d)    input x_t of the SSM (after the causal conv and SiLU)
    delta  (b, l, d)    step size Delta_t (already softplus-ed, bias added)
    A      (d, n)       continuous state matrix (diagonal per channel, negative real)
    B, C   (b, l, g, n) input-dependent projections; channel c uses group c // (d // g).
                        Mamba-1 checkpoints have g = 1; transferred attention layers use g = heads.
    D      (d,)         skip connection
    h      (b, d, n)    SSM state

Recurrence (zero-order hold for A, Euler for B), for every channel c and state index k:
    h_t[c, k] = exp(delta_t[c] * A[c, k]) * h_{t-1}[c, k] + delta_t[c] * B_t[k] * u_t[c]
    y_t[c]    = sum_k C_t[k] * h_t[c, k] + D[c] * u_t[c]

Backends (`selective_scan(..., backend=...)`):
    "reference" sequential loop over tokens; the definition, used by tests only.
    "chunked"   pure PyTorch, differentiable. Chunks of `chunk` tokens; inside a chunk the
                recurrence is solved in closed form with cumulative sums of log decays:
                    S_t = A * sum_{s<=t} delta_s            (log of the decay from chunk start)
                    h_t = exp(S_t) * (h_0 + sum_{s<=t} exp(-S_s) * delta_s B_s u_s)
                exp(-S_s) overflows when a chunk's total decay is below exp(-LOG_RANGE); such a
                chunk is solved instead by log-depth doubling (Hillis-Steele), which only
                multiplies decays <= 1 and is always stable. The state is carried between chunks.
    "cpu"       compiled C++ kernel (medmoe.mamba.cpu_kernel): fused sequential scan, one pass,
                no (l, d, n) tensor in memory. Inference only (no autograd); built on first use
                when a C++ compiler is present, otherwise "auto" skips it.
    "cuda"      the official mamba-ssm kernel, when installed and the tensors are on a GPU.
    "auto"      cuda if possible, else cpu kernel when no gradient is needed, else chunked.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.utils.checkpoint

log = logging.getLogger(__name__)

# Largest |S| (natural log of the decay) the cumulative-sum form may see in one chunk in fp32:
# exp(80) = 5.5e34 stays below the fp32 maximum 3.4e38 even after multiplying by |delta*B*u|.
LOG_RANGE = 80.0
BACKENDS = ("auto", "reference", "chunked", "cpu", "cuda")


def _check(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> None:
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"selective_scan: u and delta must both be (b, l, d); got {tuple(u.shape)} and {tuple(delta.shape)}")
    b, l, d = u.shape
    if A.shape[0] != d:
        raise ValueError(f"selective_scan: A must be (d={d}, n); got {tuple(A.shape)}")
    n = A.shape[1]
    if B.dim() != 4 or B.shape[:2] != (b, l) or B.shape[3] != n or C.shape != B.shape:
        raise ValueError(f"selective_scan: B and C must be (b={b}, l={l}, g, n={n}); got {tuple(B.shape)} and {tuple(C.shape)}")
    if d % B.shape[2]:
        raise ValueError(f"selective_scan: channels d={d} not divisible by groups g={B.shape[2]}")


def _expand_groups(X: torch.Tensor, d: int) -> torch.Tensor:
    """(b, l, g, n) -> (b, l, d, n) view: channel c reads group c // (d // g) (no copy when g = 1)."""
    b, l, g, n = X.shape
    return X[:, :, :, None, :].expand(b, l, g, d // g, n).reshape(b, l, d, n) if g > 1 else X.expand(b, l, d, n)


def selective_scan_reference(u, delta, A, B, C, D=None, h0=None):
    """Sequential definition of the recurrence (a Python loop over tokens): tests only.

    Returns y (b, l, d) and the final state h (b, d, n)."""
    _check(u, delta, A, B, C)
    b, l, d = u.shape
    h = u.new_zeros(b, d, A.shape[1]) if h0 is None else h0
    Bd, Cd = _expand_groups(B, d), _expand_groups(C, d)
    ys = []
    for t in range(l):
        h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * u[:, t])[..., None] * Bd[:, t]
        ys.append((h * Cd[:, t]).sum(-1))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + u * D
    return y, h


def _chunk_doubling(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inclusive scan h_t = a_t h_{t-1} + v_t over dim 1 (h_{-1} = 0) in log2(L) steps; stable."""
    L, k = a.shape[1], 1
    while k < L:
        v = torch.cat([v[:, :k], v[:, k:] + a[:, k:] * v[:, :-k]], dim=1)
        a = torch.cat([a[:, :k], a[:, k:] * a[:, :-k]], dim=1)
        k *= 2
    return v


def _contract_C(hs: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """y_t[c] = sum_k C_t[group(c), k] h_t[c, k]: hs (b, L, d, n), C (b, L, g, n) -> (b, L, d)."""
    b, L, d, n = hs.shape
    g = C.shape[2]
    return (hs.view(b, L, g, d // g, n) @ C[..., None]).view(b, L, d)


def _scan_chunk(u, dt, A, B, C, h):
    """One chunk: u, dt (b, L, d); B, C (b, L, g, n); h (b, d, n) -> y (b, L, d) without D, h_last."""
    d = u.shape[2]
    v = (dt * u)[..., None] * _expand_groups(B, d)                    # delta_s B_s u_s  (b, L, d, n)
    S = dt.cumsum(1)[..., None] * A                                   # S_t = A sum delta  (b, L, d, n), <= 0
    if float(S[:, -1].detach().min()) > -LOG_RANGE:                   # closed form is safe in fp32
        hs = torch.exp(S) * (torch.cumsum(v * torch.exp(-S), dim=1) + h[:, None])
    else:                                                             # strong decay: stable doubling
        v = torch.cat([v[:, :1] + torch.exp(dt[:, :1, :, None] * A) * h[:, None], v[:, 1:]], dim=1)
        hs = _chunk_doubling(torch.exp(dt[..., None] * A), v)
    return _contract_C(hs, C), hs[:, -1].clone()  # clone: a view would keep all of hs alive


def selective_scan_chunked(u, delta, A, B, C, D=None, h0=None, chunk: int = 32):
    """Differentiable chunked scan (see module docstring). Returns y (b, l, d), h_last (b, d, n).

    Under autograd each chunk is recomputed in the backward pass (activation checkpointing), so
    training memory is O(l d) for the inputs instead of O(l d n) for every chunk's states."""
    _check(u, delta, A, B, C)
    b, l, d = u.shape
    h = u.new_zeros(b, d, A.shape[1]) if h0 is None else h0
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (u, delta, A, B, C, h0))
    ys = []
    for s in range(0, l, chunk):
        args = (u[:, s:s + chunk], delta[:, s:s + chunk], A, B[:, s:s + chunk], C[:, s:s + chunk], h)
        if grad:
            y_c, h = torch.utils.checkpoint.checkpoint(_scan_chunk, *args, use_reentrant=False)
        else:
            y_c, h = _scan_chunk(*args)
        ys.append(y_c)
    y = torch.cat(ys, dim=1)
    if D is not None:
        y = y + u * D
    return y, h


@functools.lru_cache(maxsize=1)
def _mamba_ssm_fn():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # not installed, or installed without a usable CUDA build
        return None
    return selective_scan_fn


def _scan_cuda(u, delta, A, B, C, D, h0):
    """mamba-ssm layout: u, delta (b, d, l); B, C (b, g, n, l). No initial state support."""
    fn = _mamba_ssm_fn()
    y, h = fn(u.transpose(1, 2).contiguous(), delta.transpose(1, 2).contiguous(), A.contiguous(),
              B.permute(0, 2, 3, 1).contiguous(), C.permute(0, 2, 3, 1).contiguous(),
              D.float() if D is not None else None, return_last_state=True)
    return y.transpose(1, 2), h


def selective_scan(u, delta, A, B, C, D=None, h0=None, backend: str = "auto", chunk: int = 32):
    """Run the selective scan. Returns y (b, l, d) and the final state h (b, d, n)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown selective-scan backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, h0))
    if backend == "auto":
        if u.is_cuda and h0 is None and _mamba_ssm_fn() is not None:
            backend = "cuda"
        elif u.device.type == "cpu" and not needs_grad and u.dtype == torch.float32:
            from medmoe.mamba import cpu_kernel
            backend = "cpu" if cpu_kernel.available() else "chunked"
        else:
            backend = "chunked"
    if backend == "reference":
        return selective_scan_reference(u, delta, A, B, C, D, h0)
    if backend == "chunked":
        return selective_scan_chunked(u, delta, A, B, C, D, h0, chunk=chunk)
    if backend == "cuda":
        return _scan_cuda(u, delta, A, B, C, D, h0)
    from medmoe.mamba import cpu_kernel
    _check(u, delta, A, B, C)
    return cpu_kernel.scan(u, delta, A, B, C, D, h0)


def selective_state_step(h, u, delta, A, B, C, D=None):
    """One token of the recurrence, in place on h (b, d, n). u, delta (b, d); B, C (b, g, n) -> y (b, d)."""
    b, d = u.shape
    g, n = B.shape[1], B.shape[2]
    hg = h.view(b, g, d // g, n)
    hg.mul_(torch.exp(delta[..., None] * A).view(b, g, d // g, n))
    hg.add_((delta * u).view(b, g, d // g, 1) * B[:, :, None, :])   # delta B u
    y = (hg @ C[..., None]).view(b, d)                                # sum_k C h
    return y + u * D if D is not None else y

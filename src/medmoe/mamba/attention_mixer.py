"""`AttentionMamba`: a selective-SSM mixer shaped like the Llama attention it replaces.

Linear attention is the selective SSM with B = key, C = query, x = value and no decay. Per query head
h (H heads of width P, with GQA kv head g(h) = h // (H / H_kv)) and state h_t in R^{P x P}:

    x_t[h, :]  = W_V[g(h)] u_t                   (value, repeated to every query head of its group)
    B_t[h, :]  = W_K[g(h)] u_t                   (key)      -> N = P state entries per channel
    C_t[h, :]  = W_Q[h] u_t / sqrt(P)            (query, softmax temperature folded in)
    delta_t    = softplus(W_dt2 W_dt1 u_t + b)   (new: the selective step size, per channel)
    h_t        = exp(delta_t A) h_{t-1} + delta_t B_t x_t ,   y_t = C_t h_t + D x_t
    out_t      = W_O y_t                         (output projection)

with d_inner = H * P channels and B, C in H groups. New parameters: A = -1 everywhere (every key
dimension decays alike; dt sets the time scale, 10 to 1,000 tokens at init), D = 0 (attention has no
skip), a width-K causal conv on x initialised to the identity. RoPE is dropped (the scan is ordered).
No output gate. `medmoe.mamba.transfer` initialises one from a teacher's attention weights.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from medmoe.errors import ModelError
from medmoe.mamba import cpu_kernel
from medmoe.mamba.block import LayerState
from medmoe.mamba.hybrid_cache import HybridCache
from medmoe.mamba.scan import selective_scan


class AttentionMamba(nn.Module):
    """Drop-in replacement of a Llama attention module: same call signature, returns (output, None)."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, d_conv: int = 4,
                 dt_rank: int | None = None, bias: bool = False):
        super().__init__()
        if heads % kv_heads:
            raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
        self.heads, self.kv_heads, self.head_dim, self.d_conv = heads, kv_heads, head_dim, d_conv
        self.d_inner = heads * head_dim
        self.dt_rank = dt_rank or math.ceil(hidden / 16)
        self.x_proj = nn.Linear(hidden, kv_heads * head_dim, bias=bias)      # from V
        self.B_proj = nn.Linear(hidden, kv_heads * head_dim, bias=bias)      # from K
        self.C_proj = nn.Linear(hidden, heads * head_dim, bias=bias)         # from Q
        self.out_proj = nn.Linear(heads * head_dim, hidden, bias=bias)       # from O
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1)
        self.dt_in = nn.Linear(hidden, self.dt_rank, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.zeros(self.d_inner, head_dim))       # A = -exp(0) = -1
        self.D = nn.Parameter(torch.zeros(self.d_inner))
        self.scan_backend = "auto"
        self.fused = True         # fused CPU inference kernels when they apply (cpu_kernel.use_fused)
        self.layer_idx = 0        # position in the student's decoder, set by _apply_spec
        self.is_recurrent = True  # tells the harness not to reuse cropped caches (PrefixCache)
        self._init_new_parameters()

    @torch.no_grad()
    def _init_new_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
        self.conv1d.weight.zero_()
        self.conv1d.weight[:, 0, -1] = 1.0                                   # identity: x_t passes through
        cast(torch.Tensor, self.conv1d.bias).zero_()  # built with bias=True
        nn.init.uniform_(self.dt_in.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        nn.init.uniform_(self.dt_proj.weight, -1e-3, 1e-3)                   # dt starts input-independent
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))           # softplus^{-1}(dt)

    @classmethod
    def from_attention(cls, attn: Any, config) -> AttentionMamba:  # a Llama-family attention module (q/k/v/o_proj)
        heads, kv = config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        mixer = cls(config.hidden_size, heads, kv, head_dim, bias=attn.q_proj.bias is not None)
        with torch.no_grad():
            for ours, theirs, scale in ((mixer.x_proj, attn.v_proj, 1.0), (mixer.B_proj, attn.k_proj, 1.0),
                                        (mixer.C_proj, attn.q_proj, head_dim ** -0.5), (mixer.out_proj, attn.o_proj, 1.0)):
                ours.weight.copy_(theirs.weight * scale)
                if theirs.bias is not None:
                    ours.bias.copy_(theirs.bias * scale)
        return mixer.to(attn.q_proj.weight.dtype)

    def _per_head(self, t: torch.Tensor) -> torch.Tensor:
        """(b, l, H_kv * P) -> (b, l, H, P): each kv head repeated for the query heads that share it."""
        b, l, _ = t.shape
        return t.view(b, l, self.kv_heads, 1, self.head_dim).expand(
            b, l, self.kv_heads, self.heads // self.kv_heads, self.head_dim).reshape(b, l, self.heads, self.head_dim)

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs):
        """hidden (b, l, D) -> ((b, l, D), None), like the attention it replaces.

        With a `HybridCache` (passed by the decoder layer as `cache`, or `past_key_values` before
        transformers 5.24) the mixer continues from its recurrent state there and leaves the new one:
        decoding costs the same at every position. Left padding (read from the 4D attention mask) is
        exact: padded positions get u = 0, so the state stays zero until the first real token."""
        b, l, _ = hidden_states.shape
        K = self.d_conv
        cache = _hybrid_cache(kwargs)
        state = cache.recurrent_state(self.layer_idx, b) if cache is not None else None
        x = self._per_head(self.x_proj(hidden_states)).reshape(b, l, self.d_inner)   # (b, l, d)
        keep = key_padding(attention_mask, l)                                         # (b, l) or None
        if keep is not None:
            x = x * keep[..., None]
        fused = cpu_kernel.use_fused(self, hidden_states)
        history = state.conv if state is not None else x.new_zeros(b, K - 1, self.d_inner)
        if fused:  # conv + bias + mask in one kernel pass, straight from x and the state
            u = cpu_kernel.causal_conv(x, self.conv1d.weight, self.conv1d.bias, history, keep, silu=False)
        else:
            conv_in = torch.cat([history, x], dim=1)                                  # (b, K-1+l, d)
            u = F.conv1d(conv_in.transpose(1, 2), self.conv1d.weight, self.conv1d.bias,
                         groups=self.d_inner).transpose(1, 2)                         # (b, l, d)
            if keep is not None:
                u = u * keep[..., None]
        B = self._per_head(self.B_proj(hidden_states))                               # (b, l, H, P)
        C = self.C_proj(hidden_states).view(b, l, self.heads, self.head_dim)         # (b, l, H, P)
        A = -torch.exp(self.A_log.float())                                           # (d, P)
        h0 = None if state is None else state.ssm
        if fused:  # softplus(dt + bias) inside the scan kernel
            dt = F.linear(self.dt_in(hidden_states), self.dt_proj.weight)            # (b, l, d), no bias
            y, h = cpu_kernel.scan_gated(u, dt, self.dt_proj.bias, A, B, C, self.D, None, h0)
        else:
            delta = F.softplus(self.dt_proj(self.dt_in(hidden_states)))              # (b, l, d)
            y, h = selective_scan(u, delta, A, B, C, self.D, h0=h0, backend=self.scan_backend)
        if cache is not None:
            conv_tail = torch.cat([history, x[:, -(K - 1):]], dim=1)[:, -(K - 1):]     # last K-1 conv inputs
            cache.store_recurrent(self.layer_idx, LayerState(conv=conv_tail, ssm=h), new_tokens=l)
        return self.out_proj(y), None


def _hybrid_cache(kwargs: dict) -> HybridCache | None:
    """The cache the decoder layer passed (under either of transformers' names), which must be a
    HybridCache: any other cache has no place for the recurrent state, and continuing from it would
    silently restart every mixer from zero."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None or isinstance(cache, HybridCache):
        return cache
    raise ModelError(f"a Mamba hybrid decodes with medmoe's HybridCache, not {type(cache).__name__}: load it with "
                     "medmoe (MambaHybridForCausalLM makes its own cache) or pass use_cache=False")


def key_padding(attention_mask, length: int) -> torch.Tensor | None:
    """(b, l) 1.0 at real tokens, 0.0 at padding, from the 4D mask HF gives attention layers.

    A real token always attends to itself and a padded one never does, so the diagonal of the last
    `length` key columns is the padding mask. None when there is no mask (no padding)."""
    if attention_mask is None or attention_mask.dim() != 4:
        return None
    m = attention_mask[:, 0, -length:, -length:].diagonal(dim1=-2, dim2=-1)         # (b, l)
    keep = m if m.dtype == torch.bool else m == 0                                   # float masks: 0 = attend
    return keep.to(torch.float32) if not keep.all() else None

"""Fused CPU inference kernels of the Mamba mixer, compiled on first use with torch's C++ extension loader.

Why: the chunked PyTorch scan materialises (L, d, n) tensors and walks them several times, so it is
bound by memory traffic. This kernel keeps a block of channels' states (64 channels x n floats) in
L1 cache and walks the tokens once, fusing exp(delta*A), the state update and the C contraction:
for 2,048 tokens x 1,536 channels x 16 states it does 50 M exp+FMA per layer in one pass.
Channels are split over torch's intra-op threads (at::parallel_for). Inside a block one vector lane
holds one channel, so the C contraction needs no horizontal sums, and exp is an inlined polynomial
that vectorises in place. Wider blocks give the out-of-order core more independent work per token
(reports/mamba_speed.md has the prefill times this gives).

Two kernels (MambaMixer._forward_fused uses both; docs/mamba.md lists what each fuses):
    scan_forward   the scan, optionally with softplus(dt + dt_bias) on the way in and the D skip and
                   the SiLU(z) gate on the way out; B, C and z may be strided views (`scan`, `scan_gated`).
    causal_conv    causal depthwise conv + bias (+ SiLU) (+ 0/1 mask) reading x in place from a wider
                   tensor, with an optional conv state for continuing a sequence (`causal_conv`).

The scan computes the same recurrence as `scan.selective_scan_reference` (see scan.py), forward only.
Built by medmoe.native (g++ and ninja; cached in $TORCH_EXTENSIONS_DIR). When the build fails,
`available()` returns False and the chunked PyTorch scan is used. Set MEDMOE_MAMBA_CPU_KERNEL=0 to disable.
"""

from __future__ import annotations

import os

import torch

from medmoe import native

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

// Selective scan, forward only, fp32. Channels are processed in blocks of W = 64 (one vector lane per
// channel, so the C contraction needs no horizontal sums); the block's states h[k][lane] stay in L1.
//   u (b, l, d) contiguous; dt (b, l, d) contiguous: Delta before the optional bias + softplus;
//   dt_bias (d) or empty; A (d, n); B, C (b, l, g, n), any strides with the last one 1;
//   D (d) or empty; z (b, l, d) with last stride 1, or empty (then no output gate);
//   h (b, d, n) contiguous, the initial state, updated in place.
// Per channel c (group gc) and state k:
//   delta = softplus(dt + dt_bias)   (when softplus, else dt + dt_bias)
//   h[c,k] = exp(delta A[c,k]) h[c,k] + delta u[c] B[gc,k];   y[c] = sum_k C[gc,k] h[c,k] + D[c] u[c]
//   y[c] *= z[c] sigmoid(z[c])       (when z is given)
constexpr int64_t W = 64;

// exp(x), inlined so the compiler vectorises it in place (libmvec's expf is an out-of-line call that
// spills the loop's registers). x is clamped to [-87, 88] (here
// x = delta * A <= 0, and exp(-87) ~ 1.6e-38 is 0 for the state update).
//   exp(x) = 2^(x log2 e) = 2^j * 2^f,  j = round(x log2 e),  f in [-0.5, 0.5)
// 2^f by Cephes' degree-6 polynomial (relative error ~2e-7); 2^j is written into the exponent bits.
static inline float fast_exp(float x) {
  x = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
  const float t = x * 1.44269504088896341f;
  const float j = std::floor(t + 0.5f);
  const float f = t - j;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(j) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  return p * scale;
}

static inline float softplus(float x) { return x > 20.f ? x : std::log1p(std::exp(x)); }

torch::Tensor scan_forward(torch::Tensor u, torch::Tensor dt, torch::Tensor dt_bias, bool use_softplus,
                           torch::Tensor A, torch::Tensor B, torch::Tensor C, torch::Tensor D,
                           torch::Tensor z, torch::Tensor h) {
  const int64_t b = u.size(0), l = u.size(1), d = u.size(2), n = A.size(1), g = B.size(2);
  const int64_t per_group = d / g, nsub = (per_group + W - 1) / W;
  TORCH_CHECK(u.is_contiguous() && dt.is_contiguous() && A.is_contiguous() && h.is_contiguous(),
              "scan_forward: u, dt, A and h must be contiguous");
  TORCH_CHECK(B.stride(3) == 1 && C.stride(3) == 1 && (!z.numel() || z.stride(2) == 1),
              "scan_forward: B, C and z need a contiguous last dimension");
  auto y = torch::empty({b, l, d}, u.options());
  const float* pu = u.data_ptr<float>();
  const float* pdt = dt.data_ptr<float>();
  const float* pbias = dt_bias.numel() ? dt_bias.data_ptr<float>() : nullptr;
  const float* pA = A.data_ptr<float>();
  const float* pB = B.data_ptr<float>();
  const float* pC = C.data_ptr<float>();
  const int64_t sBb = B.stride(0), sBl = B.stride(1), sBg = B.stride(2);
  const int64_t sCb = C.stride(0), sCl = C.stride(1), sCg = C.stride(2);
  const float* pD = D.numel() ? D.data_ptr<float>() : nullptr;
  const float* pz = z.numel() ? z.data_ptr<float>() : nullptr;
  const int64_t szb = z.numel() ? z.stride(0) : 0, szl = z.numel() ? z.stride(1) : 0;
  float* ph = h.data_ptr<float>();
  float* py = y.data_ptr<float>();
  at::parallel_for(0, b * g * nsub, 1, [&](int64_t start, int64_t end) {
    std::vector<float> Aloc(n * W), hloc(n * W);   // [k][lane]
    alignas(64) float bias[W], Dv[W], raw[W], uv[W], dtv[W], dtu[W], acc[W];
    for (int64_t item = start; item < end; ++item) {
      const int64_t bi = item / (g * nsub), gi = (item / nsub) % g, sub = item % nsub;
      const int64_t c0 = gi * per_group + sub * W;
      const int64_t w = std::min(W, per_group - sub * W);  // live lanes; the rest are zero padding
      float* hb = ph + (bi * d + c0) * n;
      for (int64_t i = 0; i < W; ++i) {
        bias[i] = (i < w && pbias) ? pbias[c0 + i] : 0.f;
        Dv[i] = (i < w && pD) ? pD[c0 + i] : 0.f;
        raw[i] = uv[i] = 0.f;
        for (int64_t k = 0; k < n; ++k) {
          Aloc[k * W + i] = i < w ? pA[(c0 + i) * n + k] : 0.f;
          hloc[k * W + i] = i < w ? hb[i * n + k] : 0.f;
        }
      }
      for (int64_t t = 0; t < l; ++t) {
        const int64_t row = (bi * l + t) * d + c0;
        for (int64_t i = 0; i < w; ++i) { uv[i] = pu[row + i]; raw[i] = pdt[row + i]; }
#pragma omp simd
        for (int64_t i = 0; i < W; ++i) {
          const float delta = use_softplus ? softplus(raw[i] + bias[i]) : raw[i] + bias[i];
          dtv[i] = delta;
          dtu[i] = delta * uv[i];
          acc[i] = Dv[i] * uv[i];
        }
        const float* Bt = pB + bi * sBb + t * sBl + gi * sBg;
        const float* Ct = pC + bi * sCb + t * sCl + gi * sCg;
        for (int64_t k = 0; k < n; ++k) {
          const float Bk = Bt[k], Ck = Ct[k];
          float* hk = hloc.data() + k * W;
          const float* Ak = Aloc.data() + k * W;
#pragma omp simd
          for (int64_t i = 0; i < W; ++i) {
            const float hv = fast_exp(dtv[i] * Ak[i]) * hk[i] + dtu[i] * Bk;
            hk[i] = hv;
            acc[i] += hv * Ck;
          }
        }
        float* yt = py + row;
        if (pz) {
          const float* zt = pz + bi * szb + t * szl + c0;
          for (int64_t i = 0; i < w; ++i) yt[i] = acc[i] * (zt[i] / (1.f + std::exp(-zt[i])));
        } else {
          for (int64_t i = 0; i < w; ++i) yt[i] = acc[i];
        }
      }
      for (int64_t i = 0; i < w; ++i)
        for (int64_t k = 0; k < n; ++k) hb[i * n + k] = hloc[k * W + i];
    }
  });
  return y;
}

// Causal depthwise conv of width K + bias (+ SiLU) (+ optional 0/1 mask), one pass:
//   out[t, c] = SiLU(bias[c] + sum_j w[j, c] X[t - (K-1) + j, c]) * mask[t]   (no SiLU when !silu)
// X[s] = x[s] for s >= 0, else state[K-1+s] (the previous call's last K-1 inputs) or 0.
//   x (b, l, d) with last stride 1 (e.g. a slice of in_proj's output); w (K, d) contiguous;
//   bias (d) or empty; state (b, K-1, d) contiguous or empty; mask (b, l) contiguous or empty.
torch::Tensor causal_conv(torch::Tensor x, torch::Tensor w, torch::Tensor bias, torch::Tensor state,
                          torch::Tensor mask, bool silu) {
  const int64_t b = x.size(0), l = x.size(1), d = x.size(2), K = w.size(0);
  const int64_t sxb = x.stride(0), sxl = x.stride(1);
  TORCH_CHECK(x.stride(2) == 1 && w.is_contiguous(), "causal_conv: x needs a contiguous last dimension, w (K, d)");
  auto out = torch::empty({b, l, d}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const float* px = x.data_ptr<float>();
  const float* pw = w.data_ptr<float>();
  const float* pbias = bias.numel() ? bias.data_ptr<float>() : nullptr;
  const float* pst = state.numel() ? state.data_ptr<float>() : nullptr;
  const float* pm = mask.numel() ? mask.data_ptr<float>() : nullptr;
  float* po = out.data_ptr<float>();
  std::vector<float> zeros(d, 0.f);
  at::parallel_for(0, b * l, 16, [&](int64_t start, int64_t end) {
    std::vector<const float*> rows(K);
    for (int64_t r = start; r < end; ++r) {
      const int64_t bi = r / l, t = r % l;
      for (int64_t j = 0; j < K; ++j) {
        const int64_t s = t - (K - 1) + j;
        rows[j] = s >= 0 ? px + bi * sxb + s * sxl
                         : (pst ? pst + (bi * (K - 1) + (K - 1 + s)) * d : zeros.data());
      }
      const float m = pm ? pm[r] : 1.f;
      float* o = po + r * d;
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) o[c] = pbias ? pbias[c] : 0.f;
      for (int64_t j = 0; j < K; ++j) {
        const float* xr = rows[j];
        const float* wj = pw + j * d;
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) o[c] += wj[c] * xr[c];
      }
      if (silu) {
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) o[c] = m * o[c] / (1.f + std::exp(-o[c]));
      } else if (pm) {
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) o[c] *= m;
      }
    }
  });
  return out;
}






PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("scan_forward", &scan_forward);
  m.def("causal_conv", &causal_conv);
}
"""

def _module():
    return native.build("medmoe_selective_scan_v3", _SOURCE, "MEDMOE_MAMBA_CPU_KERNEL", "the chunked PyTorch scan")


def available() -> bool:
    """True when the kernel is built (building it now if needed) and usable."""
    return _module() is not None


def use_fused(mixer: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether `mixer` (MambaMixer or AttentionMamba) should take its fused inference path for input x:
    CPU, fp32, no gradient wanted, scan backend auto/cpu, `mixer.fused` set, MEDMOE_MAMBA_FUSED not 0,
    and the kernel built. Otherwise the mixer runs its unfused sequence of PyTorch ops."""
    return (getattr(mixer, "fused", True) and getattr(mixer, "scan_backend", "auto") in ("auto", "cpu")
            and x.device.type == "cpu" and x.dtype == torch.float32
            and all(p.dtype == torch.float32 for p in mixer.parameters())
            and not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in mixer.parameters())))
            and os.environ.get("MEDMOE_MAMBA_FUSED", "1") != "0" and available())


def _f32(t: torch.Tensor | None) -> torch.Tensor:
    """fp32, detached, contiguous; None -> an empty tensor (the kernels' "absent")."""
    return torch.empty(0) if t is None else t.detach().float().contiguous()


def _rows(t: torch.Tensor) -> torch.Tensor:
    """fp32 and detached, any strides as long as the last dimension is contiguous (no copy then)."""
    t = t.detach().float()
    return t if t.stride(-1) == 1 else t.contiguous()


def _module_or_raise():
    mod = _module()
    if mod is None:
        raise RuntimeError("the fused CPU selective-scan kernel is not available; use backend='chunked'")
    return mod


def scan(u, delta, A, B, C, D=None, h0=None):
    """Forward-only fused scan (fp32, CPU). Same contract as scan.selective_scan: returns (y, h)."""
    mod = _module_or_raise()
    b, _, d = u.shape
    h = torch.zeros(b, d, A.shape[1]) if h0 is None else h0.detach().float().clone().contiguous()
    empty = torch.empty(0)
    y = mod.scan_forward(_f32(u), _f32(delta), empty, False, _f32(A), _rows(B), _rows(C), _f32(D), empty, h)
    return y.to(u.dtype), h.to(u.dtype)


def scan_gated(u, dt, dt_bias, A, B, C, D=None, z=None, h0=None):
    """The scan with the elementwise work around it fused in (fp32, CPU, forward only):

        delta = softplus(dt + dt_bias)                       dt (b, l, d): dt_proj's matmul without bias
        y     = selective_scan(u, delta, A, B, C, D) * SiLU(z)   (no gate when z is None)

    u (b, l, d); B, C (b, l, g, n) and z (b, l, d) may be strided views (e.g. slices of x_proj's
    and in_proj's outputs) as long as the last dimension is contiguous. Returns y (b, l, d), h (b, d, n)."""
    mod = _module_or_raise()
    b, _, d = u.shape
    h = torch.zeros(b, d, A.shape[1]) if h0 is None else h0.detach().float().clone().contiguous()
    y = mod.scan_forward(_f32(u), _f32(dt), _f32(dt_bias), True, _f32(A), _rows(B), _rows(C), _f32(D),
                         torch.empty(0) if z is None else _rows(z), h)
    return y, h


def causal_conv(x, weight, bias=None, state=None, mask=None, silu: bool = True):
    """Causal depthwise conv of width K, + bias, then SiLU, then times mask, in one pass (fp32, CPU):

        out_t = SiLU(bias + sum_j weight[:, 0, j] * x_{t-(K-1)+j}) * mask_t

    x (b, l, d) may be a strided view (a slice of in_proj's output); weight (d, 1, K) as nn.Conv1d's;
    state (b, K-1, d): the K-1 inputs before x (zeros when None); mask (b, l) of 0/1 or None.
    Returns out (b, l, d), contiguous. Equals F.conv1d(cat(state, x)) + bias -> SiLU -> * mask."""
    mod = _module_or_raise()
    w = weight.detach().float()[:, 0].t().contiguous()                          # (K, d)
    return mod.causal_conv(_rows(x), w, _f32(bias), _f32(state), _f32(mask), silu)

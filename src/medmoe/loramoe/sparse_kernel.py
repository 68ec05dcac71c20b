"""Sparse top-k LoRA-MoE experts on CPU: a C++ kernel that computes only the experts each token is routed to.

The dense form (fused.py) computes all E experts' A x and masks the unselected ones with zero gates:
one rank-(E*r) LoRA, so its cost grows with E. This kernel touches only the k selected experts per
token, so its cost is that of a rank-(k*r) LoRA whatever E is. Forward, per token n and slot s
(e = top_i[n, s], G the scaled gates):

    h[n, s] = A_e x_n  (r)              y_n += sum_s G[n, s] B_e h[n, s]         (y_n starts as W_0 x_n + b)

Backward, from dy (hand-written; docs/loramoe.md, "Computation"):

    u = B_e^T dy_n    dG[n, s] = u . h[n, s]    dh = G[n, s] u    dx_n = sum_s A_e^T dh
    dA_e = sum_{(n, s) routed to e} dh x_n^T                      dB_e = sum_{(n, s) routed to e} dy_n (G h)^T

Per-token work runs in parallel over tokens; dA and dB, sums over each expert's tokens, run in
parallel over (expert, column block) tasks, so no two threads write the same memory and no
per-thread copies are needed. Built by medmoe.native; `available()` is False without a compiler,
and MEDMOE_LORAMOE_SPARSE_KERNEL=0 disables it (compute="auto" then uses the dense form).
"""

from __future__ import annotations

import torch

from medmoe import native

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <vector>

// Sparse top-k LoRA-MoE on CPU, fp32: only the k experts each token is routed to are computed.
// Vectors of 16 floats (GCC vector extensions: one AVX-512 register, two AVX2 ones). Loops over
// tokens and over (expert, column block) tasks run on torch's intra-op threads (at::parallel_for).
typedef float vf __attribute__((vector_size(64)));
typedef float vfu __attribute__((vector_size(64), aligned(4)));
constexpr int64_t L = 16;
static inline vf load(const float* p) { return *reinterpret_cast<const vfu*>(p); }
static inline void store(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
static inline float hsum(vf v) { float s = 0.f; for (int l = 0; l < L; ++l) s += v[l]; return s; }

// out[j] = rows[j * ld : j * ld + n] . v, for j < R (R independent accumulators: no dependency chain)
template <int R>
static inline void dots(const float* rows, int64_t ld, const float* v, int64_t n, float* out) {
  vf acc[R];
  for (int j = 0; j < R; ++j) acc[j] = vf{};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    const vf xv = load(v + i);
    for (int j = 0; j < R; ++j) acc[j] += load(rows + j * ld + i) * xv;
  }
  for (int j = 0; j < R; ++j) {
    float s = hsum(acc[j]);
    for (int64_t t = i; t < n; ++t) s += rows[j * ld + t] * v[t];
    out[j] = s;
  }
}

// out[j] = rows[j] . v for j < r, in groups of 8 rows
static void dots_any(const float* rows, int64_t ld, const float* v, int64_t n, int64_t r, float* out) {
  int64_t j = 0;
  for (; j + 8 <= r; j += 8) dots<8>(rows + j * ld, ld, v, n, out + j);
  const float* rj = rows + j * ld; float* oj = out + j;
  switch (r - j) {
    case 1: dots<1>(rj, ld, v, n, oj); break; case 2: dots<2>(rj, ld, v, n, oj); break;
    case 3: dots<3>(rj, ld, v, n, oj); break; case 4: dots<4>(rj, ld, v, n, oj); break;
    case 5: dots<5>(rj, ld, v, n, oj); break; case 6: dots<6>(rj, ld, v, n, oj); break;
    case 7: dots<7>(rj, ld, v, n, oj); break; default: break;
  }
}

// out[0:n] = (accumulate ? out : 0) + sum_q c[q] * rows[q][0:n]: V vectors of columns at a time (V chains)
static void combine_rows(float* out, const float* const* rows, const float* c, int64_t Q, int64_t n, bool accumulate) {
  constexpr int V = 8;
  int64_t i = 0;
  for (; i + V * L <= n; i += V * L) {
    vf acc[V];
    for (int v = 0; v < V; ++v) acc[v] = accumulate ? load(out + i + v * L) : vf{};
    for (int64_t q = 0; q < Q; ++q) {
      const float cq = c[q]; const float* rq = rows[q] + i;
      for (int v = 0; v < V; ++v) acc[v] += cq * load(rq + v * L);
    }
    for (int v = 0; v < V; ++v) store(out + i + v * L, acc[v]);
  }
  for (; i + L <= n; i += L) {
    vf acc = accumulate ? load(out + i) : vf{};
    for (int64_t q = 0; q < Q; ++q) acc += c[q] * load(rows[q] + i);
    store(out + i, acc);
  }
  for (; i < n; ++i) {
    float acc = accumulate ? out[i] : 0.f;
    for (int64_t q = 0; q < Q; ++q) acc += c[q] * rows[q][i];
    out[i] = acc;
  }
}

// out (R rows of width ld, columns [i0, i0 + V*L)) = sum over pairs p of coef[p*r + j] * src[row(p)][i0 ...]
template <int R, int V>
static void outer_block(float* out, int64_t ld, const float* coef, int64_t r, const float* src, int64_t ld_src,
                        const int64_t* pairs, int64_t n_pairs, int64_t K, int64_t i0) {
  vf acc[R][V];
  for (int j = 0; j < R; ++j) for (int v = 0; v < V; ++v) acc[j][v] = vf{};
  for (int64_t q = 0; q < n_pairs; ++q) {
    const int64_t p = pairs[q];
    const float* s = src + (p / K) * ld_src + i0;
    vf sv[V];
    for (int v = 0; v < V; ++v) sv[v] = load(s + v * L);
    const float* cp = coef + p * r;
    for (int j = 0; j < R; ++j) { const float cj = cp[j]; for (int v = 0; v < V; ++v) acc[j][v] += cj * sv[v]; }
  }
  for (int j = 0; j < R; ++j) for (int v = 0; v < V; ++v) store(out + j * ld + i0 + v * L, acc[j][v]);
}

// Forward. x (N, d_in); a (E, r, d_in) = A; bt (E, r, d_out): bt[e, j] = column j of B_e; top_i (N, k) int64;
// gates (N, k) = G; y (N, d_out) updated in place; h (N, k, r) written.
//   h[n,s] = A_e x_n        y_n += sum_s G[n,s] B_e h[n,s]        (e = top_i[n,s])
static void check(const torch::Tensor& t, torch::ScalarType type, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == type && t.is_contiguous(),
              "sparse LoRA-MoE kernel: ", name, " must be a contiguous CPU tensor of ", c10::toString(type));
}

static void check_inputs(const torch::Tensor& x, const torch::Tensor& a, const torch::Tensor& bt,
                         const torch::Tensor& top_i, const torch::Tensor& gates) {
  check(x, torch::kFloat, "x"); check(a, torch::kFloat, "A"); check(bt, torch::kFloat, "B_t");
  check(top_i, torch::kLong, "top_i"); check(gates, torch::kFloat, "gates");
  TORCH_CHECK(a.size(0) == bt.size(0) && a.size(1) == bt.size(1) && a.size(2) == x.size(1) &&
              top_i.sizes() == gates.sizes() && top_i.size(0) == x.size(0), "sparse LoRA-MoE kernel: shapes disagree");
  if (top_i.numel()) {
    const auto range = top_i.aminmax();
    TORCH_CHECK(std::get<0>(range).item<int64_t>() >= 0 && std::get<1>(range).item<int64_t>() < a.size(0),
                "sparse LoRA-MoE kernel: expert index out of range");
  }
}

void sparse_forward(torch::Tensor x, torch::Tensor a, torch::Tensor bt, torch::Tensor top_i,
                    torch::Tensor gates, torch::Tensor y, torch::Tensor h) {
  check_inputs(x, a, bt, top_i, gates); check(y, torch::kFloat, "y"); check(h, torch::kFloat, "h");
  const int64_t N = x.size(0), din = x.size(1), r = a.size(1), dout = bt.size(2), K = top_i.size(1);
  const float* X = x.data_ptr<float>(); const float* A = a.data_ptr<float>(); const float* Bt = bt.data_ptr<float>();
  const int64_t* T = top_i.data_ptr<int64_t>(); const float* G = gates.data_ptr<float>();
  float* Y = y.data_ptr<float>(); float* H = h.data_ptr<float>();
  at::parallel_for(0, N, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> c(K * r); std::vector<const float*> rows(K * r);
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t s = 0; s < K; ++s) {
        const int64_t e = T[n * K + s];
        float* hs = H + (n * K + s) * r;
        dots_any(A + e * r * din, din, X + n * din, din, r, hs);
        for (int64_t j = 0; j < r; ++j) { c[s * r + j] = G[n * K + s] * hs[j]; rows[s * r + j] = Bt + (e * r + j) * dout; }
      }
      combine_rows(Y + n * dout, rows.data(), c.data(), K * r, dout, true);
    }
  });
}

template <int R>
static void outer_rows(float* o, int64_t ld, const float* cf, int64_t r, const float* src, const int64_t* pairs,
                       int64_t n_pairs, int64_t K, int64_t i0, int64_t w) {
  if (w == 32) { outer_block<R, 2>(o, ld, cf, r, src, ld, pairs, n_pairs, K, i0); return; }
  if (w == 16) { outer_block<R, 1>(o, ld, cf, r, src, ld, pairs, n_pairs, K, i0); return; }
  for (int64_t j = 0; j < R; ++j)  // the last columns (w < 16)
    for (int64_t i = i0; i < i0 + w; ++i) {
      float acc = 0.f;
      for (int64_t q = 0; q < n_pairs; ++q) acc += cf[pairs[q] * r + j] * src[(pairs[q] / K) * ld + i];
      o[j * ld + i] = acc;
    }
}

// Rows j0 .. j0 + min(8, r - j0) of out, columns [i0, i0 + w) (w = 32, 16 or the last < 16 columns):
// out[j, i] = sum over the pairs of coef[pair, j] * src[token(pair), i].
static void outer_any(float* out, int64_t ld, const float* coef, int64_t r, const float* src, const int64_t* pairs,
                      int64_t n_pairs, int64_t K, int64_t j0, int64_t i0, int64_t w) {
  float* o = out + j0 * ld; const float* cf = coef + j0;
  switch (std::min<int64_t>(8, r - j0)) {
    case 1: outer_rows<1>(o, ld, cf, r, src, pairs, n_pairs, K, i0, w); break;
    case 2: outer_rows<2>(o, ld, cf, r, src, pairs, n_pairs, K, i0, w); break;
    case 3: outer_rows<3>(o, ld, cf, r, src, pairs, n_pairs, K, i0, w); break;
    case 4: outer_rows<4>(o, ld, cf, r, src, pairs, n_pairs, K, i0, w); break;
    case 5: outer_rows<5>(o, ld, cf, r, src, pairs, n_pairs, K, i0, w); break;
    case 6: outer_rows<6>(o, ld, cf, r, src, pairs, n_pairs, K, i0, w); break;
    case 7: outer_rows<7>(o, ld, cf, r, src, pairs, n_pairs, K, i0, w); break;
    default: outer_rows<8>(o, ld, cf, r, src, pairs, n_pairs, K, i0, w); break;
  }
}

// Backward. dy (N, d_out). Returns dx (N, d_in), dA (E, r, d_in), dBt (E, r, d_out), dG (N, k).
//   u = B_e^T dy_n   dG[n,s] = u . h[n,s]   dh = G u   dx_n = sum_s A_e^T dh[n,s]
//   dA_e = sum_{(n,s) -> e} dh[n,s] x_n^T        dBt_e = sum_{(n,s) -> e} (G h[n,s]) dy_n^T
// dx is computed only when need_dx (else returned empty).
std::vector<torch::Tensor> sparse_backward(torch::Tensor x, torch::Tensor a, torch::Tensor bt, torch::Tensor top_i,
                                           torch::Tensor gates, torch::Tensor h, torch::Tensor dy, bool need_dx) {
  check_inputs(x, a, bt, top_i, gates); check(h, torch::kFloat, "h"); check(dy, torch::kFloat, "dy");
  const int64_t N = x.size(0), din = x.size(1), E = a.size(0), r = a.size(1), dout = bt.size(2), K = top_i.size(1);
  auto dx = need_dx ? torch::empty_like(x) : torch::empty({0}, x.options()); auto da = torch::empty_like(a); auto dbt = torch::empty_like(bt);
  auto dg = torch::empty_like(gates); auto dh = torch::empty({N, K, r}, x.options()); auto gh = torch::empty({N, K, r}, x.options());
  const float* X = x.data_ptr<float>(); const float* A = a.data_ptr<float>(); const float* Bt = bt.data_ptr<float>();
  const int64_t* T = top_i.data_ptr<int64_t>(); const float* G = gates.data_ptr<float>(); const float* H = h.data_ptr<float>();
  const float* DY = dy.data_ptr<float>();
  float* DX = dx.data_ptr<float>(); float* DA = da.data_ptr<float>(); float* DBT = dbt.data_ptr<float>();
  float* DG = dg.data_ptr<float>(); float* DH = dh.data_ptr<float>(); float* GH = gh.data_ptr<float>();
  // phase 1, per token: u, dG, dh, G h, dx
  at::parallel_for(0, N, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> u(r); std::vector<const float*> rows(K * r);
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t s = 0; s < K; ++s) {
        const int64_t p = n * K + s, e = T[p]; const float g = G[p];
        dots_any(Bt + e * r * dout, dout, DY + n * dout, dout, r, u.data());
        float dgs = 0.f;
        for (int64_t j = 0; j < r; ++j) {
          dgs += u[j] * H[p * r + j];
          DH[p * r + j] = g * u[j];
          GH[p * r + j] = g * H[p * r + j];
          rows[s * r + j] = A + (e * r + j) * din;
        }
        DG[p] = dgs;
      }
      if (need_dx) combine_rows(DX + n * din, rows.data(), DH + n * K * r, K * r, din, false);
    }
  });
  // the (token, slot) pairs routed to each expert, in token order (counting sort)
  std::vector<int64_t> offset(E + 1, 0), pairs(N * K);
  for (int64_t p = 0; p < N * K; ++p) offset[T[p] + 1]++;
  for (int64_t e = 0; e < E; ++e) offset[e + 1] += offset[e];
  {
    std::vector<int64_t> fill(offset.begin(), offset.end() - 1);
    for (int64_t p = 0; p < N * K; ++p) pairs[fill[T[p]]++] = p;
  }
  // phase 2: tasks (expert, 8-row group, column block) of dA and of dBt; no two tasks write the same memory.
  // The expert varies fastest, so each thread's contiguous share of tasks covers every expert.
  auto blocks = [](int64_t width) { return (width / 32) + ((width % 32) >= 16 ? 1 : 0) + ((width % 16) ? 1 : 0); };
  auto block_at = [](int64_t width, int64_t b, int64_t& i0, int64_t& w) {
    const int64_t full = width / 32;
    if (b < full) { i0 = b * 32; w = 32; return; }
    i0 = full * 32; const int64_t rest = width - i0;
    if (b == full && rest >= 16) { w = 16; return; }
    if (rest >= 16) i0 += 16;
    w = width - i0;
  };
  const int64_t groups = (r + 7) / 8, ba = blocks(din), bb = blocks(dout), per_expert = groups * (ba + bb);
  at::parallel_for(0, E * per_expert, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t e = t % E, rest = t / E, g = rest % groups, b = rest / groups;
      const int64_t* pe = pairs.data() + offset[e]; const int64_t np = offset[e + 1] - offset[e];
      int64_t i0, w;
      if (b < ba) { block_at(din, b, i0, w); outer_any(DA + e * r * din, din, DH, r, X, pe, np, K, g * 8, i0, w); }
      else { block_at(dout, b - ba, i0, w); outer_any(DBT + e * r * dout, dout, GH, r, DY, pe, np, K, g * 8, i0, w); }
    }
  });
  return {dx, da, dbt, dg};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &sparse_forward, "y += the selected experts' outputs (in place); h written");
  m.def("backward", &sparse_backward, "dx, dA, dB_t, dG");
}
"""


def _module():
    return native.build("medmoe_sparse_loramoe_v1", _SOURCE, "MEDMOE_LORAMOE_SPARSE_KERNEL", "the dense LoRA-MoE form")


def available() -> bool:
    """True when the kernel is built (building it now if needed)."""
    return _module() is not None


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernel can take these tensors: all fp32 on CPU, and the kernel built."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and available()


def add_experts_(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b_t: torch.Tensor, top_i: torch.Tensor,
                 gates: torch.Tensor) -> torch.Tensor:
    """y += sum_s G[n, s] B_e A_e x_n in place, without autograd (inference); returns h (N, k, r).

    y (N, d_out) and x (N, d_in) contiguous; a = A (E, r, d_in); b_t (E, r, d_out) with b_t[e, j] = column
    j of B_e; top_i (N, k) int64; gates G (N, k), the scale alpha / r folded in."""
    h = x.new_empty(x.shape[0], top_i.shape[1], a.shape[1])
    _module().forward(x, a, b_t, top_i.contiguous(), gates.contiguous(), y, h)
    return h


class SparseExpertMix(torch.autograd.Function):
    """(Y_0, x, A, B, top_i, G) -> Y_0 + sum_s G[n, s] B_e A_e x_n, with Y_0 updated in place (its buffer
    is the output). A (E, r, d_in) and B (E, d_out, r) are the layer's parameters as stored."""

    @staticmethod
    def forward(ctx, y0, x, a, b, top_i, gates):
        x, a, top_i, gates = x.contiguous(), a.contiguous(), top_i.contiguous(), gates.contiguous()  # no-ops in the layer
        b_t = b.transpose(1, 2).contiguous()  # B_t (E, r, d_out)
        h = add_experts_(y0, x, a, b_t, top_i, gates)  # h = A_e x_n: (N, k, r)
        ctx.mark_dirty(y0)
        ctx.save_for_backward(x, a, b_t, top_i, gates, h)
        return y0

    @staticmethod
    def backward(ctx, dy):
        x, a, b_t, top_i, gates, h = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dx, da, db_t, dgates = _module().backward(x, a, b_t, top_i, gates, h, dy.contiguous(), needs[1])
        return (dy, dx if needs[1] else None, da if needs[2] else None,
                db_t.transpose(1, 2).contiguous() if needs[3] else None, None, dgates if needs[5] else None)

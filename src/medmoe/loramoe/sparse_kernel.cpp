// Sparse top-k LoRA-MoE on CPU, fp32: only the k experts each token is routed to are computed.
// The equations, the glossary and the Python side are in sparse_kernel.py; docs/loramoe.md, "Computation".
//
// Layout: x (N, d_in); A (E, r, d_in); Bt (E, r, d_out) with Bt[e, j] = column j of B_e; top_i (N, k) int64;
// gates (N, k), softmax over the k selected logits, unscaled (G = scaling * gates); h (N, k, r) = A_e x.
// The router (optional: the "layer" entry points): P = W_r x (N, d_q); prototype router q = P / |P|,
// logits = (q . kn_e) / T with kn the normalised keys (E, d_q); linear router logits = P (d_q = E).
//
// Speed: tokens routed to the same set of experts are processed in tiles of up to 4, so each expert
// row loaded from cache serves every token of the tile; the weight gradients (dA, dBt, dW_r) are sums
// over each expert's tokens, accumulated in an L1-resident tile per (expert, 8 rows, 256 columns) task.
// Parallel loops run on torch's intra-op threads (at::parallel_for); no two threads write the same memory.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <numeric>
#include <type_traits>
#include <vector>

// ---------- vectors of 16 floats (GCC vector extensions: one AVX-512 register, two AVX2 ones) ----------
typedef float vf __attribute__((vector_size(64)));
typedef float vfu __attribute__((vector_size(64), aligned(4)));
constexpr int64_t L = 16;
static inline vf load(const float* p) { return *reinterpret_cast<const vfu*>(p); }
static inline void store(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
static inline float hsum(vf v) { float s = 0.f; for (int l = 0; l < L; ++l) s += v[l]; return s; }

constexpr int MAX_TILE = 4;   // tokens per tile
constexpr int64_t CW = 256;   // columns per weight-gradient task

// ---------- out[t][j] = rows[j] . v[t]: R rows shared by T tokens, R * T accumulators ----------
template <int R, int T>
static inline void dots(const float* rows, int64_t ld, const float* const* v, int64_t n, float* const* out) {
  vf acc[R][T];
  for (int j = 0; j < R; ++j) for (int t = 0; t < T; ++t) acc[j][t] = vf{};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    vf xv[T];
    for (int t = 0; t < T; ++t) xv[t] = load(v[t] + i);
    for (int j = 0; j < R; ++j) { const vf a = load(rows + j * ld + i); for (int t = 0; t < T; ++t) acc[j][t] += a * xv[t]; }
  }
  for (int j = 0; j < R; ++j) for (int t = 0; t < T; ++t) {
    float s = hsum(acc[j][t]);
    for (int64_t q = i; q < n; ++q) s += rows[j * ld + q] * v[t][q];
    out[t][j] = s;
  }
}

// the same for any number of rows r: blocks of RB rows, then the rest
template <int T>
static void dots_rows(const float* rows, int64_t ld, const float* const* v, int64_t n, int64_t r, float* const* out) {
  constexpr int RB = T <= 2 ? 8 : 4;
  float* o[T];
  int64_t j = 0;
  for (; j + RB <= r; j += RB) { for (int t = 0; t < T; ++t) o[t] = out[t] + j; dots<RB, T>(rows + j * ld, ld, v, n, o); }
  for (int t = 0; t < T; ++t) o[t] = out[t] + j;
  const float* rj = rows + j * ld;
  switch (r - j) {
    case 1: dots<1, T>(rj, ld, v, n, o); break; case 2: dots<2, T>(rj, ld, v, n, o); break;
    case 3: dots<3, T>(rj, ld, v, n, o); break; case 4: dots<4, T>(rj, ld, v, n, o); break;
    case 5: dots<5, T>(rj, ld, v, n, o); break; case 6: dots<6, T>(rj, ld, v, n, o); break;
    case 7: dots<7, T>(rj, ld, v, n, o); break; default: break;
  }
}

// ---------- out[t][0:n] = (accumulate ? out[t] : 0) + sum_q c[t * Q + q] * rows[q][0:n]: rows shared by T tokens ----------
template <int T>
static void combine(float* const* out, const float* const* rows, const float* c, int64_t Q, int64_t n, bool accumulate) {
  constexpr int V = T == 1 ? 8 : 4;
  int64_t i = 0;
  for (; i + V * L <= n; i += V * L) {
    vf acc[T][V];
    for (int t = 0; t < T; ++t) for (int v = 0; v < V; ++v) acc[t][v] = accumulate ? load(out[t] + i + v * L) : vf{};
    for (int64_t q = 0; q < Q; ++q) {
      vf b[V];
      for (int v = 0; v < V; ++v) b[v] = load(rows[q] + i + v * L);
      for (int t = 0; t < T; ++t) { const float ct = c[t * Q + q]; for (int v = 0; v < V; ++v) acc[t][v] += ct * b[v]; }
    }
    for (int t = 0; t < T; ++t) for (int v = 0; v < V; ++v) store(out[t] + i + v * L, acc[t][v]);
  }
  for (; i + L <= n; i += L) {
    vf acc[T];
    for (int t = 0; t < T; ++t) acc[t] = accumulate ? load(out[t] + i) : vf{};
    for (int64_t q = 0; q < Q; ++q) { const vf b = load(rows[q] + i); for (int t = 0; t < T; ++t) acc[t] += c[t * Q + q] * b; }
    for (int t = 0; t < T; ++t) store(out[t] + i, acc[t]);
  }
  for (; i < n; ++i) for (int t = 0; t < T; ++t) {
    float acc = accumulate ? out[t][i] : 0.f;
    for (int64_t q = 0; q < Q; ++q) acc += c[t * Q + q] * rows[q][i];
    out[t][i] = acc;
  }
}

// ---------- weight gradients: out (R rows, columns [i0, i0 + w)) = sum over pairs p of coef[p * cs + j] * src[p / K] ----------
template <int R, int T>
static inline void accumulate_pairs(float* tile, const float* coef, int64_t cs, const float* src, int64_t ld,
                                    const int64_t* pairs, int64_t K, int64_t i0, int64_t w) {
  const float* s[T]; float c[T][R];
  for (int t = 0; t < T; ++t) { s[t] = src + (pairs[t] / K) * ld + i0; for (int j = 0; j < R; ++j) c[t][j] = coef[pairs[t] * cs + j]; }
  int64_t i = 0;
  for (; i + L <= w; i += L) {
    vf xv[T];
    for (int t = 0; t < T; ++t) xv[t] = load(s[t] + i);
    for (int j = 0; j < R; ++j) {
      vf acc = load(tile + j * CW + i);
      for (int t = 0; t < T; ++t) acc += c[t][j] * xv[t];
      store(tile + j * CW + i, acc);
    }
  }
  for (; i < w; ++i) for (int j = 0; j < R; ++j) {
    float acc = tile[j * CW + i];
    for (int t = 0; t < T; ++t) acc += c[t][j] * s[t][i];
    tile[j * CW + i] = acc;
  }
}

template <int R>
static void outer_task(float* out, int64_t rs, int64_t cs_out, const float* coef, int64_t cs, const float* src, int64_t ld,
                       const int64_t* pairs, int64_t np, int64_t K, int64_t i0, int64_t w) {
  alignas(64) float tile[R * CW];
  std::fill(tile, tile + R * CW, 0.f);
  int64_t q = 0;
  for (; q + 4 <= np; q += 4) accumulate_pairs<R, 4>(tile, coef, cs, src, ld, pairs + q, K, i0, w);
  for (; q < np; ++q) accumulate_pairs<R, 1>(tile, coef, cs, src, ld, pairs + q, K, i0, w);
  if (cs_out == 1) for (int j = 0; j < R; ++j) std::copy(tile + j * CW, tile + j * CW + w, out + j * rs + i0);
  else for (int j = 0; j < R; ++j) for (int64_t i = 0; i < w; ++i) out[j * rs + (i0 + i) * cs_out] = tile[j * CW + i];
}

// one task: rows [j0, j0 + min(8, rows - j0)) and columns [i0, i0 + w) of out, element (j, i) at out[j * rs + i * cs_out]
static void outer_rows(float* out, int64_t rs, int64_t cs_out, int64_t rows, const float* coef, int64_t cs, const float* src, int64_t ld,
                       const int64_t* pairs, int64_t np, int64_t K, int64_t j0, int64_t i0, int64_t w) {
  float* o = out + j0 * rs; const float* cf = coef + j0;
  switch (std::min<int64_t>(8, rows - j0)) {
    case 1: outer_task<1>(o, rs, cs_out, cf, cs, src, ld, pairs, np, K, i0, w); break;
    case 2: outer_task<2>(o, rs, cs_out, cf, cs, src, ld, pairs, np, K, i0, w); break;
    case 3: outer_task<3>(o, rs, cs_out, cf, cs, src, ld, pairs, np, K, i0, w); break;
    case 4: outer_task<4>(o, rs, cs_out, cf, cs, src, ld, pairs, np, K, i0, w); break;
    case 5: outer_task<5>(o, rs, cs_out, cf, cs, src, ld, pairs, np, K, i0, w); break;
    case 6: outer_task<6>(o, rs, cs_out, cf, cs, src, ld, pairs, np, K, i0, w); break;
    case 7: outer_task<7>(o, rs, cs_out, cf, cs, src, ld, pairs, np, K, i0, w); break;
    default: outer_task<8>(o, rs, cs_out, cf, cs, src, ld, pairs, np, K, i0, w); break;
  }
}

// A weight gradient as tasks: out (rows, width) = sum over pairs of coef (rows per pair) x src rows,
// stored as (rows, width) or, transposed, as (width, rows)
struct OuterJob {
  float* out; int64_t rows, width; const float* coef; int64_t cs; const float* src; int64_t ld;
  const int64_t* pairs; int64_t np, K; bool transposed;
  int64_t tasks() const { return ((rows + 7) / 8) * ((width + CW - 1) / CW); }
  void run(int64_t t) const {
    const int64_t groups = (rows + 7) / 8, j0 = (t % groups) * 8, i0 = (t / groups) * CW;
    outer_rows(out, transposed ? 1 : width, transposed ? rows : 1, rows, coef, cs, src, ld, pairs, np, K, j0, i0, std::min(CW, width - i0));
  }
};

// every task of every job, dynamically shared among the threads (tasks differ in cost: their token counts)
static void run_jobs(const std::vector<OuterJob>& jobs) {
  std::vector<std::pair<int64_t, int64_t>> tasks;  // (job, task), the heaviest jobs first
  std::vector<int64_t> by_cost(jobs.size());
  std::iota(by_cost.begin(), by_cost.end(), 0);
  std::stable_sort(by_cost.begin(), by_cost.end(), [&](int64_t a, int64_t b) { return jobs[a].np > jobs[b].np; });
  for (int64_t j : by_cost) for (int64_t t = 0; t < jobs[j].tasks(); ++t) tasks.emplace_back(j, t);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    for (int64_t i = next++; i < (int64_t)tasks.size(); i = next++) jobs[tasks[i].first].run(tasks[i].second);
  });
}

// ---------- the plan: tiles of tokens routed to the same set of experts, and each expert's (token, slot) pairs ----------
// order (N): tokens sorted by their expert set; tile_start (tiles + 1): tile i is order[tile_start[i] .. tile_start[i+1]);
// slot (N, k): slot[n, c] = the slot of token n that holds its c-th smallest expert;
// offset (E + 1), pairs (N k): expert e's pairs p = n k + s are pairs[offset[e] .. offset[e+1]), in token order.
std::vector<torch::Tensor> make_plan(torch::Tensor top_i, int64_t E) {
  TORCH_CHECK(top_i.device().is_cpu() && top_i.scalar_type() == torch::kLong && top_i.is_contiguous() && top_i.dim() == 2,
              "sparse LoRA-MoE kernel: top_i must be a contiguous (N, k) int64 CPU tensor");
  const int64_t N = top_i.size(0), K = top_i.size(1);
  const int64_t* T = top_i.data_ptr<int64_t>();
  for (int64_t p = 0; p < N * K; ++p)
    TORCH_CHECK(T[p] >= 0 && T[p] < E, "sparse LoRA-MoE kernel: expert index ", T[p], " out of range [0, ", E, ")");
  auto opts = top_i.options();
  auto order = torch::empty({N}, opts), slot = torch::empty({N, K}, opts), offset = torch::zeros({E + 1}, opts), pairs = torch::empty({N * K}, opts);
  int64_t* O = order.data_ptr<int64_t>(); int64_t* S = slot.data_ptr<int64_t>(); int64_t* F = offset.data_ptr<int64_t>(); int64_t* P = pairs.data_ptr<int64_t>();
  std::vector<uint64_t> key(N);
  for (int64_t n = 0; n < N; ++n) {
    int64_t* s = S + n * K;
    std::iota(s, s + K, 0);
    std::sort(s, s + K, [&](int64_t a, int64_t b) { return T[n * K + a] < T[n * K + b]; });
    uint64_t k = 0;
    for (int64_t c = 0; c < K; ++c) k = k * (uint64_t)E + (uint64_t)T[n * K + s[c]];  // unique when E^k < 2^64; else only tiles merge less
    key[n] = k;
  }
  std::iota(O, O + N, 0);
  std::stable_sort(O, O + N, [&](int64_t a, int64_t b) { return key[a] < key[b]; });
  std::vector<int64_t> starts;
  for (int64_t i = 0; i < N;) {
    int64_t j = i + 1;
    while (j < N && j - i < MAX_TILE && key[O[j]] == key[O[i]]) ++j;
    starts.push_back(i); i = j;
  }
  starts.push_back(N);
  for (int64_t p = 0; p < N * K; ++p) F[T[p] + 1]++;
  for (int64_t e = 0; e < E; ++e) F[e + 1] += F[e];
  std::vector<int64_t> fill(F, F + E);
  for (int64_t p = 0; p < N * K; ++p) P[fill[T[p]]++] = p;
  return {order, torch::tensor(starts, opts), slot, offset, pairs};
}

struct Plan {
  const int64_t *order, *tile_start, *slot, *offset, *pairs; int64_t tiles;
  explicit Plan(const std::vector<torch::Tensor>& p)
      : order(p[0].data_ptr<int64_t>()), tile_start(p[1].data_ptr<int64_t>()), slot(p[2].data_ptr<int64_t>()),
        offset(p[3].data_ptr<int64_t>()), pairs(p[4].data_ptr<int64_t>()), tiles(p[1].numel() - 1) {}
};

// f(std::integral_constant<int, T>{}) with T the tile's token count (1 .. MAX_TILE)
template <class F>
static void with_tile_size(int64_t size, F&& f) {
  switch (size) {
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{}); break;
  }
}

static void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat && t.is_contiguous(),
              "sparse LoRA-MoE kernel: ", name, " must be a contiguous fp32 CPU tensor");
}

// ---------- routing (forward): P = W_r x, then logits, q, top-k and gates ----------
// x (N, d_in); w_r (d_q, d_in); keys (E, d_q) or empty (linear router: logits = P, d_q = E).
// Returns P (N, d_q), logits (N, E), q (N, d_q) or empty, gates (N, k), top_i (N, k): the k largest logits,
// best first (ties: the lower index; NaN counts as largest), and kn (E, d_q) the normalised keys or empty.
std::vector<torch::Tensor> route(torch::Tensor x, torch::Tensor w_r, torch::Tensor keys, double inv_temperature, int64_t K) {
  check(x, "x"); check(w_r, "W_r");
  const bool proto = keys.numel() > 0;
  if (proto) check(keys, "keys");
  const int64_t N = x.size(0), din = x.size(1), dq = w_r.size(0), E = proto ? keys.size(0) : dq;
  TORCH_CHECK(w_r.size(1) == din, "sparse LoRA-MoE kernel: W_r and x widths differ");
  TORCH_CHECK(!proto || keys.size(1) == dq, "sparse LoRA-MoE kernel: keys and router projection widths differ");
  TORCH_CHECK(K >= 1 && K <= E, "sparse LoRA-MoE kernel: top_k must be in [1, ", E, "]");
  auto opts = x.options();
  auto p = torch::empty({N, dq}, opts), logits = proto ? torch::empty({N, E}, opts) : p;
  auto q = proto ? torch::empty({N, dq}, opts) : torch::empty({0}, opts), kn = proto ? torch::empty({E, dq}, opts) : q;
  auto gates = torch::empty({N, K}, opts);
  auto top_i = torch::empty({N, K}, opts.dtype(torch::kLong));
  const float* X = x.data_ptr<float>(); const float* WR = w_r.data_ptr<float>();
  float* Pp = p.data_ptr<float>(); float* LG = logits.data_ptr<float>(); float* Q = proto ? q.data_ptr<float>() : nullptr;
  float* KN = proto ? kn.data_ptr<float>() : nullptr;
  float* G = gates.data_ptr<float>(); int64_t* TI = top_i.data_ptr<int64_t>();
  const float inv_t = (float)inv_temperature;
  if (proto) {  // kn = keys / max(|keys|, eps), per expert
    const float* KY = keys.data_ptr<float>();
    for (int64_t e = 0; e < E; ++e) {
      float ss = 0.f;
      for (int64_t i = 0; i < dq; ++i) ss += KY[e * dq + i] * KY[e * dq + i];
      const float inv = 1.f / std::max(std::sqrt(ss), 1e-12f);
      for (int64_t i = 0; i < dq; ++i) KN[e * dq + i] = KY[e * dq + i] * inv;
    }
  }
  at::parallel_for(0, (N + MAX_TILE - 1) / MAX_TILE, 16, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * MAX_TILE;
      with_tile_size(std::min<int64_t>(MAX_TILE, N - n0), [&](auto tt) {  // P = W_r x for up to 4 tokens at once
        constexpr int T = decltype(tt)::value;
        const float* xv[T]; float* pv[T];
        for (int t = 0; t < T; ++t) { xv[t] = X + (n0 + t) * din; pv[t] = Pp + (n0 + t) * dq; }
        dots_rows<T>(WR, din, xv, din, dq, pv);
      });
    }
  });
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      float* lg = LG + n * E;
      if (proto) {  // q = P / max(|P|, eps) (F.normalize), logits = q kn^T / T
        const float* pn = Pp + n * dq; float* qn = Q + n * dq;
        float ss = 0.f;
        for (int64_t i = 0; i < dq; ++i) ss += pn[i] * pn[i];
        const float inv = 1.f / std::max(std::sqrt(ss), 1e-12f);
        for (int64_t i = 0; i < dq; ++i) qn[i] = pn[i] * inv;
        for (int64_t e = 0; e < E; ++e) {
          float s = 0.f;
          for (int64_t i = 0; i < dq; ++i) s += qn[i] * KN[e * dq + i];
          lg[e] = s * inv_t;
        }
      }
      int64_t* ti = TI + n * K; float* g = G + n * K;
      for (int64_t s = 0; s < K; ++s) {  // selection of the k largest (E is small)
        int64_t best = -1;
        for (int64_t e = 0; e < E; ++e) {
          bool taken = false;
          for (int64_t u = 0; u < s; ++u) taken |= ti[u] == e;
          if (taken) continue;
          if (best < 0 || std::isnan(lg[e]) > std::isnan(lg[best]) || lg[e] > lg[best]) best = e;
        }
        ti[s] = best;
      }
      float m = lg[ti[0]], z = 0.f;  // gates = softmax of the k selected logits
      for (int64_t s = 0; s < K; ++s) { g[s] = std::exp(lg[ti[s]] - m); z += g[s]; }
      for (int64_t s = 0; s < K; ++s) g[s] /= z;
    }
  });
  return {p, proto ? logits : p.clone(), q, gates, top_i, kn};
}

// ---------- forward: h = A_e x and y += sum_s G B_e h (y updated in place) ----------
void forward(torch::Tensor x, torch::Tensor a, torch::Tensor bt, torch::Tensor top_i, torch::Tensor gates, double scaling,
             std::vector<torch::Tensor> plan, torch::Tensor y, torch::Tensor h) {
  check(x, "x"); check(a, "A"); check(bt, "B_t"); check(gates, "gates"); check(y, "y"); check(h, "h");
  const int64_t N = x.size(0), din = x.size(1), r = a.size(1), dout = bt.size(2), K = top_i.size(1);
  TORCH_CHECK(a.size(0) == bt.size(0) && bt.size(1) == r && a.size(2) == din && y.size(0) == N && y.size(1) == dout &&
              top_i.size(0) == N && gates.sizes() == top_i.sizes() && h.numel() == N * K * r, "sparse LoRA-MoE kernel: shapes disagree");
  const Plan pl(plan);
  const float* X = x.data_ptr<float>(); const float* A = a.data_ptr<float>(); const float* Bt = bt.data_ptr<float>();
  const int64_t* TI = top_i.data_ptr<int64_t>(); const float* G = gates.data_ptr<float>();
  float* Y = y.data_ptr<float>(); float* H = h.data_ptr<float>();
  const float sc = (float)scaling;
  at::parallel_for(0, pl.tiles, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> coef(MAX_TILE * K * r); std::vector<const float*> rows(K * r);
    for (int64_t ti = begin; ti < end; ++ti) {
      const int64_t* ns = pl.order + pl.tile_start[ti];
      with_tile_size(pl.tile_start[ti + 1] - pl.tile_start[ti], [&](auto tt) {
        constexpr int T = decltype(tt)::value;
        const float* xv[T]; float* yv[T]; float* hv[T];
        for (int t = 0; t < T; ++t) { xv[t] = X + ns[t] * din; yv[t] = Y + ns[t] * dout; }
        for (int64_t c = 0; c < K; ++c) {  // the tile's c-th expert (the same for all its tokens)
          const int64_t e = TI[ns[0] * K + pl.slot[ns[0] * K + c]];
          for (int t = 0; t < T; ++t) hv[t] = H + (ns[t] * K + pl.slot[ns[t] * K + c]) * r;
          dots_rows<T>(A + e * r * din, din, xv, din, r, hv);  // h = A_e x
          for (int64_t j = 0; j < r; ++j) {
            rows[c * r + j] = Bt + (e * r + j) * dout;
            for (int t = 0; t < T; ++t) coef[t * K * r + c * r + j] = sc * G[ns[t] * K + pl.slot[ns[t] * K + c]] * hv[t][j];
          }
        }
        combine<T>(yv, rows.data(), coef.data(), K * r, dout, true);  // y += sum_s G B_e h
      });
    }
  });
}

// ---------- backward ----------
// From dy (N, d_out) and, in the layer form (p given), the router's upstream gradients dlogits_in (N, E),
// dq_in (N, d_q), dgates_in (N, k) (each may be empty: zero). Per token, with G = scaling * gates:
//   u = B_e^T dy   dG = u . h   dh = G u   gh = G h
//   layer form: dgates = scaling dG + dgates_in -> dlogits (softmax over the top k, + dlogits_in)
//               -> dq = dq_in + dlogits kn / T -> dP (normalize's backward; linear router: dP = dlogits)
//   dx += sum_s A_e^T dh (+ W_r^T dP in the layer form)   (dx: filled by the caller with dy W_0, or empty: not wanted)
//   dkn = dlogits^T q / T -> dkeys (normalize's backward)
// Then dA_e = sum dh x^T, dB_e = sum dy (gh)^T over e's pairs, and dW_r = dP^T x when need_dwr.
// Returns dA (E, r, d_in), dB (E, d_out, r), dG (N, k: w.r.t. G), and in the layer form (else empty)
// dP (N, d_q), dlogits (N, E), dW_r (when need_dwr) and dkeys (prototype router).
std::vector<torch::Tensor> backward(torch::Tensor x, torch::Tensor a, torch::Tensor bt, torch::Tensor top_i, torch::Tensor gates,
                                    double scaling, torch::Tensor h, torch::Tensor dy, std::vector<torch::Tensor> plan, torch::Tensor dx,
                                    torch::Tensor p, torch::Tensor q, torch::Tensor keys, torch::Tensor kn, torch::Tensor w_r, double inv_temperature,
                                    torch::Tensor dlogits_in, torch::Tensor dq_in, torch::Tensor dgates_in, bool need_dwr) {
  check(x, "x"); check(a, "A"); check(bt, "B_t"); check(gates, "gates"); check(h, "h"); check(dy, "dy");
  const int64_t N = x.size(0), din = x.size(1), E = a.size(0), r = a.size(1), dout = bt.size(2), K = top_i.size(1);
  // the layer form passes P (N, d_q); the expert mix alone passes empty 1-d tensors for P, q, kn and W_r
  const bool layer = p.dim() == 2, proto = kn.numel() > 0, need_dx = dx.numel() > 0;
  const int64_t dq = layer ? p.size(1) : 0, Q = K * r + dq;  // rows combined into dx per token
  if (layer) { check(p, "P"); check(w_r, "W_r"); TORCH_CHECK(w_r.size(0) == dq && w_r.size(1) == din, "sparse LoRA-MoE kernel: W_r shape"); }
  if (proto) { check(q, "q"); check(keys, "keys"); check(kn, "normalised keys"); }
  for (const auto* t : {&dlogits_in, &dq_in, &dgates_in}) if (t->numel()) check(*t, "an upstream router gradient");
  if (need_dx) { check(dx, "dx"); TORCH_CHECK(dx.sizes() == x.sizes(), "sparse LoRA-MoE kernel: dx shape"); }
  auto opts = x.options();
  auto da = torch::empty_like(a), db = torch::empty({E, dout, r}, opts), dg = torch::empty_like(gates);
  auto dh = torch::empty({N, K, r}, opts), gh = torch::empty({N, K, r}, opts);
  auto dp = layer ? torch::empty({N, dq}, opts) : torch::empty({0}, opts);
  auto dl = layer ? torch::empty({N, proto ? E : dq}, opts) : torch::empty({0}, opts);
  auto dwr = layer && need_dwr ? torch::empty({dq, din}, opts) : torch::empty({0}, opts);
  const Plan pl(plan);
  const float* X = x.data_ptr<float>(); const float* A = a.data_ptr<float>(); const float* Bt = bt.data_ptr<float>();
  const int64_t* TI = top_i.data_ptr<int64_t>(); const float* GA = gates.data_ptr<float>(); const float* H = h.data_ptr<float>();
  const float* DY = dy.data_ptr<float>();
  const float* PP = layer ? p.data_ptr<float>() : nullptr; const float* QQ = proto ? q.data_ptr<float>() : nullptr;
  const float* KN = proto ? kn.data_ptr<float>() : nullptr; const float* WR = layer ? w_r.data_ptr<float>() : nullptr;
  const float* DLI = dlogits_in.numel() ? dlogits_in.data_ptr<float>() : nullptr;
  const float* DQI = dq_in.numel() ? dq_in.data_ptr<float>() : nullptr;
  const float* DGI = dgates_in.numel() ? dgates_in.data_ptr<float>() : nullptr;
  float* DX = need_dx ? dx.data_ptr<float>() : nullptr; float* DG = dg.data_ptr<float>();
  float* DH = dh.data_ptr<float>(); float* GH = gh.data_ptr<float>();
  float* DP = layer ? dp.data_ptr<float>() : nullptr; float* DL = layer ? dl.data_ptr<float>() : nullptr;
  const float sc = (float)scaling, inv_t = (float)inv_temperature;
  const int64_t EL = proto ? E : dq;  // logits per token
  const int64_t threads = at::get_num_threads();
  std::vector<float> dkn_parts(proto ? threads * E * dq : 0, 0.f);  // per thread: sum over its tokens of dlogits q^T / T

  // the router's backward for token n, from dG: writes dlogits (N, EL) and dP (N, d_q); adds to this thread's dkn
  auto route_backward = [&](int64_t n, float* dqv, float* dkn) {
    const float* g = GA + n * K; const int64_t* ti = TI + n * K; float* dln = DL + n * EL;
    float dgt[64], mean = 0.f;
    for (int64_t s = 0; s < K; ++s) { dgt[s] = sc * DG[n * K + s] + (DGI ? DGI[n * K + s] : 0.f); mean += g[s] * dgt[s]; }
    for (int64_t e = 0; e < EL; ++e) dln[e] = DLI ? DLI[n * EL + e] : 0.f;
    for (int64_t s = 0; s < K; ++s) dln[ti[s]] += g[s] * (dgt[s] - mean);  // softmax over the top k
    float* dpn = DP + n * dq;
    if (!proto) { std::copy(dln, dln + dq, dpn); return; }  // linear router: logits = P
    const float* qn = QQ + n * dq; const float* pn = PP + n * dq;
    for (int64_t e = 0; e < E; ++e) for (int64_t i = 0; i < dq; ++i) dkn[e * dq + i] += inv_t * dln[e] * qn[i];
    float dot = 0.f, ss = 0.f;
    for (int64_t i = 0; i < dq; ++i) {  // dq = dq_in + dlogits kn / T
      float s = DQI ? DQI[n * dq + i] : 0.f;
      for (int64_t e = 0; e < E; ++e) s += inv_t * dln[e] * KN[e * dq + i];
      dqv[i] = s; dot += s * qn[i]; ss += pn[i] * pn[i];
    }
    const float nrm = std::sqrt(ss);  // q = P / max(|P|, eps): dP = (dq - q (q . dq)) / |P|, or dq / eps
    for (int64_t i = 0; i < dq; ++i) dpn[i] = nrm > 1e-12f ? (dqv[i] - qn[i] * dot) / nrm : dqv[i] / 1e-12f;
  };
  TORCH_CHECK(K <= 64, "sparse LoRA-MoE kernel: top_k above 64");

  // phase 1, per tile: u, dG, dh, gh, the router's backward, dx
  at::parallel_for(0, pl.tiles, 4, [&](int64_t begin, int64_t end) {
    const int64_t tid = at::get_thread_num();
    TORCH_CHECK(tid < threads, "sparse LoRA-MoE kernel: thread index out of range");
    float* dkn = proto ? dkn_parts.data() + tid * E * dq : nullptr;
    std::vector<float> coef(MAX_TILE * Q), u(MAX_TILE * r), dqv(std::max<int64_t>(dq, 1));
    std::vector<const float*> rows(Q);
    for (int64_t i = 0; i < dq; ++i) rows[K * r + i] = WR + i * din;
    for (int64_t ti = begin; ti < end; ++ti) {
      const int64_t* ns = pl.order + pl.tile_start[ti];
      with_tile_size(pl.tile_start[ti + 1] - pl.tile_start[ti], [&](auto tt) {
        constexpr int T = decltype(tt)::value;
        const float* dyv[T]; float* uv[T]; float* dxv[T];
        for (int t = 0; t < T; ++t) { dyv[t] = DY + ns[t] * dout; uv[t] = u.data() + t * r; if (need_dx) dxv[t] = DX + ns[t] * din; }
        for (int64_t c = 0; c < K; ++c) {
          const int64_t e = TI[ns[0] * K + pl.slot[ns[0] * K + c]];
          dots_rows<T>(Bt + e * r * dout, dout, dyv, dout, r, uv);  // u = B_e^T dy
          for (int t = 0; t < T; ++t) {
            const int64_t pr = ns[t] * K + pl.slot[ns[t] * K + c];
            const float g = sc * GA[pr];
            float dgs = 0.f;
            for (int64_t j = 0; j < r; ++j) {
              dgs += uv[t][j] * H[pr * r + j];
              DH[pr * r + j] = g * uv[t][j];
              GH[pr * r + j] = g * H[pr * r + j];
              coef[t * Q + c * r + j] = g * uv[t][j];
            }
            DG[pr] = dgs;
          }
          for (int64_t j = 0; j < r; ++j) rows[c * r + j] = A + (e * r + j) * din;
        }
        if (layer) for (int t = 0; t < T; ++t) {
          route_backward(ns[t], dqv.data(), dkn);
          std::copy(DP + ns[t] * dq, DP + (ns[t] + 1) * dq, coef.data() + t * Q + K * r);
        }
        if (need_dx) combine<T>(dxv, rows.data(), coef.data(), Q, din, layer);  // layer: dx holds dy W_0 already
      });
    }
  });

  // phase 2: the weight gradients
  std::vector<OuterJob> jobs;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t* pe = pl.pairs + pl.offset[e]; const int64_t np = pl.offset[e + 1] - pl.offset[e];
    jobs.push_back({da.data_ptr<float>() + e * r * din, r, din, DH, r, X, din, pe, np, K, false});
    jobs.push_back({db.data_ptr<float>() + e * dout * r, r, dout, GH, r, DY, dout, pe, np, K, true});  // dB_e (d_out, r)
  }
  std::vector<int64_t> all_tokens;
  if (layer && need_dwr) {
    all_tokens.resize(N);
    std::iota(all_tokens.begin(), all_tokens.end(), 0);
    jobs.push_back({dwr.data_ptr<float>(), dq, din, DP, dq, X, din, all_tokens.data(), N, 1, false});
  }
  run_jobs(jobs);
  auto dkeys = proto ? torch::empty({E, dq}, opts) : torch::empty({0}, opts);
  if (proto) {  // dkn summed over threads, then kn = keys / max(|keys|, eps): dkeys = (dkn - kn (kn . dkn)) / |keys|
    const float* KY = keys.data_ptr<float>(); float* DK = dkeys.data_ptr<float>();
    std::vector<float> dkn_e(dq);
    for (int64_t e = 0; e < E; ++e) {
      float dot = 0.f, ss = 0.f;
      for (int64_t i = 0; i < dq; ++i) {
        float v = 0.f;
        for (int64_t t = 0; t < threads; ++t) v += dkn_parts[(t * E + e) * dq + i];
        dkn_e[i] = v; dot += v * KN[e * dq + i]; ss += KY[e * dq + i] * KY[e * dq + i];
      }
      const float nrm = std::sqrt(ss);
      for (int64_t i = 0; i < dq; ++i) DK[e * dq + i] = nrm > 1e-12f ? (dkn_e[i] - KN[e * dq + i] * dot) / nrm : dkn_e[i] / 1e-12f;
    }
  }
  return {da, db, dg, dp, dl, dwr, dkeys};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("make_plan", &make_plan, "tiles of tokens sharing an expert set; each expert's (token, slot) pairs");
  m.def("route", &route, "logits, q, gates and top-k indices from the router projection");
  m.def("forward", &forward, "y += the selected experts' outputs (in place); h written");
  m.def("backward", &backward, "dA, dB_t, dG, dP, dlogits, dW_r (dx accumulated in place)");
}

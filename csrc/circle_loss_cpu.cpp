// Fused Circle Loss for CPU tensors: the blockwise algorithm of the Triton kernels (docs/design.md).
//
// The keys are cut into tiles of kTileKeys rows, small enough that a tile of S (B x kTileKeys), its
// normalised keys and Q-hat stay in cache. The tiles are grouped into a fixed number of contiguous
// splits (it depends on N only, not on the thread count); each split is processed by one thread in
// order and writes its own partial statistics, which are then combined in split order, so every
// result is deterministic. Products go through ATen's matrix multiply (single-threaded inside the
// parallel region); the epilogue (weights, margins, log-sum-exps, dL/ds) is fused in one pass over
// each tile. No B x N buffer is allocated.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>

namespace {

constexpr int64_t kTileKeys = 256;
constexpr int64_t kMaxSplits = 32;
constexpr float kEps = 1e-12f;  // as F.normalize
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The epilogue works on kLanes similarities at a time with GCC/Clang vector extensions, so it is
// vectorised whatever the compiler's loop heuristics decide (AVX-512: one register per vector).
constexpr int64_t kLanes = 16;
typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(kLanes * sizeof(int32_t))));
typedef int64_t vlong __attribute__((vector_size(kLanes * sizeof(int64_t))));
static_assert(kTileKeys % kLanes == 0, "tiles hold whole vectors");

inline vfloat splat(float x) { return vfloat{} + x; }
template <typename V, typename T>
inline V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename V, typename T>
inline void store(T* p, V v) { std::memcpy(p, &v, sizeof(v)); }
inline vfloat vmax(vfloat a, vfloat b) { return a > b ? a : b; }
inline float hmax(vfloat v) {
  float m = v[0];
  for (int64_t l = 1; l < kLanes; ++l) m = v[l] > m ? v[l] : m;
  return m;
}
inline float hsum(vfloat v) {
  float s = 0.f;
  for (int64_t l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

// exp(x) lane by lane: Cody-Waite reduction to r in [-ln2/2, ln2/2] and a degree-7 Taylor
// polynomial (relative error below 2e-7). exp(x) = 0 below -87.3 (where float32 leaves normal
// numbers), inf above 88.7, and NaN stays NaN.
inline vfloat vexp(vfloat x) {
  const float lo = -87.3f, hi = 88.7f;
  vfloat t = x < lo ? splat(lo) : x;
  t = t > hi ? splat(hi) : t;
  const vint n = __builtin_convertvector(t * 1.44269504f + (t >= 0.f ? splat(0.5f) : splat(-0.5f)), vint);
  const vfloat nf = __builtin_convertvector(n, vfloat);
  const vfloat r = (t - nf * 0.693145752f) - nf * 1.42860677e-6f;
  vfloat p = splat(1.f / 5040.f);
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  vfloat y = p * (vfloat)((n + 127) << 23);  // p * 2^n, building the exponent bits
  y = x < lo ? splat(0.f) : y;
  y = x > hi ? splat(std::numeric_limits<float>::infinity()) : y;
  return x != x ? x : y;
}

// The Circle Loss formula on kLanes similarities: the one place alpha, Delta, gamma live in C++.
// logit: u = -gamma*alpha_p*(s - (1-m)) for a positive, v = gamma*alpha_n*(s - m) for a negative.
// slope: d logit / d s, with alpha detached (-gamma*alpha_p, gamma*alpha_n) or not (-2gamma(1-s) where
// alpha_p > 0, 2gamma*s where alpha_n > 0: a clipped alpha makes its logit 0 whatever s).
struct Epilogue {
  float m, gamma;
  bool detach_alpha;

  inline vfloat logit(vfloat s, vint pos) const {
    const vfloat alpha_p = vmax(1.f + m - s, splat(0.f));
    const vfloat alpha_n = vmax(s + m, splat(0.f));
    return pos ? -gamma * alpha_p * (s - (1.f - m)) : gamma * alpha_n * (s - m);
  }
  inline vfloat slope(vfloat s, vint pos) const {
    if (detach_alpha) return pos ? -gamma * vmax(1.f + m - s, splat(0.f)) : gamma * vmax(s + m, splat(0.f));
    const vfloat zero = splat(0.f);
    return pos ? (1.f + m - s > zero ? -2.f * gamma * (1.f - s) : zero) : (s + m > zero ? 2.f * gamma * s : zero);
  }
};

// Lane masks for the keys [j0 + jj, j0 + jj + kLanes) of row i: positives (b_j == a_i) and pairs
// (j < the tile's end, and j != the row's excluded key: i itself for in-batch keys, its own slot in a
// memory; -1 for none).
struct LaneMasks {
  vint pos, pair;
};
inline LaneMasks lane_masks(const int64_t* tile_labels, int64_t jj, int64_t n, int64_t label, int64_t excluded,
                            int64_t j0) {
  vint lane;
  for (int64_t l = 0; l < kLanes; ++l) lane[l] = static_cast<int32_t>(l);
  const vint key = lane + static_cast<int32_t>(jj);
  const vint is_self = excluded >= 0 ? (key + static_cast<int32_t>(j0 - excluded) == 0) : vint{};
  const vint pos = __builtin_convertvector(load<vlong>(tile_labels + jj) == label, vint);
  return {pos, (key < static_cast<int32_t>(n)) & ~is_self};
}

// What every pass needs to know about the problem.
struct Problem {
  at::Tensor queries, keys, query_labels;
  std::optional<at::Tensor> key_labels;  // none: class-level keys, b_j = j
  at::Tensor q_hat;                      // (B, D) float32, normalised queries
  at::Tensor inv_norm_k;                 // (N,) float32
  std::optional<at::Tensor> excluded_keys;  // (B,) int64: the key that is no pair of row i (-1: none)
  int64_t B, N, D, tiles_per_split, splits;

  Problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& ql, const std::optional<at::Tensor>& kl,
          const at::Tensor& inv_q, const at::Tensor& inv_k, const std::optional<at::Tensor>& excl)
      : queries(q), keys(k), query_labels(ql.contiguous()), inv_norm_k(inv_k.contiguous()) {
    if (kl) key_labels = kl->contiguous();
    if (excl) excluded_keys = excl->contiguous();
    B = q.size(0);
    N = k.size(0);
    D = q.size(1);
    q_hat = (q.to(at::kFloat) * inv_q.unsqueeze(1)).contiguous();
    const int64_t tiles = (N + kTileKeys - 1) / kTileKeys;
    splits = std::min(tiles, kMaxSplits);
    tiles_per_split = (tiles + splits - 1) / splits;
    splits = (tiles + tiles_per_split - 1) / tiles_per_split;
  }

  int64_t excluded(int64_t i) const { return excluded_keys ? excluded_keys->data_ptr<int64_t>()[i] : -1; }

  // b_j for the keys [j0, j0 + n).
  void tile_labels(int64_t j0, int64_t n, int64_t* out) const {
    const int64_t* b = key_labels ? key_labels->data_ptr<int64_t>() : nullptr;
    for (int64_t jj = 0; jj < n; ++jj) out[jj] = b ? b[j0 + jj] : j0 + jj;
  }

  int64_t split_start(int64_t p) const { return p * tiles_per_split * kTileKeys; }
  int64_t split_stop(int64_t p) const { return std::min(N, (p + 1) * tiles_per_split * kTileKeys); }

  // Normalised keys [j0, j0 + n) into k_hat (n x D), then S = Q-hat * K-hat^T into s_tile (B x n);
  // k_hat and s_tile come in as whole tile buffers and leave as views of their first n keys.
  void similarity_tile(int64_t j0, int64_t n, at::Tensor& k_hat, at::Tensor& s_tile) const {
    k_hat = k_hat.narrow(0, 0, n);
    at::mul_out(k_hat, keys.narrow(0, j0, n), inv_norm_k.narrow(0, j0, n).unsqueeze(1));
    s_tile = s_tile.narrow(1, 0, n);
    at::mm_out(s_tile, q_hat, k_hat.t());
  }
};

// Calls body(i) for i in [0, n) on the intra-op threads, each i on one thread.
// The ATen calls inside (products, casts) run as the caller's: grad mode and dispatch keys are
// thread-local, so they are carried to the worker threads. Those calls must run on one thread each:
// a multi-threaded GEMM may cut its inner dimension by the thread count and so change the bits.
// at::parallel_for runs a range of one element inline, outside any parallel region, where the BLAS
// would use every thread; asking for at least two elements keeps the body either inside a parallel
// region (where the BLAS runs single-threaded) or on a single configured thread.
template <typename Body>
void parallel_each(int64_t n, const Body& body) {
  const at::ThreadLocalState caller;
  at::parallel_for(0, std::max<int64_t>(n, 2), 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard as_caller(caller);
    for (int64_t i = begin; i < std::min(end, n); ++i) body(i);
  });
}

// Calls body(p, k_hat, s_tile) for every split p, in parallel, with tile buffers of its own.
template <typename Body>
void for_each_split(const Problem& pb, const Body& body) {
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  parallel_each(pb.splits, [&](int64_t p) {
    const at::Tensor k_buf = at::zeros({kTileKeys, pb.D}, opts);
    const at::Tensor s_buf = at::zeros({pb.B, kTileKeys}, opts);  // whole vectors are read past a short tile
    body(p, k_buf, s_buf);
  });
}

// The C++ entry points are reachable without the Python checks (torch.ops, circleloss_ext._C), so they
// check every size they index with themselves.
void check_vector(const at::Tensor& t, const char* name, int64_t n, at::ScalarType dtype, const char* of) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype == at::kLong ? "int64" : "float32", ", got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, " must have ", n, " elements (one per row of ", of, "), got shape ",
              t.sizes());
}

void check_operands(const at::Tensor& queries, const at::Tensor& keys) {
  for (const auto& [x, name] : {std::pair{&queries, "queries"}, std::pair{&keys, "keys"}}) {
    TORCH_CHECK(x->device().is_cpu(), name, " must be a CPU tensor, got one on ", x->device());
    TORCH_CHECK(x->dim() == 2, name, " must be 2-D (rows, D), got shape ", x->sizes());
    const auto t = x->scalar_type();
    TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, name,
                " must be float16, bfloat16 or float32, got ", t);
  }
  TORCH_CHECK(keys.scalar_type() == queries.scalar_type(), "keys has dtype ", keys.scalar_type(),
              " but queries has ", queries.scalar_type());
  TORCH_CHECK(keys.size(1) == queries.size(1), "keys must have D = ", queries.size(1),
              " columns (as queries), got shape ", keys.sizes());
}

void check_problem(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& query_labels,
                   const std::optional<at::Tensor>& key_labels, const at::Tensor& inv_norm_q,
                   const at::Tensor& inv_norm_k, const std::optional<at::Tensor>& excluded_keys) {
  check_operands(queries, keys);
  const int64_t B = queries.size(0), N = keys.size(0);
  check_vector(query_labels, "query_labels", B, at::kLong, "queries");
  if (excluded_keys) check_vector(*excluded_keys, "excluded_keys", B, at::kLong, "queries");
  if (key_labels) check_vector(*key_labels, "key_labels", N, at::kLong, "keys");
  check_vector(inv_norm_q, "inv_norm_q", B, at::kFloat, "queries");
  check_vector(inv_norm_k, "inv_norm_k", N, at::kFloat, "keys");
}

}  // namespace

// 1 / max(|x_r|, eps) per row, float32. Each row is summed by one thread in a fixed order (kLanes
// partial sums, then across lanes), so the bits do not depend on the thread count; rows are read in
// chunks converted to float32, never the whole matrix at once.
at::Tensor inverse_norms(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2, "x must be a 2-D CPU tensor, got shape ", x.sizes(), " on ",
              x.device());
  const int64_t R = x.size(0), D = x.size(1);
  at::Tensor out = at::empty({R}, at::TensorOptions().dtype(at::kFloat));
  float* inv = out.data_ptr<float>();
  constexpr int64_t kChunkRows = 64;
  parallel_each((R + kChunkRows - 1) / kChunkRows, [&](int64_t c) {
    const int64_t r0 = c * kChunkRows, rows = std::min(kChunkRows, R - r0);
    const at::Tensor chunk = x.narrow(0, r0, rows).to(at::kFloat).contiguous();
    const float* v = chunk.data_ptr<float>();
    for (int64_t r = 0; r < rows; ++r) {
      const float* row = v + r * D;
      vfloat lanes = splat(0.f);
      int64_t d = 0;
      for (; d + kLanes <= D; d += kLanes) {
        const vfloat e = load<vfloat>(row + d);
        lanes += e * e;
      }
      float sum_sq = hsum(lanes);
      for (; d < D; ++d) sum_sq += row[d] * row[d];
      inv[r0 + r] = 1.f / std::max(std::sqrt(sum_sq), kEps);
    }
  });
  return out;
}

// log sum_p exp(partial[p, i]) over the splits p, in split order (-inf where every split has -inf):
// a fixed order whatever the thread count.
static at::Tensor combine_splits(const at::Tensor& partial) {
  const int64_t splits = partial.size(0), B = partial.size(1);
  at::Tensor out = at::empty({B}, at::TensorOptions().dtype(at::kFloat));
  const float* x = partial.data_ptr<float>();
  float* lse = out.data_ptr<float>();
  for (int64_t i = 0; i < B; ++i) {
    float top = kNegInf;
    for (int64_t p = 0; p < splits; ++p) top = std::max(top, x[p * B + i]);
    const float shift = top == kNegInf ? 0.f : top;
    float sum = 0.f;
    for (int64_t p = 0; p < splits; ++p) sum += std::exp(x[p * B + i] - shift);
    lse[i] = shift + std::log(sum);  // a NaN partial, dropped by the max, reaches the sum
  }
  return out;
}

// max_p partial[.., p, i] over the splits p, in split order.
static at::Tensor max_over_splits(const at::Tensor& partial) { return std::get<0>(partial.max(1)); }

// (LP, LN, top, V): float32 (B,) log-sum-exps of each row's positive and negative logits (-inf if none);
// with track_top1, top (2, B) holds each row's largest positive and largest negative similarity
// (-inf if none); with negative_sum, V (B,) the sum of each row's negative logits; each empty otherwise.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> circle_forward(
    const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& query_labels,
    const std::optional<at::Tensor>& key_labels, const at::Tensor& inv_norm_q, const at::Tensor& inv_norm_k,
    double margin, double gamma, const std::optional<at::Tensor>& excluded_keys, bool track_top1, bool negative_sum) {
  check_problem(queries, keys, query_labels, key_labels, inv_norm_q, inv_norm_k, excluded_keys);
  const Problem pb(queries, keys, query_labels, key_labels, inv_norm_q, inv_norm_k, excluded_keys);
  const Epilogue ep{static_cast<float>(margin), static_cast<float>(gamma), true};
  const int64_t B = pb.B;
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor partial = at::empty({2, pb.splits, B}, opts);
  float* partial_pos = partial.data_ptr<float>();
  float* partial_neg = partial_pos + pb.splits * B;
  at::Tensor top_partial = at::full({2, track_top1 ? pb.splits : 0, B}, kNegInf, opts);
  float* top_pos = top_partial.data_ptr<float>();
  float* top_neg = top_pos + (track_top1 ? pb.splits * B : 0);
  at::Tensor sum_partial = at::zeros({negative_sum ? pb.splits : 0, B}, opts);
  float* neg_sum = sum_partial.data_ptr<float>();
  const int64_t* a = pb.query_labels.data_ptr<int64_t>();

  for_each_split(pb, [&](int64_t p, const at::Tensor& k_buf, const at::Tensor& s_buf) {
    std::vector<float> max_pos(B, kNegInf), max_neg(B, kNegInf), sum_pos(B, 0.f), sum_neg(B, 0.f);
    std::vector<float> logits(kTileKeys);
    std::vector<int64_t> labels(kTileKeys);
    float* z = logits.data();
    const int64_t* b = labels.data();
    for (int64_t j0 = pb.split_start(p); j0 < pb.split_stop(p); j0 += kTileKeys) {
      const int64_t n = std::min(kTileKeys, pb.split_stop(p) - j0);
      at::Tensor k_hat = k_buf, s_tile = s_buf;
      pb.similarity_tile(j0, n, k_hat, s_tile);
      const float* S = s_tile.data_ptr<float>();
      const int64_t ld = s_tile.stride(0);
      pb.tile_labels(j0, n, labels.data());
      for (int64_t i = 0; i < B; ++i) {
        const float* s = S + i * ld;
        vfloat tile_max_pos = splat(kNegInf), tile_max_neg = splat(kNegInf);
        vfloat tile_top_pos = splat(kNegInf), tile_top_neg = splat(kNegInf), tile_neg_sum = splat(0.f);
        for (int64_t jj = 0; jj < n; jj += kLanes) {
          const LaneMasks lanes = lane_masks(b, jj, n, a[i], pb.excluded(i), j0);
          const vfloat sim = load<vfloat>(s + jj);
          const vfloat logit = lanes.pair ? ep.logit(sim, lanes.pos) : splat(kNegInf);
          store(z + jj, logit);
          tile_max_pos = vmax(tile_max_pos, lanes.pos ? logit : splat(kNegInf));
          tile_max_neg = vmax(tile_max_neg, lanes.pos ? splat(kNegInf) : logit);
          if (track_top1) {  // the nearest positive and negative, as cosines
            tile_top_pos = vmax(tile_top_pos, (lanes.pair & lanes.pos) ? sim : splat(kNegInf));
            tile_top_neg = vmax(tile_top_neg, (lanes.pair & ~lanes.pos) ? sim : splat(kNegInf));
          }
          if (negative_sum) tile_neg_sum += (lanes.pair & ~lanes.pos) ? logit : splat(0.f);
        }
        if (negative_sum) neg_sum[p * B + i] += hsum(tile_neg_sum);
        if (track_top1) {
          top_pos[p * B + i] = std::max(top_pos[p * B + i], hmax(tile_top_pos));
          top_neg[p * B + i] = std::max(top_neg[p * B + i], hmax(tile_top_neg));
        }
        const float new_max_pos = std::max(max_pos[i], hmax(tile_max_pos));
        const float new_max_neg = std::max(max_neg[i], hmax(tile_max_neg));
        const float shift_pos = new_max_pos == kNegInf ? 0.f : new_max_pos;
        const float shift_neg = new_max_neg == kNegInf ? 0.f : new_max_neg;
        vfloat add_pos = splat(0.f), add_neg = splat(0.f);
        for (int64_t jj = 0; jj < n; jj += kLanes) {
          const vint pos = lane_masks(b, jj, n, a[i], pb.excluded(i), j0).pos;
          const vfloat e = vexp(load<vfloat>(z + jj) - (pos ? splat(shift_pos) : splat(shift_neg)));
          add_pos += pos ? e : splat(0.f);
          add_neg += pos ? splat(0.f) : e;
        }
        // NaN logits may be dropped from the maxima, but they reach the sums through exp.
        sum_pos[i] = sum_pos[i] * std::exp(max_pos[i] - shift_pos) + hsum(add_pos);
        sum_neg[i] = sum_neg[i] * std::exp(max_neg[i] - shift_neg) + hsum(add_neg);
        max_pos[i] = new_max_pos;
        max_neg[i] = new_max_neg;
      }
    }
    for (int64_t i = 0; i < B; ++i) {
      partial_pos[p * B + i] = max_pos[i] + std::log(sum_pos[i]);
      partial_neg[p * B + i] = max_neg[i] + std::log(sum_neg[i]);
    }
  });
  at::Tensor top = track_top1 ? max_over_splits(top_partial) : at::empty({0}, opts);
  at::Tensor sums = negative_sum ? sum_partial.sum(0) : at::empty({0}, opts);  // a fixed order over splits
  return {combine_splits(partial[0]), combine_splits(partial[1]), top, sums};
}

// (dL/dqueries, dL/dkeys) in the inputs' dtypes (empty where not asked for). grad_rows: float32 (B,).
std::tuple<at::Tensor, at::Tensor> circle_backward(
    const at::Tensor& grad_rows, const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& query_labels,
    const std::optional<at::Tensor>& key_labels, const at::Tensor& inv_norm_q, const at::Tensor& inv_norm_k,
    const at::Tensor& lse_pos, const at::Tensor& lse_neg, double margin, double gamma,
    const std::optional<at::Tensor>& excluded_keys,
    bool detach_alpha, bool need_queries, bool need_keys, double smooth_pos, double smooth_neg) {
  check_problem(queries, keys, query_labels, key_labels, inv_norm_q, inv_norm_k, excluded_keys);
  for (const auto& [t, name] : {std::pair{&grad_rows, "grad_rows"}, std::pair{&lse_pos, "lse_pos"},
                                std::pair{&lse_neg, "lse_neg"}}) {
    check_vector(*t, name, queries.size(0), at::kFloat, "queries");
  }
  const Problem pb(queries, keys, query_labels, key_labels, inv_norm_q, inv_norm_k, excluded_keys);
  const Epilogue ep{static_cast<float>(margin), static_cast<float>(gamma), detach_alpha};
  const int64_t B = pb.B, D = pb.D;
  const at::Tensor row_scale = (at::sigmoid(lse_pos + lse_neg) * grad_rows).contiguous();  // sigma_i
  const at::Tensor lp = lse_pos.contiguous(), ln = lse_neg.contiguous();
  const float* sigma = row_scale.data_ptr<float>();
  const at::Tensor upstream = grad_rows.contiguous();
  const float* g_up = upstream.data_ptr<float>();
  const float* lse_p = lp.data_ptr<float>();
  const float* lse_n = ln.data_ptr<float>();
  const int64_t* a = pb.query_labels.data_ptr<int64_t>();
  const float* k_inv = pb.inv_norm_k.data_ptr<float>();

  const auto opts = at::TensorOptions().dtype(at::kFloat);
  // Per split: R_p = G K-hat over the split's keys (B x D), and the row sums of G o S (q-hat . R_p).
  at::Tensor raw_q = need_queries ? at::zeros({pb.splits, B, D}, opts) : at::Tensor();
  at::Tensor radial_q = at::zeros({pb.splits, B}, opts);
  at::Tensor grad_k = need_keys ? at::empty({pb.N, D}, keys.options()) : keys.new_empty({0});

  for_each_split(pb, [&](int64_t p, const at::Tensor& k_buf, const at::Tensor& s_buf) {
    float* radial = radial_q.data_ptr<float>() + p * B;
    std::vector<float> radial_k_buf(kTileKeys);
    std::vector<int64_t> labels(kTileKeys);
    float* radial_k = radial_k_buf.data();
    const int64_t* b = labels.data();
    at::Tensor cc = need_keys ? at::empty({kTileKeys, D}, opts) : at::Tensor();
    at::Tensor r_split = need_queries ? raw_q[p] : at::Tensor();
    for (int64_t j0 = pb.split_start(p); j0 < pb.split_stop(p); j0 += kTileKeys) {
      const int64_t n = std::min(kTileKeys, pb.split_stop(p) - j0);
      at::Tensor k_hat = k_buf, g_tile = s_buf;
      pb.similarity_tile(j0, n, k_hat, g_tile);
      const int64_t ld = g_tile.stride(0);
      pb.tile_labels(j0, n, labels.data());
      std::fill(radial_k, radial_k + n, 0.f);
      for (int64_t i = 0; i < B; ++i) {
        float* g_row = g_tile.data_ptr<float>() + i * ld;  // s_ij on entry, dL/ds_ij on exit
        const vfloat lse_pos_i = splat(lse_p[i]), lse_neg_i = splat(lse_n[i]), sigma_i = splat(sigma[i]);
        // label smoothing: G = g_i (sigma_i e - c) slope, c = c_p on positives, c_n on negatives
        const vfloat c_pos = splat(g_up[i] * static_cast<float>(smooth_pos));
        const vfloat c_neg = splat(g_up[i] * static_cast<float>(smooth_neg));
        vfloat row_radial = splat(0.f);
        for (int64_t jj = 0; jj < n; jj += kLanes) {
          const LaneMasks lanes = lane_masks(b, jj, n, a[i], pb.excluded(i), j0);
          const vfloat s = lanes.pair ? load<vfloat>(g_row + jj) : splat(0.f);
          const vfloat e = vexp(ep.logit(s, lanes.pos) - (lanes.pos ? lse_pos_i : lse_neg_i));
          const vfloat g = lanes.pair ? (sigma_i * e - (lanes.pos ? c_pos : c_neg)) * ep.slope(s, lanes.pos)
                                      : splat(0.f);
          store(g_row + jj, g);
          row_radial += g * s;
          store(radial_k + jj, load<vfloat>(radial_k + jj) + g * s);
        }
        radial[i] += hsum(row_radial);
      }
      if (need_queries) r_split.addmm_(g_tile, k_hat);
      if (need_keys) {
        at::Tensor cc_tile = cc.narrow(0, 0, n);
        at::mm_out(cc_tile, g_tile.t(), pb.q_hat);
        // dL/dk_j = (Cc_j - (k-hat_j . Cc_j) k-hat_j) / |k_j|, with k-hat_j . Cc_j = sum_i G_ij s_ij.
        float* c = cc_tile.data_ptr<float>();
        const float* kh = k_hat.data_ptr<float>();
        for (int64_t jj = 0; jj < n; ++jj) {
          for (int64_t d = 0; d < D; ++d) {
            c[jj * D + d] = (c[jj * D + d] - radial_k[jj] * kh[jj * D + d]) * k_inv[j0 + jj];
          }
        }
        grad_k.narrow(0, j0, n).copy_(cc_tile);
      }
    }
  });

  at::Tensor grad_q = queries.new_empty({0});
  if (need_queries) {
    // Splits are added in order; dL/dq_i = (R_i - (q-hat_i . R_i) q-hat_i) / |q_i|.
    at::Tensor r = raw_q[0].clone();
    at::Tensor radial = radial_q[0].clone();
    for (int64_t p = 1; p < pb.splits; ++p) {
      r.add_(raw_q[p]);
      radial.add_(radial_q[p]);
    }
    grad_q = ((r - radial.unsqueeze(1) * pb.q_hat) * inv_norm_q.unsqueeze(1)).to(queries.scalar_type());
  }
  return {grad_q, grad_k};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "circleloss-ext: fused Circle Loss for CPU tensors";
  m.def("inverse_norms", &inverse_norms, "1 / max(|x_r|, eps) per row, float32", py::arg("x"));
  m.def("circle_forward", &circle_forward, "(LP, LN, top) per row", py::arg("queries"), py::arg("keys"),
        py::arg("query_labels"), py::arg("key_labels"), py::arg("inv_norm_q"), py::arg("inv_norm_k"),
        py::arg("margin"), py::arg("gamma"), py::arg("excluded_keys"), py::arg("track_top1"),
        py::arg("negative_sum"));
  m.def("circle_backward", &circle_backward, "(dL/dqueries, dL/dkeys)", py::arg("grad_rows"), py::arg("queries"),
        py::arg("keys"), py::arg("query_labels"), py::arg("key_labels"), py::arg("inv_norm_q"),
        py::arg("inv_norm_k"), py::arg("lse_pos"), py::arg("lse_neg"), py::arg("margin"), py::arg("gamma"),
        py::arg("excluded_keys"), py::arg("detach_alpha"), py::arg("need_queries"), py::arg("need_keys"),
        py::arg("smooth_pos"), py::arg("smooth_neg"));
}

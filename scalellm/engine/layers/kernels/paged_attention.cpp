// Fused paged decode attention for the CPU.
//
// What it computes, for every decode row b (one query token) and query head h:
//
//     ctx   = context_lens[b]                      keys at positions [start, ctx)
//     start = sliding_window > 0 ? max(0, ctx - sliding_window) : 0
//     s_t   = scale * q[b, h] . K[t]               for t in [start, ctx)
//     out[b, h] = sum_t softmax(s)_t * V[t]        (scores, softmax, sums in float)
//
// where K[t] / V[t] are read straight from the paged cache of the KV head kv = h / G
// (G = num_heads / num_kv_heads query heads share one KV head):
//
//     slot(t) = block_table[b, t / block_size] * block_size + t % block_size
//     K[t]    = k_cache[slot(t), kv, :]            a contiguous run of head_dim elements
//
// Memory access pattern. One task is a (row, kv head) pair; tasks are split over the intra-op
// thread pool (at::parallel_for). A task walks the row's blocks in order; inside a block the
// K vectors of consecutive positions are num_kv_heads * head_dim elements apart (slot stride),
// each a contiguous head_dim run. Each K vector is loaded once and dotted with all G queries of
// the group (pass 1); after the softmax, each V vector is loaded once and accumulated into the G
// outputs (pass 2). Nothing is gathered or copied besides a head_dim float conversion of bf16 rows.
// Per-thread scratch (scores [G, ctx], accumulators [G, D]) lives on the heap, so contexts of
// any length fit.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "avx512_bf16.h"

namespace {

// Row loaders: view head_dim elements of the cache as floats. float rows are used in place;
// bfloat16 rows are widened into `tmp` (the upper 16 bits of a float32).
inline const float* load_row(const float* src, float* /*tmp*/, int64_t /*dim*/) {
  return src;
}

inline const float* load_row(const at::BFloat16* src, float* tmp, int64_t dim) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t d = 0; d < dim; ++d) {
    uint32_t wide = static_cast<uint32_t>(bits[d]) << 16;
    float value;
    std::memcpy(&value, &wide, sizeof(value));
    tmp[d] = value;
  }
  return tmp;
}

inline float dot(const float* a, const float* b, int64_t dim) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t d = 0; d < dim; ++d) sum += a[d] * b[d];
  return sum;
}

inline void axpy(float alpha, const float* x, float* y, int64_t dim) {
#pragma omp simd
  for (int64_t d = 0; d < dim; ++d) y[d] += alpha * x[d];
}

// exp(x) for x <= 0, vectorizable (std::exp is not without -ffast-math): x = k ln2 + r with
// |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial (relative error < 2e-7), 2^k from the
// exponent bits. Inputs below -87 (e^x < 1.7e-38, a negligible softmax weight) give 0.
inline float exp_nonpositive(float x) {
  constexpr float kLog2e = 1.44269504f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  const bool underflow = x < -87.f;
  x = std::max(x, -87.f);
  const float k = std::nearbyint(x * kLog2e);
  const float r = (x - k * kLn2Hi) - k * kLn2Lo;
  float p = 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return underflow ? 0.f : p * scale;
}

// Softmax of scores[0, n) in place, unnormalized; returns the sum of the exponentials (>= 1).
inline float softmax_unnormalized(float* scores, int64_t n) {
  float max_score = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : max_score)
  for (int64_t i = 0; i < n; ++i) max_score = std::max(max_score, scores[i]);
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    scores[i] = exp_nonpositive(scores[i] - max_score);
    sum += scores[i];
  }
  return sum;
}

// Shapes and strides shared by every task.
struct Problem {
  int64_t num_kv_heads, group, head_dim, block_size, window, max_blocks;
  int64_t slot_stride;  // elements between slots of the cache
  float scale;
};

// Per-thread scratch, grown on demand.
struct Scratch {
  std::vector<float> query;   // [G, D] scaled queries
  std::vector<float> scores;  // [G, n]
  std::vector<float> acc;     // [G, D]
  std::vector<float> row;     // [D] a widened K or V row
};

// Calls fn(t, slot) for each position t in [start, ctx) of one row, walking its blocks in order.
template <typename Index, typename Fn>
inline void for_each_slot(const Index* table_row, int64_t block_size, int64_t start, int64_t ctx,
                          Fn fn) {
  for (int64_t t = start; t < ctx;) {
    int64_t block = static_cast<int64_t>(table_row[t / block_size]);
    int64_t offset = t % block_size;
    int64_t end = std::min(ctx, t + block_size - offset);
    for (int64_t slot = block * block_size + offset; t < end; ++t, ++slot) fn(t, slot);
  }
}

// One (row, kv head) task: out[b, kv*G : (kv+1)*G, :] from q and the row's cache blocks.
template <typename T, typename Index>
void attend_group(const Problem& p, const T* q, const T* k_cache, const T* v_cache,
                  const Index* table_row, int64_t ctx, int64_t kv, T* out, Scratch& s) {
  const int64_t G = p.group, D = p.head_dim;
  const int64_t start = p.window > 0 ? std::max<int64_t>(0, ctx - p.window) : 0;
  const int64_t n = ctx - start;
  s.query.resize(G * D);
  s.scores.resize(G * n);
  s.acc.assign(G * D, 0.f);
  s.row.resize(D);
  for (int64_t i = 0; i < G * D; ++i) s.query[i] = static_cast<float>(q[i]) * p.scale;

  const int64_t head_offset = kv * D;
  for_each_slot(table_row, p.block_size, start, ctx, [&](int64_t t, int64_t slot) {
    const float* k = load_row(k_cache + slot * p.slot_stride + head_offset, s.row.data(), D);
    for (int64_t g = 0; g < G; ++g) s.scores[g * n + t - start] = dot(&s.query[g * D], k, D);
  });
  std::vector<float> inv_sum(G);
  for (int64_t g = 0; g < G; ++g) inv_sum[g] = 1.f / softmax_unnormalized(&s.scores[g * n], n);
  for_each_slot(table_row, p.block_size, start, ctx, [&](int64_t t, int64_t slot) {
    const float* v = load_row(v_cache + slot * p.slot_stride + head_offset, s.row.data(), D);
    for (int64_t g = 0; g < G; ++g) axpy(s.scores[g * n + t - start], v, &s.acc[g * D], D);
  });
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) out[g * D + d] = static_cast<T>(s.acc[g * D + d] * inv_sum[g]);
}

#if SCALELLM_AVX512_BF16
// Register-resident path for head_dim 64 or 128 (D / 16 vectors of 16 floats per row). The queries
// of up to HEADS heads of the group and their output accumulators live in zmm registers for the
// whole walk over the context, and a bf16 K or V row is widened in registers: per key, one load
// of the row, HEADS x D / 16 fused multiply-adds, and no scratch traffic. Groups larger than HEADS
// are done in chunks of HEADS heads (each chunk walks the context again, from cache).
using scalellm_avx512::load16;
using scalellm_avx512::store16;

template <int D, int HEADS, typename T, typename Index>
void attend_heads(const Problem& p, const T* q, const T* k_cache, const T* v_cache, const Index* table_row,
                  int64_t start, int64_t ctx, int64_t head_offset, int heads, T* out, float* scores) {
  constexpr int V = D / 16;
  const int64_t n = ctx - start;
  __m512 reg[HEADS][V];  // the scaled queries in pass 1, the output accumulators in pass 2
  for (int g = 0; g < heads; ++g)
    for (int v = 0; v < V; ++v) reg[g][v] = _mm512_mul_ps(load16(q + g * D + v * 16), _mm512_set1_ps(p.scale));
  for_each_slot(table_row, p.block_size, start, ctx, [&](int64_t t, int64_t slot) {
    const T* k = k_cache + slot * p.slot_stride + head_offset;
    __m512 row[V];
    for (int v = 0; v < V; ++v) row[v] = load16(k + v * 16);
    for (int g = 0; g < heads; ++g) {
      __m512 sum = _mm512_mul_ps(reg[g][0], row[0]);
      for (int v = 1; v < V; ++v) sum = _mm512_fmadd_ps(reg[g][v], row[v], sum);
      scores[g * n + t - start] = _mm512_reduce_add_ps(sum);
    }
  });
  float inv_sum[HEADS];
  for (int g = 0; g < heads; ++g) inv_sum[g] = 1.f / softmax_unnormalized(scores + g * n, n);
  for (int g = 0; g < heads; ++g)
    for (int v = 0; v < V; ++v) reg[g][v] = _mm512_setzero_ps();
  for_each_slot(table_row, p.block_size, start, ctx, [&](int64_t t, int64_t slot) {
    const T* vrow = v_cache + slot * p.slot_stride + head_offset;
    __m512 row[V];
    for (int v = 0; v < V; ++v) row[v] = load16(vrow + v * 16);
    for (int g = 0; g < heads; ++g) {
      const __m512 weight = _mm512_set1_ps(scores[g * n + t - start]);
      for (int v = 0; v < V; ++v) reg[g][v] = _mm512_fmadd_ps(weight, row[v], reg[g][v]);
    }
  });
  for (int g = 0; g < heads; ++g)
    for (int v = 0; v < V; ++v) store16(out + g * D + v * 16, _mm512_mul_ps(reg[g][v], _mm512_set1_ps(inv_sum[g])));
}

// The whole group of one (row, kv head) task in chunks of HEADS heads; false when D is not 64 or 128.
template <typename T, typename Index>
bool attend_group_registers(const Problem& p, const T* q, const T* k_cache, const T* v_cache,
                            const Index* table_row, int64_t ctx, int64_t kv, T* out, Scratch& s) {
  const int64_t D = p.head_dim;
  if (D != 64 && D != 128) return false;
  const int64_t start = p.window > 0 ? std::max<int64_t>(0, ctx - p.window) : 0;
  const int heads_per_chunk = D == 64 ? 4 : 2;
  s.scores.resize(heads_per_chunk * (ctx - start));
  for (int64_t g0 = 0; g0 < p.group; g0 += heads_per_chunk) {
    const int heads = static_cast<int>(std::min<int64_t>(heads_per_chunk, p.group - g0));
    if (D == 64)
      attend_heads<64, 4>(p, q + g0 * D, k_cache, v_cache, table_row, start, ctx, kv * D, heads, out + g0 * D,
                          s.scores.data());
    else
      attend_heads<128, 2>(p, q + g0 * D, k_cache, v_cache, table_row, start, ctx, kv * D, heads, out + g0 * D,
                           s.scores.data());
  }
  return true;
}
#else
template <typename T, typename Index>
bool attend_group_registers(const Problem&, const T*, const T*, const T*, const Index*, int64_t, int64_t, T*,
                            Scratch&) {
  return false;
}
#endif

// Every context length in [1, NB * block_size] and every block it uses inside the cache, so the
// tasks never read out of bounds.
template <typename Index>
void check_table(const Problem& p, const Index* table, const Index* lens, int64_t rows,
                 int64_t num_blocks) {
  for (int64_t b = 0; b < rows; ++b) {
    const int64_t ctx = static_cast<int64_t>(lens[b]);
    TORCH_CHECK(ctx >= 1 && ctx <= p.max_blocks * p.block_size, "context_lens[", b, "] = ", ctx,
                " is outside [1, block_table.size(1) * block_size]");
    const int64_t first = p.window > 0 ? std::max<int64_t>(0, ctx - p.window) / p.block_size : 0;
    for (int64_t i = first; i < (ctx + p.block_size - 1) / p.block_size; ++i) {
      const int64_t block = static_cast<int64_t>(table[b * p.max_blocks + i]);
      TORCH_CHECK(block >= 0 && block < num_blocks, "block_table[", b, ", ", i, "] = ", block,
                  " is not a block of the cache");
    }
  }
}

template <typename T, typename Index>
void run(const Problem& p, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
         const at::Tensor& block_table, const at::Tensor& context_lens, at::Tensor& out) {
  const T* q_ptr = q.data_ptr<T>();
  const T* k_ptr = k_cache.data_ptr<T>();
  const T* v_ptr = v_cache.data_ptr<T>();
  const Index* table = block_table.data_ptr<Index>();
  const Index* lens = context_lens.data_ptr<Index>();
  T* out_ptr = out.data_ptr<T>();
  check_table(p, table, lens, q.size(0), k_cache.size(0) / p.block_size);
  const int64_t group_size = p.group * p.head_dim;  // elements of one KV head's queries in a row
  const int64_t row_size = p.num_kv_heads * group_size;
  at::parallel_for(0, q.size(0) * p.num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / p.num_kv_heads, kv = task % p.num_kv_heads;
      const int64_t offset = b * row_size + kv * group_size;
      const Index* table_row = table + b * p.max_blocks;
      const int64_t ctx = static_cast<int64_t>(lens[b]);
      if (!attend_group_registers<T, Index>(p, q_ptr + offset, k_ptr, v_ptr, table_row, ctx, kv,
                                            out_ptr + offset, scratch))
        attend_group<T, Index>(p, q_ptr + offset, k_ptr, v_ptr, table_row, ctx, kv, out_ptr + offset, scratch);
    }
  });
}

void check_inputs(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& block_table, const at::Tensor& context_lens, int64_t block_size) {
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(),
              "paged_decode_attention runs on CPU tensors");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3, "q must be [B, H, D] and k_cache [slots, KH, D]");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache must have the same shape");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "q, k_cache and v_cache must share a dtype");
  TORCH_CHECK(q.size(2) == k_cache.size(2), "q and the cache must share head_dim");
  TORCH_CHECK(q.size(1) % k_cache.size(1) == 0, "num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the KV cache must be contiguous");
  TORCH_CHECK(block_size > 0 && k_cache.size(0) % block_size == 0, "bad block_size");
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == q.size(0), "block_table must be [B, NB]");
  TORCH_CHECK(context_lens.dim() == 1 && context_lens.size(0) == q.size(0), "context_lens must be [B]");
  TORCH_CHECK(block_table.scalar_type() == context_lens.scalar_type(),
              "block_table and context_lens must share an integer dtype");
}

// Contract: see the comment at the top. context_lens[b] must lie in [1, NB * block_size] and the
// blocks a row reads must be blocks of the cache (both checked).
at::Tensor paged_decode_attention(const at::Tensor& q_in, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_table_in,
                                  const at::Tensor& context_lens_in, int64_t block_size,
                                  double scale, int64_t sliding_window) {
  check_inputs(q_in, k_cache, v_cache, block_table_in, context_lens_in, block_size);
  at::Tensor q = q_in.contiguous();
  at::Tensor block_table = block_table_in.contiguous();
  at::Tensor context_lens = context_lens_in.contiguous();
  const int64_t max_blocks = block_table.size(1);
  const int64_t num_kv_heads = k_cache.size(1), head_dim = k_cache.size(2);
  Problem p{num_kv_heads, q.size(1) / num_kv_heads, head_dim, block_size, sliding_window,
            max_blocks, num_kv_heads * head_dim, static_cast<float>(scale)};
  at::Tensor out = at::empty_like(q);
  auto dispatch_index = [&](auto scalar_tag) {
    using T = decltype(scalar_tag);
    if (block_table.scalar_type() == at::kInt)
      run<T, int32_t>(p, q, k_cache, v_cache, block_table, context_lens, out);
    else if (block_table.scalar_type() == at::kLong)
      run<T, int64_t>(p, q, k_cache, v_cache, block_table, context_lens, out);
    else
      TORCH_CHECK(false, "block_table and context_lens must be int32 or int64");
  };
  if (q.scalar_type() == at::kFloat)
    dispatch_index(float{});
  else if (q.scalar_type() == at::kBFloat16)
    dispatch_index(at::BFloat16{});
  else
    TORCH_CHECK(false, "paged_decode_attention supports float32 and bfloat16, got ", q.scalar_type());
  return out;
}

}  // namespace

TORCH_LIBRARY(scalellm, m) {
  m.def(
      "paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, "
      "Tensor context_lens, int block_size, float scale, int sliding_window) -> Tensor");
}

TORCH_LIBRARY_IMPL(scalellm, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
}

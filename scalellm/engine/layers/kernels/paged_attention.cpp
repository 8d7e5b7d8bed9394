// Fused paged decode attention for the CPU.
//
// q (and the output) are float32 or bfloat16; the cache is in q's dtype, or bfloat16 under float32
// queries (a 16-bit cache halves the bytes a step reads; its rows are widened exactly as they load).
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
// Memory access pattern. One task is a (row, kv head) pair (on the AVX2 path, a whole row, or an
// equal part of a row's positions when rows are fewer than two a thread: see run()); tasks are split
// over the intra-op thread pool (at::parallel_for). A task walks the row's blocks in order; inside a block the K vectors of
// consecutive positions are num_kv_heads * head_dim elements apart (slot stride), each a
// contiguous head_dim run. Each K vector is loaded once and dotted with all G queries of
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
#include <numeric>
#include <utility>
#include <vector>

#include "avx512_bf16.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

// The op's name: a build of this file for its AVX2 path alone (tests) registers it under another.
#ifndef SCALELLM_OP
#define SCALELLM_OP paged_decode_attention
#endif
#define SCALELLM_STR2(x) #x
#define SCALELLM_STR(x) SCALELLM_STR2(x)

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

// Softmax of scores[0, n) in place, unnormalized; returns the sum of the exponentials (>= 1, 0 when
// n = 0) and, in *max_out if given, the maximum subtracted (-inf when n = 0).
inline float softmax_unnormalized(float* scores, int64_t n, float* max_out = nullptr) {
  float max_score = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : max_score)
  for (int64_t i = 0; i < n; ++i) max_score = scores[i] > max_score ? scores[i] : max_score;  // std::max stays scalar
  if (max_out != nullptr) *max_out = max_score;
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

// The first key position a row of context length ctx attends to (the sliding window's start).
inline int64_t first_position(const Problem& p, int64_t ctx) {
  return p.window > 0 ? std::max<int64_t>(0, ctx - p.window) : 0;
}

// A task's share of its row's context: part `index` of `count` equal ranges of the positions the row
// attends to. A task of a row split in several parts leaves, for each of its query heads, the
// range's maximum score, its sum of exponentials and its head_dim unnormalized weighted values in
// `state` (kStateExtra + head_dim floats a head); run() merges the parts (merge_parts).
struct Part {
  int64_t index = 0, count = 1;
  float* state = nullptr;  // null for a whole row: the task writes its normalized output
};
constexpr int64_t kStateExtra = 2;

// Positions [begin, end) of part `part` of a row of context length ctx.
inline std::pair<int64_t, int64_t> part_range(const Problem& p, int64_t ctx, const Part& part) {
  const int64_t start = first_position(p, ctx), n = ctx - start;
  return {start + n * part.index / part.count, start + n * (part.index + 1) / part.count};
}

// Per-thread scratch, grown on demand.
struct Scratch {
  std::vector<float> query;   // [G, D] scaled queries
  std::vector<float> scores;  // [G, n]
  std::vector<float> acc;     // [G, D]
  std::vector<float> row;     // [D] a widened K or V row
};

// s.query = the first `count` query values as floats, times the scale.
template <typename T>
inline void scale_queries(const Problem& p, const T* q, int64_t count, Scratch& s) {
  s.query.resize(count);
  for (int64_t i = 0; i < count; ++i) s.query[i] = static_cast<float>(q[i]) * p.scale;
}

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
template <typename T, typename C, typename Index>
void attend_group(const Problem& p, const T* q, const C* k_cache, const C* v_cache,
                  const Index* table_row, int64_t ctx, int64_t kv, T* out, Scratch& s) {
  const int64_t G = p.group, D = p.head_dim;
  const int64_t start = first_position(p, ctx);
  const int64_t n = ctx - start;
  s.scores.resize(G * n);
  s.acc.assign(G * D, 0.f);
  s.row.resize(D);
  scale_queries(p, q, G * D, s);

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

template <int D, int HEADS, typename T, typename C, typename Index>
void attend_heads(const Problem& p, const T* q, const C* k_cache, const C* v_cache, const Index* table_row,
                  int64_t start, int64_t ctx, int64_t head_offset, int heads, T* out, float* scores) {
  constexpr int V = D / 16;
  const int64_t n = ctx - start;
  __m512 reg[HEADS][V];  // the scaled queries in pass 1, the output accumulators in pass 2
  for (int g = 0; g < heads; ++g)
    for (int v = 0; v < V; ++v) reg[g][v] = _mm512_mul_ps(load16(q + g * D + v * 16), _mm512_set1_ps(p.scale));
  for_each_slot(table_row, p.block_size, start, ctx, [&](int64_t t, int64_t slot) {
    const C* k = k_cache + slot * p.slot_stride + head_offset;
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
    const C* vrow = v_cache + slot * p.slot_stride + head_offset;
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
template <typename T, typename C, typename Index>
bool attend_group_registers(const Problem& p, const T* q, const C* k_cache, const C* v_cache,
                            const Index* table_row, int64_t ctx, int64_t kv, T* out, Scratch& s) {
  const int64_t D = p.head_dim;
  if (D != 64 && D != 128) return false;
  const int64_t start = first_position(p, ctx);
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

constexpr bool kRangeTasks = false;  // a task is one (row, KV head) pair: kv_count is 1

template <typename T, typename C, typename Index>
bool attend_registers(const Problem& p, const T* q, const C* k_cache, const C* v_cache, const Index* table_row,
                      int64_t ctx, int64_t kv0, int64_t kv_count, T* out, Scratch& s, const Part& /*whole*/) {
  for (int64_t i = 0; i < kv_count; ++i) {
    const int64_t offset = i * p.group * p.head_dim;
    if (!attend_group_registers(p, q + offset, k_cache, v_cache, table_row, ctx, kv0 + i, out + offset, s))
      return false;
  }
  return true;
}
#elif defined(__AVX2__) && defined(__FMA__)
// The AVX2 register path for head_dim 64 or 128. With 16 ymm registers a group's queries and
// outputs cannot stay in registers for the whole walk, and a walk per KV head reads a slot's KV
// heads as separate strided streams, which left it waiting on memory (5-6 GB/s of a core's 17).
// So this path takes every KV head of a row (or of a part of its positions: see run()) and walks
// each slot's heads together, a contiguous run of the cache:
//   pass 1: per slot, KV head and chunk of up to 4 query heads, each 8-float piece of the key is
//           loaded once and multiplied into two accumulators per head, the scaled float queries
//           read from scratch (L1) as memory operands; the chunk's sums are reduced together;
//   pass 2: per slot, the heads' weights are broadcast and each piece of the value is added into
//           the heads' float accumulators in scratch (L1), two slots at a time (one load and
//           store of an accumulator per two multiply-adds).
// Both walks prefetch the range of the slot kAhead positions on.
constexpr int64_t kAhead = 8;

inline __m256 load8(const float* src) { return _mm256_loadu_ps(src); }

inline __m256 load8(const at::BFloat16* src) {  // bfloat16 widened exactly
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

// The four sums of a, b, c, d's lanes, in that order.
inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 all = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(all), _mm256_extractf128_ps(all, 1));
}

template <typename T, typename Index>
inline const T* slot_row(const Problem& p, const T* cache, const Index* table_row, int64_t t, int64_t offset) {
  const int64_t slot = static_cast<int64_t>(table_row[t / p.block_size]) * p.block_size + t % p.block_size;
  return cache + slot * p.slot_stride + offset;
}

template <typename T, typename Index>
inline void prefetch_ahead(const Problem& p, const T* cache, const Index* table_row, int64_t t, int64_t ctx,
                           int64_t offset, int64_t bytes) {
  if (t + kAhead >= ctx) return;
  const char* row = reinterpret_cast<const char*>(slot_row(p, cache, table_row, t + kAhead, offset));
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(row + b, _MM_HINT_T0);
}

// Scores of H query heads (1-4) against one key: scores[g * n] for g < H.
template <int D, int H, typename T>
inline void score_heads(const float* q, const T* key, float* scores, int64_t n) {
  __m256 acc[4][2];
  _Pragma("GCC unroll 4") for (int g = 0; g < 4; ++g) acc[g][0] = acc[g][1] = _mm256_setzero_ps();
  _Pragma("GCC unroll 16") for (int v = 0; v < D / 8; ++v) {
    const __m256 row = load8(key + v * 8);
    _Pragma("GCC unroll 4") for (int g = 0; g < H; ++g)
      acc[g][v & 1] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + v * 8), row, acc[g][v & 1]);
  }
  alignas(16) float four[4];
  _mm_store_ps(four, hsum4(_mm256_add_ps(acc[0][0], acc[0][1]), _mm256_add_ps(acc[1][0], acc[1][1]),
                           _mm256_add_ps(acc[2][0], acc[2][1]), _mm256_add_ps(acc[3][0], acc[3][1])));
  _Pragma("GCC unroll 4") for (int g = 0; g < H; ++g) scores[g * n] = four[g];
}

// acc[g] += weights[g * n] * value0 + weights[g * n + 1] * value1 for H query heads (1-4);
// value1 == nullptr adds value0's term alone.
template <int D, int H, typename T>
inline void accumulate_heads(const float* weights, int64_t n, const T* value0, const T* value1, float* acc) {
  __m256 w0[H], w1[H];
  _Pragma("GCC unroll 4") for (int g = 0; g < H; ++g) {
    w0[g] = _mm256_broadcast_ss(weights + g * n);
    w1[g] = value1 ? _mm256_broadcast_ss(weights + g * n + 1) : _mm256_setzero_ps();
  }
  _Pragma("GCC unroll 16") for (int v = 0; v < D / 8; ++v) {
    const __m256 row0 = load8(value0 + v * 8);
    const __m256 row1 = value1 ? load8(value1 + v * 8) : _mm256_setzero_ps();
    _Pragma("GCC unroll 4") for (int g = 0; g < H; ++g) {
      float* a = acc + g * D + v * 8;
      _mm256_storeu_ps(a, _mm256_fmadd_ps(w1[g], row1, _mm256_fmadd_ps(w0[g], row0, _mm256_loadu_ps(a))));
    }
  }
}

// fn(KV head, its chunk's first query head, heads in the chunk) over the query heads of KV heads
// [0, kv_count), in chunks of 4 at most.
template <typename Fn>
inline void for_each_chunk(int64_t kv_count, int64_t group, Fn fn) {
  for (int64_t kv = 0; kv < kv_count; ++kv)
    for (int64_t g0 = 0; g0 < group; g0 += 4) fn(kv, kv * group + g0, std::min<int64_t>(4, group - g0));
}

// Positions [start, ctx) of KV heads [kv0, kv0 + kv_count): the normalized output into `out`, or with
// `state`, each head's maximum, sum of exponentials and unnormalized values (see Part).
template <int D, typename T, typename C, typename Index>
void attend_range(const Problem& p, const float* q, const C* k_cache, const C* v_cache, const Index* table_row,
                  int64_t start, int64_t ctx, int64_t kv0, int64_t kv_count, T* out, Scratch& s, float* state) {
  const int64_t G = p.group, heads = kv_count * G, n = ctx - start, offset = kv0 * D;
  const int64_t bytes = kv_count * D * static_cast<int64_t>(sizeof(C));
  s.scores.resize(heads * n);
  s.acc.assign(heads * D, 0.f);
  float* scores = s.scores.data();
  for (int64_t t = start; t < ctx; ++t) {
    prefetch_ahead(p, k_cache, table_row, t, ctx, offset, bytes);
    const C* key = slot_row(p, k_cache, table_row, t, offset);
    for_each_chunk(kv_count, G, [&](int64_t kv, int64_t h, int64_t count) {
      const float* qh = q + h * D;
      float* sh = scores + h * n + t - start;
      switch (count) {
        case 4: score_heads<D, 4>(qh, key + kv * D, sh, n); break;
        case 3: score_heads<D, 3>(qh, key + kv * D, sh, n); break;
        case 2: score_heads<D, 2>(qh, key + kv * D, sh, n); break;
        default: score_heads<D, 1>(qh, key + kv * D, sh, n);
      }
    });
  }
  std::vector<float> sums(heads), maxima(heads);
  for (int64_t h = 0; h < heads; ++h) sums[h] = softmax_unnormalized(scores + h * n, n, &maxima[h]);
  for (int64_t t = start; t < ctx; t += 2) {
    prefetch_ahead(p, v_cache, table_row, t, ctx, offset, bytes);
    prefetch_ahead(p, v_cache, table_row, t + 1, ctx, offset, bytes);
    const C* value0 = slot_row(p, v_cache, table_row, t, offset);
    const C* value1 = t + 1 < ctx ? slot_row(p, v_cache, table_row, t + 1, offset) : nullptr;
    for_each_chunk(kv_count, G, [&](int64_t kv, int64_t h, int64_t count) {
      const float* wh = scores + h * n + t - start;
      const C* v0 = value0 + kv * D;
      const C* v1 = value1 ? value1 + kv * D : nullptr;
      float* ah = s.acc.data() + h * D;
      switch (count) {
        case 4: accumulate_heads<D, 4>(wh, n, v0, v1, ah); break;
        case 3: accumulate_heads<D, 3>(wh, n, v0, v1, ah); break;
        case 2: accumulate_heads<D, 2>(wh, n, v0, v1, ah); break;
        default: accumulate_heads<D, 1>(wh, n, v0, v1, ah);
      }
    });
  }
  for (int64_t h = 0; h < heads; ++h) {
    if (state != nullptr) {
      float* head = state + h * (kStateExtra + D);
      head[0] = maxima[h];
      head[1] = sums[h];
      std::copy(s.acc.data() + h * D, s.acc.data() + (h + 1) * D, head + kStateExtra);
      continue;
    }
    const float inv_sum = 1.f / sums[h];
    for (int64_t d = 0; d < D; ++d) out[h * D + d] = static_cast<T>(s.acc[h * D + d] * inv_sum);
  }
}

constexpr bool kRangeTasks = true;

// KV heads [kv0, kv0 + kv_count) of one row (q and out at kv0's first query head); false when D
// is not 64 or 128.
template <typename T, typename C, typename Index>
bool attend_registers(const Problem& p, const T* q, const C* k_cache, const C* v_cache, const Index* table_row,
                      int64_t ctx, int64_t kv0, int64_t kv_count, T* out, Scratch& s, const Part& part) {
  const int64_t D = p.head_dim;
  if (D != 64 && D != 128) return false;
  const auto [begin, end] = part_range(p, ctx, part);
  const int64_t values = kv_count * p.group * D;
  scale_queries(p, q, values, s);
  if (D == 64)
    attend_range<64>(p, s.query.data(), k_cache, v_cache, table_row, begin, end, kv0, kv_count, out, s, part.state);
  else
    attend_range<128>(p, s.query.data(), k_cache, v_cache, table_row, begin, end, kv0, kv_count, out, s, part.state);
  return true;
}
#else
constexpr bool kRangeTasks = false;

template <typename T, typename C, typename Index>
bool attend_registers(const Problem&, const T*, const C*, const C*, const Index*, int64_t, int64_t, int64_t, T*,
                      Scratch&, const Part&) {
  return false;
}
#endif

// out[b, h] from the `parts` states of each row b (see Part): the parts' sums rescaled to the largest
// maximum, as one softmax over the whole range would have them. Empty parts (sum 0) count for nothing.
template <typename T>
void merge_parts(const Problem& p, const float* states, int64_t rows, int64_t parts, int64_t heads, T* out) {
  const int64_t D = p.head_dim, head_size = kStateExtra + D, state_size = heads * head_size;
  std::vector<float> acc(D);
  for (int64_t b = 0; b < rows; ++b) {
    const float* row = states + b * parts * state_size;
    for (int64_t h = 0; h < heads; ++h) {
      float max_score = -std::numeric_limits<float>::infinity();
      for (int64_t i = 0; i < parts; ++i) {
        const float* head = row + i * state_size + h * head_size;
        if (head[1] > 0.f) max_score = std::max(max_score, head[0]);
      }
      float sum = 0.f;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t i = 0; i < parts; ++i) {
        const float* head = row + i * state_size + h * head_size;
        if (head[1] == 0.f) continue;
        const float weight = exp_nonpositive(head[0] - max_score);
        sum += weight * head[1];
        for (int64_t d = 0; d < D; ++d) acc[d] += weight * head[kStateExtra + d];
      }
      T* target = out + (b * heads + h) * D;
      const float inv_sum = 1.f / sum;
      for (int64_t d = 0; d < D; ++d) target[d] = static_cast<T>(acc[d] * inv_sum);
    }
  }
}

// Every context length in [1, NB * block_size] and every block it uses inside the cache, so the
// tasks never read out of bounds.
template <typename Index>
void check_table(const Problem& p, const Index* table, const Index* lens, int64_t rows,
                 int64_t num_blocks) {
  for (int64_t b = 0; b < rows; ++b) {
    const int64_t ctx = static_cast<int64_t>(lens[b]);
    TORCH_CHECK(ctx >= 1 && ctx <= p.max_blocks * p.block_size, "context_lens[", b, "] = ", ctx,
                " is outside [1, block_table.size(1) * block_size]");
    const int64_t first = first_position(p, ctx) / p.block_size;
    for (int64_t i = first; i < (ctx + p.block_size - 1) / p.block_size; ++i) {
      const int64_t block = static_cast<int64_t>(table[b * p.max_blocks + i]);
      TORCH_CHECK(block >= 0 && block < num_blocks, "block_table[", b, ", ", i, "] = ", block,
                  " is not a block of the cache");
    }
  }
}

template <typename T, typename C, typename Index>
void run(const Problem& p, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
         const at::Tensor& block_table, const at::Tensor& context_lens, at::Tensor& out) {
  const T* q_ptr = q.data_ptr<T>();
  const C* k_ptr = k_cache.data_ptr<C>();
  const C* v_ptr = v_cache.data_ptr<C>();
  const Index* table = block_table.data_ptr<Index>();
  const Index* lens = context_lens.data_ptr<Index>();
  T* out_ptr = out.data_ptr<T>();
  check_table(p, table, lens, q.size(0), k_cache.size(0) / p.block_size);
  const int64_t group_size = p.group * p.head_dim;  // elements of one KV head's queries in a row
  const int64_t row_size = p.num_kv_heads * group_size;
  // A task is one (row, KV head) pair, or, on the AVX2 path, a whole row or a part of one (see its
  // comment): with fewer rows than two a thread, each row's context is split in `parts` equal ranges
  // so that every thread has the same number of tasks, and the parts are merged after (merge_parts).
  // Rows are taken in zigzag order (first, last, second, second last, ...): the threads get
  // contiguous ranges of tasks, and the rows of a prompt chunk have contexts that grow one by one, so
  // in row order the thread with the last rows would get most of the work.
  const int64_t rows = q.size(0), threads = at::get_num_threads();
  const bool registers = p.head_dim == 64 || p.head_dim == 128;
  const int64_t kv_per_task = kRangeTasks && registers ? p.num_kv_heads : 1;
  const int64_t parts = kRangeTasks && registers && rows < 2 * threads ? threads / std::gcd(rows, threads) : 1;
  const int64_t tasks_per_row = p.num_kv_heads / kv_per_task * parts;
  const int64_t state_size = row_size / p.head_dim * (kStateExtra + p.head_dim);  // a part's, every head
  std::vector<float> states(parts > 1 ? rows * parts * state_size : 0);
  at::parallel_for(0, rows * tasks_per_row, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / tasks_per_row, kv0 = task % tasks_per_row / parts * kv_per_task;
      const int64_t b = r % 2 == 0 ? r / 2 : rows - 1 - r / 2;
      const int64_t offset = b * row_size + kv0 * group_size;
      const Index* table_row = table + b * p.max_blocks;
      const int64_t ctx = static_cast<int64_t>(lens[b]);
      const Part part{task % parts, parts, parts > 1 ? states.data() + (b * parts + task % parts) * state_size : nullptr};
      if (attend_registers<T, C, Index>(p, q_ptr + offset, k_ptr, v_ptr, table_row, ctx, kv0, kv_per_task,
                                        out_ptr + offset, scratch, part))
        continue;
      for (int64_t i = 0; i < kv_per_task; ++i)
        attend_group<T, C, Index>(p, q_ptr + offset + i * group_size, k_ptr, v_ptr, table_row, ctx, kv0 + i,
                                  out_ptr + offset + i * group_size, scratch);
    }
  });
  if (parts > 1) merge_parts(p, states.data(), rows, parts, row_size / p.head_dim, out_ptr);
}

void check_inputs(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& block_table, const at::Tensor& context_lens, int64_t block_size) {
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(),
              "paged_decode_attention runs on CPU tensors");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3, "q must be [B, H, D] and k_cache [slots, KH, D]");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache must have the same shape");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "k_cache and v_cache must share a dtype");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() ||
                  (q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kBFloat16),
              "the cache must be in q's dtype, or bfloat16 under float32 queries");
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
  auto dispatch_index = [&](auto scalar_tag, auto cache_tag) {
    using T = decltype(scalar_tag);
    using C = decltype(cache_tag);
    if (block_table.scalar_type() == at::kInt)
      run<T, C, int32_t>(p, q, k_cache, v_cache, block_table, context_lens, out);
    else if (block_table.scalar_type() == at::kLong)
      run<T, C, int64_t>(p, q, k_cache, v_cache, block_table, context_lens, out);
    else
      TORCH_CHECK(false, "block_table and context_lens must be int32 or int64");
  };
  if (q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kBFloat16)
    dispatch_index(float{}, at::BFloat16{});
  else if (q.scalar_type() == at::kFloat)
    dispatch_index(float{}, float{});
  else if (q.scalar_type() == at::kBFloat16)
    dispatch_index(at::BFloat16{}, at::BFloat16{});
  else
    TORCH_CHECK(false, "paged_decode_attention supports float32 and bfloat16, got ", q.scalar_type());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(scalellm, m) {
  m.def(SCALELLM_STR(SCALELLM_OP) "(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, "
        "Tensor context_lens, int block_size, float scale, int sliding_window) -> Tensor");
}

TORCH_LIBRARY_IMPL(scalellm, CPU, m) {
  m.impl(SCALELLM_STR(SCALELLM_OP), &paged_decode_attention);
}

// Linear layer on weights kept in their GGUF quantization (4, 5, 6 or 8 bits per weight with a
// float16 scale, and a minimum or an integer zero point, per group of 16 or 32 weights along K),
// dequantized in registers: on AVX512-VNNI, or on AVX2 (with FMA and F16C) where the CPU has no AVX-512.
//
//   quantized_linear(x, packed, scales, minimums, bias, n, bits, group, zero_point) -> y [M, n]
//
// What it computes, for x [M, K] (float32 or bfloat16), with g = k / group and b = k / 32:
//
//   activations, per row and block of 32:  d[m, b] = max|x[m, 32b : 32b + 32]| / 127,
//                                          xq[m, k] = round_half_even(x[m, k] * (1 / d[m, b]))  (0 when d = 0)
//   S[m, n, g]  = sum over the group of code[n, k] * xq[m, k]          (exact int32, vpdpbusd)
//   s[m, g]     = sum over the group of xq[m, k]
//   y[m, n]     = sum_g  float(S - zero_point * s) * (scale[n, g] * d[m, b])          (no minimums)
//                 sum_g  float(S) * (scale[n, g] * d[m, b]) + minimum[n, g] * (d[m, b] * s)  (minimums)
//               (+ bias[n])
//
// i.e. y = x' W^T with W the file's weights (w = scale * (code - zero_point), or scale * code + minimum)
// and x' the activations rounded to 8 bits per 32-block, as llama.cpp's q8 dot products do.
//
// Weight layout (built at load by quantization/gguf.py), output channels in blocks of 16, N padded to
// a multiple of 64 (four blocks), and S = 4 blocks side by side per group for codes under 8 bits, S = 2
// for 8-bit codes (group_bytes = 2 * group * bits, one block's codes of one group):
//
//   packed  uint8 [ceil(N/64) * 4 / S, K/group, S, group_bytes]   S blocks' 16 channels x `group` k
//   scales  float16 [ceil(N/64) * 4 / S, K/group, S, 16]           minimums: the same shape, or empty
//
// The kernel reads S from the shape. Side by side, the decode tile (one token, four blocks) reads its
// weights in 4 / S streams with about 1 KB per group each; with a stream per block, a token's pass
// over a layer's small matrices took 5-25% longer (4 bits) and up to 60% for large ones (5 bits), the
// short streams ending before the hardware prefetcher has ramped up, while for 8-bit codes 2 blocks
// measured 5-10% faster than 1 and 4 blocks 10-20% slower.
//
// A block's group holds group/4 "steps"; step s is the 16 x 4 codes code[16 nb + j, group * g + 4 s + i] at
// byte 4 j + i of a 64-byte vector: one vpdpbusd operand. 8-bit codes are stored as such; 4..6-bit
// codes as a low-nibble plane (steps 2p and 2p+1 in the low and high nibbles of 64 bytes), then the
// high bits at the same byte positions: 5 bits, bit 4 of step s at bit s of one 64-byte plane (8 steps);
// 6 bits, bits 4-5 of step s at bits 2 (s % 4) .. +1 of plane s / 4 (64 bytes per 4 steps).
// The micro kernel holds 1-2 tokens x 4 channel blocks of accumulators while tokens are few
// (decode), and up to 8 tokens (4 on AVX2) x 1 channel block for batches; channel tiles are split over the
// intra-op threads, so each weight byte is read once per 8 tokens of a batch.
//
// The AVX2 path reads the same layout, a 64-byte step as two 32-byte halves (channels 0-7, 8-15 of the
// block). It has no vpdpbusd: vpmaddubsw multiplies unsigned codes by the signed activation bytes and
// adds pairs into int16 (at most 2 * 63 * 127 for codes under 8 bits, and two steps' pairs summed
// stay below 2^15), then vpmaddwd by ones widens and adds pairs into int32: exact, as on VNNI. 8-bit
// codes are made signed (code - 128) and multiplied as |w| by x with w's sign (vpsignb), at most
// 2 * 128 * 127 per pair; the sum then starts from (128 - zero_point) * s.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <cstddef>
#include <type_traits>
#include <vector>

#include "avx512_bf16.h"

#if SCALELLM_AVX512_BF16 && defined(__AVX512VNNI__)
#define SCALELLM_VNNI 1
#define SCALELLM_AVX2 0
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define SCALELLM_VNNI 0
#define SCALELLM_AVX2 1
#include <immintrin.h>
#else
#define SCALELLM_VNNI 0
#define SCALELLM_AVX2 0
#endif

// The op's name: a second build of this file for AVX2 alone (-mno-avx512f) registers it under another.
#ifndef SCALELLM_OP
#define SCALELLM_OP quantized_linear
#endif
#define SCALELLM_STR2(x) #x
#define SCALELLM_STR(x) SCALELLM_STR2(x)

namespace {

#if SCALELLM_VNNI || SCALELLM_AVX2
constexpr int64_t kChannels = 16;
constexpr int64_t kActBlock = 32;

// The activations rounded to int8, with their per-block scales and per-group sums, laid out for the
// micro kernel: rows in tiles of kTileRows, and within a tile, block by block (group by group for the
// sums), the tile's rows side by side. A kernel tile of up to kTileRows rows inside one row tile then
// reads every value it needs at a constant offset from one pointer per group, which keeps the
// compiler from holding a pointer (and a register) per row. Rows past M in the last tile are never read
// (nor written: the buffers are left uninitialized, which matters at one or two rows).
constexpr int64_t kTileRows = 8;

struct Activations {
  int64_t blocks, groups;
  std::unique_ptr<int8_t[]> q;           // [tiles, K / 32, kTileRows, 32]
  std::unique_ptr<float[]> scales;       // [tiles, K / 32, kTileRows]: d
  std::unique_ptr<int32_t[]> sums;       // [tiles, K / group, kTileRows]: s
  std::unique_ptr<float[]> scaled_sums;  // [tiles, K / group, kTileRows]: d * s

  // Offsets of row `row`'s values of block b / group g.
  int64_t q_at(int64_t row, int64_t b) const {
    return ((row / kTileRows * blocks + b) * kTileRows + row % kTileRows) * kActBlock;
  }
  int64_t scale_at(int64_t row, int64_t b) const { return (row / kTileRows * blocks + b) * kTileRows + row % kTileRows; }
  int64_t sum_at(int64_t row, int64_t g) const { return (row / kTileRows * groups + g) * kTileRows + row % kTileRows; }
};

#if SCALELLM_VNNI
using scalellm_avx512::load16;
using scalellm_avx512::store16;
using scalellm_avx512::tail_mask;

// One block of 32 activations rounded to int8 into dst; returns its scale d, the sums of its two
// halves of 16 in half_sums.
template <typename T>
inline float round_block(const T* src, int8_t* dst, int32_t* half_sums) {
  const __m512 v0 = load16(src), v1 = load16(src + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
  const float d = amax / 127.0f;
  const __m512 inv = _mm512_set1_ps(d > 0.f ? 1.0f / d : 0.f);
  const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv));  // round half to even
  const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtsepi32_epi8(q0));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16), _mm512_cvtsepi32_epi8(q1));
  half_sums[0] = _mm512_reduce_add_epi32(q0);
  half_sums[1] = _mm512_reduce_add_epi32(q1);
  return d;
}
#endif

struct Problem {
  const Activations* a;
  const uint8_t* packed;
  const at::Half* scales;
  const at::Half* minimums;  // or nullptr
  const float* bias;         // or nullptr
  int64_t m, n, k, groups, group_bytes;  // group_bytes: one block's codes of one group
  int zero_point;
  int side_shift;  // log2 of S, the blocks side by side per group

  // Block b's place among the S blocks side by side (0: the first).
  int64_t side_of(int64_t b) const { return b & ((int64_t{1} << side_shift) - 1); }
  // Where block b's group g starts, in units of one block's group (group_bytes codes, 16 scales).
  int64_t unit(int64_t b, int64_t g) const { return (((b >> side_shift) * groups + g) << side_shift) + side_of(b); }
};

#if SCALELLM_VNNI
// The codes of one group's STEPS steps for one channel block, as unsigned bytes.
template <int BITS, int STEPS>
inline void load_codes(const uint8_t* src, __m512i* codes) {
  if constexpr (BITS == 8) {
#pragma GCC unroll 8
    for (int s = 0; s < STEPS; ++s) codes[s] = _mm512_loadu_si512(src + 64 * s);
  } else {
    const __m512i low = _mm512_set1_epi8(0x0F);
#pragma GCC unroll 4
    for (int p = 0; p < STEPS / 2; ++p) {
      const __m512i v = _mm512_loadu_si512(src + 64 * p);
      codes[2 * p] = _mm512_and_si512(v, low);
      codes[2 * p + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
    }
    // Bit b (4 or 5) of step s sits at bit s' of the byte at the code's position in a high plane of 64
    // bytes per 8 (bit 4) or 4 (bit 5, with bit 4 beside it) steps: shift it to bit 4 or 5 within each
    // byte (16-bit shifts by <= 4 never carry a neighbour's bit into the kept one) and mask it.
    if constexpr (BITS == 5) {
      const __m512i plane = _mm512_loadu_si512(src + 32 * STEPS);
      const __m512i bit4 = _mm512_set1_epi8(0x10);
#pragma GCC unroll 8
      for (int s = 0; s < STEPS; ++s) {
        const __m512i moved = s <= 4 ? _mm512_slli_epi16(plane, 4 - s) : _mm512_srli_epi16(plane, s - 4);
        codes[s] = _mm512_or_si512(codes[s], _mm512_and_si512(moved, bit4));
      }
    }
    if constexpr (BITS == 6) {
      const __m512i bits45 = _mm512_set1_epi8(0x30);
#pragma GCC unroll 8
      for (int s = 0; s < STEPS; ++s) {
        const __m512i plane = _mm512_loadu_si512(src + 32 * STEPS + 64 * (s / 4));
        const int at = 2 * (s % 4);  // the step's two bits within each byte
        const __m512i moved = at <= 4 ? _mm512_slli_epi16(plane, 4 - at) : _mm512_srli_epi16(plane, at - 4);
        codes[s] = _mm512_or_si512(codes[s], _mm512_and_si512(moved, bits45));
      }
    }
  }
}

// Four activation bytes read as one int32, broadcast straight from memory into vpdpbusd's operand.
typedef int32_t Int32Alias __attribute__((may_alias));

// sum + codes . (four bytes at `x`, in every 32-bit lane), the bytes broadcast by vpdpbusd's own memory
// operand: the compilers load and broadcast them in a separate instruction otherwise. Tiles of one
// channel block use it; with several blocks the compiler's broadcast register serves them all.
inline __m512i dpbusd_broadcast(__m512i sum, __m512i codes, const Int32Alias* x) {
  asm("vpdpbusd %[x]%{1to16%}, %[codes], %[sum]" : [sum] "+v"(sum) : [codes] "v"(codes), [x] "m"(*x));
  return sum;
}

// y for tokens [m0, m0 + TOKENS) x channel blocks [b0, b0 + BLOCKS); the tokens lie in one row tile.
// (The last argument is expand_block's: on VNNI the codes are always rebuilt in registers.)
template <int BITS, int GROUP, bool MINIMUMS, int TOKENS, int BLOCKS, typename T>
void tile(const Problem& p, int64_t m0, int64_t b0, T* y, std::nullptr_t = nullptr) {
  constexpr int kSteps = GROUP / 4;
  const Activations& a = *p.a;
  __m512 out[TOKENS][BLOCKS];
#pragma GCC unroll 8
  for (int t = 0; t < TOKENS; ++t)
#pragma GCC unroll 4
    for (int b = 0; b < BLOCKS; ++b) out[t][b] = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.groups; ++g) {
    // This group's values of token m0: token m0 + t's are kActBlock bytes (one value) further per t.
    const int8_t* x = a.q.get() + a.q_at(m0, g * GROUP / kActBlock) + g * GROUP % kActBlock;
    const float* d = a.scales.get() + a.scale_at(m0, g * GROUP / kActBlock);
    const int32_t* sums = a.sums.get() + a.sum_at(m0, g);
    const float* scaled_sums = a.scaled_sums.get() + a.sum_at(m0, g);
    __m512i acc[TOKENS][BLOCKS];
    if constexpr (BLOCKS == 1) {
      // A batch tile reads its block's groups S blocks apart, a stride the hardware prefetcher does not
      // follow. The first tile of a task's first block asks for all S blocks' codes 4 groups ahead into
      // L2, where the task's other tiles find them: at 8 and 16 tokens 8-10% faster than the
      // block-by-block layout, where without it 4 and 8 tokens took 25-43% longer. Past the last group
      // the address is another block's, or beyond the tensor, which a prefetch may be (it never faults).
      if (m0 == 0 && p.side_of(b0) == 0) {
        const char* ahead = reinterpret_cast<const char*>(p.packed + p.unit(b0, g + 4) * p.group_bytes);
        for (int64_t line = 0; line < (p.group_bytes << p.side_shift); line += 64)
          _mm_prefetch(ahead + line, _MM_HINT_T1);
      }
    }
#pragma GCC unroll 4
    for (int b = 0; b < BLOCKS; ++b) {
      __m512i codes[kSteps];
      load_codes<BITS, kSteps>(p.packed + p.unit(b0 + b, g) * p.group_bytes, codes);
#pragma GCC unroll 8
      for (int t = 0; t < TOKENS; ++t) {
        const auto* fours = reinterpret_cast<const Int32Alias*>(x + t * kActBlock);
        // symmetric codes: start from -zero_point * s so the sum is already sum (code - zero_point) * xq
        __m512i sum = MINIMUMS ? _mm512_setzero_si512() : _mm512_set1_epi32(-p.zero_point * sums[t]);
#pragma GCC unroll 8
        for (int s = 0; s < kSteps; ++s)
          sum = BLOCKS == 1 ? dpbusd_broadcast(sum, codes[s], fours + s)
                            : _mm512_dpbusd_epi32(sum, codes[s], _mm512_set1_epi32(fours[s]));
        acc[t][b] = sum;
      }
    }
#pragma GCC unroll 4
    for (int b = 0; b < BLOCKS; ++b) {
      const int64_t at = p.unit(b0 + b, g) * kChannels;
      const __m512 ws = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.scales + at)));
      __m512 mins;
      if constexpr (MINIMUMS)
        mins = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.minimums + at)));
#pragma GCC unroll 8
      for (int t = 0; t < TOKENS; ++t) {
        out[t][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t][b]), _mm512_mul_ps(ws, _mm512_set1_ps(d[t])), out[t][b]);
        if constexpr (MINIMUMS) out[t][b] = _mm512_fmadd_ps(mins, _mm512_set1_ps(scaled_sums[t]), out[t][b]);
      }
    }
  }
#pragma GCC unroll 4
  for (int b = 0; b < BLOCKS; ++b) {
    const int64_t n = (b0 + b) * kChannels;
    const int64_t count = std::min<int64_t>(kChannels, p.n - n);
    if (count <= 0) break;
    const __mmask16 mask = tail_mask(count);
    const __m512 bias = p.bias ? _mm512_maskz_loadu_ps(mask, p.bias + n) : _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int t = 0; t < TOKENS; ++t) store16(y + (m0 + t) * p.n + n, _mm512_add_ps(out[t][b], bias), mask);
  }
}

#endif  // SCALELLM_VNNI
#if SCALELLM_AVX2
// Eight values from src as floats (bfloat16 widened, which is exact).
template <typename T>
inline __m256 load8(const T* src) {
  if constexpr (std::is_same_v<T, float>) return _mm256_loadu_ps(src);
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

inline int32_t sum8(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

// round_block as on VNNI: the same maximum, scale and rounding (vcvtps2dq rounds half to even).
template <typename T>
inline float round_block(const T* src, int8_t* dst, int32_t* half_sums) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 v[4], amax = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = load8(src + 8 * i);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  const float d = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4))) / 127.0f;
  const __m256 inv = _mm256_set1_ps(d > 0.f ? 1.0f / d : 0.f);
  __m256i q[4];
  for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
  // The packs work within 128-bit lanes: 4-byte pieces come out as q0 q1 q2 q3 (first halves), then
  // the second halves; the permutation puts them in order.
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                      _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  half_sums[0] = sum8(_mm256_add_epi32(q[0], q[1]));
  half_sums[1] = sum8(_mm256_add_epi32(q[2], q[3]));
  return d;
}

// Half h (channels 8h .. 8h + 7) of step s of one channel block's group: 8 channels x 4 codes, as
// unsigned bytes (codes under 8 bits) or as signed code - 128 (8 bits). Planes as on VNNI, each
// 64-byte row read as two 32-byte halves.
template <int BITS, int STEPS>
inline __m256i load_step(const uint8_t* src, int s, int h) {
  const auto at = [&](int64_t offset) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + offset + 32 * h));
  };
  if constexpr (BITS == 8) {
    return _mm256_xor_si256(at(64 * s), _mm256_set1_epi8(static_cast<char>(0x80)));
  } else {
    const __m256i low = _mm256_set1_epi8(0x0F);
    const __m256i nibbles = at(64 * (s / 2));
    __m256i codes = _mm256_and_si256(s % 2 ? _mm256_srli_epi16(nibbles, 4) : nibbles, low);
    if constexpr (BITS == 5) {
      const __m256i plane = at(32 * STEPS);
      const __m256i moved = s <= 4 ? _mm256_slli_epi16(plane, 4 - s) : _mm256_srli_epi16(plane, s - 4);
      codes = _mm256_or_si256(codes, _mm256_and_si256(moved, _mm256_set1_epi8(0x10)));
    }
    if constexpr (BITS == 6) {
      const __m256i plane = at(32 * STEPS + 64 * (s / 4));
      const int shift = 2 * (s % 4);
      const __m256i moved = shift <= 4 ? _mm256_slli_epi16(plane, 4 - shift) : _mm256_srli_epi16(plane, shift - 4);
      codes = _mm256_or_si256(codes, _mm256_and_si256(moved, _mm256_set1_epi8(0x30)));
    }
    return codes;
  }
}

// The int16 pair sums of one step: codes . x for each channel's four codes, two int16 per channel.
template <int BITS>
inline __m256i step_pairs(__m256i codes, __m256i x) {
  if constexpr (BITS == 8) return _mm256_maddubs_epi16(_mm256_sign_epi8(codes, codes), _mm256_sign_epi8(x, codes));
  return _mm256_maddubs_epi16(codes, x);
}

// Eight floats to y[0 .. count): float32, or bfloat16 rounded like at::BFloat16(float).
template <typename T>
inline void store8(T* y, __m256 v, int64_t count) {
  if constexpr (std::is_same_v<T, float>) {
    if (count >= 8) return _mm256_storeu_ps(y, v);
  }
  alignas(32) float values[8];
  _mm256_store_ps(values, v);
  for (int64_t i = 0; i < std::min<int64_t>(count, 8); ++i) y[i] = static_cast<T>(values[i]);
}

// A batch of at least kExpandRows tokens rebuilds each block's codes once (expand_block) rather
// than in every 4-token tile: the tiles then load ready steps (K * 16 bytes a block, from L1 or
// L2) in place of the nibble shifts and masks and the high-bit planes.
constexpr int64_t kExpandRows = 16;

// Block b's codes as load_step gives them, for every group, step and half: [groups, steps, 2].
template <int BITS, int GROUP>
const __m256i* expand_block(const Problem& p, int64_t b) {
  constexpr int kSteps = GROUP / 4;
  thread_local std::vector<__m256i> steps;
  steps.resize(p.groups * kSteps * 2);
  for (int64_t g = 0; g < p.groups; ++g) {
    const uint8_t* src = p.packed + p.unit(b, g) * p.group_bytes;
    for (int s = 0; s < kSteps; ++s)
      for (int h = 0; h < 2; ++h) steps[(g * kSteps + s) * 2 + h] = load_step<BITS, kSteps>(src, s, h);
  }
  return steps.data();
}

// y for tokens [m0, m0 + TOKENS) x channel blocks [b0, b0 + BLOCKS); the tokens lie in one row tile.
// `steps`: block b0's codes from expand_block (BLOCKS 1), or null to rebuild them here.
template <int BITS, int GROUP, bool MINIMUMS, int TOKENS, int BLOCKS, typename T>
void tile(const Problem& p, int64_t m0, int64_t b0, T* y, const __m256i* steps = nullptr) {
  constexpr int kSteps = GROUP / 4;
  const Activations& a = *p.a;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 out[TOKENS][BLOCKS][2];
  for (int t = 0; t < TOKENS; ++t)
    for (int b = 0; b < BLOCKS; ++b) out[t][b][0] = out[t][b][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < p.groups; ++g) {
    const int8_t* x = a.q.get() + a.q_at(m0, g * GROUP / kActBlock) + g * GROUP % kActBlock;
    const float* d = a.scales.get() + a.scale_at(m0, g * GROUP / kActBlock);
    const int32_t* sums = a.sums.get() + a.sum_at(m0, g);
    const float* scaled_sums = a.scaled_sums.get() + a.sum_at(m0, g);
#pragma GCC unroll 4
    for (int b = 0; b < BLOCKS; ++b) {
      const uint8_t* src = p.packed + p.unit(b0 + b, g) * p.group_bytes;
      __m256i acc[TOKENS][2];
      for (int t = 0; t < TOKENS; ++t)  // the sum starts from -zero_point * s (8 bits: codes less 128)
        acc[t][0] = acc[t][1] = _mm256_set1_epi32(((BITS == 8 ? 128 : 0) - p.zero_point) * sums[t]);
      // Two steps' pairs summed in int16 under 8 bits (see the header), one at a time for 8 bits.
      constexpr int kFold = BITS == 8 ? 1 : 2;
#pragma GCC unroll 8
      for (int s = 0; s < kSteps; s += kFold) {
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
          __m256i codes[kFold];
          for (int f = 0; f < kFold; ++f)
            codes[f] = steps ? _mm256_load_si256(steps + (g * kSteps + s + f) * 2 + h)
                             : load_step<BITS, kSteps>(src, s + f, h);
#pragma GCC unroll 4
          for (int t = 0; t < TOKENS; ++t) {
            const int32_t* fours = reinterpret_cast<const int32_t*>(x + t * kActBlock);
            __m256i pairs = step_pairs<BITS>(codes[0], _mm256_set1_epi32(fours[s]));
            if constexpr (kFold == 2)
              pairs = _mm256_add_epi16(pairs, step_pairs<BITS>(codes[1], _mm256_set1_epi32(fours[s + 1])));
            acc[t][h] = _mm256_add_epi32(acc[t][h], _mm256_madd_epi16(pairs, ones));
          }
        }
      }
      const int64_t at = p.unit(b0 + b, g) * kChannels;
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const __m256 ws = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.scales + at + 8 * h)));
        __m256 mins;
        if constexpr (MINIMUMS)
          mins = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.minimums + at + 8 * h)));
        for (int t = 0; t < TOKENS; ++t) {
          out[t][b][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[t][h]), _mm256_mul_ps(ws, _mm256_set1_ps(d[t])),
                                         out[t][b][h]);
          if constexpr (MINIMUMS) out[t][b][h] = _mm256_fmadd_ps(mins, _mm256_set1_ps(scaled_sums[t]), out[t][b][h]);
        }
      }
    }
  }
  for (int b = 0; b < BLOCKS; ++b) {
    for (int h = 0; h < 2; ++h) {
      const int64_t n = (b0 + b) * kChannels + 8 * h;
      const int64_t count = std::min<int64_t>(8, p.n - n);
      if (count <= 0) break;
      __m256 bias = _mm256_setzero_ps();
      if (p.bias) {
        alignas(32) float values[8] = {};
        std::copy(p.bias + n, p.bias + n + count, values);
        bias = _mm256_load_ps(values);
      }
      for (int t = 0; t < TOKENS; ++t) store8(y + (m0 + t) * p.n + n, _mm256_add_ps(out[t][b][h], bias), count);
    }
  }
}

#endif  // SCALELLM_AVX2

template <typename T>
Activations quantize(const T* x, int64_t m, int64_t k, int64_t group) {
  Activations a;
  a.blocks = k / kActBlock;
  a.groups = k / group;
  const int64_t rows = (m + kTileRows - 1) / kTileRows * kTileRows;
  a.q.reset(new int8_t[rows * k]);
  a.scales.reset(new float[rows * a.blocks]);
  a.sums.reset(new int32_t[rows * a.groups]);
  a.scaled_sums.reset(new float[rows * a.groups]);
  for (int64_t row = 0; row < m; ++row) {
    for (int64_t b = 0; b < a.blocks; ++b) {
      int32_t half_sums[2];
      a.scales[a.scale_at(row, b)] = round_block(x + row * k + b * kActBlock, a.q.get() + a.q_at(row, b), half_sums);
      if (group == 32) {
        a.sums[a.sum_at(row, b)] = half_sums[0] + half_sums[1];
      } else {
        a.sums[a.sum_at(row, 2 * b)] = half_sums[0];
        a.sums[a.sum_at(row, 2 * b + 1)] = half_sums[1];
      }
    }
    for (int64_t g = 0; g < a.groups; ++g)
      a.scaled_sums[a.sum_at(row, g)] = a.scales[a.scale_at(row, g * group / kActBlock)] *
                                        static_cast<float>(a.sums[a.sum_at(row, g)]);
  }
  return a;
}

// Tokens per batch tile: 8 on AVX512-VNNI, 4 on AVX2 (16 ymm registers hold fewer accumulators).
constexpr int64_t kBatchTile = SCALELLM_VNNI ? 8 : 4;

// Every token of the problem for channel block b: batch tiles, one block at a time.
template <int BITS, int GROUP, bool MINIMUMS, typename T>
void batch_block(const Problem& p, int64_t b, T* y) {
#if SCALELLM_AVX2
  const __m256i* steps = p.m >= kExpandRows ? expand_block<BITS, GROUP>(p, b) : nullptr;
#else
  constexpr std::nullptr_t steps = nullptr;
#endif
  int64_t m0 = 0;
  for (; m0 + kBatchTile <= p.m; m0 += kBatchTile) tile<BITS, GROUP, MINIMUMS, kBatchTile, 1>(p, m0, b, y, steps);
  if (kBatchTile > 4 && m0 + 4 <= p.m) {
    tile<BITS, GROUP, MINIMUMS, 4, 1>(p, m0, b, y, steps);
    m0 += 4;
  }
  switch (p.m - m0) {
    case 3: tile<BITS, GROUP, MINIMUMS, 3, 1>(p, m0, b, y, steps); break;
    case 2: tile<BITS, GROUP, MINIMUMS, 2, 1>(p, m0, b, y, steps); break;
    case 1: tile<BITS, GROUP, MINIMUMS, 1, 1>(p, m0, b, y, steps); break;
    default: break;
  }
}

// Tasks over the intra-op threads. Batches (more than 2 tokens) take a channel block a task: their
// tiles walk the blocks one at a time anyway, and with four blocks a task a projection of 576
// channels made 9 tasks, 5 and 4 on two threads. Decodes take the four blocks [4t, 4t + 4) a task
// (one group of 64 channels in the layout): 1-2 tokens across the four blocks, whose accumulators
// in flight together hide the multiply-adds' latency. num_blocks is a multiple of 4 (the padding).
template <int BITS, int GROUP, bool MINIMUMS, typename T>
void run_all(const Problem& p, int64_t num_blocks, T* y) {
  if (p.m > 2) {
    at::parallel_for(0, num_blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) batch_block<BITS, GROUP, MINIMUMS>(p, b, y);
    });
    return;
  }
  at::parallel_for(0, num_blocks / 4, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (p.m == 2) tile<BITS, GROUP, MINIMUMS, 2, 4>(p, 0, 4 * t, y);
      else tile<BITS, GROUP, MINIMUMS, 1, 4>(p, 0, 4 * t, y);
    }
  });
}

template <int BITS, typename T>
void dispatch_group(const Problem& p, int64_t num_blocks, int group, T* y) {
  const bool minimums = p.minimums != nullptr;
  if (group == 32) {
    if (minimums) return run_all<BITS, 32, true>(p, num_blocks, y);
    return run_all<BITS, 32, false>(p, num_blocks, y);
  }
  if (minimums) return run_all<BITS, 16, true>(p, num_blocks, y);
  return run_all<BITS, 16, false>(p, num_blocks, y);
}

template <typename T>
at::Tensor run(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
               const c10::optional<at::Tensor>& minimums, const c10::optional<at::Tensor>& bias, int64_t n,
               int64_t bits, int64_t group, int64_t zero_point) {
  const int64_t m = x.size(0), k = x.size(1);
  const Activations a = quantize(x.data_ptr<T>(), m, k, group);
  at::Tensor y = at::empty({m, n}, x.options());
  const int64_t group_bytes = 2 * group * bits, side = packed.size(2) / group_bytes;
  const Problem p{&a, packed.data_ptr<uint8_t>(), scales.data_ptr<at::Half>(),
                  minimums.has_value() ? minimums->data_ptr<at::Half>() : nullptr,
                  bias.has_value() ? bias->data_ptr<float>() : nullptr,
                  m, n, k, k / group, group_bytes, static_cast<int>(zero_point), side == 4 ? 2 : side == 2 ? 1 : 0};
  T* out = y.data_ptr<T>();
  const int64_t num_blocks = packed.size(0) * side;
  switch (bits) {
    case 4: dispatch_group<4>(p, num_blocks, group, out); break;
    case 5: dispatch_group<5>(p, num_blocks, group, out); break;
    case 6: dispatch_group<6>(p, num_blocks, group, out); break;
    default: dispatch_group<8>(p, num_blocks, group, out); break;
  }
  return y;
}
#endif

at::Tensor quantized_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                            const c10::optional<at::Tensor>& minimums, const c10::optional<at::Tensor>& bias,
                            int64_t n, int64_t bits, int64_t group, int64_t zero_point) {
#if SCALELLM_VNNI || SCALELLM_AVX2
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [M, K] matrix");
  TORCH_CHECK(bits == 4 || bits == 5 || bits == 6 || bits == 8, "bits must be 4, 5, 6 or 8");
  TORCH_CHECK(group == 32 || (group == 16 && bits != 5), "group must be 32, or 16 for 4, 6 or 8 bits");
  const int64_t k = x.size(1), groups = k / group;
  TORCH_CHECK(k % 32 == 0 && k > 0, "K must be a positive multiple of 32");
  TORCH_CHECK(n > 0 && packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.size(1) == groups && packed.size(2) % (2 * group * bits) == 0,
              "packed must be uint8 [blocks / S, K/group, S * group * 2 * bits]");
  const int64_t side = packed.size(2) / (2 * group * bits);
  TORCH_CHECK((side == 1 || side == 2 || side == 4) && packed.size(0) * side == (n + 63) / 64 * 4,
              "packed must hold ceil(N/64) * 4 channel blocks, S = 1, 2 or 4 side by side");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() &&
                  scales.numel() == packed.size(0) * groups * side * 16,
              "scales must be float16 [blocks / S, K/group, S * 16]");
  TORCH_CHECK(!minimums.has_value() || (minimums->scalar_type() == at::kHalf && minimums->is_contiguous() &&
                                        minimums->numel() == scales.numel()),
              "minimums must be float16 shaped like scales");
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kFloat && bias->numel() == n && bias->is_contiguous()),
              "bias must be float32 [N]");
  if (x.scalar_type() == at::kFloat) return run<float>(x, packed, scales, minimums, bias, n, bits, group, zero_point);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  return run<at::BFloat16>(x, packed, scales, minimums, bias, n, bits, group, zero_point);
#else
  TORCH_CHECK(false, "quantized_linear was built for a CPU without AVX512-VNNI or AVX2; use the torch path");
  return x;
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(scalellm, m) {
  m.def(SCALELLM_STR(SCALELLM_OP) "(Tensor x, Tensor packed, Tensor scales, Tensor? minimums, Tensor? bias, int n, "
        "int bits, int group, int zero_point) -> Tensor");
}

TORCH_LIBRARY_IMPL(scalellm, CPU, m) {
  m.impl(SCALELLM_STR(SCALELLM_OP), &quantized_linear);
}

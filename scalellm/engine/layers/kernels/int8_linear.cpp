// Fused W8A8 linear layer for the CPU: per-token activation quantization, an int8 x int8 matrix
// product on AVX512-VNNI (or AVX2), and the dequantization epilogue, in one op.
//
// What it computes, for x [M, K] (float32 or bfloat16) and an int8 weight W [N, K] with one
// float scale per output channel s_w [N]:
//
//     s_x[m]  = max(max_k |x[m, k]|, 1e-8) / 127                 (float32)
//     q[m, k] = round_half_even(x[m, k] / s_x[m])                  in [-127, 127]
//     y[m, n] = ((float)(sum_k q[m, k] * W[n, k]) * s_x[m]) * s_w[n] (+ bias[n])
//
// in exactly that order of float operations, so the result is bit for bit the one of the
// unfused torch path (quantize, torch._int_mm, two multiplies): the integer sums are exact, and a
// token's output never depends on the other tokens of the batch.
//
// VNNI multiplies unsigned by signed bytes (vpdpbusd), so activations are stored as q + 128 and
// the extra 128 * sum_k W[n, k] is subtracted from each sum (`compensation`, computed at load).
//
// Weight layout ("packed"), built once at load by the Python side:
//
//     packed[nb, k4, j, i] = W[16 * nb + j, 4 * k4 + i]     shape [ceil(N/16), ceil(K/4), 16, 4]
//
// (zero padded), so one 64-byte load holds 4 consecutive k of 16 consecutive output channels:
// exactly one vpdpbusd operand. The micro kernel keeps a tile of up to 4 tokens x 64 channels in
// 16 accumulator registers; every weight byte is read once per 4 tokens and, for decode-sized
// batches, streams from memory once per step. The epilogue works on the accumulators in registers,
// 16 channels at a time, and the activations are quantized 16 at a time: the same IEEE operations
// in the same order as the scalar code, so vectorizing changes no bit. Channel tiles are split over
// the intra-op threads.
//
// The AVX2 path (CPUs without AVX512-VNNI) reads the same layout, a 64-byte step as two 32-byte
// halves (channels 0-7, 8-15), in tiles of 1-2 tokens x 64 channels (decode) or 4 tokens x 16. It has
// no vpdpbusd: vpmaddubsw multiplies |W| (unsigned) by q carrying W's sign (vpsignb) and adds pairs
// into int16, at most 2 * 127 * 127 < 2^15 (weights and activations lie in [-127, 127]), then
// vpmaddwd by ones widens and adds pairs into int32. It takes q itself (the stored byte less 128), so
// its sums need no compensation: the same exact integers, handed to the scalar epilogue.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "avx512_bf16.h"

#if SCALELLM_AVX512_BF16 && defined(__AVX512VNNI__)
#define SCALELLM_VNNI 1
#define SCALELLM_AVX2 0
#elif defined(__AVX2__)
#define SCALELLM_VNNI 0
#define SCALELLM_AVX2 1
#include <immintrin.h>
#else
#define SCALELLM_VNNI 0
#define SCALELLM_AVX2 0
#endif

// The op's name: builds of this file for one path alone (tests) register it under another.
#ifndef SCALELLM_OP
#define SCALELLM_OP int8_linear
#endif
#define SCALELLM_STR2(x) #x
#define SCALELLM_STR(x) SCALELLM_STR2(x)

namespace {

constexpr int64_t kChannels = 16;  // output channels per packed block
constexpr int64_t kDepth = 4;      // k values per 32-bit lane
constexpr int kTileTokens = 4;
constexpr int kTileBlocks = 4;     // 4 blocks of 16 channels = 64 channels per tile

inline float to_float(float v) { return v; }
inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }

// Quantize one row of x into unsigned bytes (q + 128); returns s_x. Padding bytes stay 128 (q = 0).
#if SCALELLM_VNNI
using scalellm_avx512::load16;
using scalellm_avx512::store16;
using scalellm_avx512::tail_mask;

// The same arithmetic as the scalar version below, 16 lanes at a time (division and rounding are
// exact IEEE operations either way).
template <typename T>
float quantize_row(const T* x, int64_t k, uint8_t* out) {
  __m512 amax = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; i += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(load16(x + i, tail_mask(k - i))));
  const float scale = std::max(_mm512_reduce_max_ps(amax), 1e-8f) / 127.0f;
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < k; i += 16) {
    const __mmask16 mask = tail_mask(k - i);
    const __m512 q = _mm512_roundscale_ps(_mm512_div_ps(load16(x + i, mask), vscale),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i shifted = _mm512_add_epi32(_mm512_cvtps_epi32(q), _mm512_set1_epi32(128));
    _mm_mask_storeu_epi8(out + i, mask, _mm512_cvtepi32_epi8(shifted));
  }
  return scale;
}
#else
template <typename T>
float quantize_row(const T* x, int64_t k, uint8_t* out) {
  float amax = 0.f;
  for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(to_float(x[i])));
  const float scale = std::max(amax, 1e-8f) / 127.0f;
  for (int64_t i = 0; i < k; ++i) {
    const float q = std::nearbyint(to_float(x[i]) / scale);  // round half to even (default mode)
    out[i] = static_cast<uint8_t>(static_cast<int32_t>(q) + 128);
  }
  return scale;
}
#endif

inline void store_row(float* dst, const float* src, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

inline void store_row(at::BFloat16* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = at::BFloat16(src[i]);  // round to nearest even
}

struct Problem {
  const uint8_t* x_u8;          // [M, k_padded]
  const float* x_scales;        // [M]
  const int8_t* packed;         // [num_blocks, k_padded / 4, 16, 4]
  const int32_t* compensation;  // [num_blocks * 16]
  const float* w_scales;        // [N]
  const float* bias;            // [N] or nullptr
  int64_t m, n, k_padded;
};

// y[m, n0:n0+count] for one token, from the exact integer sums of q . W `sums` [count].
template <typename T>
void epilogue(const Problem& p, int64_t m, int64_t n0, int64_t count, const int32_t* sums, T* y) {
  float row[kChannels * kTileBlocks];
  const float xs = p.x_scales[m];
  for (int64_t j = 0; j < count; ++j) {
    float v = static_cast<float>(sums[j]) * xs * p.w_scales[n0 + j];
    row[j] = p.bias ? v + p.bias[n0 + j] : v;
  }
  store_row(y + m * p.n + n0, row, count);
}

#if SCALELLM_VNNI
// Sums of tokens [m0, m0+TOKENS) x channel blocks [b0, b0+BLOCKS): 16 x BLOCKS channels each,
// then the epilogue straight from the accumulators.
template <int TOKENS, int BLOCKS, typename T>
void tile(const Problem& p, int64_t m0, int64_t b0, T* y) {
  const int64_t depth = p.k_padded / kDepth;
  __m512i acc[TOKENS][BLOCKS];
#pragma GCC unroll 8
  for (int t = 0; t < TOKENS; ++t)
#pragma GCC unroll 8
    for (int b = 0; b < BLOCKS; ++b) acc[t][b] = _mm512_setzero_si512();
  const int8_t* w = p.packed + b0 * depth * 64;
  const uint8_t* x = p.x_u8 + m0 * p.k_padded;
  for (int64_t d = 0; d < depth; ++d, w += 64, x += kDepth) {
    __m512i wv[BLOCKS];
#pragma GCC unroll 8
    for (int b = 0; b < BLOCKS; ++b) wv[b] = _mm512_loadu_si512(w + b * depth * 64);
#pragma GCC unroll 8
    for (int t = 0; t < TOKENS; ++t) {
      const __m512i xv = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(x + t * p.k_padded));
#pragma GCC unroll 8
      for (int b = 0; b < BLOCKS; ++b) acc[t][b] = _mm512_dpbusd_epi32(acc[t][b], xv, wv[b]);
    }
  }
  const int64_t n0 = b0 * kChannels;
#pragma GCC unroll 8
  for (int b = 0; b < BLOCKS; ++b) {
    const int64_t n = n0 + b * kChannels;
    const int64_t count = std::min<int64_t>(kChannels, p.n - n);
    if (count <= 0) break;
    const __mmask16 mask = count >= kChannels ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1);
    const __m512i comp = _mm512_loadu_si512(p.compensation + n);
    const __m512 ws = _mm512_maskz_loadu_ps(mask, p.w_scales + n);
    const __m512 bias = p.bias ? _mm512_maskz_loadu_ps(mask, p.bias + n) : _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int t = 0; t < TOKENS; ++t) {
      __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[t][b], comp));
      v = _mm512_mul_ps(_mm512_mul_ps(v, _mm512_set1_ps(p.x_scales[m0 + t])), ws);
      if (p.bias) v = _mm512_add_ps(v, bias);
      store16(y + (m0 + t) * p.n + n, v, mask);
    }
  }
}

template <int TOKENS, typename T>
void tile_blocks(const Problem& p, int64_t m0, int64_t b0, int64_t blocks, T* y) {
  switch (blocks) {
    case 4: return tile<TOKENS, 4>(p, m0, b0, y);
    case 3: return tile<TOKENS, 3>(p, m0, b0, y);
    case 2: return tile<TOKENS, 2>(p, m0, b0, y);
    default: return tile<TOKENS, 1>(p, m0, b0, y);
  }
}

#elif SCALELLM_AVX2
// Sums of tokens [m0, m0+TOKENS) x channel blocks [b0, b0+BLOCKS), then the epilogue per token.
template <int TOKENS, int BLOCKS, typename T>
void tile(const Problem& p, int64_t m0, int64_t b0, T* y) {
  const int64_t depth = p.k_padded / kDepth;
  const __m256i ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8(static_cast<char>(0x80));
  __m256i acc[TOKENS][BLOCKS][2];
  for (int t = 0; t < TOKENS; ++t)
    for (int b = 0; b < BLOCKS; ++b) acc[t][b][0] = acc[t][b][1] = _mm256_setzero_si256();
  const int8_t* w = p.packed + b0 * depth * 64;
  const uint8_t* x = p.x_u8 + m0 * p.k_padded;
  for (int64_t d = 0; d < depth; ++d, w += 64, x += kDepth) {
    __m256i q[TOKENS];  // the token's four activations, signed again, in every lane
#pragma GCC unroll 4
    for (int t = 0; t < TOKENS; ++t)
      q[t] = _mm256_xor_si256(_mm256_set1_epi32(*reinterpret_cast<const int32_t*>(x + t * p.k_padded)), flip);
#pragma GCC unroll 4
    for (int b = 0; b < BLOCKS; ++b)
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * depth * 64 + 32 * h));
        const __m256i magnitude = _mm256_abs_epi8(wv);
#pragma GCC unroll 4
        for (int t = 0; t < TOKENS; ++t) {
          const __m256i pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(q[t], wv));
          acc[t][b][h] = _mm256_add_epi32(acc[t][b][h], _mm256_madd_epi16(pairs, ones));
        }
      }
  }
  const int64_t n0 = b0 * kChannels;
  const int64_t count = std::min<int64_t>(kChannels * BLOCKS, p.n - n0);
  for (int t = 0; t < TOKENS; ++t) {
    alignas(32) int32_t sums[kChannels * BLOCKS];
    for (int b = 0; b < BLOCKS; ++b)
      for (int h = 0; h < 2; ++h)
        _mm256_store_si256(reinterpret_cast<__m256i*>(sums + b * kChannels + 8 * h), acc[t][b][h]);
    epilogue(p, m0 + t, n0, count, sums, y);
  }
}

// 1-2 tokens across the tile's blocks (decode); 3-4 tokens one block at a time (16 ymm registers).
template <int TOKENS, typename T>
void tile_blocks(const Problem& p, int64_t m0, int64_t b0, int64_t blocks, T* y) {
  if constexpr (TOKENS <= 2) {
    switch (blocks) {
      case 4: return tile<TOKENS, 4>(p, m0, b0, y);
      case 3: return tile<TOKENS, 3>(p, m0, b0, y);
      case 2: return tile<TOKENS, 2>(p, m0, b0, y);
      default: return tile<TOKENS, 1>(p, m0, b0, y);
    }
  } else {
    for (int64_t b = b0; b < b0 + blocks; ++b) tile<TOKENS, 1>(p, m0, b, y);
  }
}
#endif

#if SCALELLM_VNNI || SCALELLM_AVX2
template <typename T>
void channel_tile(const Problem& p, int64_t b0, int64_t blocks, T* y) {
  int64_t m0 = 0;
  for (; m0 + kTileTokens <= p.m; m0 += kTileTokens) tile_blocks<4>(p, m0, b0, blocks, y);
  switch (p.m - m0) {
    case 3: tile_blocks<3>(p, m0, b0, blocks, y); break;
    case 2: tile_blocks<2>(p, m0, b0, blocks, y); break;
    case 1: tile_blocks<1>(p, m0, b0, blocks, y); break;
    default: break;
  }
}
#else
// Portable fallback with the same arithmetic (where the compiler targets neither AVX512-VNNI nor AVX2).
template <typename T>
void channel_tile(const Problem& p, int64_t b0, int64_t blocks, T* y) {
  const int64_t depth = p.k_padded / kDepth;
  const int64_t n0 = b0 * kChannels;
  const int64_t count = std::min<int64_t>(kChannels * blocks, p.n - n0);
  std::vector<int32_t> sums(count);
  for (int64_t m = 0; m < p.m; ++m) {
    const uint8_t* x = p.x_u8 + m * p.k_padded;
    for (int64_t j = 0; j < count; ++j) {
      const int64_t block = (n0 + j) / kChannels, lane = (n0 + j) % kChannels;
      int32_t sum = -p.compensation[n0 + j];  // x holds q + 128
      for (int64_t d = 0; d < depth; ++d)
        for (int64_t i = 0; i < kDepth; ++i)
          sum += static_cast<int32_t>(x[d * kDepth + i]) *
                 p.packed[((block * depth + d) * kChannels + lane) * kDepth + i];
      sums[j] = sum;
    }
    epilogue(p, m, n0, count, sums.data(), y);
  }
}
#endif

template <typename T>
at::Tensor run(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& compensation,
               const at::Tensor& w_scales, const c10::optional<at::Tensor>& bias, int64_t n) {
  const int64_t m = x.size(0), k = x.size(1);
  const int64_t num_blocks = packed.size(0), k_padded = packed.size(1) * kDepth;
  std::vector<uint8_t> x_u8(static_cast<size_t>(m * k_padded), 128);
  std::vector<float> x_scales(static_cast<size_t>(m));
  const T* x_data = x.data_ptr<T>();
  for (int64_t row = 0; row < m; ++row)
    x_scales[row] = quantize_row(x_data + row * k, k, x_u8.data() + row * k_padded);
  at::Tensor y = at::empty({m, n}, x.options());
  Problem p{x_u8.data(), x_scales.data(), packed.data_ptr<int8_t>(), compensation.data_ptr<int32_t>(),
            w_scales.data_ptr<float>(), bias.has_value() ? bias->data_ptr<float>() : nullptr, m, n, k_padded};
  T* y_data = y.data_ptr<T>();
  const int64_t num_tiles = (num_blocks + kTileBlocks - 1) / kTileBlocks;
  at::parallel_for(0, num_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b0 = t * kTileBlocks;
      channel_tile(p, b0, std::min<int64_t>(kTileBlocks, num_blocks - b0), y_data);
    }
  });
  return y;
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& compensation,
                       const at::Tensor& w_scales, const c10::optional<at::Tensor>& bias, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [M, K] matrix");
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == kChannels && packed.size(3) == kDepth &&
                  packed.scalar_type() == at::kChar && packed.is_contiguous(),
              "packed must be int8 [ceil(N/16), ceil(K/4), 16, 4]");
  TORCH_CHECK(packed.size(1) * kDepth >= x.size(1) && packed.size(1) * kDepth < x.size(1) + kDepth,
              "packed weight depth does not match x's K");
  TORCH_CHECK(n > 0 && packed.size(0) == (n + kChannels - 1) / kChannels, "N does not match packed");
  TORCH_CHECK(compensation.scalar_type() == at::kInt && compensation.numel() == packed.size(0) * kChannels,
              "compensation must be int32 [ceil(N/16) * 16]");
  TORCH_CHECK(w_scales.scalar_type() == at::kFloat && w_scales.numel() == n, "w_scales must be float32 [N]");
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kFloat && bias->numel() == n &&
                                    bias->is_contiguous()),
              "bias must be float32 [N]");
  if (x.scalar_type() == at::kFloat) return run<float>(x, packed, compensation, w_scales, bias, n);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  return run<at::BFloat16>(x, packed, compensation, w_scales, bias, n);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(scalellm, m) {
  m.def(SCALELLM_STR(SCALELLM_OP) "(Tensor x, Tensor packed, Tensor compensation, Tensor w_scales, "
        "Tensor? bias, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(scalellm, CPU, m) {
  m.impl(SCALELLM_STR(SCALELLM_OP), &int8_linear);
}

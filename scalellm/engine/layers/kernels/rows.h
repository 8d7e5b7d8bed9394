// The row functions of the fused element-wise ops (see norm_rotary.cpp for what each computes and
// how it rounds), shared by norm_rotary.cpp's ops and decode_layers.cpp, which calls them directly
// on its own buffers: one definition, so both give the same bits. Sources that include this file
// are built with -ffp-contract=off (no contraction: the rounding after every step must stay).
//
//   norm_row(x, residual, weight, eps, h, out, sum_out)    one row of add_rms_norm (residual may be
//                                                          null; sum_out may alias residual)
//   rotate_row(x, cos, sin, half)                          one head of rotary_, in place
//   silu_mul_row(gate, up, n, out)                         one row of silu_and_mul
//   on_dtype(dtype, what, body)                            body(T{}) for float32 or bfloat16
//
// and the ops' row loops over the intra-op thread pool, on buffers the caller owns (the ops allocate
// theirs; the fused layers make theirs once per call):
//
//   add_rms_norm_rows(x, residual, weight, eps, rows, h, out, sum)   sum unused without a residual
//   rotary_rows(x, tokens, heads, token_stride, head_stride, cos, sin, dim)      cos/sin [tokens, dim]
//   silu_and_mul_rows(x, rows, n, out)                                x [rows, 2n], out [rows, n]

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "avx512_bf16.h"

// Internal linkage in every source that includes it: each kernel library keeps its own copy.
namespace scalellm_rows {
namespace {

using bf16 = at::BFloat16;

#if SCALELLM_AVX512_BF16
using namespace scalellm_avx512;

constexpr int64_t kLanes = 16;

void norm_row(const bf16* x, const bf16* residual, const bf16* weight, float eps, int64_t h, bf16* out,
              bf16* sum_out) {
  __m512 squares = _mm512_setzero_ps();
  for (int64_t i = 0; i < h; i += kLanes) {
    const __mmask16 mask = tail_mask(h - i);
    __m512 v = load16(x + i, mask);
    if (residual != nullptr) {
      v = round_trip(_mm512_add_ps(v, load16(residual + i, mask)));
      store16(sum_out + i, v, mask);
    }
    squares = _mm512_fmadd_ps(v, v, squares);
  }
  const float inv_rms = 1.f / std::sqrt(_mm512_reduce_add_ps(squares) / static_cast<float>(h) + eps);
  const bf16* source = residual != nullptr ? sum_out : x;
  for (int64_t i = 0; i < h; i += kLanes) {
    const __mmask16 mask = tail_mask(h - i);
    const __m512 normed = round_trip(_mm512_mul_ps(load16(source + i, mask), _mm512_set1_ps(inv_rms)));
    store16(out + i, _mm512_mul_ps(load16(weight + i, mask), normed), mask);
  }
}

void rotate_row(bf16* x, const bf16* cos, const bf16* sin, int64_t half) {
  for (int64_t i = 0; i < half; i += kLanes) {
    const __mmask16 mask = tail_mask(half - i);
    const __m512 a = load16(x + i, mask), b = load16(x + half + i, mask);
    const __m512 first = _mm512_add_ps(round_trip(_mm512_mul_ps(a, load16(cos + i, mask))),
                                       round_trip(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), b),
                                                                load16(sin + i, mask))));
    const __m512 second = _mm512_add_ps(round_trip(_mm512_mul_ps(b, load16(cos + half + i, mask))),
                                        round_trip(_mm512_mul_ps(a, load16(sin + half + i, mask))));
    store16(x + i, first, mask);
    store16(x + half + i, second, mask);
  }
}
// exp(x) in float: x = k ln2 + r with |r| <= ln2 / 2, e^r by its degree-7 Taylor polynomial, then
// scaled by 2^k (scalef: overflow gives inf and underflow 0, as expf does).
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.f)), _mm512_set1_ps(89.f));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_sub_ps(_mm512_sub_ps(x, _mm512_mul_ps(k, _mm512_set1_ps(0.693359375f))),
                                 _mm512_mul_ps(k, _mm512_set1_ps(-2.12194440e-4f)));
  __m512 p = _mm512_set1_ps(1.f / 5040);
  for (const float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, k);
}

void silu_mul_row(const bf16* gate, const bf16* up, int64_t n, bf16* out) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t i = 0; i < n; i += kLanes) {
    const __mmask16 mask = tail_mask(n - i);
    const __m512 g = load16(gate + i, mask);
    const __m512 silu = round_trip(_mm512_div_ps(g, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g)))));
    store16(out + i, _mm512_mul_ps(silu, load16(up + i, mask)), mask);
  }
}
#endif

// The portable rows, for float32 everywhere and for bfloat16 where the AVX-512 rows above are not
// built (where they are, those non-template overloads are the ones a bfloat16 call picks).
// rounded<T>(v) is the value T(v) as float: a rounding to bfloat16, nothing for float32. The loops
// are plain float arithmetic (no calls, no contraction) that the compiler vectorizes (built with
// -fno-trapping-math: kernels/__init__.py).
template <typename T>
inline float rounded(float v) {
  return static_cast<float>(T(v));
}

// exp(x) in float: the same reduction and degree-7 polynomial as exp16, with 2^k made from its
// exponent bits in two factors (so k = 128 overflows to inf as expf does). Below -87 it gives 0
// (expf: under 1.7e-38), which leaves 1 + exp(-g) unchanged.
inline float exp_float(float x) {
  x = x < -87.f ? -87.f : (x > 89.f ? 89.f : x);  // not fmin/fmax: library calls
  const float shifter = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer, to nearest even
  const float k = (x * 1.44269504f + shifter) - shifter;
  const float r = (x - k * 0.693359375f) - k * -2.12194440e-4f;
  float p = 1.f / 5040;
  for (const float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = p * r + c;
  const int32_t bits = (static_cast<int32_t>(k) + 126) << 23;  // 2^(k - 1); 0 when k = -126
  float half_scale;
  std::memcpy(&half_scale, &bits, sizeof bits);
  return p * half_scale * 2.f;
}

template <typename T>
void silu_mul_row(const T* gate, const T* up, int64_t n, T* out) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = static_cast<float>(gate[i]);
    const float silu = rounded<T>(g / (1.f + exp_float(-g)));
    out[i] = T(silu * static_cast<float>(up[i]));
  }
}

template <typename T>
void norm_row(const T* x, const T* residual, const T* weight, float eps, int64_t h, T* out, T* sum_out) {
  constexpr int64_t kParts = 16;  // independent partial sums of squares, summed at the end
  float parts[kParts] = {};
  const T* source = residual != nullptr ? sum_out : x;
  if (residual != nullptr)
    for (int64_t i = 0; i < h; ++i) sum_out[i] = T(static_cast<float>(x[i]) + static_cast<float>(residual[i]));
  int64_t i = 0;
  for (; i + kParts <= h; i += kParts)
    for (int64_t j = 0; j < kParts; ++j) {
      const float v = static_cast<float>(source[i + j]);
      parts[j] += v * v;
    }
  for (; i < h; ++i) parts[i % kParts] += static_cast<float>(source[i]) * static_cast<float>(source[i]);
  float squares = 0.f;
  for (const float part : parts) squares += part;
  const float inv_rms = 1.f / std::sqrt(squares / static_cast<float>(h) + eps);
  for (int64_t i = 0; i < h; ++i)
    out[i] = T(static_cast<float>(weight[i]) * rounded<T>(static_cast<float>(source[i]) * inv_rms));
}

template <typename T>
void rotate_row(T* x, const T* cos, const T* sin, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float a = static_cast<float>(x[i]), b = static_cast<float>(x[half + i]);
    const float first = rounded<T>(a * static_cast<float>(cos[i])) + rounded<T>(-b * static_cast<float>(sin[i]));
    const float second =
        rounded<T>(b * static_cast<float>(cos[half + i])) + rounded<T>(a * static_cast<float>(sin[half + i]));
    x[i] = T(first);
    x[half + i] = T(second);
  }
}

// The row loops: unqualified calls, so a bfloat16 row takes the AVX-512 overload where it is built.
template <typename T>
void add_rms_norm_rows(const T* x, const T* residual, const T* weight, float eps, int64_t rows, int64_t h, T* out,
                       T* sum) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      norm_row(x + r * h, residual != nullptr ? residual + r * h : nullptr, weight, eps, h, out + r * h,
               residual != nullptr ? sum + r * h : nullptr);
  });
}

template <typename T>
void rotary_rows(T* x, int64_t tokens, int64_t heads, int64_t token_stride, int64_t head_stride, const T* cos,
                 const T* sin, int64_t dim) {
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t h = 0; h < heads; ++h)
        rotate_row(x + t * token_stride + h * head_stride, cos + t * dim, sin + t * dim, dim / 2);
  });
}

template <typename T>
void silu_and_mul_rows(const T* x, int64_t rows, int64_t n, T* out) {
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) silu_mul_row(x + r * 2 * n, x + r * 2 * n + n, n, out + r * n);
  });
}

// Calls body(T{}) with T the C++ type of `dtype`: float32 or bfloat16, else an error naming `what`.
template <typename Body>
void on_dtype(at::ScalarType dtype, const char* what, Body body) {
  if (dtype == at::kFloat)
    body(float{});
  else if (dtype == at::kBFloat16)
    body(bf16{});
  else
    TORCH_CHECK(false, what, " must be float32 or bfloat16, got ", dtype);
}

}  // namespace
}  // namespace scalellm_rows

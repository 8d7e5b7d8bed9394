// Fused bfloat16 element-wise ops of a decoder layer, for the CPU: each replaces a chain of torch
// ops (one dispatch each) by one pass, rounding to bfloat16 after every step exactly where the
// torch chain does, so only the order of the float sum in the norm's mean differs from torch.
//
//   add_rms_norm(x, residual, weight, eps) -> (out, sum)     x, residual [T, H]; weight [H]
//       sum = bf16(x + residual)                               (residual undefined: sum = x)
//       out = bf16(weight * bf16(sum * rsqrt(mean(sum^2) + eps)))   the norm in float
//
//   rotary_(x, cos, sin)                                       x [T, heads, D] (any row strides,
//       x = bf16(bf16(x * cos) + bf16(rotate_half(x) * sin))   contiguous D), cos/sin [T, 1, D]
//       rotate_half([a, b]) = [-b, a], in place
//
//   silu_and_mul(x) -> out                                     x [T, 2I] = [gate | up], out [T, I]
//       out = bf16(bf16(silu(gate)) * up)                      silu(g) = g / (1 + exp(-g)) in float
//       The exponential is a polynomial of its own, within 2 float ulps of torch's: a result can
//       differ from torch's by one bfloat16 ulp when the float value lies at a rounding boundary.
//
// Rows are split over the intra-op thread pool.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>

#include "avx512_bf16.h"

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
#else
void silu_mul_row(const bf16* gate, const bf16* up, int64_t n, bf16* out) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = static_cast<float>(gate[i]);
    const float silu = static_cast<float>(bf16(g / (1.f + std::exp(-g))));
    out[i] = bf16(silu * static_cast<float>(up[i]));
  }
}

void norm_row(const bf16* x, const bf16* residual, const bf16* weight, float eps, int64_t h, bf16* out,
              bf16* sum_out) {
  float squares = 0.f;
  for (int64_t i = 0; i < h; ++i) {
    float v = static_cast<float>(x[i]);
    if (residual != nullptr) {
      sum_out[i] = bf16(v + static_cast<float>(residual[i]));
      v = static_cast<float>(sum_out[i]);
    }
    squares += v * v;
  }
  const float inv_rms = 1.f / std::sqrt(squares / static_cast<float>(h) + eps);
  const bf16* source = residual != nullptr ? sum_out : x;
  for (int64_t i = 0; i < h; ++i) {
    const float normed = static_cast<float>(bf16(static_cast<float>(source[i]) * inv_rms));
    out[i] = bf16(static_cast<float>(weight[i]) * normed);
  }
}

void rotate_row(bf16* x, const bf16* cos, const bf16* sin, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float a = static_cast<float>(x[i]), b = static_cast<float>(x[half + i]);
    const float first = static_cast<float>(bf16(a * static_cast<float>(cos[i]))) +
                        static_cast<float>(bf16(-b * static_cast<float>(sin[i])));
    const float second = static_cast<float>(bf16(b * static_cast<float>(cos[half + i]))) +
                         static_cast<float>(bf16(a * static_cast<float>(sin[half + i])));
    x[i] = bf16(first);
    x[half + i] = bf16(second);
  }
}
#endif

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x_in, const c10::optional<at::Tensor>& residual_in,
                                                const at::Tensor& weight_in, double eps) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kBFloat16 && x_in.device().is_cpu(),
              "x must be a bfloat16 CPU matrix [T, H]");
  TORCH_CHECK(weight_in.scalar_type() == at::kBFloat16 && weight_in.numel() == x_in.size(1),
              "weight must be bfloat16 [H]");
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  at::Tensor residual, sum;
  if (residual_in.has_value()) {
    TORCH_CHECK(residual_in->sizes() == x.sizes() && residual_in->scalar_type() == at::kBFloat16,
                "residual must match x");
    residual = residual_in->contiguous();
    sum = at::empty_like(x);
  } else {
    sum = x;
  }
  at::Tensor out = at::empty_like(x);
  const int64_t rows = x.size(0), h = x.size(1);
  const bf16* x_ptr = x.data_ptr<bf16>();
  const bf16* residual_ptr = residual.defined() ? residual.data_ptr<bf16>() : nullptr;
  bf16* sum_ptr = sum.data_ptr<bf16>();
  bf16* out_ptr = out.data_ptr<bf16>();
  const bf16* weight_ptr = weight.data_ptr<bf16>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      norm_row(x_ptr + r * h, residual_ptr ? residual_ptr + r * h : nullptr, weight_ptr, static_cast<float>(eps), h,
               out_ptr + r * h, sum_ptr + r * h);
  });
  return {out, sum};
}

at::Tensor rotary_(at::Tensor x, const at::Tensor& cos_in, const at::Tensor& sin_in) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kBFloat16 && x.device().is_cpu() && x.stride(2) == 1,
              "x must be a bfloat16 CPU tensor [T, heads, D] with contiguous D");
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2);
  TORCH_CHECK(dim % 2 == 0, "head_dim must be even");
  const at::Tensor cos = cos_in.reshape({tokens, dim}).contiguous(), sin = sin_in.reshape({tokens, dim}).contiguous();
  TORCH_CHECK(cos.scalar_type() == at::kBFloat16 && sin.scalar_type() == at::kBFloat16, "cos/sin must be bfloat16");
  bf16* base = x.data_ptr<bf16>();
  const bf16* cos_ptr = cos.data_ptr<bf16>();
  const bf16* sin_ptr = sin.data_ptr<bf16>();
  const int64_t token_stride = x.stride(0), head_stride = x.stride(1);
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t h = 0; h < heads; ++h)
        rotate_row(base + t * token_stride + h * head_stride, cos_ptr + t * dim, sin_ptr + t * dim, dim / 2);
  });
  return x;
}

at::Tensor silu_and_mul(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kBFloat16 && x_in.device().is_cpu() &&
                  x_in.size(1) % 2 == 0,
              "x must be a bfloat16 CPU matrix [T, 2I]");
  const at::Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), n = x.size(1) / 2;
  at::Tensor out = at::empty({rows, n}, x.options());
  const bf16* x_ptr = x.data_ptr<bf16>();
  bf16* out_ptr = out.data_ptr<bf16>();
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) silu_mul_row(x_ptr + r * 2 * n, x_ptr + r * 2 * n + n, n, out_ptr + r * n);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(scalellm, m) {
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rotary_(Tensor(a!) x, Tensor cos, Tensor sin) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(scalellm, CPU, m) {
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rotary_", &rotary_);
  m.impl("silu_and_mul", &silu_and_mul);
}

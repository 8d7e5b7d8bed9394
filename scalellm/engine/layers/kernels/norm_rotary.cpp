// Fused element-wise ops of a decoder layer, for the CPU, in float32 or bfloat16: each replaces a
// chain of torch ops (one dispatch each) by one pass, rounding to the dtype after every step exactly
// where the torch chain does (for float32: after every operation), so only the order of the float
// sum in the norm's mean and the exponential of silu differ from torch. Written below for bfloat16;
// float32 is the same with every bf16(.) left out.
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
//       differ from torch's by one bfloat16 ulp when the float value lies at a rounding boundary
//       (in float32, by a few ulps).
//
// Rows are split over the intra-op thread pool. The row functions and their loops are in rows.h
// (decode_layers.cpp calls them too): bfloat16 rows use AVX-512 where the CPU has it (avx512_bf16.h);
// every other row is portable C++ the compiler vectorizes for the CPU.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "rows.h"

namespace {

using namespace scalellm_rows;

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x_in, const c10::optional<at::Tensor>& residual_in,
                                                const at::Tensor& weight_in, double eps) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.device().is_cpu(), "x must be a CPU matrix [T, H]");
  TORCH_CHECK(weight_in.scalar_type() == x_in.scalar_type() && weight_in.numel() == x_in.size(1),
              "weight must be [H] in x's dtype");
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  at::Tensor residual, sum;
  if (residual_in.has_value()) {
    TORCH_CHECK(residual_in->sizes() == x.sizes() && residual_in->scalar_type() == x.scalar_type(),
                "residual must match x");
    residual = residual_in->contiguous();
    sum = at::empty_like(x);
  } else {
    sum = x;
  }
  at::Tensor out = at::empty_like(x);
  const int64_t rows = x.size(0), h = x.size(1);
  on_dtype(x.scalar_type(), "x", [&](auto zero) {
    using T = decltype(zero);
    const T* x_ptr = x.data_ptr<T>();
    const T* residual_ptr = residual.defined() ? residual.data_ptr<T>() : nullptr;
    const T* weight_ptr = weight.data_ptr<T>();
    T* out_ptr = out.data_ptr<T>();
    T* sum_ptr = sum.data_ptr<T>();
    add_rms_norm_rows(x_ptr, residual_ptr, weight_ptr, static_cast<float>(eps), rows, h, out_ptr, sum_ptr);
  });
  return {out, sum};
}

at::Tensor rotary_(at::Tensor x, const at::Tensor& cos_in, const at::Tensor& sin_in) {
  TORCH_CHECK(x.dim() == 3 && x.device().is_cpu() && x.stride(2) == 1,
              "x must be a CPU tensor [T, heads, D] with contiguous D");
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2);
  TORCH_CHECK(dim % 2 == 0, "head_dim must be even");
  const at::Tensor cos = cos_in.reshape({tokens, dim}).contiguous(), sin = sin_in.reshape({tokens, dim}).contiguous();
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(),
              "cos/sin must be in x's dtype");
  on_dtype(x.scalar_type(), "x", [&](auto zero) {
    using T = decltype(zero);
    rotary_rows(x.data_ptr<T>(), tokens, heads, x.stride(0), x.stride(1), cos.data_ptr<T>(), sin.data_ptr<T>(), dim);
  });
  return x;
}

at::Tensor silu_and_mul(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.device().is_cpu() && x_in.size(1) % 2 == 0,
              "x must be a CPU matrix [T, 2I]");
  const at::Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), n = x.size(1) / 2;
  at::Tensor out = at::empty({rows, n}, x.options());
  on_dtype(x.scalar_type(), "x", [&](auto zero) {
    using T = decltype(zero);
    silu_and_mul_rows(x.data_ptr<T>(), rows, n, out.data_ptr<T>());
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

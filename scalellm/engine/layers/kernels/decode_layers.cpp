// Every decoder layer of a Llama-family model for a step of one-query rows (decodes, and the tokens of
// short prompt chunks: engine/step_inputs.py), in one call.
//
// decode_layers(layers, x, cos, sin, slots, block_table, context_lens, block_size, sliding_window,
//               num_heads, num_kv_heads, eps) -> (x, residual)
//
// `layers` is a DecodeLayers object (torch.classes.scalellm.DecodeLayers(weights, k_caches, v_caches))
// that holds the model's tensors, made once: handing the op some 700 tensors as lists on every step
// cost about 60 us of conversion a call.
//
// runs, for each layer l, exactly the ops the Python layers run for a step whose B tokens are all
// one-token queries, in the same order and on the same tensors, so the result is bit for bit theirs:
//
//   h, residual = add_rms_norm(x, residual, input_norm)          (layer 0: residual = x)
//   qkv = linear(h, qkv_proj)                  [B, (H + 2 KH) D]: q | k | v
//   rotary_(q | k, cos, sin)                   in place, rotate-half
//   k_cache[slots] = k;  v_cache[slots] = v    the new keys and values
//   attn = paged_decode_attention(q, k_cache, v_cache, block_table, context_lens, ...)
//   h, residual = add_rms_norm(linear(attn, o_proj), residual, post_attention_norm)
//   x = linear(silu_and_mul(linear(h, gate_up_proj)), down_proj)
//
// and returns the last layer's (x, residual); the final norm and the logits stay in Python.
// `weights` holds kTensorsPerLayer tensors per layer: the input norm weight, the five tensors of the
// qkv projection, the five of o, the post-attention norm weight, the five of gate_up, the five of down.
// A projection is W8A8 int8 (packed int8 weight, int32 compensation, float32 scales, float32 bias or
// an empty tensor, an empty tensor: the operands of int8_linear), GGUF-quantized (packed uint8 codes,
// float16 scales, float16 minimums or empty, float32 bias or empty, int64 [n, bits, group, zero_point]:
// the operands of quantized_linear) or plain (weight [N, K] in x's dtype, bias or an empty tensor,
// three empty tensors: at::linear). Caches are [slots, KH, D] per layer, in x's dtype or bfloat16 under
// float32 (the new K and V rounded as they are stored, as the Python layers' cast rounds them).
//
// What it saves is the Python work around some 15 small ops per layer. The projections and the
// attention are the scalellm ops the layers call (found in the dispatcher, so their libraries must be
// loaded first); the norms, the rotary embedding and silu_and_mul run the row functions of those ops
// (rows.h, built with the same flags) on buffers made once per call, without a dispatch or an
// allocation each: for one token those three took some 20 us a layer through the dispatcher.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <tuple>
#include <utility>
#include <vector>

#include "rows.h"

namespace {

constexpr int64_t kTensorsPerLayer = 22;
constexpr int64_t kTensorsPerProjection = 5;

using Int8LinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const c10::optional<at::Tensor>&, int64_t);
using QuantizedLinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, int64_t,
                                     int64_t, int64_t, int64_t);
using AttentionFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, int64_t, double, int64_t);

template <typename Fn>
c10::TypedOperatorHandle<Fn> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

// The scalellm ops this one composes, looked up once.
struct Ops {
  c10::TypedOperatorHandle<Int8LinearFn> int8_linear = find_op<Int8LinearFn>("scalellm::int8_linear");
  // Looked up on first use: only models with GGUF-quantized projections need its library loaded.
  c10::TypedOperatorHandle<QuantizedLinearFn> quantized_linear() const {
    static const auto handle = find_op<QuantizedLinearFn>("scalellm::quantized_linear");
    return handle;
  }
  c10::TypedOperatorHandle<AttentionFn> attention = find_op<AttentionFn>("scalellm::paged_decode_attention");
};

const Ops& ops() {
  static const Ops instance;
  return instance;
}

c10::optional<at::Tensor> optional(const at::Tensor& t) {
  return t.numel() > 0 ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

// y = x W^T + b for one projection, given its five tensors starting at `w`.
at::Tensor project(const at::Tensor& x, const at::Tensor* w) {
  if (w[0].scalar_type() == at::kChar)
    return ops().int8_linear.call(x.contiguous(), w[0], w[1], w[2], optional(w[3]), w[2].numel());
  if (w[0].scalar_type() == at::kByte) {
    const int64_t* meta = w[4].data_ptr<int64_t>();  // n, bits, group, zero_point
    return ops().quantized_linear().call(x.contiguous(), w[0], w[1], optional(w[2]), optional(w[3]), meta[0], meta[1],
                                         meta[2], meta[3]);
  }
  return at::linear(x, w[0], optional(w[1]));
}

// Row `row` of `elements` values from qkv's dtype into the cache's: a copy, or float32 rounded to
// bfloat16 (to nearest even, as torch's .to(torch.bfloat16) rounds).
void store_row(const char* source, char* target, int64_t elements, bool to_bfloat16, int64_t element) {
  if (!to_bfloat16) {
    std::memcpy(target, source, elements * element);
    return;
  }
  const auto* from = reinterpret_cast<const float*>(source);
  auto* to = reinterpret_cast<at::BFloat16*>(target);
  for (int64_t i = 0; i < elements; ++i) to[i] = at::BFloat16(from[i]);
}

// The step's new K and V [B, KH, D] (rows of qkv) into their slots of the layer's caches.
void write_kv(const at::Tensor& qkv, int64_t k_offset, int64_t v_offset, const at::Tensor& slots,
              at::Tensor& k_cache, at::Tensor& v_cache) {
  const int64_t rows = qkv.size(0), row_elems = k_cache.stride(0);
  const int64_t element = qkv.element_size(), row_stride = qkv.stride(0), cache_element = k_cache.element_size();
  const bool to_bfloat16 = k_cache.scalar_type() != qkv.scalar_type();
  const auto* source = static_cast<const char*>(qkv.data_ptr());
  auto* k_base = static_cast<char*>(k_cache.data_ptr());
  auto* v_base = static_cast<char*>(v_cache.data_ptr());
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t b = 0; b < rows; ++b) {
    const char* row = source + b * row_stride * element;
    store_row(row + k_offset * element, k_base + slot[b] * row_elems * cache_element, row_elems, to_bfloat16, element);
    store_row(row + v_offset * element, v_base + slot[b] * row_elems * cache_element, row_elems, to_bfloat16, element);
  }
}

// add_rms_norm's two results into buffers: h = the norm of x + residual, residual = x + residual
// (`first`: no residual yet, so residual = x and h = the norm of x).
void add_rms_norm_into(const at::Tensor& x, at::Tensor& residual, bool first, const at::Tensor& weight, double eps,
                       at::Tensor& h) {
  if (first) residual.copy_(x);
  scalellm_rows::on_dtype(x.scalar_type(), "x", [&](auto zero) {
    using T = decltype(zero);
    scalellm_rows::add_rms_norm_rows(x.data_ptr<T>(), first ? nullptr : residual.data_ptr<T>(), weight.data_ptr<T>(),
                                     static_cast<float>(eps), x.size(0), x.size(1), h.data_ptr<T>(),
                                     residual.data_ptr<T>());
  });
}

// rotary_ on the first `heads` heads of each row of qkv [B, heads_total * D], in place; cos, sin [B, D].
void rotary_into(at::Tensor& qkv, int64_t heads, int64_t head_dim, const at::Tensor& cos, const at::Tensor& sin) {
  scalellm_rows::on_dtype(qkv.scalar_type(), "x", [&](auto zero) {
    using T = decltype(zero);
    scalellm_rows::rotary_rows(qkv.data_ptr<T>(), qkv.size(0), heads, qkv.size(1), head_dim, cos.data_ptr<T>(),
                               sin.data_ptr<T>(), head_dim);
  });
}

// silu_and_mul of gate_up [B, 2I] into out [B, I].
void silu_and_mul_into(const at::Tensor& gate_up, at::Tensor& out) {
  scalellm_rows::on_dtype(gate_up.scalar_type(), "x", [&](auto zero) {
    using T = decltype(zero);
    scalellm_rows::silu_and_mul_rows(gate_up.data_ptr<T>(), gate_up.size(0), out.size(1), out.data_ptr<T>());
  });
}

// The tensors of every layer, in the order the top of this file gives, and each layer's K and V cache.
struct DecodeLayers : torch::CustomClassHolder {
  std::vector<at::Tensor> weights, k_caches, v_caches;
  DecodeLayers(std::vector<at::Tensor> weights, std::vector<at::Tensor> k_caches, std::vector<at::Tensor> v_caches)
      : weights(std::move(weights)), k_caches(std::move(k_caches)), v_caches(std::move(v_caches)) {}
};

std::tuple<at::Tensor, at::Tensor> decode_layers(
    const c10::intrusive_ptr<DecodeLayers>& layers, const at::Tensor& x_in, const at::Tensor& cos,
    const at::Tensor& sin, const at::Tensor& slots_in, const at::Tensor& block_table, const at::Tensor& context_lens,
    int64_t block_size, int64_t sliding_window, int64_t num_heads, int64_t num_kv_heads, double eps) {
  const std::vector<at::Tensor>& weights = layers->weights;
  const std::vector<at::Tensor>& k_caches = layers->k_caches;
  const std::vector<at::Tensor>& v_caches = layers->v_caches;
  const int64_t num_layers = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(num_layers > 0 && v_caches.size() == k_caches.size() &&
                  static_cast<int64_t>(weights.size()) == num_layers * kTensorsPerLayer,
              "decode_layers: need ", kTensorsPerLayer, " weight tensors and one K and V cache per layer");
  TORCH_CHECK(x_in.dim() == 2 && x_in.device().is_cpu(), "x must be a CPU matrix [B, hidden]");
  const int64_t rows = x_in.size(0);
  const int64_t head_dim = k_caches[0].size(2);
  TORCH_CHECK(k_caches[0].size(1) == num_kv_heads && num_heads % num_kv_heads == 0,
              "the caches' KV heads must divide the query heads");
  const at::Tensor slots = slots_in.to(at::kLong).contiguous();
  TORCH_CHECK(slots.numel() == rows, "one slot per token");
  const double scale = std::pow(static_cast<double>(head_dim), -0.5);
  const int64_t q_heads_and_k = num_heads + num_kv_heads;
  TORCH_CHECK(cos.scalar_type() == x_in.scalar_type() && sin.scalar_type() == x_in.scalar_type(),
              "cos/sin must be in x's dtype");
  const at::Tensor cos_rows = cos.reshape({rows, head_dim}).contiguous();
  const at::Tensor sin_rows = sin.reshape({rows, head_dim}).contiguous();

  // Made once, written by every layer in turn: the normed hidden states, the residual stream, and
  // silu_and_mul's output (its width from the first layer's gate_up, 2 I wide).
  at::Tensor x = x_in.contiguous();
  at::Tensor h = at::empty_like(x), residual = at::empty_like(x);
  at::Tensor act;
  for (int64_t l = 0; l < num_layers; ++l) {
    const at::Tensor* w = weights.data() + l * kTensorsPerLayer;
    at::Tensor k_cache = k_caches[l], v_cache = v_caches[l];
    TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.scalar_type() == v_cache.scalar_type() &&
                    (k_cache.scalar_type() == x.scalar_type() ||
                     (x.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kBFloat16)),
                "caches must be contiguous and in x's dtype, or bfloat16 under float32");
    add_rms_norm_into(x, residual, l == 0, w[0], eps, h);
    at::Tensor qkv = project(h, w + 1);
    rotary_into(qkv, q_heads_and_k, head_dim, cos_rows, sin_rows);
    write_kv(qkv, num_heads * head_dim, q_heads_and_k * head_dim, slots, k_cache, v_cache);
    at::Tensor heads = qkv.view({rows, num_heads + 2 * num_kv_heads, head_dim});
    at::Tensor attn = ops().attention.call(heads.narrow(1, 0, num_heads), k_cache, v_cache, block_table,
                                           context_lens, block_size, scale, sliding_window);
    at::Tensor o = project(attn.reshape({rows, -1}), w + 1 + kTensorsPerProjection);
    add_rms_norm_into(o, residual, false, w[1 + 2 * kTensorsPerProjection], eps, h);
    const at::Tensor* mlp = w + 2 + 2 * kTensorsPerProjection;
    at::Tensor gate_up = project(h, mlp);
    if (!act.defined()) act = at::empty({rows, gate_up.size(1) / 2}, x.options());
    silu_and_mul_into(gate_up, act);
    x = project(act, mlp + kTensorsPerProjection);
  }
  return {x, residual};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(scalellm, m) {
  m.class_<DecodeLayers>("DecodeLayers")
      .def(torch::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>());
  m.def("decode_layers(__torch__.torch.classes.scalellm.DecodeLayers layers, Tensor x, Tensor cos, Tensor sin, "
        "Tensor slots, Tensor block_table, Tensor context_lens, int block_size, int sliding_window, "
        "int num_heads, int num_kv_heads, float eps) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(scalellm, CPU, m) {
  m.impl("decode_layers", &decode_layers);
}

// Grammar bitmasks applied to a batch's logits, in place.
//
//   apply_token_bitmask_(logits, bitmask, rows) -> logits
//
// logits float32 [B, V] (rows contiguous), bitmask int32 [R, W] with W >= ceil(V / 32), rows int64 [n]
// (distinct indices below min(B, R)): for each r in rows and each token t < V whose bit
// (bitmask[r, t / 32] >> (t % 32)) & 1 is 0, logits[r, t] = -inf; other values are left untouched.
// The layout is the grammar engine's (xgrammar: bit t % 32 of word t / 32, 1 = allowed).
//
// One word covers 32 logits: with AVX-512 its complement is two 16-lane store masks of -inf (a word of
// allowed tokens stores nothing); elsewhere a scalar loop. Rows are split over the intra-op threads.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

void mask_row(float* logits, const int32_t* words, int64_t vocab) {
  const float minus_inf = -std::numeric_limits<float>::infinity();
  const int64_t full_words = vocab / 32;
#if defined(__AVX512F__)
  const __m512 fill = _mm512_set1_ps(minus_inf);
  for (int64_t w = 0; w < full_words; ++w) {
    const uint32_t forbidden = ~static_cast<uint32_t>(words[w]);
    if (forbidden == 0) continue;
    _mm512_mask_storeu_ps(logits + 32 * w, static_cast<__mmask16>(forbidden), fill);
    _mm512_mask_storeu_ps(logits + 32 * w + 16, static_cast<__mmask16>(forbidden >> 16), fill);
  }
#else
  for (int64_t w = 0; w < full_words; ++w) {
    const uint32_t forbidden = ~static_cast<uint32_t>(words[w]);
    for (int bit = 0; forbidden != 0 && bit < 32; ++bit)
      if ((forbidden >> bit) & 1u) logits[32 * w + bit] = minus_inf;
  }
#endif
  for (int64_t t = 32 * full_words; t < vocab; ++t)
    if (((static_cast<uint32_t>(words[t / 32]) >> (t % 32)) & 1u) == 0) logits[t] = minus_inf;
}

at::Tensor apply_token_bitmask_(at::Tensor logits, const at::Tensor& bitmask, const at::Tensor& rows) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat && logits.dim() == 2 &&
                  logits.stride(1) == 1,
              "logits must be a float32 [B, V] CPU tensor with contiguous rows");
  TORCH_CHECK(bitmask.scalar_type() == at::kInt && bitmask.dim() == 2 && bitmask.is_contiguous(),
              "bitmask must be a contiguous int32 [R, W] tensor");
  const int64_t vocab = logits.size(1), width = bitmask.size(1);
  TORCH_CHECK(width * 32 >= vocab, "bitmask has ", width, " words per row, fewer than the ", vocab,
              " logits need");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.dim() == 1, "rows must be an int64 [n] tensor");
  const at::Tensor row_list = rows.contiguous();
  const int64_t* row_ids = row_list.data_ptr<int64_t>();
  const int64_t limit = std::min(logits.size(0), bitmask.size(0));
  for (int64_t i = 0; i < row_list.numel(); ++i)
    TORCH_CHECK(row_ids[i] >= 0 && row_ids[i] < limit, "rows[", i, "] = ", row_ids[i], " is outside [0, ", limit,
                ")");
  float* out = logits.data_ptr<float>();
  const int32_t* words = bitmask.data_ptr<int32_t>();
  const int64_t row_stride = logits.stride(0);
  at::parallel_for(0, row_list.numel(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      mask_row(out + row_ids[i] * row_stride, words + row_ids[i] * width, vocab);
  });
  return logits;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(scalellm, m) {
  m.def("apply_token_bitmask_(Tensor(a!) logits, Tensor bitmask, Tensor rows) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(scalellm, CPU, m) {
  m.impl("apply_token_bitmask_", &apply_token_bitmask_);
}

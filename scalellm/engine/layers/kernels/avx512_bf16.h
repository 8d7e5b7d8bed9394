// 16-lane float <-> float32 / bfloat16 loads and stores for the AVX-512 kernels of this folder.
//
//   load16(src[, mask])        16 values as floats (bfloat16 widened exactly; masked lanes are 0)
//   store16(dst, v[, mask])    16 floats stored as float32, or as bfloat16 rounded like
//                              at::BFloat16(float): to nearest even, NaN to a quiet NaN
//   round16(v), widen16(bits)  the bfloat16 rounding and widening alone; round_trip(v) = bf16(v)
//   tail_mask(remaining)       the lanes of a last, partial group of 16
//
// Included by each kernel's source, which builds only where SCALELLM_AVX512_BF16 is 1 (AVX-512 F
// and BW). The build hash of every kernel covers this file.

#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define SCALELLM_AVX512_BF16 1

#include <ATen/ATen.h>
#include <immintrin.h>

#include <cstdint>

namespace scalellm_avx512 {

inline __m512 widen16(__m256i bits) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// float -> bfloat16 bits, rounding to nearest even like at::BFloat16(float); NaN -> quiet NaN.
inline __m256i round16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(rounded);
}

inline __m512 round_trip(__m512 v) { return widen16(round16(v)); }  // the value bf16(v), as float

inline __mmask16 tail_mask(int64_t remaining) {
  return remaining >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << remaining) - 1);
}

inline __m512 load16(const float* src) { return _mm512_loadu_ps(src); }

inline __m512 load16(const at::BFloat16* src) {
  return widen16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
}

inline __m512 load16(const float* src, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, src); }

inline __m512 load16(const at::BFloat16* src, __mmask16 mask) { return widen16(_mm256_maskz_loadu_epi16(mask, src)); }

inline void store16(float* dst, __m512 v) { _mm512_storeu_ps(dst, v); }

inline void store16(at::BFloat16* dst, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), round16(v));
}

inline void store16(float* dst, __m512 v, __mmask16 mask) { _mm512_mask_storeu_ps(dst, mask, v); }

inline void store16(at::BFloat16* dst, __m512 v, __mmask16 mask) { _mm256_mask_storeu_epi16(dst, mask, round16(v)); }

}  // namespace scalellm_avx512

#else
#define SCALELLM_AVX512_BF16 0
#endif

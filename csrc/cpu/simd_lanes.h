// SIMD lane types for philox4x32_10_rounds (csrc/philox.h) on the CPU.
//
// Compilers vectorize the 32x32 -> 64-bit products of Philox poorly (they widen every lane to
// 64 bits); these types compute the high and low halves of 8 or 16 products with the even/odd
// vpmuludq idiom, which is what makes Philox ~3x faster than the auto-vectorized loop.  Only
// the tile kernels built for AVX2 / AVX-512 (tile_kernels.cpp) include this header.
#pragma once

#include <immintrin.h>
#include <stdint.h>

#define ADDAX_LANE_INLINE inline __attribute__((always_inline))

namespace addax {
namespace simd {

#if defined(__AVX512F__)

struct U32Lanes {
  static constexpr int kWidth = 16;
  __m512i v;
};

ADDAX_LANE_INLINE U32Lanes broadcast(uint32_t value) { return {_mm512_set1_epi32(static_cast<int>(value))}; }
// first, first + 1, ..., first + 15 (wrapping: callers keep runs free of 32-bit carries).
ADDAX_LANE_INLINE U32Lanes iota(uint32_t first) {
  return {_mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(first)),
                           _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15))};
}
ADDAX_LANE_INLINE void store(uint32_t* out, U32Lanes lanes) { _mm512_storeu_si512(out, lanes.v); }
ADDAX_LANE_INLINE U32Lanes operator^(U32Lanes a, U32Lanes b) { return {_mm512_xor_si512(a.v, b.v)}; }
ADDAX_LANE_INLINE U32Lanes operator^(U32Lanes a, uint32_t b) { return a ^ broadcast(b); }
ADDAX_LANE_INLINE void mulhilo32(uint32_t multiplier, U32Lanes a, U32Lanes& hi, U32Lanes& lo) {
  const __m512i m = _mm512_set1_epi32(static_cast<int>(multiplier));
  const __m512i even = _mm512_mul_epu32(a.v, m);                         // lanes 0, 2, ... as 64-bit
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a.v, 32), m);   // lanes 1, 3, ...
  lo.v = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  hi.v = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

#elif defined(__AVX2__)

struct U32Lanes {
  static constexpr int kWidth = 8;
  __m256i v;
};

ADDAX_LANE_INLINE U32Lanes broadcast(uint32_t value) { return {_mm256_set1_epi32(static_cast<int>(value))}; }
ADDAX_LANE_INLINE U32Lanes iota(uint32_t first) {
  return {_mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(first)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))};
}
ADDAX_LANE_INLINE void store(uint32_t* out, U32Lanes lanes) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), lanes.v);
}
ADDAX_LANE_INLINE U32Lanes operator^(U32Lanes a, U32Lanes b) { return {_mm256_xor_si256(a.v, b.v)}; }
ADDAX_LANE_INLINE U32Lanes operator^(U32Lanes a, uint32_t b) { return a ^ broadcast(b); }
ADDAX_LANE_INLINE void mulhilo32(uint32_t multiplier, U32Lanes a, U32Lanes& hi, U32Lanes& lo) {
  const __m256i m = _mm256_set1_epi32(static_cast<int>(multiplier));
  const __m256i even = _mm256_mul_epu32(a.v, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a.v, 32), m);
  lo.v = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi.v = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

#endif

}  // namespace simd
}  // namespace addax

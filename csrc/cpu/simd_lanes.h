// SIMD lane types for philox4x32_10_rounds (csrc/philox.h) on the CPU.
//
// Philox is a chain of 32x32 -> 64-bit products.  x86 multiplies the low 32-bit halves of
// 64-bit lanes (vpmuludq), so each counter word lives in the low half of a 64-bit lane and
// the upper half is never read as an operand (it carries garbage): one multiply gives both
// halves of the product (lo = the product itself, hi = one shift), where packed 32-bit lanes
// needed two multiplies, three shifts and two blends per register of products.  A lane type
// holds kRegisters independent vectors, so every round issues that many independent multiply
// chains and the core is never waiting on one chain's latency.  Only the tile kernels built
// for AVX2 / AVX-512 (tile_kernels.cpp) include this header.
#pragma once

#include <immintrin.h>
#include <stdint.h>

#define ADDAX_LANE_INLINE inline __attribute__((always_inline))

namespace addax {
namespace simd {

#if defined(__AVX512F__)

using Vec = __m512i;
constexpr int kRegisters = 4;
constexpr int kBlocksPerRegister = 8;

ADDAX_LANE_INLINE Vec broadcast32(uint32_t value) { return _mm512_set1_epi32(static_cast<int>(value)); }
ADDAX_LANE_INLINE Vec add64(Vec a, Vec b) { return _mm512_add_epi64(a, b); }
ADDAX_LANE_INLINE Vec lane_index64() { return _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7); }
ADDAX_LANE_INLINE Vec mul_low32(Vec a, Vec b) { return _mm512_mul_epu32(a, b); }
ADDAX_LANE_INLINE Vec high_half(Vec a) { return _mm512_srli_epi64(a, 32); }
ADDAX_LANE_INLINE Vec xor2(Vec a, Vec b) { return _mm512_xor_si512(a, b); }  // two in a row fuse into vpternlogd
// The low halves of two registers (blocks 0..7 and 8..15) as 16 packed uint32 words.
ADDAX_LANE_INLINE void store_low_halves(uint32_t* out, Vec first, Vec second) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  _mm512_store_si512(out, _mm512_permutex2var_epi32(first, even, second));
}

#elif defined(__AVX2__)

using Vec = __m256i;
// Four registers exceed the 16 ymm registers (some state spills to L1) and are still ~5% faster
// than two on the Zen 4 we measured: the extra independent multiply chains pay for the spills.
constexpr int kRegisters = 4;
constexpr int kBlocksPerRegister = 4;

ADDAX_LANE_INLINE Vec broadcast32(uint32_t value) { return _mm256_set1_epi32(static_cast<int>(value)); }
ADDAX_LANE_INLINE Vec add64(Vec a, Vec b) { return _mm256_add_epi64(a, b); }
ADDAX_LANE_INLINE Vec lane_index64() { return _mm256_setr_epi64x(0, 1, 2, 3); }
ADDAX_LANE_INLINE Vec mul_low32(Vec a, Vec b) { return _mm256_mul_epu32(a, b); }
ADDAX_LANE_INLINE Vec high_half(Vec a) { return _mm256_srli_epi64(a, 32); }
ADDAX_LANE_INLINE Vec xor2(Vec a, Vec b) { return _mm256_xor_si256(a, b); }
ADDAX_LANE_INLINE void store_low_halves(uint32_t* out, Vec first, Vec second) {
  // (f0 f2 s0 s2 | f4 f6 s4 s6) -> (f0 f2 f4 f6 s0 s2 s4 s6)
  const __m256 packed = _mm256_shuffle_ps(_mm256_castsi256_ps(first), _mm256_castsi256_ps(second), 0x88);
  _mm256_store_si256(reinterpret_cast<__m256i*>(out), _mm256_permute4x64_epi64(_mm256_castps_si256(packed), 0xD8));
}

#endif

#if defined(__AVX512F__) || defined(__AVX2__)

// kRegisters * kBlocksPerRegister Philox counters, one uint32 word of each in the low half of
// a 64-bit lane.
struct CounterLanes {
  static constexpr int kRegisters = simd::kRegisters;
  static constexpr int kBlocks = kRegisters * kBlocksPerRegister;
  Vec v[kRegisters];
};

ADDAX_LANE_INLINE CounterLanes broadcast(uint32_t value) {
  CounterLanes lanes;
  for (int i = 0; i < CounterLanes::kRegisters; ++i) lanes.v[i] = broadcast32(value);
  return lanes;
}
// first, first + 1, ..., first + kBlocks - 1 modulo 2^32 (callers keep runs free of 32-bit carries).
ADDAX_LANE_INLINE CounterLanes iota(uint32_t first) {
  CounterLanes lanes;
  for (int i = 0; i < CounterLanes::kRegisters; ++i) {
    lanes.v[i] = add64(broadcast32(first + static_cast<uint32_t>(i * kBlocksPerRegister)), lane_index64());
  }
  return lanes;
}
// Words of blocks 0 .. kBlocks - 1 to out[0 .. kBlocks - 1] (out aligned to the vector size).
ADDAX_LANE_INLINE void store(uint32_t* out, const CounterLanes& lanes) {
  for (int i = 0; i < CounterLanes::kRegisters; i += 2) {
    store_low_halves(out + i * kBlocksPerRegister, lanes.v[i], lanes.v[i + 1]);
  }
}
ADDAX_LANE_INLINE CounterLanes operator^(const CounterLanes& a, const CounterLanes& b) {
  CounterLanes out;
  for (int i = 0; i < CounterLanes::kRegisters; ++i) out.v[i] = xor2(a.v[i], b.v[i]);
  return out;
}
ADDAX_LANE_INLINE CounterLanes operator^(const CounterLanes& a, uint32_t b) {
  CounterLanes out;
  for (int i = 0; i < CounterLanes::kRegisters; ++i) out.v[i] = xor2(a.v[i], broadcast32(b));
  return out;
}
ADDAX_LANE_INLINE void mulhilo32(uint32_t multiplier, const CounterLanes& a, CounterLanes& hi, CounterLanes& lo) {
  const Vec m = broadcast32(multiplier);
  for (int i = 0; i < CounterLanes::kRegisters; ++i) {
    lo.v[i] = mul_low32(a.v[i], m);
    hi.v[i] = high_half(lo.v[i]);
  }
}

#endif

}  // namespace simd
}  // namespace addax

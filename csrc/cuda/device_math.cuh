// Device-only building blocks of the CUDA kernels: Philox with a hoisted key schedule, the
// Gaussian transform on the special-function unit, hardware conversions and the fast paths of
// the stochastic roundings.  The bit-level definitions (words, uniforms, rounding rules) are
// SPEC §1/§2 as in csrc/philox.h; only the Gaussian transform differs from the CPU kernels'
// (SPEC §1 allows fast transcendentals within its bound; see gaussian_block).
#pragma once

#include <stdint.h>

#include "../philox.h"
#include "ptx.cuh"

namespace addax {
namespace cuda {

// ----------------------------------------------------------------------------- Philox

// The ten round keys of one seed.  Built once per thread from a kernel argument or a value
// every thread loads from the same address, so ptxas keeps them in uniform registers: a
// Philox call then costs its 20 multiplies and 20 three-input XORs, nothing for the keys.
struct PhiloxKey {
  uint32_t lo[10];
  uint32_t hi[10];
};

__host__ __device__ __forceinline__ PhiloxKey philox_key(uint64_t seed) {
  PhiloxKey key;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    key.lo[round] = static_cast<uint32_t>(seed) + static_cast<uint32_t>(round) * kPhiloxW0;
    key.hi[round] = static_cast<uint32_t>(seed >> 32) + static_cast<uint32_t>(round) * kPhiloxW1;
  }
  return key;
}

// Philox4x32-10 of counter (block_lo, block_hi, tid, purpose) — SPEC §1.  The kernels pass the
// high word as a value that is constant over a loop, so ptxas hoists the first round's
// products of the loop-invariant words.
__device__ __forceinline__ uint4 philox(uint32_t block_lo, uint32_t block_hi, uint32_t tid, uint32_t purpose,
                                        const PhiloxKey& key) {
  uint32_t c0 = block_lo, c1 = block_hi, c2 = tid, c3 = purpose;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mul_wide(c0, kPhiloxM0, hi0, lo0);
    mul_wide(c2, kPhiloxM1, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ key.lo[round];
    const uint32_t n2 = hi0 ^ c3 ^ key.hi[round];
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return make_uint4(c0, c1, c2, c3);
}

__device__ __forceinline__ uint4 philox(uint64_t block, uint32_t tid, uint32_t purpose, const PhiloxKey& key) {
  return philox(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), tid, purpose, key);
}

// ----------------------------------------------------------------------------- Gaussian z

// z = kGaussianScale * radius * trig: the constant factor of the transform below, folded by
// the kernels into the coefficients that multiply z.
//   radius = sqrt(-log2 u)          so sqrt(-2 ln u) = sqrt(2 ln 2) * radius;
//   trig   = cos/sin(2 pi (u' - 1/2)) = -cos/sin(2 pi u').
constexpr float kGaussianScale = -1.17741002251547469f;  // -sqrt(2 ln 2)

// Four Gaussians of one Philox block in factored form: z[4j + e] = kGaussianScale * radius[e / 2]
// * trig[e].  Accuracy against the float64 formula (SPEC §1: 1e-3 max, 1e-6 mean):
// * u = (1 + (w >> 9) 2^-23) - (1 - 2^-24) and u' - 1/2 are exact (no int -> float conversion,
//   which runs at the special-function unit's rate);
// * -log2 u from MUFU.LG2 (documented absolute error 2^-22 on [0.5, 2], 2 ulp elsewhere).  Near
//   u -> 1 that absolute error is as large as -log2 u itself, and the raw result can even turn
//   positive, so it is bounded below by 1 - u < (1 - u) / ln 2 <= -log2 u (one FADD, one FMNMX;
//   the bound is active only for u within ~10 ulps of 1): never NaN, and at the largest u
//   (1 - 2^-24, true |z| <= 3.5e-4) |dz| stays below 4e-4 whichever way MUFU.LG2 errs;
// * the angle 2 pi (u' - 1/2) lies in [-pi, pi), where MUFU.SIN/COS are accurate to 2^-21.4
//   absolute; it is formed in one rounding from the exact u' - 1/2;
// * sqrt.approx on the special-function unit (relative error ~2^-23).
// Expected max |dz| a few 1e-6 (at |z| ~ 5), mean a few 1e-7.
__device__ __forceinline__ void gaussian_block(const uint4& words, float (&radius)[2], float (&trig)[4]) {
  constexpr float kOneMinusHalfUlp = 0.99999994039535522f;  // 1 - 2^-24
  constexpr float kTwoPi = 6.28318530717958648f;
  constexpr float kTwoPiHalfUlp = 6.28318530717958648f * 5.9604644775390625e-8f;  // exact: 2 pi_f * 2^-24
  const uint32_t radius_words[2] = {words.x, words.z};
  const uint32_t angle_words[2] = {words.y, words.w};
#pragma unroll
  for (int pair = 0; pair < 2; ++pair) {
    const float u = __uint_as_float((radius_words[pair] >> 9) + 0x3F800000u) - kOneMinusHalfUlp;
    radius[pair] = sqrt_approx(fmaxf(-lg2_approx(u), 1.0f - u));
    const float centered = __uint_as_float((angle_words[pair] >> 9) + 0x3F800000u) - 1.5f;  // u' - 1/2 - 2^-24
    const float angle = __fmaf_rn(centered, kTwoPi, kTwoPiHalfUlp);
    trig[2 * pair] = cos_approx(angle);
    trig[2 * pair + 1] = sin_approx(angle);
  }
}

// ----------------------------------------------------------------------------- conversions

__device__ __forceinline__ float bf16_low(uint32_t pair) { return __uint_as_float(pair << 16); }
__device__ __forceinline__ float bf16_high(uint32_t pair) { return __uint_as_float(pair & 0xFFFF0000u); }

// ----------------------------------------------------------------------------- stochastic rounding

// SPEC §2 bf16: (bits(x) + (w >> 16)) >> 16, saturating, NaN/inf passed through.  Fast form:
// the addition, then truncation (cvt.rz) — exact wherever |x| <= the largest finite bf16
// (0x7F7F0000): no carry can then reach the exponent's top.  `special` collects the elements
// outside that range (larger finite values, inf, NaN), which stochastic_bf16_exact redoes.
constexpr float kBF16MaxFinite = 3.38953138925153547590e+38f;  // bits 0x7F7F0000

__device__ __forceinline__ uint32_t stochastic_bf16_fast(float x, uint32_t word, bool& special) {
  special |= !(fabsf(x) <= kBF16MaxFinite);
  return __float_as_uint(x) + (word >> 16);
}

// The exact rule as a float32 pattern whose truncation to bf16 is the result: larger finite
// magnitudes truncate to the saturated 0x7F7F, inf and NaN stay (a NaN's truncation is NaN).
__device__ __noinline__ uint32_t stochastic_bf16_exact(float x, uint32_t word) {
  const uint32_t bits = __float_as_uint(x);
  return fabsf(x) <= kBF16MaxFinite ? bits + (word >> 16) : bits;
}

// SPEC §2 fp16 where fp16 is normal (2^-14 <= |x| < inf): round |x| up iff
// (w >> 8) 2^-24 < fraction, the fraction being the 13 float32 mantissa bits below fp16's.  In
// integers: up iff f13 > (w >> 8) >> 11, i.e. iff f13 + (0x1FFF - (w >> 19)) carries into bit
// 13; the truncating conversion then keeps the carry.  Truncation also saturates at 65504, as
// the rule does.  `special` collects fp16-subnormal magnitudes and those of 2^16 and more (inf,
// NaN, and finite values within 0x1FFF ulps of FLT_MAX, which the carry would turn into inf or
// a NaN pattern; all saturate or pass through in the exact rule).
__device__ __forceinline__ uint32_t stochastic_fp16_fast(float x, uint32_t word, bool& special) {
  special |= !(fabsf(x) >= 6.103515625e-05f && fabsf(x) < 65536.0f);
  return __float_as_uint(x) + ((~word) >> 19);
}

// The exact rule (csrc/philox.h) as the pattern of the fp16 result widened to float32, whose
// truncation gives the same fp16 bits back.
__device__ __noinline__ uint32_t stochastic_fp16_exact(float x, uint32_t word) {
  const uint16_t half = float_to_fp16_stochastic(x, word);
  return __float_as_uint(fp16_to_float(half));
}

}  // namespace cuda
}  // namespace addax

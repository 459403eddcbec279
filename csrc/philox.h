// The noise z of SPEC §1 and the storage rounding of SPEC §2, for host and device code.
//
// One definition shared by the CPU kernels (compiled by the host compiler, vectorized by it)
// and the CUDA kernels (compiled by nvcc).  Everything is branch-free arithmetic on 32-bit
// lanes so that a loop over elements vectorizes: selects instead of branches, integer
// bit manipulation instead of library calls, and a log / sincos of our own (the libm
// versions do not vectorize and the CUDA fast intrinsics miss the accuracy bound near u -> 1).
//
// Accuracy of the Gaussian transform against the float64 evaluation of the formula, over every
// one of the 2^23 uniforms as radius input and as angle input: max |dz| 7e-7, mean |dz| 3.2e-8
// (the float32 rounding floor), well inside the SPEC bound (1e-3 max, 1e-6 mean) and the
// tighter one tests/test_native_backend.py pins (5e-6, 1e-7).
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define ADDAX_HD __host__ __device__ __forceinline__
#else
#include <math.h>
#include <string.h>
#define ADDAX_HD inline __attribute__((always_inline))
#endif

namespace addax {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

constexpr uint32_t kPurposeNoise = 0;
constexpr uint32_t kPurposeRounding = 1;
constexpr uint32_t kPurposeMask = 2;

// Elements covered by one Philox call: four Gaussians, or 128 Rademacher signs.
constexpr int kGaussianPerBlock = 4;
constexpr int kRademacherPerBlock = 128;

struct Words {
  uint32_t w0, w1, w2, w3;
};

ADDAX_HD float bits_to_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float value;
  memcpy(&value, &bits, sizeof(value));
  return value;
#endif
}

ADDAX_HD uint32_t float_to_bits(float value) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(value);
#else
  uint32_t bits;
  memcpy(&bits, &value, sizeof(bits));
  return bits;
#endif
}

ADDAX_HD float sqrt_rn(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);
#else
  return sqrtf(x);  // correctly rounded; vectorizes to sqrtps with -fno-math-errno
#endif
}

// ----------------------------------------------------------------------------- Philox4x32-10

// (high, low) 32-bit halves of multiplier * a.
ADDAX_HD void mulhilo32(uint32_t multiplier, uint32_t a, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  hi = __umulhi(multiplier, a);
  lo = multiplier * a;
#else
  const uint64_t product = static_cast<uint64_t>(multiplier) * a;
  hi = static_cast<uint32_t>(product >> 32);
  lo = static_cast<uint32_t>(product);
#endif
}

// Random123 Philox4x32-10 rounds on counter (c0, c1, c2, c3) under key (k0, k1), in place.
// `Lane` is uint32_t, or a group of SIMD registers of counters (csrc/cpu/simd_lanes.h) that
// provides mulhilo32, ^ and ^ with a broadcast uint32 (found by argument-dependent lookup): the
// CPU kernels run this one definition on 32 (AVX-512) or 16 (AVX2) counters at a time.
template <typename Lane>
ADDAX_HD void philox4x32_10_rounds(Lane& c0, Lane& c1, Lane& c2, Lane& c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#elif !defined(__CUDACC__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 10
#endif
  for (int round = 0; round < 10; ++round) {
    Lane hi0, lo0, hi1, lo1;
    mulhilo32(kPhiloxM0, c0, hi0, lo0);
    mulhilo32(kPhiloxM1, c2, hi1, lo1);
    const Lane n0 = hi1 ^ c1 ^ k0;
    const Lane n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

ADDAX_HD Words philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  philox4x32_10_rounds(c0, c1, c2, c3, k0, k1);
  return Words{c0, c1, c2, c3};
}

// The words of Philox block `block` (= e >> 2 for Gaussian z and rounding bits, e >> 7 for
// Rademacher signs) of tensor stream `tid` under `seed`, SPEC §1.
ADDAX_HD Words block_words(uint64_t seed, uint32_t tid, uint64_t block, uint32_t purpose) {
  return philox4x32_10(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), tid, purpose,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

ADDAX_HD uint32_t word_at(const Words& words, uint32_t lane) {
  // Selects rather than indexing: keeps the words in registers on the GPU and in vector
  // lanes on the CPU.
  const uint32_t low = (lane & 1u) ? words.w1 : words.w0;
  const uint32_t high = (lane & 1u) ? words.w3 : words.w2;
  return (lane & 2u) ? high : low;
}

// ----------------------------------------------------------------------------- uniforms

// u = (2 * (w >> 9) + 1) * 2^-24: the odd multiples of 2^-24 in (0, 1), exact in float32.
ADDAX_HD float uniform(uint32_t word) {
  return static_cast<float>(static_cast<int32_t>(((word >> 9) << 1) | 1u)) * 5.9604644775390625e-8f;
}

// ----------------------------------------------------------------------------- Box–Muller

// The float32 value odd * 2^-24 for an odd integer |odd| < 2^24 of either sign: exact
// conversion, then the scaling by 2^-24 as an integer subtraction from the exponent field (no
// multiply; |odd| >= 1 keeps the exponent far from underflow and the sign bit untouched).
ADDAX_HD float scale_odd_by_2_pow_minus_24(int32_t odd) {
  return bits_to_float(float_to_bits(static_cast<float>(odd)) - (24u << 23));
}

// sqrt(-2 ln u) for u = uniform(word).  u = 2^k * m with m in [sqrt(1/2), sqrt(2)) by one
// integer subtraction from the bits of u (offset by those of sqrt(1/2), the arithmetic shift
// gives k), then ln u = k ln 2 + log1p(f), f = m - 1, with log1p(f) = f - f^2/2 + f^3 P(f) and
// P a degree-6 minimax fit (relative error of log1p < 3.2e-8 on the interval, about a
// float32 ulp: the transform's error stays at the float32 rounding floor).  f is exact
// (Sterbenz), so as u -> 1 (k = 0, m = u) the result tends to u - 1 < 0 and never turns
// positive.  The -2 of -2 ln u is folded into the coefficients (an exact power-of-two scaling).
// On the CPU the transform is bound by the number of vector operations, so each one counts.
ADDAX_HD float box_muller_radius(uint32_t word) {
  const int32_t odd = static_cast<int32_t>((word >> 8) | 1u);  // u * 2^24 = 2 (w >> 9) + 1
  const uint32_t u_bits = float_to_bits(scale_odd_by_2_pow_minus_24(odd));
  const int32_t offset = static_cast<int32_t>(u_bits - 0x3F3504F3u);  // bits(u) - bits(sqrt(1/2))
  const float k = static_cast<float>(offset >> 23);
  const float f = bits_to_float((static_cast<uint32_t>(offset) & 0x007FFFFFu) + 0x3F3504F3u) - 1.0f;
  const float f2 = f * f;
  // -2 P(f) by Horner.
  float p = -1.7400800652e-1f;
  p = p * f + 2.8534966762e-1f;
  p = p * f + -2.9829562862e-1f;
  p = p * f + 3.3155174596e-1f;
  p = p * f + -3.9926125808e-1f;
  p = p * f + 5.0002673752e-1f;
  p = p * f + -6.6667821488e-1f;
  // -2 ln u = -2 f + f^2 - 2 f^3 P(f) - 2 k ln 2, small terms first.  -2 k ln 2 in one
  // rounding (k = 0 for u > sqrt(1/2), and where k != 0 the radius is >= 0.83, so half an ulp
  // of 2 |k| ln 2 moves z by < 2e-7).
  float minus_two_log = (p * f) * f2 + f2;
  minus_two_log = minus_two_log - (f + f);
  minus_two_log = minus_two_log + k * -1.38629436f;
  return sqrt_rn(minus_two_log);
}

// sin and cos of 2*pi*u for u = uniform(word), without forming 2*pi*u in float32.
// With n = w >> 9, u = (2n + 1) / 2^24; the nearest quarter turn q = round(4u) and the
// remainder r = u - q/4 in [-1/8, 1/8] are computed exactly in integers, so the only
// rounding is in the polynomials: minimax fits sin(2 pi r) = r S(r^2) of degree 7 and
// cos(2 pi r) = 1 + r^2 C(r^2) of degree 8 (absolute error < 1.3e-9 and < 6e-11 on
// |r| <= 1/8).
ADDAX_HD void sincos_two_pi(uint32_t word, float& sin_out, float& cos_out) {
  const int32_t odd = static_cast<int32_t>((word >> 8) | 1u);  // u * 2^24 = 2 (w >> 9) + 1
  // round(4u) = q = rounded >> 22 (0..4), and r * 2^24 = odd - q 2^22, an odd integer.
  const uint32_t rounded = static_cast<uint32_t>(odd) + (1u << 21);
  const float r = scale_odd_by_2_pow_minus_24(static_cast<int32_t>(rounded & 0x003FFFFFu) - (1 << 21));
  const float r2 = r * r;
  float s = -7.5240055034e+01f;
  s = s * r2 + 8.1588124144e+01f;
  s = s * r2 + -4.1341628036e+01f;
  s = s * r2 + 6.2831852203e+00f;
  s = s * r;
  float c = 5.9245979307e+01f;
  c = c * r2 + -8.5443742153e+01f;
  c = c * r2 + 6.4939326475e+01f;
  c = c * r2 + -1.9739208694e+01f;
  c = c * r2 + 1.0f;
  // Rotate by q quarter turns: (sin, cos) -> (cos, -sin) -> (-sin, -cos) -> (-cos, sin).
  // Bit 0 of q is bit 22 of `rounded`, bit 1 of q (and of q + 1) is bit 23 of `rounded`
  // (of rounded + 2^22).
  const bool swap = (rounded & (1u << 22)) != 0;
  const uint32_t sin_sign = (rounded << 8) & 0x80000000u;
  const uint32_t cos_sign = ((rounded + (1u << 22)) << 8) & 0x80000000u;
  const float sin_base = swap ? c : s;
  const float cos_base = swap ? s : c;
  sin_out = bits_to_float(float_to_bits(sin_base) ^ sin_sign);
  cos_out = bits_to_float(float_to_bits(cos_base) ^ cos_sign);
}

struct Gaussian4 {
  float z0, z1, z2, z3;
};

// z[4j .. 4j+3] from the words of block j: (r0 cos, r0 sin) of (u0, u1), (r1 cos, r1 sin) of (u2, u3).
ADDAX_HD Gaussian4 gaussian4(const Words& words) {
  const float r0 = box_muller_radius(words.w0);
  const float r1 = box_muller_radius(words.w2);
  float s0, c0, s1, c1;
  sincos_two_pi(words.w1, s0, c0);
  sincos_two_pi(words.w3, s1, c1);
  return Gaussian4{r0 * c0, r0 * s0, r1 * c1, r1 * s1};
}

ADDAX_HD float gaussian4_at(const Gaussian4& z, uint32_t lane) {
  const float low = (lane & 1u) ? z.z1 : z.z0;
  const float high = (lane & 1u) ? z.z3 : z.z2;
  return (lane & 2u) ? high : low;
}

// SPEC §1 sparsity: element kept iff its purpose-2 uniform u >= p, i.e. (integer form of
// rng.sparsity_threshold) 2 (w >> 9) + 1 = (w >> 8) | 1 >= threshold.  threshold 0 keeps all.
ADDAX_HD bool keep_element(uint32_t mask_word, uint32_t threshold) { return ((mask_word >> 8) | 1u) >= threshold; }

// Rademacher z for element e of its 128-element block: bit (e & 31) of word (e >> 5) & 3.
ADDAX_HD float rademacher(const Words& words, uint32_t index_in_block) {
  const uint32_t bit = (word_at(words, (index_in_block >> 5) & 3u) >> (index_in_block & 31u)) & 1u;
  return bit ? -1.0f : 1.0f;
}

// ----------------------------------------------------------------------------- storage types

ADDAX_HD float bf16_bits_to_float(uint16_t bits) { return bits_to_float(static_cast<uint32_t>(bits) << 16); }

ADDAX_HD float fp16_bits_to_float(uint16_t half) {
  // Rebias the exponent; subnormal halves become normal floats by one exact subtraction.
  const uint32_t magnitude = static_cast<uint32_t>(half & 0x7FFFu) << 13;
  const uint32_t exponent = magnitude & 0x0F800000u;
  const uint32_t rebased = magnitude + ((127u - 15u) << 23);
  const uint32_t inf_nan = rebased + ((128u - 16u) << 23);
  const float subnormal = bits_to_float(rebased + (1u << 23)) - bits_to_float(113u << 23);
  const uint32_t bits = exponent == 0x0F800000u ? inf_nan : (exponent == 0 ? float_to_bits(subnormal) : rebased);
  return bits_to_float(bits | (static_cast<uint32_t>(half & 0x8000u) << 16));
}

// Round-half-to-even float32 -> bfloat16; NaN stays a (quiet) NaN.
ADDAX_HD uint16_t float_to_bf16_nearest(float x) {
  const uint32_t bits = float_to_bits(x);
  const bool is_nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(is_nan ? ((bits >> 16) | 0x0040u) : rounded);
}

// SPEC §2: (bits(x) + (w >> 16)) >> 16 for finite x, saturating at the largest finite bf16.
ADDAX_HD uint16_t float_to_bf16_stochastic(float x, uint32_t word) {
  const uint32_t bits = float_to_bits(x);
  const bool finite = (bits & 0x7F800000u) != 0x7F800000u;
  uint32_t rounded = (bits + (word >> 16)) >> 16;
  const bool overflowed = (rounded & 0x7FFFu) == 0x7F80u;
  rounded = overflowed ? ((rounded & 0x8000u) | 0x7F7Fu) : rounded;
  return static_cast<uint16_t>(finite ? rounded : float_to_bf16_nearest(x));
}

// Round-half-to-even float32 -> float16 (overflow to inf, gradual underflow, NaN -> quiet NaN).
ADDAX_HD uint16_t float_to_fp16_nearest(float x) {
  const uint32_t bits = float_to_bits(x);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t magnitude = bits & 0x7FFFFFFFu;
  // |x| >= 65536: inf (NaN keeps a quiet payload); 65520 <= |x| < 65536 rounds to inf below.
  const uint32_t huge = magnitude > 0x7F800000u ? 0x7E00u : 0x7C00u;
  // |x| < 2^-14: add 0.5 so the float adder rounds to the fp16 subnormal grid (ulp 2^-24).
  const uint32_t subnormal = float_to_bits(bits_to_float(magnitude) + 0.5f) - 0x3F000000u;
  const uint32_t odd = (magnitude >> 13) & 1u;
  const uint32_t normal = (magnitude + 0xC8000FFFu + odd) >> 13;  // rebias by (15 - 127) << 23
  const uint32_t result = magnitude >= 0x47800000u ? huge : (magnitude < 0x38800000u ? subnormal : normal);
  return static_cast<uint16_t>(result | sign);
}

// SPEC §2 fp16 stochastic rounding: with lo <= |x| < hi adjacent fp16 magnitudes, round up to
// hi iff (w >> 8) * 2^-24 < (|x| - lo) / (hi - lo).  Both sides are exact, so every backend
// takes the same decision; here they are compared without a division.  Where fp16 is normal
// (|x| >= 2^-14), lo is |x| truncated to fp16's 10 mantissa bits and the fraction is the 13
// float32 mantissa bits below them: an integer comparison.  Below, the fp16 grid is the
// multiples of 2^-24: |x| * 2^24 = n + fraction exactly, lo = n * 2^-24.  |x| saturates at
// the largest finite fp16 (65504, whose fraction is 0).
ADDAX_HD uint16_t float_to_fp16_stochastic(float x, uint32_t word) {
  const uint32_t bits = float_to_bits(x);
  const float absolute = bits_to_float(bits & 0x7FFFFFFFu);
  const float magnitude = absolute < 65504.0f ? absolute : 65504.0f;  // NaN -> 65504, replaced below
  const uint32_t magnitude_bits = float_to_bits(magnitude);
  const uint32_t threshold = word >> 8;  // the comparison's left side * 2^24
  // Normal: fp16 bits of the truncation (exponent rebiased by 112), round up iff
  // threshold * 2^-24 < fraction_bits * 2^-13.
  const uint32_t normal = ((magnitude_bits - 0x38000000u) >> 13) +
                          static_cast<uint32_t>(threshold < ((magnitude_bits & 0x1FFFu) << 11));
  // Subnormal: n + (threshold < fraction * 2^24) with n = floor(|x| 2^24) < 1024.  Normal
  // magnitudes (scaled >= 1024) convert 0 instead: the conversion stays in range, and in this
  // form GCC if-converts and vectorizes the loop.
  const float scaled = magnitude * 16777216.0f;
  const int32_t whole = static_cast<int32_t>(scaled < 1024.0f ? scaled : 0.0f);
  const float fraction = scaled - static_cast<float>(whole);
  const uint32_t subnormal = static_cast<uint32_t>(whole) +
                             static_cast<uint32_t>(static_cast<float>(static_cast<int32_t>(threshold)) < fraction * 16777216.0f);
  const uint32_t rounded = (magnitude_bits >= 0x38800000u ? normal : subnormal) | ((bits >> 16) & 0x8000u);
  const uint32_t non_finite = float_to_fp16_nearest(x);
  return static_cast<uint16_t>((bits & 0x7F800000u) != 0x7F800000u ? rounded : non_finite);
}

}  // namespace addax

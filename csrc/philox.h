// The noise z of SPEC §1 and the storage rounding of SPEC §2, for host and device code.
//
// One definition shared by the CPU kernels (compiled by the host compiler, vectorized by it)
// and the CUDA kernels (compiled by nvcc).  Everything is branch-free arithmetic on 32-bit
// lanes so that a loop over elements vectorizes: selects instead of branches, integer
// bit manipulation instead of library calls, and a log / sincos of our own (the libm
// versions do not vectorize and the CUDA fast intrinsics miss the accuracy bound near u -> 1).
//
// Accuracy of the Gaussian transform (measured in tests/test_native_backend.py against the
// float64 evaluation of the formula): max |dz| ~ 1e-6, mean |dz| ~ 5e-8 over 1e6 elements,
// well inside the SPEC bound (1e-3 max, 1e-6 mean).
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
// `Lane` is uint32_t, or a SIMD vector of uint32 lanes (csrc/cpu/simd_lanes.h) that provides
// mulhilo32, ^ and ^ with a broadcast uint32 (found by argument-dependent lookup): the CPU
// kernels run this one definition on 8 or 16 counters at a time.
template <typename Lane>
ADDAX_HD void philox4x32_10_rounds(Lane& c0, Lane& c1, Lane& c2, Lane& c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
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

// sqrt(-2 ln u) for u = uniform(word).  ln is Cephes' logf: u = 2^k * m with m in
// [sqrt(1/2), sqrt(2)), ln u = k ln 2 + log1p(m - 1) by a degree-9 polynomial; m - 1 is exact
// (Sterbenz), so as u -> 1 (k = 0, m = u) the result tends to u - 1 < 0 and never turns
// positive.  Max relative error ~1 ulp on (0, 1).
ADDAX_HD float box_muller_radius(uint32_t word) {
  const float u = uniform(word);
  uint32_t bits = float_to_bits(u);
  int32_t exponent = static_cast<int32_t>(bits >> 23) - 127;
  bits = (bits & 0x007FFFFFu) | 0x3F800000u;  // m in [1, 2)
  const bool above_sqrt2 = bits > 0x3FB504F3u;
  bits = above_sqrt2 ? bits - 0x00800000u : bits;  // m in [sqrt(1/2), sqrt(2))
  exponent += above_sqrt2 ? 1 : 0;
  const float f = bits_to_float(bits) - 1.0f;
  const float k = static_cast<float>(exponent);
  const float f2 = f * f;
  float poly = 7.0376836292e-2f;
  poly = poly * f + -1.1514610310e-1f;
  poly = poly * f + 1.1676998740e-1f;
  poly = poly * f + -1.2420140846e-1f;
  poly = poly * f + 1.4249322787e-1f;
  poly = poly * f + -1.6668057665e-1f;
  poly = poly * f + 2.0000714765e-1f;
  poly = poly * f + -2.4999993993e-1f;
  poly = poly * f + 3.3333331174e-1f;
  float log_u = poly * f * f2;
  log_u = log_u + k * -2.12194440e-4f;  // ln 2 split as 0.693359375 - 2.12194440e-4
  log_u = log_u - 0.5f * f2;
  log_u = f + log_u;
  log_u = log_u + k * 0.693359375f;
  return sqrt_rn(-2.0f * log_u);
}

// sin and cos of 2*pi*u for u = uniform(word), without forming 2*pi*u in float32.
// With n = w >> 9, u = (2n + 1) / 2^24; the nearest quarter turn q = round(4u) and the
// remainder r = u - q/4 in [-1/8, 1/8] are computed exactly in integers, so the only
// rounding is in the polynomials (Taylor series of sin/cos(2*pi*r) to degree 9/10:
// truncation < 2e-9 for |2*pi*r| <= pi/4).
ADDAX_HD void sincos_two_pi(uint32_t word, float& sin_out, float& cos_out) {
  const int32_t odd = static_cast<int32_t>(((word >> 9) << 1) | 1u);       // u * 2^24
  const int32_t quarter = (odd + (1 << 21)) >> 22;                          // round(4u), 0..4
  const float r = static_cast<float>(odd - (quarter << 22)) * 5.9604644775390625e-8f;
  const float r2 = r * r;
  // sin(2 pi r) = r * S(r^2), cos(2 pi r) = C(r^2): Taylor coefficients (2 pi)^k / k!.
  float s = 42.058693f;
  s = s * r2 + -76.70586f;
  s = s * r2 + 81.60525f;
  s = s * r2 + -41.3417f;
  s = s * r2 + 6.2831855f;
  s = s * r;
  float c = -26.426256f;
  c = c * r2 + 60.24464f;
  c = c * r2 + -85.45682f;
  c = c * r2 + 64.93939f;
  c = c * r2 + -19.739208f;
  c = c * r2 + 1.0f;
  // Rotate by q quarter turns: (sin, cos) -> (cos, -sin) -> (-sin, -cos) -> (-cos, sin).
  const bool swap = (quarter & 1) != 0;
  const uint32_t sin_sign = static_cast<uint32_t>(quarter & 2) << 30;
  const uint32_t cos_sign = static_cast<uint32_t>((quarter + 1) & 2) << 30;
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
// hi iff (w >> 8) * 2^-24 < (|x| - lo) / (hi - lo).  Both sides are exact in float32 (hi - lo
// is a power of two), so every backend takes the same decision.
ADDAX_HD uint16_t float_to_fp16_stochastic(float x, uint32_t word) {
  const uint32_t bits = float_to_bits(x);
  const bool finite = (bits & 0x7F800000u) != 0x7F800000u;
  float magnitude = bits_to_float(bits & 0x7FFFFFFFu);
  magnitude = magnitude < 65504.0f ? magnitude : 65504.0f;
  const uint16_t nearest = float_to_fp16_nearest(magnitude);
  const uint16_t low = fp16_bits_to_float(nearest) > magnitude ? static_cast<uint16_t>(nearest - 1) : nearest;
  const float low_value = fp16_bits_to_float(low);
  const float high_value = fp16_bits_to_float(static_cast<uint16_t>(low + 1));
  const float fraction = (magnitude - low_value) / (high_value - low_value);
  const float threshold = static_cast<float>(static_cast<int32_t>(word >> 8)) * 5.9604644775390625e-8f;
  const uint16_t rounded = static_cast<uint16_t>((threshold < fraction ? low + 1 : low) | ((bits >> 16) & 0x8000u));
  return finite ? rounded : float_to_fp16_nearest(x);
}

}  // namespace addax

// The CPU emulation's stand-in for csrc/cuda/ptx.cuh: each inline-PTX wrapper restated in C++
// with the instruction's semantics (PTX ISA: mul.wide, cvt with .rn / .rz rounding), except
// the special-function approximations (lg2/sqrt/sin/cos.approx), which become libm's
// functions, exact by default.  For the accuracy check of the Gaussian transform
// (gaussian_bound_check.cu) they can instead err by the larger of the published bounds of the
// hardware's approximations (CUDA C++ Programming Guide: __log2f 2^-22 absolute on [0.5, 2],
// 2 ulp elsewhere; PTX ISA: sin/cos.approx 2^-20.9 absolute on [-pi, pi], where the Guide gives
// 2^-21.41 / 2^-21.19; the square root, documented at about 1 ulp, here 2^-22 relative), in a
// chosen direction.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

namespace addax_emulation {

// 0: exact.  +1 / -1: every approximation is off by its whole bound, upwards / downwards.
// 2: each evaluation off by its whole bound in a direction taken from a hash of its input.
inline int mufu_error_mode = 0;

inline float mufu_result(float exact, float bound, float input) {
  if (mufu_error_mode == 0) return exact;
  float direction = static_cast<float>(mufu_error_mode);
  if (mufu_error_mode == 2) {
    uint32_t bits;
    memcpy(&bits, &input, sizeof(bits));
    direction = ((bits * 0x9E3779B1u) >> 31) ? 1.0f : -1.0f;
  }
  return exact + direction * bound;
}

inline float ulp_of(float value) {
  const float magnitude = fabsf(value);
  return nextafterf(magnitude, INFINITY) - magnitude;
}

}  // namespace addax_emulation

namespace addax {
namespace cuda {

inline void mul_wide(uint32_t a, uint32_t m, uint32_t& hi, uint32_t& lo) {
  const uint64_t product = static_cast<uint64_t>(a) * m;
  hi = static_cast<uint32_t>(product >> 32);
  lo = static_cast<uint32_t>(product);
}

inline float lg2_approx(float x) {
  const float exact = log2f(x);
  const float bound = x >= 0.5f && x <= 2.0f ? 0x1p-22f : 2.0f * addax_emulation::ulp_of(exact);
  return addax_emulation::mufu_result(exact, bound, x);
}
inline float sqrt_approx(float x) {
  const float exact = sqrtf(x);
  return addax_emulation::mufu_result(exact, exact * 0x1p-22f, x);
}
inline float sin_approx(float x) { return addax_emulation::mufu_result(sinf(x), 5.1e-7f, x); }  // 2^-20.9 = 5.09e-7
inline float cos_approx(float x) { return addax_emulation::mufu_result(cosf(x), 5.1e-7f, x); }

inline float fp16_to_float(uint16_t bits) { return fp16_bits_to_float(bits); }

// cvt.rn.{bf16,f16}x2.f32 d, high, low: the IEEE round-half-to-even conversions.
inline uint32_t pack_bf16_nearest(float low, float high) {
  return static_cast<uint32_t>(float_to_bf16_nearest(low)) | (static_cast<uint32_t>(float_to_bf16_nearest(high)) << 16);
}
inline uint32_t pack_fp16_nearest(float low, float high) {
  return static_cast<uint32_t>(float_to_fp16_nearest(low)) | (static_cast<uint32_t>(float_to_fp16_nearest(high)) << 16);
}

// cvt.rz.bf16.f32: drop the low 16 bits (finite values and infinities); NaN -> canonical NaN.
inline uint16_t bf16_toward_zero(uint32_t bits) {
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FFFu;
  return static_cast<uint16_t>(bits >> 16);
}

// cvt.rz.f16.f32: round toward zero, so a finite value never overflows (it saturates at 65504);
// infinities stay, NaN -> canonical NaN, magnitudes below 2^-14 truncate onto the subnormal grid.
inline uint16_t fp16_toward_zero(uint32_t bits) {
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7FFFFFFFu;
  if (magnitude > 0x7F800000u) return 0x7FFFu;
  if (magnitude == 0x7F800000u) return sign | 0x7C00u;
  if (magnitude >= 0x477FE000u) return sign | 0x7BFFu;  // >= 65504
  if (magnitude < 0x38800000u) {                        // < 2^-14: multiples of 2^-24, truncated
    float value;
    memcpy(&value, &magnitude, sizeof(value));
    return sign | static_cast<uint16_t>(value * 16777216.0f);
  }
  return sign | static_cast<uint16_t>((magnitude - 0x38000000u) >> 13);  // rebias 127 -> 15, truncate
}

inline uint32_t pack_bf16_truncated(uint32_t low, uint32_t high) {
  return static_cast<uint32_t>(bf16_toward_zero(low)) | (static_cast<uint32_t>(bf16_toward_zero(high)) << 16);
}
inline uint32_t pack_fp16_truncated(uint32_t low, uint32_t high) {
  return static_cast<uint32_t>(fp16_toward_zero(low)) | (static_cast<uint32_t>(fp16_toward_zero(high)) << 16);
}

}  // namespace cuda
}  // namespace addax

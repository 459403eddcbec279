// The CPU emulation's stand-in for csrc/cuda/ptx.cuh: each inline-PTX wrapper restated in C++
// with the instruction's semantics (PTX ISA: mul.wide, cvt with .rn / .rz rounding), except
// the special-function approximations (lg2/sqrt/sin/cos.approx), which become the correctly
// rounded libm functions: the emulation checks the kernels' logic, not MUFU's accuracy.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

namespace addax {
namespace cuda {

inline void mul_wide(uint32_t a, uint32_t m, uint32_t& hi, uint32_t& lo) {
  const uint64_t product = static_cast<uint64_t>(a) * m;
  hi = static_cast<uint32_t>(product >> 32);
  lo = static_cast<uint32_t>(product);
}

inline float lg2_approx(float x) { return log2f(x); }
inline float sqrt_approx(float x) { return sqrtf(x); }
inline float sin_approx(float x) { return sinf(x); }
inline float cos_approx(float x) { return cosf(x); }

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

// The inline PTX of the CUDA kernels, and nothing else: one wrapper per instruction that the
// CUDA C++ intrinsics do not give in the wanted form.  Kept in one header so that the CPU
// emulation of the kernels (tests/cuda_emulation/) can put C++ statements of the same
// semantics in its place and run the rest of csrc/cuda unchanged.
#pragma once

#include <stdint.h>

namespace addax {
namespace cuda {

// (high, low) halves of a * m as one IMAD.WIDE.U32 (the C++ 64-bit product plus a shift makes
// ptxas add register moves).
__device__ __forceinline__ void mul_wide(uint32_t a, uint32_t m, uint32_t& hi, uint32_t& lo) {
  asm("{\n\t.reg .u64 t;\n\tmul.wide.u32 t, %2, %3;\n\tmov.b64 {%1, %0}, t;\n\t}"
      : "=r"(hi), "=r"(lo)
      : "r"(a), "r"(m));
}

__device__ __forceinline__ float lg2_approx(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float sqrt_approx(float x) {
  float y;
  asm("sqrt.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float sin_approx(float x) {
  float y;
  asm("sin.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float cos_approx(float x) {
  float y;
  asm("cos.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float fp16_to_float(uint16_t bits) {
  float out;
  asm("cvt.f32.f16 %0, %1;" : "=f"(out) : "h"(bits));
  return out;
}

// Round-half-to-even of two floats into one bf16x2 / f16x2 word (`high` in bits 16..31):
// IEEE conversions in hardware (overflow to inf, NaN stays NaN, gradual underflow).
__device__ __forceinline__ uint32_t pack_bf16_nearest(float low, float high) {
  uint32_t out;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(out) : "f"(high), "f"(low));
  return out;
}

__device__ __forceinline__ uint32_t pack_fp16_nearest(float low, float high) {
  uint32_t out;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(out) : "f"(high), "f"(low));
  return out;
}

// Truncation of two float32 bit patterns to bf16 / f16 (round toward zero).
__device__ __forceinline__ uint32_t pack_bf16_truncated(uint32_t low, uint32_t high) {
  uint32_t out;
  asm("cvt.rz.bf16x2.f32 %0, %1, %2;" : "=r"(out) : "f"(__uint_as_float(high)), "f"(__uint_as_float(low)));
  return out;
}

__device__ __forceinline__ uint32_t pack_fp16_truncated(uint32_t low, uint32_t high) {
  uint32_t out;
  asm("cvt.rz.f16x2.f32 %0, %1, %2;" : "=r"(out) : "f"(__uint_as_float(high)), "f"(__uint_as_float(low)));
  return out;
}

}  // namespace cuda
}  // namespace addax

// The CUDA kernels' Gaussian transform (gaussian_block of csrc/cuda/device_math.cuh) against the
// float64 formula of SPEC §1, z = sqrt(-2 ln u) * (cos, sin)(2 pi u'), over every one of the 2^23
// radius uniforms and every one of the 2^23 angle uniforms (each paired with a hashed partner),
// with the special-function approximations exact or off by their documented bound
// (tests/cuda_emulation/ptx.cuh).  Compiled against the emulation's copy of csrc/ and run by
// tests/test_cuda_emulation.py, one error mode per run:
//   gaussian_bound_check MODE     (0 exact, 1 all high, -1 all low, 2 hashed directions)
// prints "max <max |dz|> mean <mean |dz|> nonfinite <count> worst 0x<radius word>".
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "device_math.cuh"

namespace {

uint32_t hash(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

double uniform(uint32_t word) { return (2.0 * static_cast<double>(word >> 9) + 1.0) * 0x1p-24; }

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::printf("usage: gaussian_bound_check 0|1|-1|2\n");
    return 2;
  }
  addax_emulation::mufu_error_mode = std::atoi(argv[1]);
  const double two_pi = 6.283185307179586476925286766559;
  double max_error = 0.0, sum = 0.0;
  long count = 0, nonfinite = 0;
  uint32_t worst = 0;
  for (uint32_t k = 0; k < (1u << 23); ++k) {
    const uint32_t swept = (k << 9) | (hash(k) & 0x1FFu);  // every uniform; the ignored low bits vary
    const uint32_t partner = hash(k ^ 0x5BD1E995u);
    // Pair 0 sweeps the radius uniform, pair 1 the angle uniform.
    const uint4 words = make_uint4(swept, partner, hash(partner), swept);
    float radius[2], trig[4];
    addax::cuda::gaussian_block(words, radius, trig);
    const uint32_t radius_words[2] = {words.x, words.z};
    const uint32_t angle_words[2] = {words.y, words.w};
    for (int e = 0; e < 4; ++e) {
      const int pair = e / 2;
      // The kernels fold the constant into the coefficient, then multiply by the trig factor.
      const float z = (addax::cuda::kGaussianScale * radius[pair]) * trig[e];
      const double r = std::sqrt(-2.0 * std::log(uniform(radius_words[pair])));
      const double angle = two_pi * uniform(angle_words[pair]);
      const double exact = r * ((e & 1) ? std::sin(angle) : std::cos(angle));
      if (!std::isfinite(z)) {
        ++nonfinite;
        continue;
      }
      const double error = std::fabs(static_cast<double>(z) - exact);
      sum += error;
      ++count;
      if (error > max_error) {
        max_error = error;
        worst = radius_words[pair];
      }
    }
  }
  std::printf("max %.6e mean %.6e nonfinite %ld worst 0x%08x\n", max_error, sum / static_cast<double>(count),
              nonfinite, worst);
  return 0;
}

// The fused pass of addax_kernels/backends/__init__.py in plain types, shared by the CPU and
// CUDA launchers and the Python bindings (no torch headers: the extension does not depend on
// the C++ ABI of the installed torch).
#pragma once

#include <stdint.h>

namespace addax {

enum class StorageType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
enum class NoiseKind : int32_t { kGaussian = 0, kRademacher = 1 };
enum class Rounding : int32_t { kNearest = 0, kStochastic = 1 };

// Layout of the scalar vector: [shift, lr, grad_coeff, coeff_0, coeff_1, ...].
constexpr int kScalarShift = 0;
constexpr int kScalarLr = 1;
constexpr int kScalarGradCoeff = 2;
constexpr int kScalarFirstCoeff = 3;

struct TensorArg {
  void* param;        // numel elements of the job's param type, contiguous
  const void* grad;   // numel elements of the job's grad type, or null without gradients
  int64_t numel;
  uint64_t offset;    // global index of element 0 (shards)
  uint32_t tid;
  float weight_decay;
};

struct JobArgs {
  StorageType param_type;
  StorageType grad_type;
  NoiseKind noise;
  Rounding rounding;
  const uint64_t* seeds;  // num_directions entries, at least one (seeds[0] also keys the rounding bits)
  int32_t num_directions;
  bool has_shift;
  bool has_grad;
};

}  // namespace addax

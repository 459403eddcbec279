// The fused pass of addax_kernels/backends/__init__.py in plain types, shared by the CPU and
// CUDA launchers and the Python bindings (no torch headers: the extension does not depend on
// the C++ ABI of the installed torch).
//
// A pass is described in two parts, as the backend protocol splits it:
// * what prepare() fixes for a group of tensors (TensorArg per tensor, GroupArgs): addresses of
//   parameters and state buffers, sizes, stream ids, offsets, weight decays, storage types;
// * what run() passes per call (JobArgs): flags, seeds, scalars and the gradient addresses.
#pragma once

#include <stdint.h>

namespace addax {

enum class StorageType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
enum class NoiseKind : int32_t { kGaussian = 0, kRademacher = 1 };
enum class Rounding : int32_t { kNearest = 0, kStochastic = 1 };
// Optimizer state updated in the pass (STATE_* of backends/__init__.py).
enum class StateKind : int32_t { kNone = 0, kMomentum = 1, kAdam = 2 };

// The scalar vector's layout (SCALAR_* of backends/__init__.py; native.py checks at import
// that the two agree, see scalar_layout() in bindings.cpp).
constexpr int kScalarShift = 0;
constexpr int kScalarLr = 1;
constexpr int kScalarGradCoeff = 2;
constexpr int kScalarMomentum = 3;   // MOMENTUM: beta
constexpr int kScalarAdamW1 = 3;     // ADAM: 1 - beta1
constexpr int kScalarAdamBeta2 = 4;  // ADAM: beta2
constexpr int kScalarAdamW2 = 5;     // ADAM: 1 - beta2
constexpr int kScalarAdamBc2Sqrt = 6;
constexpr int kScalarAdamEps = 7;
constexpr int kScalarFirstCoeff = 8;

constexpr int state_buffers(StateKind state) {
  return state == StateKind::kNone ? 0 : (state == StateKind::kMomentum ? 1 : 2);
}

// One tensor of a prepared group.
struct TensorArg {
  void* param;     // numel elements of the group's param type, contiguous
  void* state[2];  // the state buffers of the group's state kind (state type), else null
  int64_t numel;   // > 0
  uint64_t offset; // global index of element 0 (shards)
  uint32_t tid;
  float weight_decay;
};

// What a group fixes for every call.
struct GroupArgs {
  StorageType param_type;
  StorageType grad_type;   // meaningful when a job has gradients
  StorageType state_type;  // meaningful when a job has state (kFloat32 or kBFloat16)
  bool has_decay;          // any weight decay != 0
  // Key of the purpose-1 words rounding state buffer s: rounding_seed ^ state_keys[s]
  // (rng.STATE_ROUNDING_KEYS, passed in by native.py).
  uint64_t state_keys[2];
};

// One call.  `seeds` holds max(1, num_directions) direction seeds then the rounding seed
// (u64, or the same bits as int64); `scalars` holds kScalarFirstCoeff + num_directions floats.
struct JobArgs {
  NoiseKind noise;
  Rounding rounding;
  StateKind state;
  int32_t num_directions;
  bool has_shift;
  bool has_grad;
  uint32_t sparsity_threshold;  // 0: dense; else keep iff 2 (w >> 9) + 1 >= threshold
  const uint64_t* seeds;
  const float* scalars;
};

inline int32_t num_seeds(const JobArgs& job) { return (job.num_directions > 0 ? job.num_directions : 1) + 1; }
inline uint64_t rounding_seed(const JobArgs& job) { return job.seeds[num_seeds(job) - 1]; }

// The reference backend's rule: the update step runs when anything but the shift is asked for.
inline bool needs_update(const GroupArgs& group, const JobArgs& job) {
  return job.num_directions > 0 || job.has_grad || job.state != StateKind::kNone || group.has_decay;
}

}  // namespace addax

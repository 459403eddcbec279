// CUDA implementation of the fused pass: one launch per prepared tensor group.
//
// Work layout.  Every tensor is cut into chunks of kChunk elements on the *global* element
// index (offset + local index), so chunk, tile and Philox-block boundaries coincide for every
// shard of a tensor.  prepare_group copies a table to the device once per group: one
// DeviceTensor per tensor and, per chunk, the index of its tensor (an O(1) chunk -> tensor
// lookup).  A launch runs a grid of persistent thread blocks (as many as the device keeps
// resident) that walk the chunks; per chunk a block reads its tensor's descriptor and runs
//   * the steady-state loop over whole 16-byte units (4 fp32 or 8 bf16/fp16 elements per
//     thread, one 128-bit load and store), when every address of the tensor (parameter,
//     gradient, state buffers) sits at the same position modulo 16 bytes as its global index
//     allows ("vectorizable"), and
//   * a masked path of 4-element Philox blocks with scalar accesses for everything else: the
//     ragged ends of a tensor and tensors that are not vectorizable (handled per tensor).
// The general kernel (below) has a steady-state loop of its own: 16-byte parameter units, its
// gradient and state elements accessed one by one, so only the parameter's alignment counts
// (Rademacher there: one Philox call per unit).
// Gaussian z: one Philox call per 4 elements (SPEC §1).  Rademacher z: a warp computes the 32
// Philox blocks of a 4096-element tile, one per lane, and hands each thread its word with a
// shuffle: one Philox call per 128 elements, as the SPEC lays it out.  All indices are 64-bit.
//
// Specialization.  The structural flags of a job select a kernel at compile time: parameter
// type, noise kind, stochastic rounding, and the op's shape (perturb; one direction with or
// without the restore shift; one direction plus a gradient of a given type).  Everything else
// (several directions, sparsity masks, optimizer state, other combinations) runs in a general
// kernel with runtime flags.  Per-step values (seeds, scalars) are kernel arguments or, when
// they live on the device, read by the kernel (no host sync; a CUDA-graph replay reads what the
// tensors hold then).
//
// Arithmetic.  FMA contraction is allowed (SPEC §4: the updates agree with the float32
// reference within a few ulps); the Gaussian transform uses the special-function unit
// (device_math.cuh); the storage roundings are bit-exact given the float32 value, as are the
// Philox words and Rademacher signs.
#include "fused_cuda.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <mutex>
#include <type_traits>
#include <string>
#include <unordered_map>
#include <vector>

#include "../philox.h"
#include "device_math.cuh"

namespace addax {
namespace cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kChunk = 65536;  // elements per chunk: two Rademacher tiles per warp
constexpr int kTile = 4096;        // Rademacher warp tile: 32 Philox blocks of 128 elements
constexpr int kGradSlots = 512;    // gradient addresses one launch carries by value
static_assert(kChunk % (kWarps * kTile) == 0, "a chunk is whole Rademacher tiles for every warp");

struct DeviceTensor {
  uint64_t param;
  uint64_t state0;
  uint64_t state1;
  int64_t numel;
  uint64_t offset;
  uint64_t first_global_chunk;  // offset / kChunk
  uint32_t first_chunk;         // index of the tensor's first chunk in the group
  uint32_t tid;
  float weight_decay;
  uint32_t padding;
};
static_assert(sizeof(DeviceTensor) == 64, "one descriptor is four 16-byte loads");

// Flags of the general kernel.
constexpr uint32_t kFlagShift = 1u << 0;
constexpr uint32_t kFlagGrad = 1u << 1;
constexpr uint32_t kFlagUpdate = 1u << 2;
constexpr uint32_t kFlagStateBF16 = 1u << 3;
constexpr int kFlagGradTypeShift = 4;  // 2 bits: StorageType of the gradients
constexpr int kFlagStateShift = 6;     // 2 bits: StateKind

// What a launch derives from its scalars.  Gaussian coefficients carry the transform's constant
// factor (kGaussianScale, see device_math.cuh).  Computed on the host when the scalars are host
// values (then the kernels read them from the parameter constant bank), else by each thread.
struct Coefficients {
  float shift;      // shift (x kGaussianScale)
  float coeff;      // coeffs[0] (x kGaussianScale)
  float step;       // -lr * coeffs[0] (x kGaussianScale)
  float shift_step; // shift - lr * coeffs[0] (x kGaussianScale): restore and step in one FFMA
  float lr;
  float grad_coeff;
  float grad_step;  // -lr * grad_coeff
};

// Products and sums rounded one by one, also on the device (no FMA contraction), so that
// coefficients computed by the kernel from device scalars equal those run_group computes from
// host values bit for bit.
__host__ __device__ __forceinline__ float multiply_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
__host__ __device__ __forceinline__ float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

__host__ __device__ __forceinline__ Coefficients make_coefficients(float shift, float lr, float coeff, float grad_coeff,
                                                                   bool gaussian) {
  const float scale = gaussian ? kGaussianScale : 1.0f;
  Coefficients c;
  c.lr = lr;
  c.shift = multiply_rn(shift, scale);
  c.coeff = multiply_rn(coeff, scale);
  c.step = multiply_rn(-multiply_rn(lr, coeff), scale);
  c.shift_step = add_rn(c.shift, c.step);
  c.grad_coeff = grad_coeff;
  c.grad_step = -multiply_rn(lr, grad_coeff);
  return c;
}

struct LaunchArgs {
  const DeviceTensor* tensors;
  const uint32_t* chunk_tensor;
  const uint64_t* device_seeds;  // null: host_seeds
  const float* device_scalars;   // null: host_scalars
  uint64_t state_keys[2];
  uint32_t chunk_base;  // this launch covers chunks chunk_base .. chunk_base + num_chunks - 1
  uint32_t num_chunks;
  uint32_t tensor_base;  // grads[i] belongs to tensor tensor_base + i
  int32_t num_directions;
  uint32_t sparsity_threshold;
  uint32_t flags;
  uint32_t precomputed;  // host_keys and host_coefficients hold the values of the host seeds and scalars
  uint64_t host_seeds[kParamDirections + 1];
  float host_scalars[kScalarFirstCoeff + kParamDirections];
  PhiloxKey host_keys[2];           // philox_key(seeds[0]), philox_key(rounding seed)
  Coefficients host_coefficients;
};

struct GradLaunchArgs : LaunchArgs {
  const void* grads[kGradSlots];
};

enum class Op : int {
  kPerturb,    // x + shift z
  kStep,       // one direction: x - lr (c z + wd x)
  kStepShift,  // restore then one direction: x' = x + shift z, x' - lr (c z + wd x')
  kGrad,       // one direction and a gradient: x - lr (c z + g grad + wd x)
  kGeneral,    // runtime flags: directions, shift, gradient, decay, sparsity, state
};

template <StorageType T>
struct Storage;
template <>
struct Storage<StorageType::kFloat32> {
  static constexpr int kBytes = 4;
};
template <>
struct Storage<StorageType::kBFloat16> {
  static constexpr int kBytes = 2;
};
template <>
struct Storage<StorageType::kFloat16> {
  static constexpr int kBytes = 2;
};

template <StorageType P_, NoiseKind N_, bool kStochastic_, Op O_, StorageType G_>
struct Spec {
  static constexpr StorageType P = P_;
  static constexpr NoiseKind N = N_;
  static constexpr bool kStochastic = kStochastic_;  // 16-bit parameters (and bf16 state) round stochastically
  static constexpr Op O = O_;
  // The gradient type (kGrad) as a type: an unreferenced constant member would draw a warning
  // in every kernel without gradients.
  using Grad = std::integral_constant<StorageType, G_>;
  static constexpr int kGradBytes = Storage<G_>::kBytes;
  static constexpr bool kGaussian = N == NoiseKind::kGaussian;
  static constexpr int E = 16 / Storage<P>::kBytes;  // elements per 16-byte unit
  static constexpr bool kHasGrads = O == Op::kGrad || O == Op::kGeneral;
  using Args = typename std::conditional<kHasGrads, GradLaunchArgs, LaunchArgs>::type;
};

// ----------------------------------------------------------------------------- per-call values

__device__ __forceinline__ uint64_t seed_at(const LaunchArgs& a, int index) {
  return a.device_seeds != nullptr ? __ldg(a.device_seeds + index) : a.host_seeds[index];
}
__device__ __forceinline__ float scalar_at(const LaunchArgs& a, int index) {
  return a.device_scalars != nullptr ? __ldg(a.device_scalars + index) : a.host_scalars[index];
}

template <class K>
__device__ __forceinline__ Coefficients coefficients(const LaunchArgs& a) {
  // (coeffs[0] is read only when the job has a direction: the vector has no slot otherwise)
  const bool has_direction = K::O == Op::kGeneral ? a.num_directions > 0 : K::O != Op::kPerturb;
  return make_coefficients(scalar_at(a, kScalarShift), scalar_at(a, kScalarLr),
                           has_direction ? scalar_at(a, kScalarFirstCoeff) : 0.0f, scalar_at(a, kScalarGradCoeff),
                           K::kGaussian);
}

// The keys and coefficients of a launch, either in the parameter constant bank (host seeds and
// scalars: computed by run_group) or in registers (values read on the device).
struct LaunchContext {
  const PhiloxKey& noise_key;     // seeds[0]
  const PhiloxKey& rounding_key;  // the rounding seed
  const Coefficients& c;
  // The general kernel's stochastic rounding of bf16 state buffers: the rounding seed xor the
  // group's state keys (built once per thread, not per element); null in the other kernels.
  const PhiloxKey* state_rounding_keys = nullptr;
};

// ----------------------------------------------------------------------------- element access

// Element `index` of an array at `base`, known to be global memory (LDG/STG, not generic).
template <typename T>
__device__ __forceinline__ T* global_element(uint64_t base, int64_t index) {
  T* pointer = reinterpret_cast<T*>(base) + index;
  __builtin_assume(__isGlobal(pointer));
  return pointer;
}

template <StorageType T>
__device__ __forceinline__ float load_one(uint64_t base, int64_t index) {
  if constexpr (T == StorageType::kFloat32) {
    return *global_element<const float>(base, index);
  } else if constexpr (T == StorageType::kBFloat16) {
    return __uint_as_float(static_cast<uint32_t>(*global_element<const uint16_t>(base, index)) << 16);
  } else {
    return fp16_to_float(*global_element<const uint16_t>(base, index));
  }
}

__device__ __forceinline__ float load_any(StorageType type, uint64_t base, int64_t index) {
  switch (type) {
    case StorageType::kFloat32:
      return load_one<StorageType::kFloat32>(base, index);
    case StorageType::kBFloat16:
      return load_one<StorageType::kBFloat16>(base, index);
    default:
      return load_one<StorageType::kFloat16>(base, index);
  }
}

// The exact SPEC §2 rounding of one element (slow path): `word` is its purpose-1 word.
template <StorageType T, bool kStochastic>
__device__ __forceinline__ void store_one(uint64_t base, int64_t index, float x, uint32_t word) {
  if constexpr (T == StorageType::kFloat32) {
    *global_element<float>(base, index) = x;
  } else if constexpr (T == StorageType::kBFloat16) {
    *global_element<uint16_t>(base, index) = kStochastic ? float_to_bf16_stochastic(x, word) : float_to_bf16_nearest(x);
  } else {
    *global_element<uint16_t>(base, index) = kStochastic ? float_to_fp16_stochastic(x, word) : float_to_fp16_nearest(x);
  }
}

// One aligned vector load: through the non-coherent read-only path (__ldg) for memory the
// kernel never writes (gradients), a plain load otherwise (parameters, state).
template <bool kReadOnly, typename V>
__device__ __forceinline__ V load_raw(const V* address) {
  if constexpr (kReadOnly) {
    return __ldg(address);
  } else {
    return *address;
  }
}

// E elements of type T from 16-byte-aligned memory (E * size bytes: 8, 16 or 32).
template <StorageType T, int E, bool kReadOnly = false>
__device__ __forceinline__ void load_vector(const void* address, float (&x)[E]) {
  if constexpr (T == StorageType::kFloat32) {
#pragma unroll
    for (int v = 0; v < E / 4; ++v) {
      const float4 raw = load_raw<kReadOnly>(reinterpret_cast<const float4*>(address) + v);
      x[4 * v + 0] = raw.x;
      x[4 * v + 1] = raw.y;
      x[4 * v + 2] = raw.z;
      x[4 * v + 3] = raw.w;
    }
  } else {
    uint32_t words[E / 2];
    if constexpr (E == 8) {
      const uint4 raw = load_raw<kReadOnly>(reinterpret_cast<const uint4*>(address));
      words[0] = raw.x;
      words[1] = raw.y;
      words[2] = raw.z;
      words[3] = raw.w;
    } else {
      static_assert(E == 4, "16-bit vectors are 8 or 16 bytes");
      const uint2 raw = load_raw<kReadOnly>(reinterpret_cast<const uint2*>(address));
      words[0] = raw.x;
      words[1] = raw.y;
    }
#pragma unroll
    for (int w = 0; w < E / 2; ++w) {
      if constexpr (T == StorageType::kBFloat16) {
        x[2 * w] = bf16_low(words[w]);
        x[2 * w + 1] = bf16_high(words[w]);
      } else {
        x[2 * w] = fp16_to_float(static_cast<uint16_t>(words[w]));
        x[2 * w + 1] = fp16_to_float(static_cast<uint16_t>(words[w] >> 16));
      }
    }
  }
}

// Rounds E floats to T and stores them as one 16-byte vector (E * size == 16 for parameters;
// bf16 state of fp32 parameters takes 8 bytes).  `words`: the purpose-1 words (stochastic only).
template <StorageType T, bool kStochastic, int E>
__device__ __forceinline__ void store_vector(void* address, const float (&x)[E], const uint32_t (&words)[E]) {
  if constexpr (T == StorageType::kFloat32) {
#pragma unroll
    for (int v = 0; v < E / 4; ++v) {
      reinterpret_cast<float4*>(address)[v] = make_float4(x[4 * v], x[4 * v + 1], x[4 * v + 2], x[4 * v + 3]);
    }
    return;
  } else {
    uint32_t packed[E / 2];
    if constexpr (kStochastic) {
      uint32_t bits[E];
      bool special = false;
#pragma unroll
      for (int e = 0; e < E; ++e) {
        bits[e] = T == StorageType::kBFloat16 ? stochastic_bf16_fast(x[e], words[e], special)
                                              : stochastic_fp16_fast(x[e], words[e], special);
      }
      if (__builtin_expect(special, 0)) {
#pragma unroll
        for (int e = 0; e < E; ++e) {
          bits[e] = T == StorageType::kBFloat16 ? stochastic_bf16_exact(x[e], words[e])
                                                : stochastic_fp16_exact(x[e], words[e]);
        }
      }
#pragma unroll
      for (int w = 0; w < E / 2; ++w) {
        packed[w] = T == StorageType::kBFloat16 ? pack_bf16_truncated(bits[2 * w], bits[2 * w + 1])
                                                : pack_fp16_truncated(bits[2 * w], bits[2 * w + 1]);
      }
    } else {
#pragma unroll
      for (int w = 0; w < E / 2; ++w) {
        packed[w] = T == StorageType::kBFloat16 ? pack_bf16_nearest(x[2 * w], x[2 * w + 1])
                                                : pack_fp16_nearest(x[2 * w], x[2 * w + 1]);
      }
    }
    if constexpr (E == 8) {
      *reinterpret_cast<uint4*>(address) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
    } else {
      *reinterpret_cast<uint2*>(address) = make_uint2(packed[0], packed[1]);
    }
  }
}

// ----------------------------------------------------------------------------- noise of a unit

// z of E consecutive elements in factored form.  Gaussian: z[e] = radius[e / 2] * trig[e]
// (times the kGaussianScale the coefficients carry).  Rademacher: bit e of `signs` set means
// z[e] = -1.  Dropped elements (sparsity) have trig[e] = -0 (so z is +0 like the reference's)
// or, Rademacher, drop bit e set.
template <int E>
struct UnitNoise {
  float radius[E / 2];
  float trig[E];
  uint32_t signs;
  uint32_t dropped;
};

// Gaussian z of E elements from Philox blocks block_lo .. block_lo + E / 4 - 1 (high word
// block_hi; the caller guarantees the low word does not wrap).
template <int E>
__device__ __forceinline__ void gaussian_unit(uint32_t block_lo, uint32_t block_hi, uint32_t tid,
                                              const PhiloxKey& key, UnitNoise<E>& z) {
#pragma unroll
  for (int b = 0; b < E / 4; ++b) {
    float radius[2], trig[4];
    gaussian_block(philox(block_lo + b, block_hi, tid, kPurposeNoise, key), radius, trig);
    z.radius[2 * b] = radius[0];
    z.radius[2 * b + 1] = radius[1];
#pragma unroll
    for (int l = 0; l < 4; ++l) z.trig[4 * b + l] = trig[l];
  }
}

// coeff * z[e] for a Rademacher sign: exact, the coefficient with its sign bit flipped.
__device__ __forceinline__ float flip(float coeff, uint32_t signs, int e) {
  return __uint_as_float(__float_as_uint(coeff) ^ ((signs << (31 - e)) & 0x80000000u));
}

// x[e] += coeff * z[e] (one FFMA per Gaussian element after one FMUL per pair).
template <bool kGaussian, int E>
__device__ __forceinline__ void add_noise(float (&x)[E], float coeff, const UnitNoise<E>& z) {
  if constexpr (kGaussian) {
#pragma unroll
    for (int p = 0; p < E / 2; ++p) {
      const float scaled = coeff * z.radius[p];
      x[2 * p] = __fmaf_rn(scaled, z.trig[2 * p], x[2 * p]);
      x[2 * p + 1] = __fmaf_rn(scaled, z.trig[2 * p + 1], x[2 * p + 1]);
    }
  } else {
#pragma unroll
    for (int e = 0; e < E; ++e) x[e] = x[e] + flip(coeff, z.signs, e);
  }
}

// coeff * z[e] with the sparsity mask (Rademacher drops; a dropped Gaussian element has trig -0).
template <bool kGaussian, int E>
__device__ __forceinline__ void scaled_noise(float coeff, const UnitNoise<E>& z, float (&out)[E]) {
  if constexpr (kGaussian) {
#pragma unroll
    for (int p = 0; p < E / 2; ++p) {
      const float scaled = coeff * z.radius[p];
      out[2 * p] = scaled * z.trig[2 * p];
      out[2 * p + 1] = scaled * z.trig[2 * p + 1];
    }
  } else {
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const bool dropped = (z.dropped >> e) & 1u;
      out[e] = dropped ? __uint_as_float(__float_as_uint(coeff) & 0x80000000u) : flip(coeff, z.signs, e);
    }
  }
}

// x[e] += coeff * z[e] with the sparsity mask (general kernel), every rounding explicit: one
// FFMA per Gaussian element (a dropped element's trig is -0: x + (±0)), an exact sign flip and
// __fadd_rn for Rademacher.  nvcc then cannot contract the vector loop's and the masked path's
// inlined copies differently: an element's result does not depend on its path.
template <bool kGaussian>
__device__ __forceinline__ void add_masked_noise(float (&x)[4], float coeff, const UnitNoise<4>& z) {
  if constexpr (kGaussian) {
    add_noise<true, 4>(x, coeff, z);
  } else {
    float t[4];
    scaled_noise<false, 4>(coeff, z, t);
#pragma unroll
    for (int e = 0; e < 4; ++e) x[e] = __fadd_rn(x[e], t[e]);
  }
}

// Purpose-1 words of E elements starting at a multiple of 4.
template <int E>
__device__ __forceinline__ void rounding_words(uint32_t block_lo, uint32_t block_hi, uint32_t tid,
                                               const PhiloxKey& key, uint32_t (&words)[E]) {
#pragma unroll
  for (int b = 0; b < E / 4; ++b) {
    const uint4 w = philox(block_lo + b, block_hi, tid, kPurposeRounding, key);
    words[4 * b + 0] = w.x;
    words[4 * b + 1] = w.y;
    words[4 * b + 2] = w.z;
    words[4 * b + 3] = w.w;
  }
}

// ----------------------------------------------------------------------------- the element math

// What a block needs for one chunk of one tensor.
struct ChunkContext {
  uint64_t param;   // address of global element 0 of the tensor: param - offset * size ("virtual base")
  uint64_t grad;    // likewise, or 0
  uint64_t state0;  // likewise, or 0
  uint64_t state1;
  uint32_t tid;
  float decay;
  uint64_t lo, hi;  // global element range of this chunk inside the tensor
};


// The one-direction kernels' update of E elements x (float32 values of the parameter at global
// elements starting at g, a multiple of E), gradient values `grad` (kGrad), noise z.
template <class K, bool kDecay, int E>
__device__ __forceinline__ void update_elements(float (&x)[E], const float (&grad)[E], const UnitNoise<E>& z,
                                                const Coefficients& c, float decay) {
  constexpr bool kGaussian = K::kGaussian;
  if constexpr (K::O == Op::kPerturb) {
    add_noise<kGaussian>(x, c.shift, z);
    return;
  }
  if constexpr (K::O == Op::kStepShift && !kDecay) {
    // x + shift z - lr c z as x + (shift - lr c) z: one rounding less than the reference's
    // restore-then-step (SPEC §4 allows a few ulps), half the instructions.
    add_noise<kGaussian>(x, c.shift_step, z);
    return;
  }
  if constexpr (K::O == Op::kStepShift) add_noise<kGaussian>(x, c.shift, z);
  if constexpr (!kDecay) {
    add_noise<kGaussian>(x, c.step, z);  // x - lr c z
    if constexpr (K::O == Op::kGrad) {
#pragma unroll
      for (int e = 0; e < E; ++e) x[e] = __fmaf_rn(c.grad_step, grad[e], x[e]);
    }
  } else {
    float d[E];
    scaled_noise<kGaussian>(c.coeff, z, d);  // c z
#pragma unroll
    for (int e = 0; e < E; ++e) {
      if constexpr (K::O == Op::kGrad) d[e] = __fmaf_rn(c.grad_coeff, grad[e], d[e]);
      d[e] = __fmaf_rn(decay, x[e], d[e]);
      x[e] = __fmaf_rn(-c.lr, d[e], x[e]);
    }
  }
}

// One whole unit of the one-direction kernels: E elements whose first has Philox block
// (block_lo, block_hi) (= global index / 4), 16-byte vector accesses at `param` (and `grad`).
// `z` is the unit's noise for Rademacher (the caller's); Gaussian z is made here.
template <class K, bool kDecay>
__device__ __forceinline__ void fast_unit(const LaunchContext& L, const ChunkContext& C, void* param,
                                          const void* grad_address, uint32_t block_lo, uint32_t block_hi,
                                          UnitNoise<K::E>& z) {
  constexpr int E = K::E;
  __builtin_assume(__isGlobal(param));
  float x[E];
  load_vector<K::P, E>(param, x);
  if constexpr (K::kGaussian) gaussian_unit<E>(block_lo, block_hi, C.tid, L.noise_key, z);
  float grad[E];
  if constexpr (K::O == Op::kGrad) {
    __builtin_assume(__isGlobal(grad_address));
    load_vector<K::Grad::value, E, true>(grad_address, grad);
  }
  update_elements<K, kDecay, E>(x, grad, z, L.c, C.decay);
  uint32_t words[E];
  if constexpr (K::kStochastic) rounding_words<E>(block_lo, block_hi, C.tid, L.rounding_key, words);
  store_vector<K::P, K::kStochastic, E>(param, x, words);
}

// ----------------------------------------------------------------------------- the general kernel's math

struct GeneralFlags {
  bool shift, grad, update, state_bf16;
  StorageType grad_type;
  StateKind state;
};

// The general kernel's configuration: its flags, direction count and whether it masks.  The
// offline SASS report (addax_kernels/sass/native_backend.py) compiles the kernel once per
// configuration it counts with ADDAX_SASS_PIN_FLAGS, ADDAX_SASS_PIN_DIRECTIONS and
// ADDAX_SASS_PIN_SPARSE defined, so that the loop it counts is that configuration's path (the
// uniform tests of the runtime values left out); a build never defines them.
#if defined(ADDAX_SASS_PIN_FLAGS)
__device__ __forceinline__ uint32_t general_flag_bits(const LaunchArgs&) { return ADDAX_SASS_PIN_FLAGS; }
__device__ __forceinline__ int general_directions(const LaunchArgs&) { return ADDAX_SASS_PIN_DIRECTIONS; }
__device__ __forceinline__ bool general_sparse(const LaunchArgs&) { return ADDAX_SASS_PIN_SPARSE; }
#else
__device__ __forceinline__ uint32_t general_flag_bits(const LaunchArgs& a) { return a.flags; }
__device__ __forceinline__ int general_directions(const LaunchArgs& a) { return a.num_directions; }
__device__ __forceinline__ bool general_sparse(const LaunchArgs& a) { return a.sparsity_threshold != 0; }
#endif

__device__ __forceinline__ GeneralFlags general_flags(uint32_t flags) {
  GeneralFlags f;
  f.shift = flags & kFlagShift;
  f.grad = flags & kFlagGrad;
  f.update = flags & kFlagUpdate;
  f.state_bf16 = flags & kFlagStateBF16;
  f.grad_type = static_cast<StorageType>((flags >> kFlagGradTypeShift) & 3u);
  f.state = static_cast<StateKind>((flags >> kFlagStateShift) & 3u);
  return f;
}

// Rademacher signs of the 4 elements at g (a multiple of 4): 4 bits of their 128-element block's words.
__device__ __forceinline__ uint32_t rademacher_signs(const uint4& words, uint64_t g) {
  const uint32_t index = static_cast<uint32_t>(g & 127u);
  return (word_at(Words{words.x, words.y, words.z, words.w}, index >> 5) >> (index & 31u)) & 0xFu;
}

// The sparsity mask of the 4 elements at g (a multiple of 4) under `key`: drops elements of z.
template <bool kGaussian>
__device__ __forceinline__ void general_mask(const LaunchArgs& a, const PhiloxKey& key, uint64_t g, uint32_t tid,
                                             UnitNoise<4>& z) {
  z.dropped = 0;
  if (general_sparse(a)) {
    const uint4 mask = philox(g >> 2, tid, kPurposeMask, key);
    const uint32_t mask_words[4] = {mask.x, mask.y, mask.z, mask.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (!keep_element(mask_words[e], a.sparsity_threshold)) {
        z.dropped |= 1u << e;
        if constexpr (kGaussian) z.trig[e] = -0.0f;
      }
    }
  }
}

// z of direction k for 4 elements starting at g (a multiple of 4), with its sparsity mask.
template <bool kGaussian>
__device__ __forceinline__ void general_noise(const LaunchArgs& a, const PhiloxKey& key, uint64_t g, uint32_t tid,
                                              UnitNoise<4>& z) {
  if constexpr (kGaussian) {
    gaussian_unit<4>(static_cast<uint32_t>(g >> 2), static_cast<uint32_t>(g >> 34), tid, key, z);
  } else {
    z.signs = rademacher_signs(philox(g >> 7, tid, kPurposeNoise, key), g);
  }
  general_mask<kGaussian>(a, key, g, tid, z);
}

template <bool kStochastic>
__device__ __forceinline__ float round_state(float value, bool bf16, uint32_t word) {
  if (!bf16) return value;
  const uint16_t bits = kStochastic ? float_to_bf16_stochastic(value, word) : float_to_bf16_nearest(value);
  return __uint_as_float(static_cast<uint32_t>(bits) << 16);
}

// The general kernel's arithmetic for 4 elements at g (masked by `valid`, scalar accesses):
// shift, directions with their masks, gradient, decay, optimizer state.
template <class K>
__device__ __forceinline__ void general_update(const typename K::Args& a, const LaunchContext& L, const ChunkContext& C,
                                               uint64_t g, const GeneralFlags& f, const bool (&valid)[4],
                                               const UnitNoise<4>& z0, float (&x)[4]) {
  constexpr bool kGaussian = K::kGaussian;
  if (f.shift) add_masked_noise<kGaussian>(x, L.c.shift, z0);
  if (f.update) {
    float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const int directions = K::O == Op::kGeneral ? general_directions(a) : 1;
    for (int k = 0; k < directions; ++k) {
      const float scale = kGaussian ? kGaussianScale : 1.0f;
      if (k == 0) {
        add_masked_noise<kGaussian>(d, L.c.coeff, z0);
      } else {
        UnitNoise<4> zk;
        const PhiloxKey key = philox_key(seed_at(a, k));
        general_noise<kGaussian>(a, key, g, C.tid, zk);
        add_masked_noise<kGaussian>(d, scalar_at(a, kScalarFirstCoeff + k) * scale, zk);
      }
    }
    if (f.grad) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float grad = valid[e] ? load_any(f.grad_type, C.grad, static_cast<int64_t>(g + e)) : 0.0f;
        d[e] = __fmaf_rn(L.c.grad_coeff, grad, d[e]);
      }
    }
    if (C.decay != 0.0f) {
#pragma unroll
      for (int e = 0; e < 4; ++e) d[e] = __fmaf_rn(C.decay, x[e], d[e]);
    }
    if (f.state == StateKind::kNone) {
#pragma unroll
      for (int e = 0; e < 4; ++e) x[e] = __fmaf_rn(-L.c.lr, d[e], x[e]);
    } else {
      const StorageType state_type = f.state_bf16 ? StorageType::kBFloat16 : StorageType::kFloat32;
      uint32_t words0[4] = {0, 0, 0, 0}, words1[4] = {0, 0, 0, 0};
      if (K::kStochastic && f.state_bf16) {
        const uint4 w0 = philox(g >> 2, C.tid, kPurposeRounding, L.state_rounding_keys[0]);
        words0[0] = w0.x, words0[1] = w0.y, words0[2] = w0.z, words0[3] = w0.w;
        if (f.state == StateKind::kAdam) {
          const uint4 w1 = philox(g >> 2, C.tid, kPurposeRounding, L.state_rounding_keys[1]);
          words1[0] = w1.x, words1[1] = w1.y, words1[2] = w1.z, words1[3] = w1.w;
        }
      }
      if (f.state == StateKind::kMomentum) {
        const float momentum = scalar_at(a, kScalarMomentum);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (!valid[e]) continue;
          const int64_t i = static_cast<int64_t>(g + e);
          const float buffer = __fmaf_rn(momentum, load_any(state_type, C.state0, i), d[e]);
          x[e] = __fmaf_rn(-L.c.lr, buffer, x[e]);
          const float stored = round_state<K::kStochastic>(buffer, f.state_bf16, words0[e]);
          if (f.state_bf16) {
            *global_element<uint16_t>(C.state0, i) = static_cast<uint16_t>(__float_as_uint(stored) >> 16);
          } else {
            *global_element<float>(C.state0, i) = stored;
          }
        }
      } else {
        const float w1 = scalar_at(a, kScalarAdamW1), beta2 = scalar_at(a, kScalarAdamBeta2);
        const float w2 = scalar_at(a, kScalarAdamW2), bc2_sqrt = scalar_at(a, kScalarAdamBc2Sqrt);
        const float eps = scalar_at(a, kScalarAdamEps);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (!valid[e]) continue;
          const int64_t i = static_cast<int64_t>(g + e);
          float m = load_any(state_type, C.state0, i);
          m = __fmaf_rn(w1, d[e] - m, m);
          const float v = __fmaf_rn(w2, d[e] * d[e], beta2 * load_any(state_type, C.state1, i));
          const float denominator = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), bc2_sqrt), eps);
          x[e] = __fmaf_rn(-L.c.lr, __fdiv_rn(m, denominator), x[e]);
          const float m_stored = round_state<K::kStochastic>(m, f.state_bf16, words0[e]);
          const float v_stored = round_state<K::kStochastic>(v, f.state_bf16, words1[e]);
          if (f.state_bf16) {
            *global_element<uint16_t>(C.state0, i) = static_cast<uint16_t>(__float_as_uint(m_stored) >> 16);
            *global_element<uint16_t>(C.state1, i) = static_cast<uint16_t>(__float_as_uint(v_stored) >> 16);
          } else {
            *global_element<float>(C.state0, i) = m_stored;
            *global_element<float>(C.state1, i) = v_stored;
          }
        }
      }
    }
  }
}

// The general pass over 4 elements at g (a multiple of 4), elements outside [lo, hi) masked,
// scalar accesses.  Also the masked path of the one-direction kernels (whose flags are then
// compile-time constants).
template <class K>
__device__ __forceinline__ void masked_block(const typename K::Args& a, const LaunchContext& L, const ChunkContext& C,
                                             uint64_t g) {
  constexpr bool kGaussian = K::kGaussian;
  bool valid[4];
  float x[4];
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    valid[e] = g + e >= C.lo && g + e < C.hi;
    x[e] = valid[e] ? load_one<K::P>(C.param, static_cast<int64_t>(g + e)) : 0.0f;
  }
  UnitNoise<4> z0;
  if constexpr (K::O == Op::kGeneral) {
    general_noise<kGaussian>(a, L.noise_key, g, C.tid, z0);
  } else if constexpr (kGaussian) {
    gaussian_unit<4>(static_cast<uint32_t>(g >> 2), static_cast<uint32_t>(g >> 34), C.tid, L.noise_key, z0);
  } else {
    z0.signs = rademacher_signs(philox(g >> 7, C.tid, kPurposeNoise, L.noise_key), g);
    z0.dropped = 0;
  }
  if constexpr (K::O != Op::kGeneral) {
    // The specialized kernels' own arithmetic, so that an element gets the same result on the
    // masked path as on the vector path (shards and ragged ends agree bit for bit).
    float grad[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if constexpr (K::O == Op::kGrad) {
#pragma unroll
      for (int e = 0; e < 4; ++e) grad[e] = valid[e] ? load_one<K::Grad::value>(C.grad, static_cast<int64_t>(g + e)) : 0.0f;
    }
    if (K::O != Op::kPerturb && C.decay != 0.0f) {
      update_elements<K, true, 4>(x, grad, z0, L.c, C.decay);
    } else {
      update_elements<K, false, 4>(x, grad, z0, L.c, C.decay);
    }
  } else {
    general_update<K>(a, L, C, g, general_flags(general_flag_bits(a)), valid, z0, x);
  }
  uint32_t words[4] = {0, 0, 0, 0};
  if constexpr (K::kStochastic && K::P != StorageType::kFloat32) {
    const uint4 w = philox(g >> 2, C.tid, kPurposeRounding, L.rounding_key);
    words[0] = w.x, words[1] = w.y, words[2] = w.z, words[3] = w.w;
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    if (valid[e]) store_one<K::P, K::kStochastic>(C.param, static_cast<int64_t>(g + e), x[e], words[e]);
  }
}

// The chunk's elements outside the vector range [first, last) (first <= last, multiples of 4,
// or first == last for a chunk without one) through masked_block: 4-element blocks of
// [lo, first) and [last, hi) spread over the block's threads, in one loop.
template <class K>
__device__ __forceinline__ void masked_ranges(const typename K::Args& a, const LaunchContext& L, const ChunkContext& C,
                                              uint64_t first, uint64_t last) {
  const uint64_t head = C.lo & ~uint64_t{3};
  const uint32_t head_blocks = static_cast<uint32_t>((first - head + 3) / 4);
  const uint32_t blocks = head_blocks + static_cast<uint32_t>((C.hi > last ? C.hi - last + 3 : 0) / 4);
  for (uint32_t b = threadIdx.x; b < blocks; b += kThreads) {  // SASS-MASKED
    masked_block<K>(a, L, C, b < head_blocks ? head + 4 * static_cast<uint64_t>(b) : last + 4 * static_cast<uint64_t>(b - head_blocks));
  }
}

// ----------------------------------------------------------------------------- the steady-state loops

// Gaussian: whole units [first, last) (multiples of E), thread-strided.  32-bit unit counter
// and Philox block low word; the caller checks that the low word does not wrap in the range.
template <class K, bool kDecay>
__device__ __forceinline__ void gaussian_units(const LaunchContext& L, const ChunkContext& C, uint64_t first,
                                               uint64_t last) {
  constexpr int E = K::E;
  constexpr uint32_t kStride = kThreads;  // units between a thread's iterations
  const uint32_t units = static_cast<uint32_t>((last - first) / E);
  if (threadIdx.x >= units) return;
  // Everything the loop needs is a pointer, a block counter and a trip count (loop-invariant
  // 64-bit bounds would be rematerialized by ptxas every iteration).
  uint32_t remaining = (units - threadIdx.x + kStride - 1) / kStride;
  uint32_t block_lo = static_cast<uint32_t>(first >> 2) + (E / 4) * threadIdx.x;
  const uint32_t block_hi = static_cast<uint32_t>(first >> 34);
  char* param = reinterpret_cast<char*>(C.param + (first + E * threadIdx.x) * Storage<K::P>::kBytes);
  const char* grad = reinterpret_cast<const char*>(C.grad + (first + E * threadIdx.x) * K::kGradBytes);
  UnitNoise<E> z;
#pragma unroll 1
  do {
    fast_unit<K, kDecay>(L, C, param, grad, block_lo, block_hi, z);
    param += 16 * kStride;
    grad += E * K::kGradBytes * kStride;
    block_lo += (E / 4) * kStride;
  } while (--remaining != 0);  // SASS-LOOP gaussian
}

// Rademacher: whole 4096-element tiles [first, last), one per warp at a time.  Lane l computes
// Philox block l of the tile; in iteration i (unrolled) every thread takes word i & 3 of block
// (i / 4) * E + l / (32 / E) by a shuffle and handles E elements of it: the warp's 32 E
// elements are E blocks' word i & 3, i.e. E runs of 32 contiguous elements.
template <class K, bool kDecay>
__device__ __forceinline__ void rademacher_tiles(const LaunchContext& L, const ChunkContext& C, uint64_t first,
                                                 uint64_t last) {
  constexpr int E = K::E;
  constexpr int kThreadsPerWord = 32 / E;
  constexpr int kGradBytes = K::kGradBytes;
  const uint32_t lane = threadIdx.x & 31u;
  const uint32_t warp = threadIdx.x >> 5;
  const uint32_t block_in_iteration = lane / kThreadsPerWord;
  const uint32_t bit_shift = (lane % kThreadsPerWord) * E;
  const uint32_t lane_offset = block_in_iteration * 128 + bit_shift;  // element offset in the tile
  const uint32_t tiles = static_cast<uint32_t>((last - first) / kTile);
  if (warp >= tiles) return;
  uint32_t remaining = (tiles - warp + kWarps - 1) / kWarps;
  uint32_t tile_block = static_cast<uint32_t>(first >> 7) + 32 * warp + lane;  // this lane's Philox block of 128
  const uint32_t tile_block_hi = static_cast<uint32_t>(first >> 39);
  uint32_t word_block = static_cast<uint32_t>(first >> 2) + warp * (kTile / 4) + lane_offset / 4;  // blocks of 4
  const uint32_t word_block_hi = static_cast<uint32_t>(first >> 34);
  const uint64_t lane_first = first + static_cast<uint64_t>(warp) * kTile + lane_offset;
  char* param = reinterpret_cast<char*>(C.param + lane_first * Storage<K::P>::kBytes);
  const char* grad = reinterpret_cast<const char*>(C.grad + lane_first * kGradBytes);
#pragma unroll 1
  do {
    const uint4 words = philox(tile_block, tile_block_hi, C.tid, kPurposeNoise, L.noise_key);
#pragma unroll
    for (int i = 0; i < 128 / E; ++i) {
      const int word_index = i & 3;
      const uint32_t own = word_index == 0 ? words.x : (word_index == 1 ? words.y : (word_index == 2 ? words.z : words.w));
      const uint32_t word = __shfl_sync(0xFFFFFFFFu, own, (i >> 2) * E + block_in_iteration);
      UnitNoise<E> z;
      z.signs = word >> bit_shift;
      z.dropped = 0;
      const int offset = (i >> 2) * E * 128 + word_index * 32;  // elements past the lane's first
      fast_unit<K, kDecay>(L, C, param + offset * Storage<K::P>::kBytes, grad + offset * kGradBytes,
                           word_block + offset / 4, word_block_hi, z);
    }
    param += static_cast<size_t>(kWarps) * kTile * Storage<K::P>::kBytes;
    grad += static_cast<size_t>(kWarps) * kTile * kGradBytes;
    tile_block += kWarps * 32;
    word_block += kWarps * (kTile / 4);
  } while (--remaining != 0);  // SASS-LOOP rademacher
}

// The general kernel's whole units [first, last) (multiples of E), thread-strided: one 16-byte
// parameter load and store per unit, the arithmetic of general_update on each 4 elements (the
// masked path's, so an element's result does not depend on the path that computed it).  Gradient
// and state elements keep scalar accesses (their types are runtime flags), so only the
// parameter's alignment decides whether a tensor takes this loop.
template <class K>
__device__ __forceinline__ void general_units(const typename K::Args& a, const LaunchContext& L, const ChunkContext& C,
                                              const GeneralFlags& flags, uint64_t first, uint64_t last) {
  constexpr int E = K::E;
  constexpr bool kAllValid[4] = {true, true, true, true};
  const uint32_t units = static_cast<uint32_t>((last - first) / E);
#pragma unroll 1
  for (uint32_t unit = threadIdx.x; unit < units; unit += kThreads) {  // SASS-LOOP general
    const uint64_t g = first + static_cast<uint64_t>(unit) * E;
    char* param = reinterpret_cast<char*>(C.param + g * Storage<K::P>::kBytes);
    __builtin_assume(__isGlobal(param));
    float x[E];
    load_vector<K::P, E>(param, x);
    uint4 signs_words;  // Rademacher: a unit (E <= 8 elements from a multiple of E) lies in one 128-element block
    if constexpr (!K::kGaussian) signs_words = philox(g >> 7, C.tid, kPurposeNoise, L.noise_key);
#pragma unroll
    for (int q = 0; q < E / 4; ++q) {
      float part[4] = {x[4 * q], x[4 * q + 1], x[4 * q + 2], x[4 * q + 3]};
      UnitNoise<4> z0;
      if constexpr (K::kGaussian) {
        general_noise<true>(a, L.noise_key, g + 4 * q, C.tid, z0);
      } else {
        z0.signs = rademacher_signs(signs_words, g + 4 * q);
        general_mask<false>(a, L.noise_key, g + 4 * q, C.tid, z0);
      }
      general_update<K>(a, L, C, g + 4 * q, flags, kAllValid, z0, part);
#pragma unroll
      for (int e = 0; e < 4; ++e) x[4 * q + e] = part[e];
    }
    uint32_t words[E];
    if constexpr (K::kStochastic && K::P != StorageType::kFloat32) {
      rounding_words<E>(static_cast<uint32_t>(g >> 2), static_cast<uint32_t>(g >> 34), C.tid, L.rounding_key, words);
    }
    store_vector<K::P, K::kStochastic && K::P != StorageType::kFloat32, E>(param, x, words);
  }
}

// The vector range of a chunk: whole units (Gaussian, and either noise in the general kernel) or
// tiles (Rademacher), or an empty range (first == last) when the tensor is not vectorizable or
// the chunk's Philox block counter would wrap its low word (once per 2^34 elements; the general
// kernel computes 64-bit block numbers, so for it the check only costs a rare masked chunk).
template <class K>
__device__ __forceinline__ void vector_range(const ChunkContext& C, bool vectorizable, uint64_t& first, uint64_t& last) {
  constexpr uint64_t kGranule = K::kGaussian || K::O == Op::kGeneral ? K::E : kTile;
  first = (C.lo + kGranule - 1) / kGranule * kGranule;
  last = C.hi / kGranule * kGranule;
  const bool wraps = (first >> 2) + (kChunk / 4) > ((first >> 34) + 1) << 32;
  if (!vectorizable || wraps || first >= last) {
    first = (C.lo + 3) & ~uint64_t{3};  // everything through the masked path: [lo, first) u [first, hi)
    last = first;
  }
}

template <class K, bool kDecay>
__device__ __forceinline__ void vector_loop(const LaunchContext& L, const ChunkContext& C, uint64_t first,
                                            uint64_t last) {
  if constexpr (K::kGaussian) {
    gaussian_units<K, kDecay>(L, C, first, last);
  } else {
    rademacher_tiles<K, kDecay>(L, C, first, last);
  }
}

// ----------------------------------------------------------------------------- the kernel

template <class K>
__device__ __forceinline__ const void* gradient_of(const typename K::Args& a, uint32_t tensor) {
  if constexpr (K::kHasGrads) {
    return a.grads[tensor - a.tensor_base];
  } else {
    (void)a;
    (void)tensor;
    return nullptr;
  }
}

// The chunks of one launch: a thread block takes chunks blockIdx.x, blockIdx.x + gridDim.x, ...
template <class K>
__device__ __forceinline__ void run_chunks(const typename K::Args& a, const LaunchContext& L) {
  GeneralFlags flags;
  if constexpr (K::O == Op::kGeneral) flags = general_flags(general_flag_bits(a));

  for (uint32_t chunk = a.chunk_base + blockIdx.x; chunk < a.chunk_base + a.num_chunks; chunk += gridDim.x) {  // SASS-CHUNK
    const uint32_t t = __ldg(a.chunk_tensor + chunk);
    const DeviceTensor* tensor = a.tensors + t;
    const uint64_t param = __ldg(&tensor->param);
    const int64_t numel = __ldg(&tensor->numel);
    const uint64_t offset = __ldg(&tensor->offset);
    const uint64_t chunk_start = (__ldg(&tensor->first_global_chunk) + (chunk - __ldg(&tensor->first_chunk))) * kChunk;
    ChunkContext C;
    C.tid = __ldg(&tensor->tid);
    C.decay = __ldg(&tensor->weight_decay);
    const uint64_t end = offset + static_cast<uint64_t>(numel);
    C.lo = chunk_start > offset ? chunk_start : offset;
    C.hi = chunk_start + kChunk < end ? chunk_start + kChunk : end;
    // Virtual bases: element e of the tensor at base + e * size for global indices e.
    C.param = param - offset * Storage<K::P>::kBytes;
    uint64_t misaligned = C.param;
    C.grad = 0;
    C.state0 = 0;
    C.state1 = 0;
    if constexpr (K::kHasGrads) {
      bool has_grad = K::O == Op::kGrad;
      int grad_bytes = K::kGradBytes;
      if constexpr (K::O == Op::kGeneral) {
        has_grad = flags.grad;
        grad_bytes = flags.grad_type == StorageType::kFloat32 ? 4 : 2;
      }
      if (has_grad) {
        C.grad = reinterpret_cast<uint64_t>(gradient_of<K>(a, t)) - offset * grad_bytes;
        if constexpr (K::O == Op::kGrad) misaligned |= C.grad;  // the general kernel reads it element by element
      }
    }
    if constexpr (K::O == Op::kGeneral) {
      if (flags.state != StateKind::kNone) {
        const int state_bytes = flags.state_bf16 ? 2 : 4;
        C.state0 = __ldg(&tensor->state0) - offset * state_bytes;
        C.state1 = flags.state == StateKind::kAdam ? __ldg(&tensor->state1) - offset * state_bytes : 0;
      }
    }
    uint64_t first, last;
    vector_range<K>(C, (misaligned & 15u) == 0, first, last);
    if (first < last) {
      if constexpr (K::O == Op::kGeneral) {
        general_units<K>(a, L, C, flags, first, last);
      } else if (K::O != Op::kPerturb && C.decay != 0.0f) {
        vector_loop<K, true>(L, C, first, last);
      } else {
        vector_loop<K, false>(L, C, first, last);
      }
    }
    masked_ranges<K>(a, L, C, first, last);
  }
}

// 4 resident blocks (64 registers) for the specialized kernels.  The general kernel holds every
// configuration's code in one loop: at 64 registers ptxas spilled 16-84 bytes there (up to 43
// local accesses in the loop body, for 16-bit Gaussian parameters); at 3 blocks (up to 85) it
// takes 70-80 with at most 3 in the loop.  Its configurations issue 29-89 instructions per
// element, so 24 warps per SM should still cover the memory latency (docs/native.md).
template <class K>
__global__ void __launch_bounds__(kThreads, K::O == Op::kGeneral ? 3 : 4) fused_kernel(const __grid_constant__ typename K::Args a) {
  if (K::O != Op::kGeneral && a.precomputed) {
    const LaunchContext L{a.host_keys[0], a.host_keys[1], a.host_coefficients};
    run_chunks<K>(a, L);
  } else {
    const PhiloxKey noise_key = philox_key(seed_at(a, 0));
    const uint64_t rounding_seed = seed_at(a, a.num_directions > 0 ? a.num_directions : 1);
    const PhiloxKey rounding_key = philox_key(rounding_seed);
    const Coefficients c = coefficients<K>(a);
    if constexpr (K::O == Op::kGeneral && K::kStochastic) {
      const PhiloxKey state_rounding_keys[2] = {philox_key(rounding_seed ^ a.state_keys[0]),
                                                philox_key(rounding_seed ^ a.state_keys[1])};
      const LaunchContext L{noise_key, rounding_key, c, state_rounding_keys};
      run_chunks<K>(a, L);
    } else {
      const LaunchContext L{noise_key, rounding_key, c};
      run_chunks<K>(a, L);
    }
  }
}

// ----------------------------------------------------------------------------- host side

std::string cuda_error(const char* what, cudaError_t status) {
  return std::string(what) + ": " + cudaGetErrorName(status) + " (" + cudaGetErrorString(status) + ")";
}

// Resident blocks per SM of one kernel, computed once per kernel.
int blocks_per_sm(const void* kernel) {
  static std::mutex mutex;
  static std::unordered_map<const void*, int> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto found = cache.find(kernel);
  if (found != cache.end()) return found->second;
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, 0) != cudaSuccess || blocks < 1) {
    cudaGetLastError();
    blocks = 1;
  }
  cache.emplace(kernel, blocks);
  return blocks;
}

}  // namespace

struct DeviceGroup {
  int device = 0;
  int sm_count = 1;
  void* memory = nullptr;  // DeviceTensor[num_tensors] then uint32_t[num_chunks]
  const DeviceTensor* tensors = nullptr;
  const uint32_t* chunk_tensor = nullptr;
  int64_t num_tensors = 0;
  uint32_t num_chunks = 0;
  std::vector<uint32_t> first_chunk;  // host copy, num_tensors + 1 entries
  GroupArgs group{};
};

namespace {

// Restores the caller's current device on scope exit.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    if (cudaGetDevice(&previous_) != cudaSuccess) {
      cudaGetLastError();
      previous_ = -1;
    }
    if (previous_ != device) status_ = cudaSetDevice(device);
  }
  ~DeviceGuard() {
    if (previous_ >= 0 && status_ == cudaSuccess) cudaSetDevice(previous_);
  }
  cudaError_t status() const { return status_; }

 private:
  int previous_ = -1;
  cudaError_t status_ = cudaSuccess;
};

template <class K>
std::string launch(const DeviceGroup& group, cudaStream_t stream, typename K::Args& args, const void* const* grads) {
  const void* kernel = reinterpret_cast<const void*>(&fused_kernel<K>);
  const uint32_t max_grid = static_cast<uint32_t>(group.sm_count * blocks_per_sm(kernel));
  // Launches with gradients carry at most kGradSlots addresses: split by tensor ranges.
  const int64_t per_launch = K::kHasGrads ? kGradSlots : group.num_tensors;
  for (int64_t first = 0; first < group.num_tensors; first += per_launch) {
    const int64_t last = std::min<int64_t>(group.num_tensors, first + per_launch);
    args.chunk_base = group.first_chunk[first];
    args.num_chunks = group.first_chunk[last] - group.first_chunk[first];
    args.tensor_base = static_cast<uint32_t>(first);
    if constexpr (K::kHasGrads) {
      for (int64_t t = first; t < last; ++t) {
        static_cast<GradLaunchArgs&>(args).grads[t - first] = grads != nullptr ? grads[t] : nullptr;
      }
    }
    const uint32_t grid = std::min(max_grid, args.num_chunks);
    fused_kernel<K><<<grid, kThreads, 0, stream>>>(args);
    const cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) return cuda_error("fused_kernel launch", status);
  }
  return std::string();
}

template <StorageType P, NoiseKind N, bool S>
std::string dispatch_op(const DeviceGroup& group, cudaStream_t stream, GradLaunchArgs& args, const JobArgs& job,
                        bool update, const void* const* grads) {
  const bool simple = job.sparsity_threshold == 0 && job.state == StateKind::kNone;
  if (simple && !update && job.has_shift && job.num_directions == 0) {
    return launch<Spec<P, N, S, Op::kPerturb, P>>(group, stream, args, grads);
  }
  if (simple && job.num_directions == 1 && !job.has_grad) {
    if (job.has_shift) return launch<Spec<P, N, S, Op::kStepShift, P>>(group, stream, args, grads);
    return launch<Spec<P, N, S, Op::kStep, P>>(group, stream, args, grads);
  }
  if (simple && job.num_directions == 1 && job.has_grad && !job.has_shift) {
    switch (group.group.grad_type) {
      case StorageType::kFloat32:
        return launch<Spec<P, N, S, Op::kGrad, StorageType::kFloat32>>(group, stream, args, grads);
      case StorageType::kBFloat16:
        return launch<Spec<P, N, S, Op::kGrad, StorageType::kBFloat16>>(group, stream, args, grads);
      case StorageType::kFloat16:
        return launch<Spec<P, N, S, Op::kGrad, StorageType::kFloat16>>(group, stream, args, grads);
    }
  }
  return launch<Spec<P, N, S, Op::kGeneral, P>>(group, stream, args, grads);
}

template <StorageType P, NoiseKind N>
std::string dispatch_rounding(const DeviceGroup& group, cudaStream_t stream, GradLaunchArgs& args,
                              const JobArgs& job, bool update, const void* const* grads) {
  // float32 parameters never round; their bf16 state (general kernel) may.
  const bool stochastic = job.rounding == Rounding::kStochastic &&
                          (P != StorageType::kFloat32 || job.state != StateKind::kNone);
  if (stochastic) {
    if constexpr (P == StorageType::kFloat32) {
      return launch<Spec<P, N, true, Op::kGeneral, P>>(group, stream, args, grads);
    } else {
      return dispatch_op<P, N, true>(group, stream, args, job, update, grads);
    }
  }
  return dispatch_op<P, N, false>(group, stream, args, job, update, grads);
}

template <StorageType P>
std::string dispatch_noise(const DeviceGroup& group, cudaStream_t stream, GradLaunchArgs& args, const JobArgs& job,
                           bool update, const void* const* grads) {
  if (job.noise == NoiseKind::kGaussian) {
    return dispatch_rounding<P, NoiseKind::kGaussian>(group, stream, args, job, update, grads);
  }
  return dispatch_rounding<P, NoiseKind::kRademacher>(group, stream, args, job, update, grads);
}

}  // namespace

int device_count(std::string* error) {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    cudaGetLastError();  // reset the runtime's last error so the next launch check is not confused
    if (error != nullptr) *error = cuda_error("cudaGetDeviceCount", status);
    return -1;
  }
  return count;
}

std::string check_device(int device) {
  std::string error;
  const int count = device_count(&error);
  if (count < 0) return error;
  if (device < 0 || device >= count) {
    return "CUDA device " + std::to_string(device) + " does not exist (" + std::to_string(count) + " visible)";
  }
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return cuda_error("cudaSetDevice", guard.status());
  cudaFuncAttributes attributes;
  using Probe = Spec<StorageType::kFloat32, NoiseKind::kGaussian, false, Op::kPerturb, StorageType::kFloat32>;
  const cudaError_t status = cudaFuncGetAttributes(&attributes, reinterpret_cast<const void*>(&fused_kernel<Probe>));
  if (status != cudaSuccess) {
    cudaGetLastError();
    cudaDeviceProp properties;
    std::string name = "device " + std::to_string(device);
    if (cudaGetDeviceProperties(&properties, device) == cudaSuccess) {
      name = std::string(properties.name) + " (sm_" + std::to_string(properties.major) +
             std::to_string(properties.minor) + ")";
    }
    return "no kernel image for " + name + ": " + cuda_error("cudaFuncGetAttributes", status) +
           "; rebuild with ADDAX_KERNELS_CUDA_ARCHS including this architecture";
  }
  return std::string();
}

std::string prepare_group(int device, const TensorArg* tensors, int64_t num_tensors, const GroupArgs& args,
                          DeviceGroup** out) {
  *out = nullptr;
  auto group = new DeviceGroup();
  group->device = device;
  group->group = args;
  group->num_tensors = num_tensors;
  std::vector<DeviceTensor> table(static_cast<size_t>(num_tensors));
  std::vector<uint32_t> chunk_tensor;
  group->first_chunk.resize(static_cast<size_t>(num_tensors) + 1);
  uint64_t chunks = 0;
  for (int64_t t = 0; t < num_tensors; ++t) {
    const TensorArg& tensor = tensors[t];
    const uint64_t first_global = tensor.offset / kChunk;
    const uint64_t last_global = (tensor.offset + static_cast<uint64_t>(tensor.numel) - 1) / kChunk;
    const uint64_t count = last_global - first_global + 1;
    if (chunks + count > 0x7FFFFFFFull) {
      delete group;
      return "the group's tensors hold more than 2^31 chunks of " + std::to_string(kChunk) + " elements";
    }
    DeviceTensor& entry = table[t];
    entry.param = reinterpret_cast<uint64_t>(tensor.param);
    entry.state0 = reinterpret_cast<uint64_t>(tensor.state[0]);
    entry.state1 = reinterpret_cast<uint64_t>(tensor.state[1]);
    entry.numel = tensor.numel;
    entry.offset = tensor.offset;
    entry.first_global_chunk = first_global;
    entry.first_chunk = static_cast<uint32_t>(chunks);
    entry.tid = tensor.tid;
    entry.weight_decay = tensor.weight_decay;
    entry.padding = 0;
    group->first_chunk[t] = static_cast<uint32_t>(chunks);
    chunk_tensor.insert(chunk_tensor.end(), static_cast<size_t>(count), static_cast<uint32_t>(t));
    chunks += count;
  }
  group->first_chunk[num_tensors] = static_cast<uint32_t>(chunks);
  group->num_chunks = static_cast<uint32_t>(chunks);

  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) {
    delete group;
    return cuda_error("cudaSetDevice", guard.status());
  }
  int sm_count = 1;
  if (cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    cudaGetLastError();
    sm_count = 1;
  }
  group->sm_count = std::max(1, sm_count);
  const size_t table_bytes = table.size() * sizeof(DeviceTensor);
  const size_t bytes = table_bytes + chunk_tensor.size() * sizeof(uint32_t);
  cudaError_t status = cudaMalloc(&group->memory, bytes);
  if (status != cudaSuccess) {
    cudaGetLastError();
    group->memory = nullptr;
    delete group;
    return cuda_error("cudaMalloc of the tensor table", status);
  }
  status = cudaMemcpy(group->memory, table.data(), table_bytes, cudaMemcpyHostToDevice);
  if (status == cudaSuccess) {
    status = cudaMemcpy(static_cast<char*>(group->memory) + table_bytes, chunk_tensor.data(),
                        chunk_tensor.size() * sizeof(uint32_t), cudaMemcpyHostToDevice);
  }
  if (status != cudaSuccess) {
    cudaGetLastError();
    cudaFree(group->memory);
    delete group;
    return cuda_error("cudaMemcpy of the tensor table", status);
  }
  group->tensors = static_cast<const DeviceTensor*>(group->memory);
  group->chunk_tensor = reinterpret_cast<const uint32_t*>(static_cast<char*>(group->memory) + table_bytes);
  *out = group;
  return std::string();
}

void release_group(DeviceGroup* group) {
  if (group == nullptr) return;
  if (group->memory != nullptr) {
    DeviceGuard guard(group->device);
    // cudaFree waits for the kernels that may still read the table; at interpreter exit the
    // runtime may already be gone, which is harmless here.
    if (cudaFree(group->memory) != cudaSuccess) cudaGetLastError();
  }
  delete group;
}

std::string run_group(const DeviceGroup* group, uintptr_t stream_handle, const void* const* grads,
                      const JobArgs& job, bool seeds_on_device, bool scalars_on_device) {
  if (group == nullptr) return "the group was not prepared for CUDA";
  const int num_seeds = (job.num_directions > 0 ? job.num_directions : 1) + 1;
  const int num_scalars = kScalarFirstCoeff + job.num_directions;
  if ((!seeds_on_device || !scalars_on_device) && job.num_directions > kParamDirections) {
    return "more than " + std::to_string(kParamDirections) +
           " directions with host seeds or scalars: pass them as device tensors";
  }
  GradLaunchArgs args{};
  args.tensors = group->tensors;
  args.chunk_tensor = group->chunk_tensor;
  args.device_seeds = seeds_on_device ? job.seeds : nullptr;
  args.device_scalars = scalars_on_device ? job.scalars : nullptr;
  args.state_keys[0] = group->group.state_keys[0];
  args.state_keys[1] = group->group.state_keys[1];
  args.num_directions = job.num_directions;
  args.sparsity_threshold = job.sparsity_threshold;
  if (!seeds_on_device) std::copy(job.seeds, job.seeds + num_seeds, args.host_seeds);
  if (!scalars_on_device) std::copy(job.scalars, job.scalars + num_scalars, args.host_scalars);
  if (!seeds_on_device && !scalars_on_device) {
    // The specialized kernels then read keys and coefficients from the constant bank.
    args.precomputed = 1;
    args.host_keys[0] = philox_key(job.seeds[0]);
    args.host_keys[1] = philox_key(job.seeds[num_seeds - 1]);
    args.host_coefficients = make_coefficients(
        job.scalars[kScalarShift], job.scalars[kScalarLr],
        job.num_directions > 0 ? job.scalars[kScalarFirstCoeff] : 0.0f, job.scalars[kScalarGradCoeff],
        job.noise == NoiseKind::kGaussian);
  }
  const bool update = needs_update(group->group, job);
  uint32_t flags = 0;
  if (job.has_shift) flags |= kFlagShift;
  if (job.has_grad) flags |= kFlagGrad;
  if (update) flags |= kFlagUpdate;
  if (group->group.state_type == StorageType::kBFloat16) flags |= kFlagStateBF16;
  flags |= static_cast<uint32_t>(group->group.grad_type) << kFlagGradTypeShift;
  flags |= static_cast<uint32_t>(job.state) << kFlagStateShift;
  args.flags = flags;

  DeviceGuard guard(group->device);
  if (guard.status() != cudaSuccess) return cuda_error("cudaSetDevice", guard.status());
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  switch (group->group.param_type) {
    case StorageType::kFloat32:
      return dispatch_noise<StorageType::kFloat32>(*group, stream, args, job, update, grads);
    case StorageType::kBFloat16:
      return dispatch_noise<StorageType::kBFloat16>(*group, stream, args, job, update, grads);
    case StorageType::kFloat16:
      return dispatch_noise<StorageType::kFloat16>(*group, stream, args, job, update, grads);
  }
  return "unknown parameter type";
}

}  // namespace cuda
}  // namespace addax

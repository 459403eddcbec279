// CUDA implementation of the fused pass: one multi-tensor-apply kernel per parameter dtype.
//
// A launch carries up to kMaxTensorsPerLaunch tensors in a by-value table (~2 KiB, under the
// classic 4 KiB parameter limit); each tensor is cut into chunks of kChunk elements and each
// thread block takes one chunk.  Within a chunk a thread handles 16 bytes of parameters at
// a time (4 fp32 or 8 bf16/fp16 elements) with one 128-bit load and store, when the tensor
// is aligned and its global offset is a multiple of 4 (so a unit covers whole Philox blocks);
// otherwise, and for the ragged tail, it falls back to per-element masked accesses.  All
// indices are 64-bit.  Per-step scalars are kernel arguments or, with device scalars, read
// from device memory (no host sync).  Flags (noise kind, rounding, directions, ...) are
// runtime arguments: they are uniform across the grid, so the branches cost nothing.
//
// Built with --fmad=false so that every product and sum is rounded exactly as in the CPU
// kernels and the reference backend (the results match the CPU build bit for bit).
#include "fused_cuda.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>

#include "../philox.h"

namespace addax {
namespace cuda {
namespace {

constexpr int kMaxTensorsPerLaunch = 36;
constexpr int kThreads = 256;
constexpr int64_t kChunk = 16384;  // elements per thread block; a multiple of every unit size

struct BF16 {
  uint16_t bits;
};
struct FP16 {
  uint16_t bits;
};

struct LaunchTable {
  uint64_t seeds[kMaxDirections];
  float scalars[kScalarFirstCoeff + kMaxDirections];
  void* param[kMaxTensorsPerLaunch];
  const void* grad[kMaxTensorsPerLaunch];
  int64_t numel[kMaxTensorsPerLaunch];
  uint64_t offset[kMaxTensorsPerLaunch];
  uint32_t tid[kMaxTensorsPerLaunch];
  float weight_decay[kMaxTensorsPerLaunch];
  uint32_t first_block[kMaxTensorsPerLaunch + 1];  // blocks [first_block[t], first_block[t+1]) work on tensor t
  uint8_t vector_ok[kMaxTensorsPerLaunch];
  int32_t num_tensors;
};
static_assert(sizeof(LaunchTable) <= 4000, "the launch table must fit the 4 KiB kernel-parameter limit");

struct KernelFlags {
  const float* device_scalars;  // null: use LaunchTable::scalars
  int32_t grad_type;
  int32_t noise;
  int32_t rounding;
  int32_t num_directions;
  bool has_shift;
  bool has_grad;
  bool needs_update;
};

// ----------------------------------------------------------------------------- element access

template <typename P>
__device__ __forceinline__ float decode(uint32_t bits);
template <>
__device__ __forceinline__ float decode<float>(uint32_t bits) {
  return __uint_as_float(bits);
}
template <>
__device__ __forceinline__ float decode<BF16>(uint32_t bits) {
  return bf16_bits_to_float(static_cast<uint16_t>(bits));
}
template <>
__device__ __forceinline__ float decode<FP16>(uint32_t bits) {
  return fp16_bits_to_float(static_cast<uint16_t>(bits));
}

template <typename P>
__device__ __forceinline__ uint32_t raw_element(const P* base, int64_t index) {
  if constexpr (sizeof(P) == 4) {
    return __float_as_uint(reinterpret_cast<const float*>(base)[index]);
  } else {
    return reinterpret_cast<const uint16_t*>(base)[index];
  }
}

// E elements from 16 * (E * sizeof(P) / 16) aligned bytes, as words of the little-endian layout.
template <typename P, int E>
__device__ __forceinline__ void load_vector(const P* base, int64_t index, float (&out)[E]) {
  constexpr int kWords = E * static_cast<int>(sizeof(P)) / 4;
  uint32_t words[kWords];
  if constexpr (kWords % 4 == 0) {
#pragma unroll
    for (int v = 0; v < kWords / 4; ++v) {
      const uint4 raw = reinterpret_cast<const uint4*>(base + index)[v];
      words[4 * v + 0] = raw.x;
      words[4 * v + 1] = raw.y;
      words[4 * v + 2] = raw.z;
      words[4 * v + 3] = raw.w;
    }
  } else {
    static_assert(kWords == 2, "unit sizes are 8, 16 or 32 bytes");
    const uint2 raw = *reinterpret_cast<const uint2*>(base + index);
    words[0] = raw.x;
    words[1] = raw.y;
  }
#pragma unroll
  for (int l = 0; l < E; ++l) {
    if constexpr (sizeof(P) == 4) {
      out[l] = decode<P>(words[l]);
    } else {
      out[l] = decode<P>((words[l / 2] >> (16 * (l & 1))) & 0xFFFFu);
    }
  }
}

template <typename P, int E>
__device__ __forceinline__ void load_elements(const P* base, int64_t index, bool full, int64_t begin, int64_t end,
                                              float (&out)[E]) {
  if (full) {
    load_vector<P, E>(base, index, out);
    return;
  }
#pragma unroll
  for (int l = 0; l < E; ++l) {
    const int64_t i = index + l;
    out[l] = (i >= begin && i < end) ? decode<P>(raw_element(base, i)) : 0.0f;
  }
}

template <int E>
__device__ __forceinline__ void load_grad(const void* base, int32_t type, int64_t index, bool full, int64_t begin,
                                          int64_t end, float (&out)[E]) {
  switch (static_cast<StorageType>(type)) {
    case StorageType::kFloat32:
      load_elements<float, E>(static_cast<const float*>(base), index, full, begin, end, out);
      break;
    case StorageType::kBFloat16:
      load_elements<BF16, E>(static_cast<const BF16*>(base), index, full, begin, end, out);
      break;
    case StorageType::kFloat16:
      load_elements<FP16, E>(static_cast<const FP16*>(base), index, full, begin, end, out);
      break;
  }
}

template <typename P>
__device__ __forceinline__ uint32_t encode(float x, bool stochastic, uint32_t word);
template <>
__device__ __forceinline__ uint32_t encode<float>(float x, bool, uint32_t) {
  return __float_as_uint(x);
}
template <>
__device__ __forceinline__ uint32_t encode<BF16>(float x, bool stochastic, uint32_t word) {
  return stochastic ? float_to_bf16_stochastic(x, word) : float_to_bf16_nearest(x);
}
template <>
__device__ __forceinline__ uint32_t encode<FP16>(float x, bool stochastic, uint32_t word) {
  return stochastic ? float_to_fp16_stochastic(x, word) : float_to_fp16_nearest(x);
}

template <typename P, int E>
__device__ __forceinline__ void store_elements(P* base, int64_t index, bool full, int64_t begin, int64_t end,
                                               const uint32_t (&bits)[E]) {
  if (full) {
    constexpr int kWords = E * static_cast<int>(sizeof(P)) / 4;
    uint32_t words[kWords];
#pragma unroll
    for (int w = 0; w < kWords; ++w) {
      words[w] = sizeof(P) == 4 ? bits[w] : (bits[2 * w] | (bits[2 * w + 1] << 16));
    }
    if constexpr (kWords == 4) {
      *reinterpret_cast<uint4*>(base + index) = make_uint4(words[0], words[1], words[2], words[3]);
    } else {
      static_assert(kWords == 2, "units are 8 or 16 bytes");
      *reinterpret_cast<uint2*>(base + index) = make_uint2(words[0], words[1]);
    }
    return;
  }
#pragma unroll
  for (int l = 0; l < E; ++l) {
    const int64_t i = index + l;
    if (i >= begin && i < end) {
      if constexpr (sizeof(P) == 4) {
        reinterpret_cast<uint32_t*>(base)[i] = bits[l];
      } else {
        reinterpret_cast<uint16_t*>(base)[i] = static_cast<uint16_t>(bits[l]);
      }
    }
  }
}

// ----------------------------------------------------------------------------- noise

// z of the E elements starting at global index `first` (a multiple of 4).
template <int E>
__device__ __forceinline__ void noise_unit(uint64_t seed, uint32_t tid, uint64_t first, int32_t kind, float (&z)[E]) {
#pragma unroll
  for (int g = 0; g < E / 4; ++g) {
    const uint64_t group_first = first + 4 * g;
    if (kind == static_cast<int32_t>(NoiseKind::kGaussian)) {
      const Gaussian4 block = gaussian4(block_words(seed, tid, group_first >> 2, kPurposeNoise));
      z[4 * g + 0] = block.z0;
      z[4 * g + 1] = block.z1;
      z[4 * g + 2] = block.z2;
      z[4 * g + 3] = block.z3;
    } else {
      // A 4-aligned group never straddles a 128-element Rademacher block.
      const Words words = block_words(seed, tid, group_first >> 7, kPurposeNoise);
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        z[4 * g + l] = rademacher(words, static_cast<uint32_t>((group_first + l) & 127u));
      }
    }
  }
}

__device__ __forceinline__ float scalar_at(const LaunchTable& table, const KernelFlags& flags, int index) {
  return flags.device_scalars != nullptr ? __ldg(flags.device_scalars + index) : table.scalars[index];
}

// ----------------------------------------------------------------------------- the pass

// Local elements [index, index + E) of tensor t, restricted to [begin, end); index - offset
// is congruent to 0 mod 4 in the global frame.
template <typename P, int E>
__device__ __forceinline__ void process_unit(const LaunchTable& table, const KernelFlags& flags, int t,
                                             int64_t index, int64_t begin, int64_t end, bool full) {
  P* param = static_cast<P*>(table.param[t]);
  const uint32_t tid = table.tid[t];
  const uint64_t first = table.offset[t] + static_cast<uint64_t>(index);

  float x[E];
  load_elements<P, E>(param, index, full, begin, end, x);
  float z0[E];
  noise_unit<E>(table.seeds[0], tid, first, flags.noise, z0);

  if (flags.has_shift) {
    const float shift = scalar_at(table, flags, kScalarShift);
#pragma unroll
    for (int l = 0; l < E; ++l) x[l] = x[l] + shift * z0[l];
  }
  if (flags.needs_update) {
    float direction[E];
#pragma unroll
    for (int l = 0; l < E; ++l) direction[l] = 0.0f;
    if (flags.num_directions > 0) {
      const float coeff = scalar_at(table, flags, kScalarFirstCoeff);
#pragma unroll
      for (int l = 0; l < E; ++l) direction[l] = direction[l] + coeff * z0[l];
    }
    for (int k = 1; k < flags.num_directions; ++k) {
      float zk[E];
      noise_unit<E>(table.seeds[k], tid, first, flags.noise, zk);
      const float coeff = scalar_at(table, flags, kScalarFirstCoeff + k);
#pragma unroll
      for (int l = 0; l < E; ++l) direction[l] = direction[l] + coeff * zk[l];
    }
    if (flags.has_grad) {
      float grad[E];
      load_grad<E>(table.grad[t], flags.grad_type, index, full, begin, end, grad);
      const float grad_coeff = scalar_at(table, flags, kScalarGradCoeff);
#pragma unroll
      for (int l = 0; l < E; ++l) direction[l] = direction[l] + grad_coeff * grad[l];
    }
    const float decay = table.weight_decay[t];
    if (decay != 0.0f) {
#pragma unroll
      for (int l = 0; l < E; ++l) direction[l] = direction[l] + decay * x[l];
    }
    const float lr = scalar_at(table, flags, kScalarLr);
#pragma unroll
    for (int l = 0; l < E; ++l) x[l] = x[l] - lr * direction[l];
  }

  const bool stochastic = sizeof(P) == 2 && flags.rounding == static_cast<int32_t>(Rounding::kStochastic);
  uint32_t words[E];
#pragma unroll
  for (int g = 0; g < E / 4; ++g) {
    Words block{0, 0, 0, 0};
    if (stochastic) block = block_words(table.seeds[0], tid, (first >> 2) + g, kPurposeRounding);
    words[4 * g + 0] = block.w0;
    words[4 * g + 1] = block.w1;
    words[4 * g + 2] = block.w2;
    words[4 * g + 3] = block.w3;
  }
  uint32_t bits[E];
#pragma unroll
  for (int l = 0; l < E; ++l) bits[l] = encode<P>(x[l], stochastic, words[l]);
  store_elements<P, E>(param, index, full, begin, end, bits);
}

template <typename P>
__global__ void __launch_bounds__(kThreads) fused_kernel(const __grid_constant__ LaunchTable table, KernelFlags flags) {
  const uint32_t block = blockIdx.x;
  int t = 0;
  while (t + 1 < table.num_tensors && table.first_block[t + 1] <= block) ++t;
  const int64_t begin = static_cast<int64_t>(block - table.first_block[t]) * kChunk;
  const int64_t end = min(begin + kChunk, table.numel[t]);

  if (table.vector_ok[t]) {
    constexpr int E = 16 / static_cast<int>(sizeof(P));
    for (int64_t index = begin + static_cast<int64_t>(threadIdx.x) * E; index < end;
         index += static_cast<int64_t>(kThreads) * E) {
      process_unit<P, E>(table, flags, t, index, begin, end, index + E <= end);
    }
  } else {
    // Unaligned data or a shard offset that is not a multiple of 4: groups follow the global
    // Philox blocks, and their first or last elements may fall outside this chunk.
    const uint64_t offset = table.offset[t];
    const uint64_t first_group = (offset + static_cast<uint64_t>(begin)) >> 2;
    const uint64_t last_group = (offset + static_cast<uint64_t>(end) - 1) >> 2;
    for (uint64_t group = first_group + threadIdx.x; group <= last_group; group += kThreads) {
      const int64_t index = static_cast<int64_t>(group * 4 - offset);
      process_unit<P, 4>(table, flags, t, index, begin, end, false);
    }
  }
}

std::string cuda_error(const char* what, cudaError_t status) {
  return std::string(what) + ": " + cudaGetErrorName(status) + " (" + cudaGetErrorString(status) + ")";
}

template <typename P>
std::string launch_all(cudaStream_t stream, const TensorArg* tensors, int64_t num_tensors, const JobArgs& job,
                       const float* host_scalars, const float* device_scalars, bool needs_update) {
  LaunchTable table{};
  // seeds[0] keys the noise of a shift and the rounding bits even without directions.
  for (int k = 0; k < std::max(1, job.num_directions); ++k) table.seeds[k] = job.seeds[k];
  if (device_scalars == nullptr) {
    for (int i = 0; i < kScalarFirstCoeff + job.num_directions; ++i) table.scalars[i] = host_scalars[i];
  }
  KernelFlags flags{device_scalars,
                    static_cast<int32_t>(job.grad_type),
                    static_cast<int32_t>(job.noise),
                    static_cast<int32_t>(job.rounding),
                    job.num_directions,
                    job.has_shift,
                    job.has_grad,
                    needs_update};

  const uint64_t max_blocks = 0x7FFFFFFFull;  // gridDim.x limit
  int32_t count = 0;
  uint64_t blocks = 0;
  auto flush = [&]() -> std::string {
    if (count == 0) return std::string();
    table.num_tensors = count;
    fused_kernel<P><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(table, flags);
    const cudaError_t status = cudaGetLastError();
    count = 0;
    blocks = 0;
    return status == cudaSuccess ? std::string() : cuda_error("fused_kernel launch", status);
  };

  for (int64_t i = 0; i < num_tensors; ++i) {
    const TensorArg& tensor = tensors[i];
    if (tensor.numel <= 0) continue;
    const uint64_t tensor_blocks = static_cast<uint64_t>((tensor.numel + kChunk - 1) / kChunk);
    if (tensor_blocks > max_blocks) return "a tensor of " + std::to_string(tensor.numel) + " elements is too large";
    if (count == kMaxTensorsPerLaunch || blocks + tensor_blocks > max_blocks) {
      const std::string error = flush();
      if (!error.empty()) return error;
    }
    const uintptr_t param_address = reinterpret_cast<uintptr_t>(tensor.param);
    const uintptr_t grad_address = reinterpret_cast<uintptr_t>(tensor.grad);
    table.param[count] = tensor.param;
    table.grad[count] = tensor.grad;
    table.numel[count] = tensor.numel;
    table.offset[count] = tensor.offset;
    table.tid[count] = tensor.tid;
    table.weight_decay[count] = tensor.weight_decay;
    table.vector_ok[count] = (tensor.offset % 4 == 0) && (param_address % 16 == 0) && (grad_address % 16 == 0);
    table.first_block[count] = static_cast<uint32_t>(blocks);
    blocks += tensor_blocks;
    table.first_block[count + 1] = static_cast<uint32_t>(blocks);
    ++count;
  }
  return flush();
}

template <typename P>
const void* kernel_symbol() {
  return reinterpret_cast<const void*>(&fused_kernel<P>);
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
  cudaError_t status = cudaSetDevice(device);
  if (status != cudaSuccess) return cuda_error("cudaSetDevice", status);
  cudaFuncAttributes attributes;
  status = cudaFuncGetAttributes(&attributes, kernel_symbol<float>());
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

std::string fused_update(int device, uintptr_t stream_handle, const TensorArg* tensors, int64_t num_tensors,
                         const JobArgs& job, const float* host_scalars, const float* device_scalars,
                         bool needs_update) {
  if (job.num_directions < 0 || job.num_directions > kMaxDirections) {
    return "the CUDA kernels take 0 to " + std::to_string(kMaxDirections) + " directions per call, got " +
           std::to_string(job.num_directions);
  }
  const cudaError_t status = cudaSetDevice(device);
  if (status != cudaSuccess) return cuda_error("cudaSetDevice", status);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  switch (job.param_type) {
    case StorageType::kFloat32:
      return launch_all<float>(stream, tensors, num_tensors, job, host_scalars, device_scalars, needs_update);
    case StorageType::kBFloat16:
      return launch_all<BF16>(stream, tensors, num_tensors, job, host_scalars, device_scalars, needs_update);
    case StorageType::kFloat16:
      return launch_all<FP16>(stream, tensors, num_tensors, job, host_scalars, device_scalars, needs_update);
  }
  return "unknown parameter type";
}

}  // namespace cuda
}  // namespace addax

// A CPU stand-in for <cuda_runtime.h>: just enough of CUDA's execution model, device
// intrinsics and runtime API to compile csrc/cuda/fused_cuda.cu with the host compiler and run
// its kernels on host memory (tests/cuda_emulation/__init__.py builds it; docs/native.md says
// what it checks and what it cannot).
//
// Execution model.  A launch runs its thread blocks one after another and, inside a block, one
// warp at a time; the 32 lanes of a warp are fibers (ucontext) on the calling thread, each run
// until it exits or reaches a warp shuffle.  A shuffle completes once every lane has reached
// it, so lanes that diverge around a full-mask __shfl_sync, or exit while others wait in one,
// are reported as a launch failure (on a GPU that is undefined behaviour).  Blocks do not
// interact in the kernels (no shared memory, no atomics, no __syncthreads), so running them in
// turn loses nothing a test can observe: two blocks touching one element show up as a wrong
// result.  Everything is deterministic.
//
// Memory.  "Device" memory is host memory; 16-byte vector types carry their CUDA alignment,
// and the build adds -fsanitize=alignment (trapping), so a misaligned vector access stops the
// process as it would fault on the GPU.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>
#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

// ----------------------------------------------------------------------------- CUDA C++ keywords

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __grid_constant__
#if !defined(__clang__)
#define __builtin_assume(condition) ((void)0)
#endif

// ----------------------------------------------------------------------------- vector types and built-ins

struct alignas(8) uint2 {
  uint32_t x, y;
};
struct alignas(16) uint4 {
  uint32_t x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct uint3 {
  unsigned x, y, z;
};
inline uint2 make_uint2(uint32_t x, uint32_t y) { return uint2{x, y}; }
inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return uint4{x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

// The running lane's coordinates (set by the scheduler before it resumes a lane).
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local uint3 gridDim;

// ----------------------------------------------------------------------------- device intrinsics

inline float __uint_as_float(uint32_t bits) {
  float value;
  memcpy(&value, &bits, sizeof(value));
  return value;
}
inline uint32_t __float_as_uint(float value) {
  uint32_t bits;
  memcpy(&bits, &value, sizeof(bits));
  return bits;
}
inline float __int_as_float(int32_t bits) { return __uint_as_float(static_cast<uint32_t>(bits)); }
// The _rn intrinsics round once (the build passes -ffp-contract=off); __fmaf_rn is a true FMA.
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline uint32_t __umulhi(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}
template <typename T>
inline T __ldg(const T* address) {
  return *address;
}
inline bool __isGlobal(const void*) { return true; }

namespace addax_emulation {

// A failure the emulator detects inside a kernel (reported as a failed launch).
struct KernelFault {
  std::string what;
};

constexpr int kWarpSize = 32;
constexpr size_t kLaneStackBytes = 256 * 1024;

enum class LaneState { kRunnable, kAtShuffle, kDone };

struct Lane {
  ucontext_t context;
  std::vector<char> stack;
  LaneState state = LaneState::kDone;
  unsigned mask = 0;
  uint32_t value = 0;
  int source = 0;
  uint32_t result = 0;
};

// One warp's lanes and the scheduler context they return to.
struct WarpRunner {
  ucontext_t scheduler;
  Lane lanes[kWarpSize];
  int current = 0;
  void (*body)(const void*) = nullptr;
  const void* body_args = nullptr;
  std::string fault;  // the first fault of the running launch
};

inline thread_local WarpRunner* running_warp = nullptr;

inline void lane_entry() {
  WarpRunner& warp = *running_warp;
  try {
    warp.body(warp.body_args);
  } catch (const KernelFault& fault) {
    if (warp.fault.empty()) warp.fault = fault.what;
  }
  warp.lanes[warp.current].state = LaneState::kDone;
  // Returning resumes uc_link: the scheduler.
}

[[noreturn]] inline void fail(const std::string& what) { throw KernelFault{what}; }

// __shfl_sync: park this lane until every lane of the warp has reached a shuffle.
inline uint32_t shuffle(unsigned mask, uint32_t value, int source) {
  WarpRunner& warp = *running_warp;
  Lane& lane = warp.lanes[warp.current];
  lane.mask = mask;
  lane.value = value;
  lane.source = source;
  lane.state = LaneState::kAtShuffle;
  swapcontext(&lane.context, &warp.scheduler);
  if (!warp.fault.empty()) fail(warp.fault);
  return lane.result;
}

// Runs `body(args)` as the 32 lanes of warp `warp_index` of the current block; returns a fault
// message or "".
inline std::string run_warp(WarpRunner& warp, unsigned warp_index, unsigned block_threads, void (*body)(const void*),
                            const void* args) {
  warp.body = body;
  warp.body_args = args;
  warp.fault.clear();
  for (int l = 0; l < kWarpSize; ++l) {
    Lane& lane = warp.lanes[l];
    if (lane.stack.empty()) lane.stack.resize(kLaneStackBytes);
    getcontext(&lane.context);
    lane.context.uc_stack.ss_sp = lane.stack.data();
    lane.context.uc_stack.ss_size = lane.stack.size();
    lane.context.uc_link = &warp.scheduler;
    makecontext(&lane.context, lane_entry, 0);
    lane.state = warp_index * kWarpSize + l < block_threads ? LaneState::kRunnable : LaneState::kDone;
  }
  for (;;) {
    for (int l = 0; l < kWarpSize; ++l) {
      if (warp.lanes[l].state != LaneState::kRunnable) continue;
      warp.current = l;
      threadIdx = uint3{warp_index * kWarpSize + l, 0, 0};
      swapcontext(&warp.scheduler, &warp.lanes[l].context);
    }
    int waiting = 0, done = 0;
    for (const Lane& lane : warp.lanes) {
      waiting += lane.state == LaneState::kAtShuffle;
      done += lane.state == LaneState::kDone;
    }
    if (waiting == 0) break;
    if (warp.fault.empty()) {
      if (done != 0) {
        warp.fault = "__shfl_sync reached by " + std::to_string(waiting) + " lanes of warp " +
                     std::to_string(warp_index) + " while " + std::to_string(done) + " have exited";
      }
      for (const Lane& lane : warp.lanes) {
        if (lane.state == LaneState::kAtShuffle && lane.mask != 0xFFFFFFFFu) {
          warp.fault = "__shfl_sync with a partial mask (the kernels use full-warp shuffles only)";
        }
      }
    }
    for (Lane& lane : warp.lanes) {
      if (lane.state != LaneState::kAtShuffle) continue;
      lane.result = warp.lanes[lane.source & (kWarpSize - 1)].value;
      lane.state = LaneState::kRunnable;  // a fault makes the lane throw when it resumes
    }
  }
  return warp.fault;
}

// The emulated runtime's state: the last error of this host thread and its message.
inline thread_local int last_error = 0;
inline thread_local std::string last_error_message;

template <class Args>
void launch(void (*kernel)(Args), unsigned grid, unsigned block_threads, size_t shared_bytes, void* stream,
            const Args& args);

}  // namespace addax_emulation

inline uint32_t __shfl_sync(unsigned mask, uint32_t value, int source) {
  return addax_emulation::shuffle(mask, value, source);
}

// ----------------------------------------------------------------------------- runtime API

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorLaunchFailure = 719,
};
using cudaError = cudaError_t;
using cudaStream_t = void*;
enum cudaMemcpyKind { cudaMemcpyHostToDevice = 1 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
struct cudaFuncAttributes {
  int numRegs;
};
struct cudaDeviceProp {
  char name[256];
  int major, minor;
};

// The emulated device: one, with few SMs and resident blocks so that a launch's blocks take
// several chunks each (the grid-stride loop runs more than once).
constexpr int kEmulatedMultiprocessors = 2;
constexpr int kEmulatedBlocksPerMultiprocessor = 2;

inline const char* cudaGetErrorName(cudaError_t status) {
  switch (status) {
    case cudaSuccess:
      return "cudaSuccess";
    case cudaErrorInvalidValue:
      return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation:
      return "cudaErrorMemoryAllocation";
    default:
      return "cudaErrorLaunchFailure";
  }
}
inline const char* cudaGetErrorString(cudaError_t status) {
  return status == cudaErrorLaunchFailure ? addax_emulation::last_error_message.c_str() : cudaGetErrorName(status);
}
inline cudaError_t cudaGetLastError() {
  const int status = addax_emulation::last_error;
  addax_emulation::last_error = 0;
  return static_cast<cudaError_t>(status);
}
inline cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidValue; }
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int device) {
  *value = kEmulatedMultiprocessors;
  return device == 0 ? cudaSuccess : cudaErrorInvalidValue;
}
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* properties, int) {
  snprintf(properties->name, sizeof(properties->name), "CPU emulation");
  properties->major = 9;
  properties->minor = 0;
  return cudaSuccess;
}
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, const void*) {
  attributes->numRegs = 0;
  return cudaSuccess;
}
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void*, int, size_t) {
  *blocks = kEmulatedBlocksPerMultiprocessor;
  return cudaSuccess;
}
inline cudaError_t cudaMalloc(void** pointer, size_t bytes) {
  *pointer = aligned_alloc(256, (bytes + 255) / 256 * 256);  // cudaMalloc's 256-byte alignment
  return *pointer != nullptr ? cudaSuccess : cudaErrorMemoryAllocation;
}
inline cudaError_t cudaFree(void* pointer) {
  free(pointer);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* destination, const void* source, size_t bytes, cudaMemcpyKind) {
  memcpy(destination, source, bytes);
  return cudaSuccess;
}

// ----------------------------------------------------------------------------- kernel launch

namespace addax_emulation {

template <class Args>
void launch(void (*kernel)(Args), unsigned grid, unsigned block_threads, size_t shared_bytes, void* stream,
            const Args& args) {
  (void)stream;  // one host thread: everything is in order
  if (grid == 0 || block_threads == 0 || block_threads > 1024 || shared_bytes != 0) {
    last_error = cudaErrorInvalidValue;
    return;
  }
  struct Call {
    void (*kernel)(Args);
    const Args* args;
  } call{kernel, &args};
  auto body = [](const void* opaque) {
    const Call& c = *static_cast<const Call*>(opaque);
    c.kernel(*c.args);  // by value, as a launch passes its parameters
  };
  WarpRunner* previous = running_warp;
  auto warp = std::make_unique<WarpRunner>();
  running_warp = warp.get();
  std::string fault;
  gridDim = uint3{grid, 1, 1};
  for (unsigned block = 0; block < grid && fault.empty(); ++block) {
    blockIdx = uint3{block, 0, 0};
    for (unsigned w = 0; w * kWarpSize < block_threads && fault.empty(); ++w) {
      fault = run_warp(*warp, w, block_threads, body, &call);
    }
  }
  running_warp = previous;
  if (!fault.empty()) {
    last_error = cudaErrorLaunchFailure;
    last_error_message = "emulated kernel fault: " + fault;
  }
}

}  // namespace addax_emulation

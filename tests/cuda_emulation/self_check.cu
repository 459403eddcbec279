// Checks of the emulated execution model itself (tests/test_cuda_emulation.py compiles this
// with g++ and the stand-in cuda_runtime.h, and runs one mode per process):
//   coverage    every thread of a multi-block launch runs once, with its own coordinates
//   shuffle     __shfl_sync returns the source lane's value, in several rounds
//   divergent   a shuffle that half the warp never reaches fails the launch, with a message
//   misaligned  a 16-byte vector load from an address that is not 16-byte aligned traps
#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>
#include <vector>

namespace {

struct CoverageArgs {
  unsigned* hits;
  unsigned* coordinates;
};

__global__ void coverage_kernel(CoverageArgs a) {
  const unsigned id = blockIdx.x * 64 + threadIdx.x;
  a.hits[id] += 1;
  a.coordinates[id] = blockIdx.x * 1000 + threadIdx.x + gridDim.x * 1000000;
}

struct ShuffleArgs {
  uint32_t* out;
};

__global__ void shuffle_kernel(ShuffleArgs a) {
  const uint32_t lane = threadIdx.x & 31u;
  uint32_t value = threadIdx.x * 7u;
  for (int round = 1; round <= 3; ++round) value = __shfl_sync(0xFFFFFFFFu, value, (lane + round) & 31u);
  a.out[threadIdx.x] = value;
}

__global__ void divergent_kernel(ShuffleArgs a) {
  if ((threadIdx.x & 31u) < 16) return;
  a.out[threadIdx.x] = __shfl_sync(0xFFFFFFFFu, threadIdx.x, 0);
}

struct VectorArgs {
  const char* bytes;
  uint32_t* out;
};

__global__ void misaligned_kernel(VectorArgs a) {
  const uint4 v = *reinterpret_cast<const uint4*>(a.bytes + 4);
  a.out[threadIdx.x] = v.x;
}

int coverage() {
  std::vector<unsigned> hits(3 * 64, 0), coordinates(3 * 64, 0);
  addax_emulation::launch(&coverage_kernel, 3, 64, 0, nullptr, CoverageArgs{hits.data(), coordinates.data()});
  if (cudaGetLastError() != cudaSuccess) return 1;
  for (unsigned id = 0; id < hits.size(); ++id) {
    const unsigned expected = (id / 64) * 1000 + id % 64 + 3 * 1000000;
    if (hits[id] != 1 || coordinates[id] != expected) {
      std::printf("thread %u: %u runs, coordinates %u (expected %u)\n", id, hits[id], coordinates[id], expected);
      return 1;
    }
  }
  std::printf("coverage ok\n");
  return 0;
}

int shuffle() {
  std::vector<uint32_t> out(64, 0);
  addax_emulation::launch(&shuffle_kernel, 1, 64, 0, nullptr, ShuffleArgs{out.data()});
  if (cudaGetLastError() != cudaSuccess) return 1;
  for (uint32_t t = 0; t < 64; ++t) {
    const uint32_t source = (t & ~31u) | ((t + 6) & 31u);  // three rounds of +1, +2, +3 lanes
    if (out[t] != source * 7u) {
      std::printf("thread %u got %u, expected %u\n", t, out[t], source * 7u);
      return 1;
    }
  }
  std::printf("shuffle ok\n");
  return 0;
}

int divergent() {
  std::vector<uint32_t> out(32, 0);
  addax_emulation::launch(&divergent_kernel, 1, 32, 0, nullptr, ShuffleArgs{out.data()});
  const cudaError_t status = cudaGetLastError();
  std::printf("%s: %s\n", cudaGetErrorName(status), cudaGetErrorString(status));
  return status == cudaErrorLaunchFailure ? 0 : 1;
}

int misaligned() {
  alignas(16) char bytes[64] = {};
  std::vector<uint32_t> out(32, 0);
  addax_emulation::launch(&misaligned_kernel, 1, 32, 0, nullptr, VectorArgs{bytes, out.data()});
  std::printf("the misaligned load did not trap\n");
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  const char* mode = argc > 1 ? argv[1] : "";
  if (std::strcmp(mode, "coverage") == 0) return coverage();
  if (std::strcmp(mode, "shuffle") == 0) return shuffle();
  if (std::strcmp(mode, "divergent") == 0) return divergent();
  if (std::strcmp(mode, "misaligned") == 0) return misaligned();
  std::printf("usage: self_check coverage|shuffle|divergent|misaligned\n");
  return 2;
}

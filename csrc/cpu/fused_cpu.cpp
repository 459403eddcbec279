// CPU driver of the fused pass: OpenMP across tiles, the tile kernel chosen for this CPU.
//
// Work is cut into tiles of kTile elements numbered across all tensors; OpenMP threads take
// whole tiles, so a thread count only changes which thread computes an element, never its
// value.  The tile kernel (tile_kernels.cpp) is built for AVX-512, AVX2 and baseline x86-64
// and picked once from the CPU's features.
#include "fused_cpu.h"

#include <omp.h>

#include <algorithm>
#include <string>
#include <vector>

#include "../philox.h"
#include "tile_kernels.h"

namespace addax {
namespace cpu {
namespace {

struct Dispatch {
  TileKernel kernel;
  const char* name;
};

bool cpu_has(const char* isa) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(ADDAX_BASELINE_ONLY)
  __builtin_cpu_init();
  if (isa[0] == 'a' && isa[3] == '5') {  // "avx512": the F, BW, DQ and VL subsets the build enables
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  }
  if (isa[0] == 'a') return __builtin_cpu_supports("avx2");
#endif
  return isa[0] == 'b';
}

// Best first.
const Dispatch kTileKernels[] = {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(ADDAX_BASELINE_ONLY)
    {process_tile_avx512, "avx512"},
    {process_tile_avx2, "avx2"},
#endif
    {process_tile_baseline, "baseline"},
};

Dispatch& dispatch() {
  static Dispatch selected = [] {
    for (const Dispatch& candidate : kTileKernels) {
      if (cpu_has(candidate.name)) return candidate;
    }
    return kTileKernels[sizeof(kTileKernels) / sizeof(kTileKernels[0]) - 1];
  }();
  return selected;
}

}  // namespace

std::vector<int64_t> tile_starts(const TensorArg* tensors, int64_t num_tensors) {
  std::vector<int64_t> starts(static_cast<size_t>(num_tensors) + 1, 0);
  for (int64_t t = 0; t < num_tensors; ++t) starts[t + 1] = starts[t] + (tensors[t].numel + kTile - 1) / kTile;
  return starts;
}

void fused_update(const TensorArg* tensors, const void* const* grads, int64_t num_tensors, const int64_t* tile_start,
                  const GroupArgs& group, const JobArgs& job, int num_threads) {
  const TileKernel process_tile = dispatch().kernel;
  const bool update = needs_update(group, job);
  const int64_t total_tiles = tile_start[num_tensors];
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, total_tiles)));
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t tile = 0; tile < total_tiles; ++tile) {
    const int64_t t = std::upper_bound(tile_start, tile_start + num_tensors + 1, tile) - tile_start - 1;
    const int64_t begin = (tile - tile_start[t]) * kTile;
    const int64_t count = std::min(kTile, tensors[t].numel - begin);
    process_tile(tensors[t], job.has_grad ? grads[t] : nullptr, group, job, update, begin, count);
  }
}

void philox4x32(const uint32_t* counters, const uint32_t* keys, int64_t count, uint32_t* out) {
  for (int64_t i = 0; i < count; ++i) {
    const Words words = philox4x32_10(counters[4 * i], counters[4 * i + 1], counters[4 * i + 2],
                                      counters[4 * i + 3], keys[2 * i], keys[2 * i + 1]);
    out[4 * i + 0] = words.w0;
    out[4 * i + 1] = words.w1;
    out[4 * i + 2] = words.w2;
    out[4 * i + 3] = words.w3;
  }
}

void uniforms(const uint32_t* words, int64_t count, float* out) {
  for (int64_t i = 0; i < count; ++i) out[i] = uniform(words[i]);
}

void gaussian_from_words(const uint32_t* words, int64_t count, float* out) {
  for (int64_t i = 0; i < count; ++i) {
    const Gaussian4 z = gaussian4(Words{words[4 * i], words[4 * i + 1], words[4 * i + 2], words[4 * i + 3]});
    out[4 * i + 0] = z.z0;
    out[4 * i + 1] = z.z1;
    out[4 * i + 2] = z.z2;
    out[4 * i + 3] = z.z3;
  }
}

const char* simd_target() { return dispatch().name; }

std::vector<std::string> supported_tile_kernels() {
  std::vector<std::string> names;
  for (const Dispatch& candidate : kTileKernels) {
    if (cpu_has(candidate.name)) names.emplace_back(candidate.name);
  }
  return names;
}

bool use_tile_kernel(const std::string& name) {
  for (const Dispatch& candidate : kTileKernels) {
    if (name == candidate.name && cpu_has(candidate.name)) {
      dispatch() = candidate;
      return true;
    }
  }
  return false;
}

}  // namespace cpu
}  // namespace addax

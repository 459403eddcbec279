// CPU kernels: the fused pass over a list of tensors, OpenMP across tiles, SIMD within a tile.
#pragma once

#include <stdint.h>

#include <string>
#include <vector>

#include "../fused_job.h"

namespace addax {
namespace cpu {

// First tile of each tensor when the tiles of all tensors are numbered in order: num_tensors + 1
// entries, the last one the total (computed once per prepared group).
std::vector<int64_t> tile_starts(const TensorArg* tensors, int64_t num_tensors);

// The fused pass (addax_kernels/backends/__init__.py) over `num_tensors` tensors, in place.
// `grads[t]` is tensor t's gradient (read only when job.has_grad); `tile_start` comes from
// tile_starts.  Results do not depend on `num_threads`: z is a function of (seed, tid, e,
// purpose) only, and each element is computed by one thread.
void fused_update(const TensorArg* tensors, const void* const* grads, int64_t num_tensors, const int64_t* tile_start,
                  const GroupArgs& group, const JobArgs& job, int num_threads);

// Philox4x32-10 on `count` counters (4 words each) and keys (2 words each).
void philox4x32(const uint32_t* counters, const uint32_t* keys, int64_t count, uint32_t* out);

// uniform(w) of SPEC §1 for `count` words.
void uniforms(const uint32_t* words, int64_t count, float* out);

// The Box–Muller transform of SPEC §1 for `count` blocks of four words -> four z each.
void gaussian_from_words(const uint32_t* words, int64_t count, float* out);

// The tile kernel picked for this CPU: "avx512", "avx2" or "baseline".
const char* simd_target();

// The tile kernels this CPU can run, best first; use_tile_kernel switches to one of them for
// the whole process (tests use it to check every variant on one machine).
std::vector<std::string> supported_tile_kernels();
bool use_tile_kernel(const std::string& name);

}  // namespace cpu
}  // namespace addax

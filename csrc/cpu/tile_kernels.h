// One tile of the fused pass, built once per instruction set (see tile_kernels.cpp).
#pragma once

#include <stdint.h>

#include "../fused_job.h"

namespace addax {
namespace cpu {

// Elements per tile: a multiple of 128 so that whole Rademacher blocks fit; the buffers of a
// tile (~40 KiB) stay in L1/L2.
constexpr int64_t kTile = 1024;

// Elements [begin, begin + count) of `tensor`, count <= kTile.  `grad` is the tensor's
// gradient (null without gradients); `needs_update` is addax::needs_update(group, job).
using TileKernel = void (*)(const TensorArg& tensor, const void* grad, const GroupArgs& group, const JobArgs& job,
                            bool needs_update, int64_t begin, int64_t count);

void process_tile_avx512(const TensorArg&, const void*, const GroupArgs&, const JobArgs&, bool, int64_t, int64_t);
void process_tile_avx2(const TensorArg&, const void*, const GroupArgs&, const JobArgs&, bool, int64_t, int64_t);
void process_tile_baseline(const TensorArg&, const void*, const GroupArgs&, const JobArgs&, bool, int64_t, int64_t);

}  // namespace cpu
}  // namespace addax

// CUDA kernels: the fused pass as a multi-tensor apply, behind a host API of plain types.
//
// Compiled by nvcc alone (no torch headers) and linked with the static CUDA runtime, so the
// extension does not depend on the CUDA version of the installed torch.  Every function sets
// the device it is given before touching it: the static runtime keeps its own current
// device, separate from torch's.  Errors come back as a message (empty string: success).
#pragma once

#include <stdint.h>

#include <string>

#include "../fused_job.h"

namespace addax {
namespace cuda {

// Directions one launch carries in its by-value table; zo_update_ with more seeds is refused.
constexpr int kMaxDirections = 32;

// Number of CUDA devices, or -1 with `error` set when the driver or a device is missing.
int device_count(std::string* error);

// Empty when the kernels can run on `device` (a kernel image for its architecture is built
// in), else why not.
std::string check_device(int device);

// The fused pass on `device`, enqueued on `stream` (a cudaStream_t as an integer; 0 is the
// legacy default stream).  `host_scalars` ([shift, lr, grad_coeff, coeff_0, ...]) is used when
// `device_scalars` is null; otherwise the kernel reads that float32 array on the device.
std::string fused_update(int device, uintptr_t stream, const TensorArg* tensors, int64_t num_tensors,
                         const JobArgs& job, const float* host_scalars, const float* device_scalars,
                         bool needs_update);

}  // namespace cuda
}  // namespace addax

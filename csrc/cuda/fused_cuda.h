// CUDA kernels: the fused pass over a prepared tensor group, behind a host API of plain types.
//
// Compiled by nvcc alone (no torch headers) and linked with the static CUDA runtime, so the
// extension does not depend on the CUDA version of the installed torch.  Errors come back as
// a message (empty string: success).
#pragma once

#include <stdint.h>

#include <string>

#include "../fused_job.h"

namespace addax {
namespace cuda {

// A group's device-resident tensor table (opaque to the bindings).
struct DeviceGroup;

// Number of CUDA devices, or -1 with `error` set when the driver or a device is missing.
int device_count(std::string* error);

// Empty when the kernels can run on `device` (a kernel image for its architecture is built
// in), else why not.
std::string check_device(int device);

// Copies the table of `num_tensors` tensors (non-empty, on `device`) to the device: one
// allocation, freed by release_group.  Runs synchronously (call it outside graph capture).
std::string prepare_group(int device, const TensorArg* tensors, int64_t num_tensors, const GroupArgs& group,
                          DeviceGroup** out);
void release_group(DeviceGroup* group);

// One fused pass over `group`, enqueued on `stream` (a cudaStream_t as an integer).  `grads`
// holds one address per tensor when job.has_grad.  job.seeds / job.scalars point to host
// memory, or with `seeds_on_device` / `scalars_on_device` to device memory that the kernel
// reads.  The caller's current device is restored before returning.
std::string run_group(const DeviceGroup* group, uintptr_t stream, const void* const* grads, const JobArgs& job,
                      bool seeds_on_device, bool scalars_on_device);

// Directions whose host seeds and coefficients a launch carries by value (more: pass them in
// device memory).
constexpr int kParamDirections = 32;

}  // namespace cuda
}  // namespace addax

// The Python module addax_kernels._C.
//
// Tensors cross this boundary as raw addresses plus metadata (addax_kernels/backends/native.py
// builds them), so the extension uses pybind11 alone and no torch C++ API: one binary works
// with every torch version of the supported range, whatever its C++ ABI or CUDA version.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/fused_cpu.h"
#include "fused_job.h"
#if defined(ADDAX_WITH_CUDA)
#include "cuda/fused_cuda.h"
#endif

#ifndef ADDAX_CUDA_ARCHS
#define ADDAX_CUDA_ARCHS ""
#endif
#ifndef ADDAX_CUDA_BUILD_NOTE
#define ADDAX_CUDA_BUILD_NOTE ""
#endif

namespace py = pybind11;

namespace {

using addax::JobArgs;
using addax::TensorArg;

struct PackedJob {
  std::vector<TensorArg> tensors;
  std::vector<uint64_t> seeds;
  JobArgs job;
};

// Checks the parallel lists describing one fused pass and packs them into plain structs.
PackedJob pack_job(const std::vector<uintptr_t>& params, const std::vector<uintptr_t>& grads,
                   const std::vector<int64_t>& numels, const std::vector<uint64_t>& offsets,
                   const std::vector<uint32_t>& tids, const std::vector<float>& weight_decay, int param_type,
                   int grad_type, int noise, int rounding, const std::vector<uint64_t>& seeds, int num_directions,
                   bool has_shift, bool has_grad) {
  const size_t count = params.size();
  if (numels.size() != count || offsets.size() != count || tids.size() != count || weight_decay.size() != count) {
    throw std::invalid_argument("params, numels, offsets, tids and weight_decay must have one entry per tensor");
  }
  if (has_grad && grads.size() != count) throw std::invalid_argument("grads must have one entry per tensor");
  if (param_type < 0 || param_type > 2 || grad_type < 0 || grad_type > 2) {
    throw std::invalid_argument("storage types are 0 (float32), 1 (float16) or 2 (bfloat16)");
  }
  if (noise < 0 || noise > 1) throw std::invalid_argument("noise is 0 (gaussian) or 1 (rademacher)");
  if (rounding < 0 || rounding > 1) throw std::invalid_argument("rounding is 0 (nearest) or 1 (stochastic)");
  if (num_directions < 0 || seeds.size() != static_cast<size_t>(std::max(1, num_directions))) {
    throw std::invalid_argument("seeds must hold max(1, num_directions) entries");
  }
  PackedJob packed;
  packed.seeds = seeds;
  packed.tensors.resize(count);
  for (size_t i = 0; i < count; ++i) {
    if (numels[i] < 0) throw std::invalid_argument("numel must be non-negative");
    packed.tensors[i] = TensorArg{reinterpret_cast<void*>(params[i]),
                                  has_grad ? reinterpret_cast<const void*>(grads[i]) : nullptr,
                                  numels[i],
                                  offsets[i],
                                  tids[i],
                                  weight_decay[i]};
  }
  packed.job = JobArgs{static_cast<addax::StorageType>(param_type),
                       static_cast<addax::StorageType>(grad_type),
                       static_cast<addax::NoiseKind>(noise),
                       static_cast<addax::Rounding>(rounding),
                       packed.seeds.data(),
                       num_directions,
                       has_shift,
                       has_grad};
  return packed;
}

void check_scalars(size_t size, int num_directions) {
  if (size != static_cast<size_t>(addax::kScalarFirstCoeff + num_directions)) {
    throw std::invalid_argument("scalars must be [shift, lr, grad_coeff, coeff_0, ...] with one coeff per direction");
  }
}

void fused_update_cpu(const std::vector<uintptr_t>& params, const std::vector<uintptr_t>& grads,
                      const std::vector<int64_t>& numels, const std::vector<uint64_t>& offsets,
                      const std::vector<uint32_t>& tids, const std::vector<float>& weight_decay, int param_type,
                      int grad_type, int noise, int rounding, const std::vector<uint64_t>& seeds, int num_directions,
                      bool has_shift, bool has_grad, bool needs_update, const std::vector<float>& scalars,
                      int num_threads) {
  PackedJob packed = pack_job(params, grads, numels, offsets, tids, weight_decay, param_type, grad_type, noise,
                              rounding, seeds, num_directions, has_shift, has_grad);
  check_scalars(scalars.size(), num_directions);
  py::gil_scoped_release release;
  addax::cpu::fused_update(packed.tensors.data(), static_cast<int64_t>(packed.tensors.size()), packed.job,
                           scalars.data(), needs_update, std::max(1, num_threads));
}

py::array_t<uint32_t> philox4x32(py::array_t<uint32_t, py::array::c_style | py::array::forcecast> counters,
                                 py::array_t<uint32_t, py::array::c_style | py::array::forcecast> keys) {
  if (counters.ndim() != 2 || counters.shape(1) != 4 || keys.ndim() != 2 || keys.shape(1) != 2 ||
      keys.shape(0) != counters.shape(0)) {
    throw std::invalid_argument("philox4x32 takes counters of shape (n, 4) and keys of shape (n, 2)");
  }
  const int64_t count = counters.shape(0);
  py::array_t<uint32_t> out({static_cast<py::ssize_t>(count), static_cast<py::ssize_t>(4)});
  addax::cpu::philox4x32(counters.data(), keys.data(), count, out.mutable_data());
  return out;
}

py::array_t<float> uniforms(py::array_t<uint32_t, py::array::c_style | py::array::forcecast> words) {
  py::array_t<float> out(words.request().shape);
  addax::cpu::uniforms(words.data(), words.size(), out.mutable_data());
  return out;
}

py::array_t<float> gaussian_from_words(py::array_t<uint32_t, py::array::c_style | py::array::forcecast> words) {
  if (words.ndim() != 2 || words.shape(1) != 4) throw std::invalid_argument("gaussian_from_words takes words of shape (n, 4)");
  py::array_t<float> out({words.shape(0), static_cast<py::ssize_t>(4)});
  addax::cpu::gaussian_from_words(words.data(), words.shape(0), out.mutable_data());
  return out;
}

#if defined(ADDAX_WITH_CUDA)
void fused_update_cuda(int device, uintptr_t stream, const std::vector<uintptr_t>& params,
                       const std::vector<uintptr_t>& grads, const std::vector<int64_t>& numels,
                       const std::vector<uint64_t>& offsets, const std::vector<uint32_t>& tids,
                       const std::vector<float>& weight_decay, int param_type, int grad_type, int noise, int rounding,
                       const std::vector<uint64_t>& seeds, int num_directions, bool has_shift, bool has_grad,
                       bool needs_update, const std::vector<float>& host_scalars, uintptr_t device_scalars) {
  PackedJob packed = pack_job(params, grads, numels, offsets, tids, weight_decay, param_type, grad_type, noise,
                              rounding, seeds, num_directions, has_shift, has_grad);
  if (device_scalars == 0) check_scalars(host_scalars.size(), num_directions);
  std::string error;
  {
    py::gil_scoped_release release;
    error = addax::cuda::fused_update(device, stream, packed.tensors.data(),
                                      static_cast<int64_t>(packed.tensors.size()), packed.job, host_scalars.data(),
                                      reinterpret_cast<const float*>(device_scalars), needs_update);
  }
  if (!error.empty()) throw std::runtime_error("addax_kernels CUDA: " + error);
}

int cuda_device_count() {
  std::string error;
  const int count = addax::cuda::device_count(&error);
  if (count < 0) throw std::runtime_error(error);
  return count;
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "addax_kernels native kernels (CPU: OpenMP + SIMD; CUDA: multi-tensor apply)";

#if defined(ADDAX_WITH_CUDA)
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
  m.attr("cuda_archs") = ADDAX_CUDA_ARCHS;
  m.attr("cuda_build_note") = ADDAX_CUDA_BUILD_NOTE;
  m.attr("max_cuda_directions") =
#if defined(ADDAX_WITH_CUDA)
      addax::cuda::kMaxDirections;
#else
      0;
#endif

  m.def("simd_target", &addax::cpu::simd_target, "the SIMD clone of the CPU kernels selected for this CPU");
  m.def("supported_tile_kernels", &addax::cpu::supported_tile_kernels,
        "CPU tile kernels this machine can run, best first");
  m.def("use_tile_kernel", &addax::cpu::use_tile_kernel, py::arg("name"),
        "switch the CPU kernels to tile kernel `name` for this process (for tests); False if unsupported");
  m.def("philox4x32", &philox4x32, py::arg("counters"), py::arg("keys"),
        "Philox4x32-10 words of csrc/philox.h for uint32 counters (n, 4) and keys (n, 2)");
  m.def("uniforms", &uniforms, py::arg("words"), "u = (2 * (w >> 9) + 1) * 2**-24 of csrc/philox.h");
  m.def("gaussian_from_words", &gaussian_from_words, py::arg("words"),
        "z[4j..4j+3] of csrc/philox.h from the four words of block j, for words of shape (n, 4)");
  m.def("fused_update_cpu", &fused_update_cpu, py::arg("params"), py::arg("grads"), py::arg("numels"),
        py::arg("offsets"), py::arg("tids"), py::arg("weight_decay"), py::arg("param_type"), py::arg("grad_type"),
        py::arg("noise"), py::arg("rounding"), py::arg("seeds"), py::arg("num_directions"), py::arg("has_shift"),
        py::arg("has_grad"), py::arg("needs_update"), py::arg("scalars"), py::arg("num_threads"),
        "the fused pass over CPU tensors given by address (see addax_kernels/backends/native.py)");
#if defined(ADDAX_WITH_CUDA)
  m.def("fused_update_cuda", &fused_update_cuda, py::arg("device"), py::arg("stream"), py::arg("params"),
        py::arg("grads"), py::arg("numels"), py::arg("offsets"), py::arg("tids"), py::arg("weight_decay"),
        py::arg("param_type"), py::arg("grad_type"), py::arg("noise"), py::arg("rounding"), py::arg("seeds"),
        py::arg("num_directions"), py::arg("has_shift"), py::arg("has_grad"), py::arg("needs_update"),
        py::arg("host_scalars"), py::arg("device_scalars"),
        "the fused pass over CUDA tensors given by address, enqueued on `stream`");
  m.def("cuda_device_count", &cuda_device_count, "CUDA devices seen by the extension's static runtime");
  m.def("cuda_check_device", &addax::cuda::check_device, py::arg("device"),
        "empty string if the kernels can run on `device`, else why not");
#endif
}

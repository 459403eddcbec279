// The Python module addax_kernels._C.
//
// Tensors cross this boundary as raw addresses plus metadata (addax_kernels/backends/native.py
// builds them), so the extension uses pybind11 alone and no torch C++ API: one binary works
// with every torch version of the supported range, whatever its C++ ABI or CUDA version.
//
// The backend protocol's two steps map onto two calls: prepare() checks and packs what a
// tensor group fixes (addresses, sizes, stream ids, offsets, decays, state buffers; on CUDA
// also a device-resident copy of that table) into a PreparedGroup, once per parameter set;
// run() takes what changes per call (flags, seeds, scalars, and the gradients, whose
// addresses it reads here from the caller's list so that Python does no per-tensor work).
#include <Python.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <cstdint>
#include <memory>
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

using addax::GroupArgs;
using addax::JobArgs;
using addax::TensorArg;

constexpr int kCpuDevice = -1;

// What prepare() keeps for one tensor group: plain addresses and sizes, no tensor references.
struct PreparedGroup {
  int device = kCpuDevice;  // -1: CPU, else the CUDA device index
  std::vector<TensorArg> tensors;
  std::vector<Py_ssize_t> positions;  // the tensors' positions in the op's lists (for grads)
  std::vector<int64_t> tile_start;    // CPU: first tile of each tensor
  GroupArgs group{};
  int num_state_buffers = 0;
#if defined(ADDAX_WITH_CUDA)
  addax::cuda::DeviceGroup* device_group = nullptr;
#endif

  PreparedGroup() = default;
  PreparedGroup(const PreparedGroup&) = delete;
  PreparedGroup& operator=(const PreparedGroup&) = delete;
  ~PreparedGroup() {
#if defined(ADDAX_WITH_CUDA)
    addax::cuda::release_group(device_group);
#endif
  }
};

addax::StorageType storage_type(int value, const char* name) {
  if (value < 0 || value > 2) {
    throw std::invalid_argument(std::string(name) + " must be 0 (float32), 1 (float16) or 2 (bfloat16), got " +
                                std::to_string(value));
  }
  return static_cast<addax::StorageType>(value);
}

std::unique_ptr<PreparedGroup> prepare(int device, const std::vector<uintptr_t>& params,
                                       const std::vector<int64_t>& numels, const std::vector<uint64_t>& offsets,
                                       const std::vector<uint32_t>& tids, const std::vector<float>& weight_decay,
                                       const std::vector<int64_t>& positions, int param_type, int grad_type,
                                       int state_type, const std::vector<std::vector<uintptr_t>>& states,
                                       const std::array<uint64_t, 2>& state_keys) {
  const size_t count = params.size();
  if (count == 0) throw std::invalid_argument("prepare: params is empty");
  if (numels.size() != count || offsets.size() != count || tids.size() != count || weight_decay.size() != count ||
      positions.size() != count) {
    throw std::invalid_argument("prepare: params, numels, offsets, tids, weight_decay and positions must have one "
                                "entry per tensor");
  }
  if (states.size() > 2) throw std::invalid_argument("prepare: states holds at most 2 lists of buffers");
  for (const auto& buffers : states) {
    if (buffers.size() != count) throw std::invalid_argument("prepare: each states list needs one entry per tensor");
  }
  auto prepared = std::make_unique<PreparedGroup>();
  prepared->device = device;
  prepared->group.param_type = storage_type(param_type, "param_type");
  prepared->group.grad_type = storage_type(grad_type, "grad_type");
  prepared->group.state_type = storage_type(state_type, "state_type");
  if (!states.empty() && prepared->group.state_type == addax::StorageType::kFloat16) {
    throw std::invalid_argument("prepare: state buffers are float32 or bfloat16");
  }
  prepared->group.state_keys[0] = state_keys[0];
  prepared->group.state_keys[1] = state_keys[1];
  prepared->num_state_buffers = static_cast<int>(states.size());
  prepared->tensors.resize(count);
  prepared->positions.resize(count);
  bool has_decay = false;
  for (size_t i = 0; i < count; ++i) {
    if (numels[i] <= 0) throw std::invalid_argument("prepare: numels must be positive (skip empty tensors)");
    if (positions[i] < 0) throw std::invalid_argument("prepare: positions must be non-negative");
    TensorArg& tensor = prepared->tensors[i];
    tensor.param = reinterpret_cast<void*>(params[i]);
    tensor.state[0] = states.size() > 0 ? reinterpret_cast<void*>(states[0][i]) : nullptr;
    tensor.state[1] = states.size() > 1 ? reinterpret_cast<void*>(states[1][i]) : nullptr;
    tensor.numel = numels[i];
    tensor.offset = offsets[i];
    tensor.tid = tids[i];
    tensor.weight_decay = weight_decay[i];
    has_decay = has_decay || weight_decay[i] != 0.0f;
    prepared->positions[i] = static_cast<Py_ssize_t>(positions[i]);
  }
  prepared->group.has_decay = has_decay;
  if (device == kCpuDevice) {
    prepared->tile_start = addax::cpu::tile_starts(prepared->tensors.data(), static_cast<int64_t>(count));
    return prepared;
  }
#if defined(ADDAX_WITH_CUDA)
  std::string error;
  {
    py::gil_scoped_release release;
    error = addax::cuda::prepare_group(device, prepared->tensors.data(), static_cast<int64_t>(count),
                                       prepared->group, &prepared->device_group);
  }
  if (!error.empty()) throw std::runtime_error("addax_kernels CUDA: " + error);
  return prepared;
#else
  throw std::invalid_argument("prepare: this build has no CUDA kernels (device must be -1)");
#endif
}

// The data_ptr() of the group's gradients at the group's positions, from `grads`: either the
// op's list of tensors (one C++ loop of data_ptr() calls) or, when the ops layer already read
// them, bytes holding every gradient's address as a native-endian uint64.
std::vector<const void*> gradient_addresses(const PreparedGroup& prepared, py::handle grads) {
  static PyObject* const data_ptr_name = PyUnicode_InternFromString("data_ptr");
  std::vector<const void*> addresses(prepared.positions.size());
  if (PyBytes_Check(grads.ptr())) {
    const char* table = PyBytes_AS_STRING(grads.ptr());
    const auto length = static_cast<Py_ssize_t>(PyBytes_GET_SIZE(grads.ptr()) / sizeof(uint64_t));
    for (size_t i = 0; i < addresses.size(); ++i) {
      const Py_ssize_t position = prepared.positions[i];
      if (position >= length) throw std::invalid_argument("grads is shorter than the prepared params list");
      uint64_t address;
      std::memcpy(&address, table + position * sizeof(uint64_t), sizeof(uint64_t));
      addresses[i] = reinterpret_cast<const void*>(static_cast<uintptr_t>(address));
    }
    return addresses;
  }
  PyObject* sequence = PySequence_Fast(grads.ptr(), "grads must be a sequence of tensors");
  if (sequence == nullptr) throw py::error_already_set();
  const py::object owner = py::reinterpret_steal<py::object>(sequence);
  const Py_ssize_t length = PySequence_Fast_GET_SIZE(sequence);
  PyObject** items = PySequence_Fast_ITEMS(sequence);
  for (size_t i = 0; i < addresses.size(); ++i) {
    const Py_ssize_t position = prepared.positions[i];
    if (position >= length) throw std::invalid_argument("grads is shorter than the prepared params list");
    PyObject* address = PyObject_CallMethodNoArgs(items[position], data_ptr_name);
    if (address == nullptr) throw py::error_already_set();
    addresses[i] = PyLong_AsVoidPtr(address);
    Py_DECREF(address);
    if (PyErr_Occurred()) throw py::error_already_set();
  }
  return addresses;
}

// One fused pass over a prepared group.  Seeds: `seed_values` (u64), or with `seed_address`
// != 0 an int64 array of the same length on the group's device (read there, never synced).
// Scalars likewise (`scalar_values` or a float32 array at `scalar_address`).  `stream` is the
// cudaStream_t to enqueue on (CUDA groups); `num_threads` the OpenMP threads (CPU groups).
void run(const PreparedGroup& prepared, py::handle grads, const std::vector<uint64_t>& seed_values,
         uintptr_t seed_address, int64_t num_seeds, const std::vector<float>& scalar_values, uintptr_t scalar_address,
         int64_t num_scalars, int noise, int rounding, int state, int num_directions, bool has_shift, bool has_grad,
         uint32_t sparsity_threshold, int num_threads, uintptr_t stream) {
  if (noise < 0 || noise > 1) throw std::invalid_argument("noise must be 0 (gaussian) or 1 (rademacher)");
  if (rounding < 0 || rounding > 1) throw std::invalid_argument("rounding must be 0 (nearest) or 1 (stochastic)");
  if (state < 0 || state > 2) throw std::invalid_argument("state must be 0 (none), 1 (momentum) or 2 (adam)");
  if (num_directions < 0) throw std::invalid_argument("num_directions must be >= 0");
  const auto state_kind = static_cast<addax::StateKind>(state);
  if (addax::state_buffers(state_kind) > prepared.num_state_buffers) {
    throw std::invalid_argument("the job updates optimizer state but the group was prepared without state buffers");
  }
  const int64_t expected_seeds = std::max(1, num_directions) + 1;
  if (seed_address == 0) num_seeds = static_cast<int64_t>(seed_values.size());
  if (num_seeds != expected_seeds) {
    throw std::invalid_argument("seeds must hold max(1, num_directions) direction seeds and the rounding seed (" +
                                std::to_string(expected_seeds) + " entries), got " + std::to_string(num_seeds));
  }
  if (scalar_address == 0) num_scalars = static_cast<int64_t>(scalar_values.size());
  if (num_scalars != addax::kScalarFirstCoeff + num_directions) {
    throw std::invalid_argument("scalars must hold " + std::to_string(addax::kScalarFirstCoeff) +
                                " slots and one coefficient per direction");
  }
  if (sparsity_threshold > (1u << 24)) throw std::invalid_argument("sparsity_threshold must be <= 2**24");
  std::vector<const void*> grad_addresses;
  if (has_grad) grad_addresses = gradient_addresses(prepared, grads);

  JobArgs job{};
  job.noise = static_cast<addax::NoiseKind>(noise);
  job.rounding = static_cast<addax::Rounding>(rounding);
  job.state = state_kind;
  job.num_directions = num_directions;
  job.has_shift = has_shift;
  job.has_grad = has_grad;
  job.sparsity_threshold = sparsity_threshold;
  job.seeds = seed_address != 0 ? reinterpret_cast<const uint64_t*>(seed_address) : seed_values.data();
  job.scalars = scalar_address != 0 ? reinterpret_cast<const float*>(scalar_address) : scalar_values.data();

  if (prepared.device == kCpuDevice) {
    py::gil_scoped_release release;
    addax::cpu::fused_update(prepared.tensors.data(), grad_addresses.data(),
                             static_cast<int64_t>(prepared.tensors.size()), prepared.tile_start.data(),
                             prepared.group, job, std::max(1, num_threads));
    return;
  }
#if defined(ADDAX_WITH_CUDA)
  std::string error;
  {
    py::gil_scoped_release release;
    error = addax::cuda::run_group(prepared.device_group, stream, grad_addresses.data(), job, seed_address != 0,
                                   scalar_address != 0);
  }
  if (!error.empty()) throw std::runtime_error("addax_kernels CUDA: " + error);
#else
  (void)stream;
  throw std::invalid_argument("run: this build has no CUDA kernels");
#endif
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

py::dict scalar_layout() {
  py::dict layout;
  layout["SCALAR_SHIFT"] = addax::kScalarShift;
  layout["SCALAR_LR"] = addax::kScalarLr;
  layout["SCALAR_GRAD_COEFF"] = addax::kScalarGradCoeff;
  layout["SCALAR_MOMENTUM"] = addax::kScalarMomentum;
  layout["SCALAR_ADAM_W1"] = addax::kScalarAdamW1;
  layout["SCALAR_ADAM_BETA2"] = addax::kScalarAdamBeta2;
  layout["SCALAR_ADAM_W2"] = addax::kScalarAdamW2;
  layout["SCALAR_ADAM_BC2_SQRT"] = addax::kScalarAdamBc2Sqrt;
  layout["SCALAR_ADAM_EPS"] = addax::kScalarAdamEps;
  layout["SCALAR_FIRST_COEFF"] = addax::kScalarFirstCoeff;
  return layout;
}

#if defined(ADDAX_WITH_CUDA)
int cuda_device_count() {
  std::string error;
  const int count = addax::cuda::device_count(&error);
  if (count < 0) throw std::runtime_error(error);
  return count;
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "addax_kernels native kernels (CPU: OpenMP + SIMD; CUDA: one launch per tensor group)";

#if defined(ADDAX_WITH_CUDA)
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
  m.attr("cuda_archs") = ADDAX_CUDA_ARCHS;
  // Directions whose host seeds and coefficients a CUDA launch carries by value.
#if defined(ADDAX_WITH_CUDA)
  m.attr("cuda_param_directions") = addax::cuda::kParamDirections;
#else
  m.attr("cuda_param_directions") = 0;
#endif
  m.attr("cuda_build_note") = ADDAX_CUDA_BUILD_NOTE;

  py::class_<PreparedGroup>(m, "PreparedGroup",
                            "addresses, sizes and metadata of one tensor group (no tensor references)")
      .def_property_readonly("num_tensors", [](const PreparedGroup& p) { return p.tensors.size(); })
      .def_property_readonly("device", [](const PreparedGroup& p) { return p.device; });

  m.def("simd_target", &addax::cpu::simd_target, "the SIMD clone of the CPU kernels selected for this CPU");
  m.def("supported_tile_kernels", &addax::cpu::supported_tile_kernels,
        "CPU tile kernels this machine can run, best first");
  m.def("use_tile_kernel", &addax::cpu::use_tile_kernel, py::arg("name"),
        "switch the CPU kernels to tile kernel `name` for this process (for tests); False if unsupported");
  m.def("philox4x32", &philox4x32, py::arg("counters"), py::arg("keys"),
        "Philox4x32-10 words of csrc/philox.h for uint32 counters (n, 4) and keys (n, 2)");
  m.def("uniforms", &uniforms, py::arg("words"), "u = (2 * (w >> 9) + 1) * 2**-24 of csrc/philox.h");
  m.def("gaussian_from_words", &gaussian_from_words, py::arg("words"),
        "z[4j..4j+3] of the CPU kernels (csrc/philox.h) from the four words of block j, for words of shape (n, 4)");
  m.def("scalar_layout", &scalar_layout, "the SCALAR_* slots the kernels read, by name");
  m.def("prepare", &prepare, py::arg("device"), py::arg("params"), py::arg("numels"), py::arg("offsets"),
        py::arg("tids"), py::arg("weight_decay"), py::arg("positions"), py::arg("param_type"),
        py::arg("grad_type"), py::arg("state_type"), py::arg("states"), py::arg("state_keys"),
        "check and pack one tensor group given by address (device -1: CPU, else a CUDA device index)");
  m.def("run", &run,
        "one fused pass over a prepared group (positional: prepared, grads, seed_values, seed_address, "
        "num_seeds, scalar_values, scalar_address, num_scalars, noise, rounding, state, num_directions, "
        "has_shift, has_grad, sparsity_threshold, num_threads, stream)");
#if defined(ADDAX_WITH_CUDA)
  m.def("cuda_device_count", &cuda_device_count, "CUDA devices seen by the extension's static runtime");
  m.def("cuda_check_device", &addax::cuda::check_device, py::arg("device"),
        "empty string if the kernels can run on `device`, else why not");
#endif
}

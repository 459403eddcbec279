// addax_kernels._host: the per-call host work of addax_kernels.ops, at C speed.
//
// The ops validate a parameter list once and cache the result under a fingerprint of every
// fact the validation depends on (address, size, dtype, device, contiguity, inference flag of
// each tensor).  Reading those facts costs ~22 us per attribute per 400 tensors through
// Python; here it is a few ns per tensor.  This module only reads tensors (and bumps version
// counters): it decides nothing, builds no messages and keeps no references.  Anything it
// cannot vouch for (tensor subclasses, sparse/nested/functional/meta tensors, other devices)
// makes it answer None, and the ops take their Python path, which reports errors.

#include <torch/csrc/autograd/python_variable.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

namespace {

constexpr uint64_t kListMarker = 0xA5ull << 56;

// Flags of a fingerprint record.
constexpr uint64_t kContiguous = 1;
constexpr uint64_t kInference = 2;

// A hash of the fingerprint words: four independent multiply-rotate lanes (so the loop is
// not one long dependency chain), then SplitMix64's finalizer.  A collision only costs a byte
// comparison, never a wrong answer: a cache hit also compares the raw words.
uint64_t hash_words(const uint64_t* words, size_t count) {
  constexpr uint64_t kMultiplier = 0x9E3779B97F4A7C15ull;
  uint64_t lanes[4] = {0x243F6A8885A308D3ull, 0x13198A2E03707344ull, 0xA4093822299F31D0ull, 0x082EFA98EC4E6C89ull};
  size_t i = 0;
  for (; i + 4 <= count; i += 4) {
    for (int lane = 0; lane < 4; ++lane) {
      const uint64_t h = lanes[lane] ^ words[i + lane];
      lanes[lane] = ((h << 27) | (h >> 37)) * kMultiplier;
    }
  }
  for (; i < count; ++i) {
    const uint64_t h = lanes[0] ^ words[i];
    lanes[0] = ((h << 27) | (h >> 37)) * kMultiplier;
  }
  uint64_t h = count;
  for (const uint64_t lane : lanes) {
    h = (h ^ lane) * kMultiplier;
    h ^= h >> 29;
  }
  h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9ull;
  h = (h ^ (h >> 27)) * 0x94D049BB133111EBull;
  return h ^ (h >> 31);
}

// A dense strided CPU/CUDA tensor of class Tensor or Parameter with nothing that redirects
// its dispatch (Python subclasses, functionalization, functorch wrappers).
const c10::TensorImpl* plain_impl(PyObject* object) {
  if (!THPVariable_CheckExact(object)) {
    return nullptr;
  }
  const at::Tensor& tensor = THPVariable_Unpack(object);
  if (!tensor.defined()) {
    return nullptr;
  }
  const c10::TensorImpl* impl = tensor.unsafeGetTensorImpl();
  const c10::DispatchKeySet keys = impl->key_set();
  if (keys.has(c10::DispatchKey::Python) || keys.has(c10::DispatchKey::PythonTLSSnapshot) ||
      keys.has(c10::DispatchKey::Functionalize) || keys.has(c10::DispatchKey::FuncTorchBatched) ||
      keys.has(c10::DispatchKey::BatchedNestedTensor) || keys.has(c10::DispatchKey::FuncTorchGradWrapper)) {
    return nullptr;
  }
  const c10::DeviceType device = impl->device_type();
  if ((device != c10::DeviceType::CPU && device != c10::DeviceType::CUDA) || impl->is_nested() ||
      impl->layout() != c10::kStrided || !impl->has_storage()) {
    return nullptr;
  }
  // A storage freed under the tensor (resized to 0 bytes) would be written through a dangling
  // address: the Python check reports it.
  const int64_t numel = impl->numel();
  if (numel > 0 && impl->storage().nbytes() <
                       static_cast<size_t>(impl->storage_offset() + numel) * impl->itemsize()) {
    return nullptr;
  }
  return impl;
}

uint64_t device_word(const c10::TensorImpl* impl) {
  const c10::Device device = impl->device();
  return (static_cast<uint64_t>(static_cast<uint8_t>(device.type())) << 8) |
         static_cast<uint64_t>(static_cast<uint8_t>(device.index() + 1));
}

uint64_t dtype_code(const c10::TensorImpl* impl) {
  return static_cast<uint64_t>(static_cast<int8_t>(impl->dtype().toScalarType()));
}

// fingerprint(*lists) -> (hash, raw bytes) | None
PyObject* fingerprint(PyObject*, PyObject* args) {
  try {
    std::vector<uint64_t> words;
    const Py_ssize_t num_lists = PyTuple_GET_SIZE(args);
    size_t expected_words = static_cast<size_t>(num_lists);
    for (Py_ssize_t l = 0; l < num_lists; ++l) {
      PyObject* list = PyTuple_GET_ITEM(args, l);
      if (PyList_Check(list) || PyTuple_Check(list)) {
        expected_words += 5 * static_cast<size_t>(PySequence_Fast_GET_SIZE(list));  // most tensors: 1-2 dims
      }
    }
    words.reserve(expected_words);
    for (Py_ssize_t l = 0; l < num_lists; ++l) {
      PyObject* list = PyTuple_GET_ITEM(args, l);
      if (!PyList_Check(list) && !PyTuple_Check(list)) {
        Py_RETURN_NONE;
      }
      const Py_ssize_t size = PySequence_Fast_GET_SIZE(list);
      PyObject** items = PySequence_Fast_ITEMS(list);
      words.push_back(kListMarker | static_cast<uint64_t>(size));
      for (Py_ssize_t i = 0; i < size; ++i) {
        const c10::TensorImpl* impl = plain_impl(items[i]);
        if (impl == nullptr) {
          Py_RETURN_NONE;
        }
        auto* mutable_impl = const_cast<c10::TensorImpl*>(impl);
        const auto sizes = impl->sizes();
        const uint64_t flags = (impl->is_contiguous() ? kContiguous : 0) |
                               (mutable_impl->is_inference() ? kInference : 0);
        words.push_back(reinterpret_cast<uint64_t>(impl->numel() ? impl->data() : nullptr));
        words.push_back(static_cast<uint64_t>(impl->numel()));
        words.push_back(dtype_code(impl) | (device_word(impl) << 8) | (flags << 24) |
                        (static_cast<uint64_t>(sizes.size()) << 32));
        for (const int64_t extent : sizes) {
          words.push_back(static_cast<uint64_t>(extent));
        }
      }
    }
    const uint64_t hash = hash_words(words.data(), words.size());
    PyObject* raw = PyBytes_FromStringAndSize(reinterpret_cast<const char*>(words.data()),
                                              static_cast<Py_ssize_t>(words.size() * sizeof(uint64_t)));
    if (raw == nullptr) {
      return nullptr;
    }
    PyObject* key = PyLong_FromUnsignedLongLong(hash);
    if (key == nullptr) {
      Py_DECREF(raw);
      return nullptr;
    }
    PyObject* result = PyTuple_Pack(2, key, raw);
    Py_DECREF(key);
    Py_DECREF(raw);
    return result;
  } catch (const std::exception& error) {
    PyErr_SetString(PyExc_RuntimeError, error.what());
    return nullptr;
  }
}

bool is_float_storage(const c10::TensorImpl* impl) {
  const auto type = impl->dtype().toScalarType();
  return type == c10::ScalarType::Float || type == c10::ScalarType::Half || type == c10::ScalarType::BFloat16;
}

// check_grads(grads, params, written_spans) -> (bytes, bytes) | None
//
// For each i: grads[i] is a plain contiguous float32/float16/bfloat16 tensor of params[i]'s
// shape and device, not overlapping any written span.  ``written_spans`` holds (start, end)
// byte addresses as uint64 pairs, sorted and disjoint (the plan's params and state buffers).
// Returns one byte per grad (its dtype code, the key of the grad-dtype grouping) and each
// grad's data_ptr() as a native-endian uint64 (what the kernels read: the backends need not
// ask each tensor again), or None when anything is off: the ops then run their Python check,
// which names the problem.
PyObject* check_grads(PyObject*, PyObject* args) {
  PyObject *grads, *params, *spans_bytes;
  if (!PyArg_ParseTuple(args, "OOS", &grads, &params, &spans_bytes)) {
    return nullptr;
  }
  try {
    if ((!PyList_Check(grads) && !PyTuple_Check(grads)) || (!PyList_Check(params) && !PyTuple_Check(params))) {
      Py_RETURN_NONE;
    }
    const Py_ssize_t size = PySequence_Fast_GET_SIZE(grads);
    if (size != PySequence_Fast_GET_SIZE(params)) {
      Py_RETURN_NONE;
    }
    const auto* spans = reinterpret_cast<const uint64_t*>(PyBytes_AS_STRING(spans_bytes));
    const size_t num_spans = static_cast<size_t>(PyBytes_GET_SIZE(spans_bytes)) / (2 * sizeof(uint64_t));
    PyObject** grad_items = PySequence_Fast_ITEMS(grads);
    PyObject** param_items = PySequence_Fast_ITEMS(params);
    std::string codes(static_cast<size_t>(size), '\0');
    std::string addresses(static_cast<size_t>(size) * sizeof(uint64_t), '\0');
    for (Py_ssize_t i = 0; i < size; ++i) {
      const c10::TensorImpl* grad = plain_impl(grad_items[i]);
      const c10::TensorImpl* param = plain_impl(param_items[i]);
      if (grad == nullptr || param == nullptr || !is_float_storage(grad) || grad->sizes() != param->sizes() ||
          grad->device() != param->device() || !grad->is_contiguous()) {
        Py_RETURN_NONE;
      }
      codes[static_cast<size_t>(i)] = static_cast<char>(dtype_code(grad));
      const auto start = reinterpret_cast<uint64_t>(grad->data());
      std::memcpy(&addresses[static_cast<size_t>(i) * sizeof(uint64_t)], &start, sizeof(uint64_t));
      if (grad->numel() == 0) {
        continue;
      }
      const uint64_t end = start + static_cast<uint64_t>(grad->numel()) * grad->itemsize();
      // The last written span starting before ``end`` is the only one that can overlap.
      size_t low = 0, high = num_spans;
      while (low < high) {
        const size_t middle = (low + high) / 2;
        if (spans[2 * middle] < end) {
          low = middle + 1;
        } else {
          high = middle;
        }
      }
      if (low > 0 && spans[2 * (low - 1) + 1] > start) {
        Py_RETURN_NONE;
      }
    }
    PyObject* code_bytes = PyBytes_FromStringAndSize(codes.data(), static_cast<Py_ssize_t>(codes.size()));
    PyObject* address_bytes = PyBytes_FromStringAndSize(addresses.data(), static_cast<Py_ssize_t>(addresses.size()));
    PyObject* result = (code_bytes && address_bytes) ? PyTuple_Pack(2, code_bytes, address_bytes) : nullptr;
    Py_XDECREF(code_bytes);
    Py_XDECREF(address_bytes);
    return result;
  } catch (const std::exception& error) {
    PyErr_SetString(PyExc_RuntimeError, error.what());
    return nullptr;
  }
}

// bump_versions(*lists): what torch's own in-place ops do to each written tensor, so that
// autograd raises for a saved tensor modified in place.  Inference tensors have no counter.
PyObject* bump_versions(PyObject*, PyObject* args) {
  try {
    const Py_ssize_t num_lists = PyTuple_GET_SIZE(args);
    for (Py_ssize_t l = 0; l < num_lists; ++l) {
      PyObject* list = PyTuple_GET_ITEM(args, l);
      if (!PyList_Check(list) && !PyTuple_Check(list)) {
        PyErr_SetString(PyExc_TypeError, "bump_versions takes lists or tuples of tensors");
        return nullptr;
      }
      const Py_ssize_t size = PySequence_Fast_GET_SIZE(list);
      PyObject** items = PySequence_Fast_ITEMS(list);
      for (Py_ssize_t i = 0; i < size; ++i) {
        if (!THPVariable_Check(items[i])) {
          PyErr_SetString(PyExc_TypeError, "bump_versions takes lists or tuples of tensors");
          return nullptr;
        }
        c10::TensorImpl* impl = THPVariable_Unpack(items[i]).unsafeGetTensorImpl();
        if (!impl->is_inference()) {
          impl->bump_version();
        }
      }
    }
    Py_RETURN_NONE;
  } catch (const std::exception& error) {
    PyErr_SetString(PyExc_RuntimeError, error.what());
    return nullptr;
  }
}

// same_values(sequence, cached_tuple) -> bool: same length, and each item has exactly the
// type of the cached item (int, float or bool) and compares equal to it.  Lets the ops
// recognise per-tensor arguments (tids, offsets, weight decays, masks) they validated before
// without walking them in Python; a float where an int was, or a numpy scalar, answers False.
PyObject* same_values(PyObject*, PyObject* args) {
  PyObject *values, *cached;
  if (!PyArg_ParseTuple(args, "OO!", &values, &PyTuple_Type, &cached)) {
    return nullptr;
  }
  if (!PyList_Check(values) && !PyTuple_Check(values)) {
    Py_RETURN_FALSE;
  }
  const Py_ssize_t size = PySequence_Fast_GET_SIZE(values);
  if (size != PyTuple_GET_SIZE(cached)) {
    Py_RETURN_FALSE;
  }
  PyObject** items = PySequence_Fast_ITEMS(values);
  for (Py_ssize_t i = 0; i < size; ++i) {
    PyObject* item = items[i];
    PyObject* expected = PyTuple_GET_ITEM(cached, i);
    if (item == expected) {
      continue;  // small ints, True/False and re-used objects
    }
    if (Py_TYPE(item) != Py_TYPE(expected)) {
      Py_RETURN_FALSE;
    }
    if (PyFloat_CheckExact(item)) {
      if (PyFloat_AS_DOUBLE(item) != PyFloat_AS_DOUBLE(expected)) {
        Py_RETURN_FALSE;
      }
    } else if (PyLong_CheckExact(item)) {
      const int equal = PyObject_RichCompareBool(item, expected, Py_EQ);
      if (equal < 0) {
        return nullptr;
      }
      if (!equal) {
        Py_RETURN_FALSE;
      }
    } else {
      Py_RETURN_FALSE;  // bools are singletons (identity above); anything else is not ours
    }
  }
  Py_RETURN_TRUE;
}

PyMethodDef methods[] = {
    {"fingerprint", fingerprint, METH_VARARGS,
     "fingerprint(*lists) -> (hash, raw) of the facts validation depends on, or None for anything but "
     "plain dense CPU/CUDA tensors"},
    {"check_grads", check_grads, METH_VARARGS,
     "check_grads(grads, params, written_spans) -> (grad dtype codes, grad addresses as uint64), or None if "
     "any grad fails a check"},
    {"bump_versions", bump_versions, METH_VARARGS,
     "bump_versions(*lists): bump the autograd version counter of each non-inference tensor"},
    {"same_values", same_values, METH_VARARGS,
     "same_values(sequence, cached_tuple) -> True iff same length, item types and values"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_host", "Host-side helpers of addax_kernels.ops.", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__host() {
  return PyModule_Create(&module_def);
}

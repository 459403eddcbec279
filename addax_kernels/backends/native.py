"""Native backend: the fused pass in ``addax_kernels._C`` (csrc/).

CPU tensors run the OpenMP + SIMD kernels of csrc/cpu, CUDA tensors the kernels of csrc/cuda
(one launch per tensor group over a device-resident tensor table).  The extension takes raw
addresses and metadata, never torch objects, so it is independent of torch's C++ ABI and of
its CUDA build.

Backend protocol (see ``addax_kernels/backends/__init__.py``):

* :func:`prepare` hands the group's addresses, sizes, stream ids, offsets, weight decays and
  state-buffer addresses to the extension once; the returned ``_C.PreparedGroup`` keeps no
  tensor references (on CUDA it owns a device copy of that table).
* :func:`run` does O(1) Python work per call: it passes the seeds and scalars (host values, or
  the address of the device tensor holding them, read by the kernel), the flags and the
  caller's gradient list, whose addresses the extension reads at the group's positions.

The extension is optional: when it is missing or cannot run on a device,
:func:`unavailable_reason` says why.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional, Sequence

import numpy as np
import torch

from .. import rng
from . import FusedJob, Scalars, Seeds, TensorGroup

try:
    from .. import _C
except ImportError as _error:  # not built (ADDAX_KERNELS_NO_NATIVE=1, failed build, or no compiler)
    _C = None
    _IMPORT_ERROR: Optional[BaseException] = _error
else:
    _IMPORT_ERROR = None

__all__ = ["unavailable_reason", "prepare", "run", "prepare_with", "run_with", "philox4x32", "uniforms", "build_info"]

_STORAGE_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_NOISE_KINDS = {"gaussian": 0, "rademacher": 1}
_ROUNDING_MODES = {"nearest": 0, "stochastic": 1}
_CPU_DEVICE = -1
_REBUILD_HINT = (
    "to build it, reinstall from the source checkout or sdist with a C++ compiler and pybind11 present: "
    "`ADDAX_KERNELS_REQUIRE_NATIVE=1 pip install --no-build-isolation --no-deps --force-reinstall <checkout or sdist>` "
    "(that variable makes a failed build stop with its error; docs/native.md)"
)


def _layout_mismatch() -> Optional[str]:
    """The extension reads the scalar vector with its own copy of the SCALAR_* slots: they must agree."""
    from .. import backends as contract

    built = _C.scalar_layout()
    wrong = sorted(name for name, slot in built.items() if getattr(contract, name, None) != slot)
    if wrong:
        return f"addax_kernels._C reads scalar slots {wrong} where backends/__init__.py puts others; {_REBUILD_HINT}"
    return None


_LAYOUT_PROBLEM = _layout_mismatch() if _C is not None else None


def unavailable_reason(device: torch.device) -> Optional[str]:
    """None if the native kernels can run on ``device``, else a sentence saying why not."""
    device = torch.device(device)
    if _C is None:
        return f"the extension addax_kernels._C is not built ({_IMPORT_ERROR}); {_REBUILD_HINT}"
    if _LAYOUT_PROBLEM is not None:
        return _LAYOUT_PROBLEM
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"the native kernels run on cpu and cuda devices, not {device.type}"
    if not _C.has_cuda:
        return f"addax_kernels._C was {_C.cuda_build_note}"
    return _cuda_device_reason(_device_index(device))


def _device_index(device: torch.device) -> int:
    if device.index is not None:
        return device.index
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


@contextlib.contextmanager
def _restoring_current_cuda_device():
    """cuda_check_device selects the device it inspects; give the caller back its own."""
    previous = torch.cuda.current_device()
    try:
        yield
    finally:
        torch.cuda.set_device(previous)


@functools.lru_cache(maxsize=None)
def _cuda_device_reason(index: int) -> Optional[str]:
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    try:
        _C.cuda_device_count()
    except RuntimeError as error:
        return f"the extension's CUDA runtime finds no usable device: {error}"
    with _restoring_current_cuda_device():
        problem = _C.cuda_check_device(index)
    return problem or None


def build_info() -> dict:
    """What the installed extension was built with (for reports and bug reports)."""
    if _C is None:
        return {"built": False, "reason": str(_IMPORT_ERROR)}
    return {
        "built": True,
        "cpu_simd": _C.simd_target(),
        "cuda": bool(_C.has_cuda),
        "cuda_archs": _C.cuda_archs,
        "cuda_note": _C.cuda_build_note,
    }


def _require_extension():
    if _C is None:
        raise RuntimeError(unavailable_reason(torch.device("cpu")))
    return _C


def prepare(group: TensorGroup, params: Sequence[torch.Tensor], states: Sequence[Sequence[torch.Tensor]]):
    """The group's launch table as a ``_C.PreparedGroup`` (addresses and sizes, no tensor references).

    ``params`` and each list of ``states`` are the op's whole lists; the group's tensors are at
    ``group.indices`` (all non-empty, contiguous, on ``group.device``).  On CUDA the table is
    copied to the device here, once.
    """
    device = _CPU_DEVICE if group.device.type == "cpu" else _device_index(group.device)
    return prepare_with(_require_extension(), device, group, params, states)


def prepare_with(module, device: int, group: TensorGroup, params, states):
    """:func:`prepare` through ``module``, an extension built from csrc/bindings.cpp, for its
    device ``device`` (-1: the CPU kernels, else a CUDA device index).  The tests pass the CPU
    emulation of the CUDA kernels (tests/cuda_emulation) this way."""
    indices = group.indices
    return module.prepare(
        device,
        [params[i].data_ptr() for i in indices],
        list(group.numels),
        list(group.offsets),
        list(group.tids),
        list(group.weight_decay),
        list(indices),
        _STORAGE_TYPES[group.param_dtype],
        _STORAGE_TYPES[group.grad_dtype] if group.grad_dtype is not None else 0,
        _STORAGE_TYPES[group.state_dtype] if states else 0,
        [[buffers[i].data_ptr() for i in indices] for buffers in states],
        rng.STATE_ROUNDING_KEYS,
    )


def _current_stream_handle(index: int) -> int:
    return torch.cuda.current_stream(index).cuda_stream


# torch's raw-stream getter skips building a Stream object (a few µs per call); it is private,
# so fall back to the public API where it is missing.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or _current_stream_handle


def run(prepared, group: TensorGroup, job: FusedJob, params, grads, states) -> None:
    """The fused pass over the group ``prepared`` describes, in place (O(1) Python work).

    ``grads`` is the op's whole gradient list (or None); the extension reads the addresses of
    the group's entries, from ``job.grad_addresses`` when the ops layer has them.  Device seeds
    and scalars are passed by address and read by the kernel on the current stream (no host
    sync).  ``params`` and ``states`` are not read here: their addresses were fixed by
    :func:`prepare`.
    """
    if prepared.device == _CPU_DEVICE:
        threads, stream = torch.get_num_threads(), 0
    else:
        threads, stream = 1, _raw_stream(prepared.device)
    run_with(_C, prepared, group, job, grads, threads, stream)


def run_with(module, prepared, group: TensorGroup, job: FusedJob, grads, threads: int, stream: int) -> None:
    """:func:`run` through ``module`` (see :func:`prepare_with`) with ``threads`` OpenMP threads
    (CPU groups) or on the CUDA stream whose handle is ``stream`` (CUDA groups)."""
    seeds, scalars = job.seeds, job.scalars
    if prepared.device != _CPU_DEVICE and job.num_directions > module.cuda_param_directions:
        seeds, scalars = _on_device(seeds, scalars, group.device)
    if seeds.tensor is None:
        seed_values, seed_address, num_seeds = seeds.values, 0, 0
    else:
        seed_values, seed_address, num_seeds = (), seeds.tensor.data_ptr(), seeds.tensor.numel()
    if scalars.tensor is None:
        scalar_values, scalar_address, num_scalars = scalars.values, 0, 0
    else:
        scalar_values, scalar_address, num_scalars = (), scalars.tensor.data_ptr(), scalars.tensor.numel()
    module.run(prepared, grads if job.grad_addresses is None else job.grad_addresses, seed_values, seed_address,
               num_seeds, scalar_values, scalar_address, num_scalars, _NOISE_KINDS[job.noise],
               _ROUNDING_MODES[job.rounding], job.state, job.num_directions, job.has_shift, job.has_grad,
               job.sparsity_threshold, threads, stream)


def _on_device(seeds: Seeds, scalars: Scalars, device: torch.device):
    """Host seeds and scalars as device tensors: a CUDA launch carries at most
    ``_C.cuda_param_directions`` directions by value (more is rare: many-direction ZO steps)."""
    if seeds.tensor is None:
        seeds = Seeds(tensor=torch.tensor([rng.seed_as_int64(seed) for seed in seeds.values], dtype=torch.int64,
                                          device=device))
    if scalars.tensor is None:
        scalars = Scalars(tensor=torch.tensor(scalars.values, dtype=torch.float32, device=device))
    return seeds, scalars


def philox4x32(counter, key) -> np.ndarray:
    """Philox4x32-10 words of csrc/philox.h: counters (n, 4), keys (n, 2) of uint32 -> (n, 4) uint32."""
    module = _require_extension()
    counter = np.asarray(counter.cpu() if isinstance(counter, torch.Tensor) else counter, dtype=np.uint64)
    key = np.asarray(key.cpu() if isinstance(key, torch.Tensor) else key, dtype=np.uint64)
    shape = np.broadcast_shapes(counter.shape[:-1], key.shape[:-1])
    counter = np.broadcast_to(counter, shape + (4,)).reshape(-1, 4).astype(np.uint32)
    key = np.broadcast_to(key, shape + (2,)).reshape(-1, 2).astype(np.uint32)
    return module.philox4x32(counter, key).reshape(shape + (4,))


def uniforms(words) -> np.ndarray:
    """``u = (2 * (w >> 9) + 1) * 2**-24`` of csrc/philox.h for uint32 words."""
    module = _require_extension()
    words = np.asarray(words.cpu() if isinstance(words, torch.Tensor) else words, dtype=np.uint64).astype(np.uint32)
    return module.uniforms(words)

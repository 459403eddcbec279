"""Native backend: the fused pass in ``addax_kernels._C`` (csrc/).

CPU tensors run the OpenMP + SIMD kernels of csrc/cpu, CUDA tensors the multi-tensor-apply
kernels of csrc/cuda, both generating z with csrc/philox.h.  The extension takes raw
addresses and metadata, never torch objects, so it is independent of torch's C++ ABI and of
its CUDA build; this module turns tensors into those arguments.  The extension is optional:
when it is missing or cannot run on a device, :func:`unavailable_reason` says why.
"""

from __future__ import annotations

import contextlib
import functools
from typing import List, Optional

import numpy as np
import torch

from . import FusedJob

try:
    from .. import _C
except ImportError as _error:  # not built (ADDAX_KERNELS_NO_NATIVE=1, failed build, or no compiler)
    _C = None
    _IMPORT_ERROR: Optional[BaseException] = _error
else:
    _IMPORT_ERROR = None

__all__ = ["unavailable_reason", "fused_update_", "philox4x32", "uniforms", "build_info"]

_STORAGE_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_NOISE_KINDS = {"gaussian": 0, "rademacher": 1}
_ROUNDING_MODES = {"nearest": 0, "stochastic": 1}
_REBUILD_HINT = (
    "to build it, reinstall from the source checkout or sdist with a C++ compiler and pybind11 present: "
    "`ADDAX_KERNELS_REQUIRE_NATIVE=1 pip install --no-build-isolation --no-deps --force-reinstall <checkout or sdist>` "
    "(that variable makes a failed build stop with its error; docs/native.md)"
)


def unavailable_reason(device: torch.device) -> Optional[str]:
    """None if the native kernels can run on ``device``, else a sentence saying why not."""
    device = torch.device(device)
    if _C is None:
        return f"the extension addax_kernels._C is not built ({_IMPORT_ERROR}); {_REBUILD_HINT}"
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"the native kernels run on cpu and cuda devices, not {device.type}"
    if not _C.has_cuda:
        return f"addax_kernels._C was {_C.cuda_build_note}"
    index = device.index if device.index is not None else (torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return _cuda_device_reason(index)


@contextlib.contextmanager
def _restoring_current_cuda_device():
    """The extension calls cudaSetDevice before each launch; give the caller back its device."""
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


def fused_update_(params: List[torch.Tensor], grads: Optional[List[torch.Tensor]], job: FusedJob) -> None:
    """The fused pass of ``backends/__init__.py`` over tensors of one device and dtype, in place."""
    module = _require_extension()
    indices = [i for i, param in enumerate(params) if param.numel()]
    if not indices:
        return
    if len(indices) != len(params):
        params = [params[i] for i in indices]
        grads = [grads[i] for i in indices] if grads is not None else None
        job = job.select(indices)
    device = params[0].device
    has_grad = job.has_grad and grads is not None
    arguments = dict(
        params=[param.data_ptr() for param in params],
        grads=[grad.data_ptr() for grad in grads] if has_grad else [],
        numels=[param.numel() for param in params],
        offsets=list(job.offsets),
        tids=list(job.tids),
        weight_decay=list(job.weight_decay),
        param_type=_STORAGE_TYPES[params[0].dtype],
        grad_type=_STORAGE_TYPES[grads[0].dtype] if has_grad else 0,
        noise=_NOISE_KINDS[job.noise],
        rounding=_ROUNDING_MODES[job.rounding],
        seeds=list(job.seeds[: max(1, job.num_directions)]),
        num_directions=job.num_directions,
        has_shift=job.has_shift,
        has_grad=has_grad,
        # The reference applies the update step when any tensor of the group needs it.
        needs_update=job.num_directions > 0 or has_grad or any(job.weight_decay),
    )
    if device.type == "cpu":
        if job.scalars.on_device:
            scalars = job.scalars.tensor.to(torch.float32).tolist()  # a CPU tensor: no sync involved
        else:
            scalars = list(job.scalars.values)
        module.fused_update_cpu(**arguments, scalars=scalars, num_threads=torch.get_num_threads())
        return
    if device.type != "cuda" or not module.has_cuda:
        raise RuntimeError(f"native backend cannot run on {device}: {unavailable_reason(device)}")
    if job.num_directions > module.max_cuda_directions:
        raise ValueError(
            f"the native CUDA kernels take at most {module.max_cuda_directions} directions per call, "
            f"got {job.num_directions}: split the seeds or use backend='triton'"
        )
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(index).cuda_stream
    with _restoring_current_cuda_device():
        if job.scalars.on_device:
            scalar_tensor = job.scalars.tensor.to(device=device, dtype=torch.float32).contiguous()
            module.fused_update_cuda(index, stream, **arguments, host_scalars=[],
                                     device_scalars=scalar_tensor.data_ptr())
            # The kernel reads the scalars later on `stream`; keep the block from being reused before.
            scalar_tensor.record_stream(torch.cuda.current_stream(index))
        else:
            module.fused_update_cuda(index, stream, **arguments, host_scalars=list(job.scalars.values),
                                     device_scalars=0)

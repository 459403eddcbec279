"""The public in-place ops (SPEC §2): validate, pack scalars, pick a backend, dispatch.

Nothing is modified unless every argument is valid: all checks run before the first kernel.
Tensors are grouped by (parameter dtype, gradient dtype) and each group goes to the backend
in one call, which launches as few kernels as it can.

All three ops route through one custom op, ``addax_kernels::fused_update_``, registered with
``torch.library`` and declared to mutate ``params``, so they trace under ``torch.compile``.
Eager calls skip the custom-op dispatcher (it costs tens of microseconds per call) and run
the same implementation directly.
"""

from __future__ import annotations

import bisect
import math
import numbers
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import backends as _backends
from . import rng as _rng
from .backends import FusedJob, Scalars

__all__ = [
    "perturb_",
    "zo_update_",
    "addax_update_",
    "noise",
    "available_backends",
    "backend_report",
    "resolve_backend",
    "BACKEND_ENV_VAR",
]

BACKEND_ENV_VAR = "ADDAX_KERNELS_BACKEND"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ROUNDING_MODES = ("nearest", "stochastic")
_FLOAT32_MAX = float(np.finfo(np.float32).max)

TensorList = Union[torch.Tensor, Sequence[torch.Tensor]]
ScalarLike = Union[float, int, torch.Tensor]


# ----------------------------------------------------------------------------- backends


def _device_backend_order(device: torch.device) -> Tuple[str, ...]:
    if device.type == "cuda":
        return ("triton", "native", "reference")
    # Triton on the CPU is its interpreter: correct but far slower than the reference.
    return ("native", "reference")


def backend_report(device: Union[str, torch.device] = "cpu") -> Dict[str, str]:
    """For each backend, ``"available"`` or the reason it cannot run on ``device``."""
    device = torch.device(device)
    return {
        name: (_backends.unavailable_reason(name, device) or "available") for name in _backends.BACKEND_NAMES
    }


def available_backends(device: Union[str, torch.device] = "cpu") -> List[str]:
    """Names of the backends that can run on ``device``."""
    return [name for name, state in backend_report(device).items() if state == "available"]


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for ``backend`` ("auto" or a name) on ``device``.

    ``"auto"`` honours the ``ADDAX_KERNELS_BACKEND`` environment variable, then picks the
    fastest available backend for the device.  An explicitly named backend that cannot run
    raises a RuntimeError saying why.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    return _resolve_backend(backend, str(device), os.environ.get(BACKEND_ENV_VAR, "").strip())


# Under torch.compile the choice is made once at trace time and baked into the graph.
@torch.compiler.assume_constant_result
def _resolve_backend(backend: str, device_name: str, override: str) -> str:
    device = torch.device(device_name)
    if backend == "auto":
        if override and override != "auto":
            if override not in _backends.BACKEND_NAMES:
                raise ValueError(
                    f"{BACKEND_ENV_VAR}={override!r} is not one of {('auto',) + _backends.BACKEND_NAMES}"
                )
            backend = override
        else:
            for name in _device_backend_order(device):
                if _backends.unavailable_reason(name, device) is None:
                    return name
            raise RuntimeError(f"no addax_kernels backend can run on {device}")
    if backend not in _backends.BACKEND_NAMES:
        raise ValueError(f"backend must be one of {('auto',) + _backends.BACKEND_NAMES}, got {backend!r}")
    reason = _backends.unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} cannot run on {device}: {reason}")
    return backend


# ----------------------------------------------------------------------------- validation


def _as_tensor_list(tensors: TensorList, name: str) -> List[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    if isinstance(tensors, (str, bytes)) or not hasattr(tensors, "__iter__"):
        raise TypeError(f"{name} must be a Tensor or a sequence of Tensors, got {type(tensors).__name__}")
    result = list(tensors)
    for index, tensor in enumerate(result):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}[{index}] must be a Tensor, got {type(tensor).__name__}")
    return result


def _memory_spans(tensors: List[torch.Tensor]) -> List[Tuple[int, int, int]]:
    """Sorted ``(first byte, end byte, index)`` of the non-empty tensors (none while tracing)."""
    if torch.compiler.is_compiling():  # fake tensors have no storage addresses
        return []
    spans = []
    for index, tensor in enumerate(tensors):
        if tensor.numel():
            start = tensor.data_ptr()
            spans.append((start, start + tensor.numel() * tensor.element_size(), index))
    return sorted(spans)


def _check_params(params: List[torch.Tensor]) -> torch.device:
    if not params:
        raise ValueError("params is empty")
    device = params[0].device
    for index, param in enumerate(params):
        where = f"params[{index}] (shape {tuple(param.shape)}, {param.dtype}, {param.device})"
        if param.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{where}: dtype must be float32, float16 or bfloat16")
        if param.device != device:
            raise ValueError(f"{where}: all tensors of one call must be on one device, params[0] is on {device}")
        if not param.is_contiguous():
            raise ValueError(f"{where}: must be contiguous (call .contiguous() and copy back)")
    spans = _memory_spans(params)
    for (_, end_a, index_a), (start_b, _, index_b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise ValueError(
                f"params[{index_a}] and params[{index_b}] overlap in memory: each element must be updated once"
            )
    return device


def _check_grads(grads: TensorList, params: List[torch.Tensor]) -> List[torch.Tensor]:
    grads = _as_tensor_list(grads, "grads")
    if len(grads) != len(params):
        raise ValueError(f"grads has {len(grads)} tensors for {len(params)} params")
    for index, (grad, param) in enumerate(zip(grads, params)):
        where = f"grads[{index}] (shape {tuple(grad.shape)}, {grad.dtype}, {grad.device})"
        if grad.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{where}: dtype must be float32, float16 or bfloat16")
        if grad.shape != param.shape:
            raise ValueError(f"{where}: shape differs from params[{index}] {tuple(param.shape)}")
        if grad.device != param.device:
            raise ValueError(f"{where}: must be on the params' device {param.device}")
        if not grad.is_contiguous():
            raise ValueError(f"{where}: must be contiguous")
    # Kernels update params in place while reading grads: a grad sharing memory with any
    # param would be read after part of it was already overwritten.
    # Params do not overlap each other (checked), so sorted by start their ends are sorted too:
    # only the last param starting before a grad's end can overlap it.
    param_spans = _memory_spans(params)
    param_starts = [start for start, _, _ in param_spans]
    for grad_start, grad_end, grad_index in _memory_spans(grads):
        candidate = bisect.bisect_left(param_starts, grad_end) - 1
        if candidate >= 0 and param_spans[candidate][1] > grad_start:
            raise ValueError(f"grads[{grad_index}] overlaps params[{param_spans[candidate][2]}] in memory")
    return grads


def _check_int_list(values, count: int, name: str, default, check) -> Tuple[int, ...]:
    if values is None:
        return tuple(default(i) for i in range(count))
    if isinstance(values, (numbers.Integral, np.integer)) and not isinstance(values, bool):
        values = [values]
    values = list(values)
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} entries for {count} tensors")
    return tuple(check(value, f"{name}[{i}]") for i, value in enumerate(values))


def _check_offset(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
        raise TypeError(f"{name} must be a non-negative int, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be non-negative, got {value}")
    return int(value)


def _check_offsets(offsets, params: List[torch.Tensor]) -> Tuple[int, ...]:
    result = _check_int_list(offsets, len(params), "offsets", lambda i: 0, _check_offset)
    for index, (offset, param) in enumerate(zip(result, params)):
        if offset + param.numel() > 2**63:
            raise ValueError(f"offsets[{index}] + numel of params[{index}] exceeds 2**63")
    return result


def _check_choice(value, name: str, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _finite_float32(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"{name} must be a float or a 0-dim tensor, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if abs(value) > _FLOAT32_MAX:
        raise ValueError(f"{name}={value} overflows float32")
    return float(np.float32(value))


def _check_scalar(value, name: str, device: torch.device) -> Union[float, torch.Tensor]:
    """A finite float32-representable float, or a 0-dim float32 tensor on ``device``.

    Accelerator tensors are not checked for NaN: that would cost a host sync every step.
    0-dim CPU tensors are read on the host and checked like floats (under torch.compile
    they stay tensors, since reading them would break the graph).
    """
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"{name} must be a 0-dim tensor, got shape {tuple(value.shape)}")
        if not (value.dtype.is_floating_point or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be a real number, got a {value.dtype} tensor")
        if value.device.type == "cpu" and not torch.compiler.is_compiling():
            return _finite_float32(value.item(), name)  # a host value: checking it costs no sync
        if value.device == device:
            return value.detach().to(torch.float32)
        raise ValueError(f"{name} is on {value.device} but params are on {device}")
    return _finite_float32(value, name)


def _check_weight_decay(weight_decay, decay_mask, count: int) -> Tuple[float, ...]:
    if isinstance(weight_decay, (numbers.Real, np.floating)) and not isinstance(weight_decay, bool):
        decays = [weight_decay] * count
    else:
        decays = list(weight_decay)
        if len(decays) != count:
            raise ValueError(f"weight_decay has {len(decays)} entries for {count} tensors")
    decays = [_finite_float32(value, f"weight_decay[{i}]") for i, value in enumerate(decays)]
    if decay_mask is not None:
        mask = list(decay_mask)
        if len(mask) != count:
            raise ValueError(f"decay_mask has {len(mask)} entries for {count} tensors")
        for index, flag in enumerate(mask):
            if not isinstance(flag, (bool, np.bool_)):
                raise TypeError(f"decay_mask[{index}] must be a bool, got {type(flag).__name__}")
        decays = [value if flag else 0.0 for value, flag in zip(decays, mask)]
    return tuple(decays)


def _pack_scalars(entries: List[Union[float, torch.Tensor]], device: torch.device) -> Scalars:
    if not any(isinstance(entry, torch.Tensor) for entry in entries):
        return Scalars(values=tuple(float(entry) for entry in entries))
    parts = [
        entry if isinstance(entry, torch.Tensor) else torch.full((), entry, dtype=torch.float32, device=device)
        for entry in entries
    ]
    return Scalars(tensor=torch.stack(parts))


def _product(a: Union[float, torch.Tensor], b: Union[float, torch.Tensor], name: str):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a * b
    return _finite_float32(a * b, name)


# ----------------------------------------------------------------------------- dispatch


def _encode_seed(seed: int) -> int:
    """u64 → the int64 with the same bits (custom-op schemas carry signed ints)."""
    return seed - 2**64 if seed >= 2**63 else seed


def _decode_seed(value: int) -> int:
    return value + 2**64 if value < 0 else value


def _run_groups(params, grads, job: FusedJob, backend: str) -> None:
    module = _backends.load(backend)
    groups: Dict[Tuple[torch.dtype, Optional[torch.dtype]], List[int]] = {}
    for index, param in enumerate(params):
        if param.numel():
            key = (param.dtype, grads[index].dtype if grads is not None else None)
            groups.setdefault(key, []).append(index)
    with torch.no_grad():
        for indices in groups.values():
            module.fused_update_(
                [params[i] for i in indices],
                [grads[i] for i in indices] if grads is not None else None,
                job.select(indices),
            )


@torch.library.custom_op("addax_kernels::fused_update_", mutates_args=("params",))
def _fused_update_op(
    params: List[torch.Tensor],
    grads: List[torch.Tensor],
    seeds: List[int],
    tids: List[int],
    offsets: List[int],
    weight_decay: List[float],
    scalar_values: List[float],
    scalar_tensor: Optional[torch.Tensor],
    has_shift: bool,
    num_directions: int,
    has_grad: bool,
    noise_kind: str,
    rounding: str,
    backend: str,
) -> None:
    scalars = Scalars(values=tuple(scalar_values)) if scalar_tensor is None else Scalars(tensor=scalar_tensor)
    job = FusedJob(
        seeds=tuple(_decode_seed(s) for s in seeds),
        tids=tuple(tids),
        offsets=tuple(offsets),
        weight_decay=tuple(weight_decay),
        scalars=scalars,
        has_shift=has_shift,
        num_directions=num_directions,
        has_grad=has_grad,
        noise=noise_kind,
        rounding=rounding,
    )
    _run_groups(params, grads if has_grad else None, job, backend)


@_fused_update_op.register_fake
def _fused_update_fake(params, grads, seeds, tids, offsets, weight_decay, scalar_values, scalar_tensor,
                       has_shift, num_directions, has_grad, noise_kind, rounding, backend) -> None:
    return None


def _dispatch(params, grads, job: FusedJob, backend: str) -> None:
    params = [p.detach() for p in params]
    grads = [g.detach() for g in grads] if grads is not None else None
    if torch.compiler.is_compiling():
        _fused_update_op(
            params,
            grads if grads is not None else [],
            [_encode_seed(s) for s in job.seeds],
            list(job.tids),
            list(job.offsets),
            list(job.weight_decay),
            list(job.scalars.values) if job.scalars.values is not None else [],
            job.scalars.tensor,
            job.has_shift,
            job.num_directions,
            job.has_grad,
            job.noise,
            job.rounding,
            backend,
        )
    else:
        _run_groups(params, grads, job, backend)


def _prepare(params, tids, offsets, noise, rounding, backend):
    params = _as_tensor_list(params, "params")
    device = _check_params(params)
    tids = _check_int_list(tids, len(params), "tids", lambda i: i, _rng.check_tid)
    offsets = _check_offsets(offsets, params)
    _check_choice(noise, "noise", _rng.NOISE_KINDS)
    _check_choice(rounding, "rounding", ROUNDING_MODES)
    return params, device, tids, offsets


# ----------------------------------------------------------------------------- public ops


def perturb_(
    params: TensorList,
    seed: int,
    scale: ScalarLike,
    *,
    tids: Optional[Sequence[int]] = None,
    offsets: Optional[Sequence[int]] = None,
    noise: str = "gaussian",
    rounding: str = "nearest",
    backend: str = "auto",
) -> None:
    """In place, θ ← θ + scale·z(seed) for every tensor in ``params`` (SPEC §2)."""
    params, device, tids, offsets = _prepare(params, tids, offsets, noise, rounding, backend)
    seed = _rng.check_seed(seed)
    scale = _check_scalar(scale, "scale", device)
    backend = resolve_backend(backend, device)
    job = FusedJob(
        seeds=(seed,),
        tids=tids,
        offsets=offsets,
        weight_decay=(0.0,) * len(params),
        scalars=_pack_scalars([scale, 0.0, 0.0], device),
        has_shift=True,
        num_directions=0,
        has_grad=False,
        noise=noise,
        rounding=rounding,
    )
    _dispatch(params, None, job, backend)


def zo_update_(
    params: TensorList,
    seeds: Union[int, Sequence[int]],
    coeffs: Union[ScalarLike, Sequence[ScalarLike]],
    lr: ScalarLike,
    *,
    restore: Optional[ScalarLike] = None,
    weight_decay: Union[float, Sequence[float]] = 0.0,
    decay_mask: Optional[Sequence[bool]] = None,
    tids: Optional[Sequence[int]] = None,
    offsets: Optional[Sequence[int]] = None,
    noise: str = "gaussian",
    rounding: str = "nearest",
    backend: str = "auto",
) -> None:
    """In place, θ ← θ' − lr·(Σ_k coeffs[k]·z(seeds[k]) + wd·θ'), θ' = θ + restore·z(seeds[0]).

    Without ``restore``, θ' = θ.  ``coeffs[k]`` is typically the projected gradient of
    direction k divided by the number of directions.  One rounding to the storage dtype.
    """
    params, device, tids, offsets = _prepare(params, tids, offsets, noise, rounding, backend)
    seed_list = [seeds] if isinstance(seeds, (numbers.Integral, np.integer)) and not isinstance(seeds, bool) else list(seeds)
    if not seed_list:
        raise ValueError("seeds is empty: give at least one direction")
    seed_list = [_rng.check_seed(s, f"seeds[{k}]") for k, s in enumerate(seed_list)]
    coeff_list = [coeffs] if isinstance(coeffs, (numbers.Real, torch.Tensor)) else list(coeffs)
    if len(coeff_list) != len(seed_list):
        raise ValueError(f"coeffs has {len(coeff_list)} entries for {len(seed_list)} seeds")
    coeff_list = [_check_scalar(c, f"coeffs[{k}]", device) for k, c in enumerate(coeff_list)]
    lr = _check_scalar(lr, "lr", device)
    shift = 0.0 if restore is None else _check_scalar(restore, "restore", device)
    decays = _check_weight_decay(weight_decay, decay_mask, len(params))
    backend = resolve_backend(backend, device)
    job = FusedJob(
        seeds=tuple(seed_list),
        tids=tids,
        offsets=offsets,
        weight_decay=decays,
        scalars=_pack_scalars([shift, lr, 0.0] + coeff_list, device),
        has_shift=restore is not None,
        num_directions=len(seed_list),
        has_grad=False,
        noise=noise,
        rounding=rounding,
    )
    _dispatch(params, None, job, backend)


def addax_update_(
    params: TensorList,
    grads: TensorList,
    seed: int,
    zo_grad: ScalarLike,
    lr: ScalarLike,
    alpha: float,
    *,
    weight_decay: Union[float, Sequence[float]] = 0.0,
    decay_mask: Optional[Sequence[bool]] = None,
    tids: Optional[Sequence[int]] = None,
    offsets: Optional[Sequence[int]] = None,
    noise: str = "gaussian",
    rounding: str = "nearest",
    backend: str = "auto",
) -> None:
    """In place, θ ← θ − lr·(α·zo_grad·z(seed) + (1−α)·grad + wd·θ) (SPEC §2)."""
    params, device, tids, offsets = _prepare(params, tids, offsets, noise, rounding, backend)
    grads = _check_grads(grads, params)
    seed = _rng.check_seed(seed)
    zo_grad = _check_scalar(zo_grad, "zo_grad", device)
    lr = _check_scalar(lr, "lr", device)
    alpha = _finite_float32(alpha, "alpha")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    decays = _check_weight_decay(weight_decay, decay_mask, len(params))
    backend = resolve_backend(backend, device)
    zo_coeff = _product(alpha, zo_grad, "alpha * zo_grad")
    job = FusedJob(
        seeds=(seed,),
        tids=tids,
        offsets=offsets,
        weight_decay=decays,
        scalars=_pack_scalars([0.0, lr, _finite_float32(1.0 - alpha, "1 - alpha"), zo_coeff], device),
        has_shift=False,
        num_directions=1,
        has_grad=True,
        noise=noise,
        rounding=rounding,
    )
    _dispatch(params, grads, job, backend)


def noise(
    shape,
    seed: int,
    tid: int = 0,
    offset: int = 0,
    *,
    noise: str = "gaussian",
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device, None] = None,
    backend: str = "reference",
) -> torch.Tensor:
    """z materialized for a tensor of ``shape`` (for tests and references).

    ``backend="reference"`` (default) evaluates SPEC §1 in PyTorch (in float64 when
    ``dtype=torch.float64``); any other backend runs its own kernel as θ = 0 + 1·z on a
    float32 buffer, which is exactly the z that backend uses in the fused ops.
    """
    if backend == "reference":
        return _rng.noise(shape, seed, tid, offset, noise=noise, dtype=dtype, device=device)
    if not dtype.is_floating_point:
        raise TypeError(f"noise dtype must be floating, got {dtype}")
    if dtype == torch.float64:
        raise ValueError("float64 noise comes from the reference backend only")
    out = torch.zeros(shape if not isinstance(shape, numbers.Integral) else (int(shape),),
                      dtype=torch.float32, device=device)
    perturb_(out, seed, 1.0, tids=[tid], offsets=[offset], noise=noise, backend=backend)
    return out.to(dtype)

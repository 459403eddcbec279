"""The public in-place ops (SPEC §2): validate, pack scalars and seeds, pick a backend, dispatch.

Nothing is modified unless every argument is valid: all checks run before the first kernel.
Tensors are grouped by (parameter dtype, gradient dtype, state dtype) and each group goes to
the backend in one call (``backends/__init__.py`` states the pass every op reduces to).  After
the pass the version counter of every written tensor is bumped, so autograd notices the
in-place update as it does for torch's own in-place ops.

All ops route through one custom op, ``addax_kernels::fused_update_``, registered with
``torch.library`` and declared to mutate the parameters and state buffers, so they trace
under ``torch.compile``.  Eager calls skip the custom-op dispatcher (it costs tens of
microseconds per call) and run the same implementation directly.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import backends as _backends
from . import rng as _rng
from .backends import (
    SCALAR_ADAM_BC2_SQRT,
    SCALAR_ADAM_BETA2,
    SCALAR_ADAM_EPS,
    SCALAR_ADAM_W1,
    SCALAR_ADAM_W2,
    SCALAR_FIRST_COEFF,
    SCALAR_GRAD_COEFF,
    SCALAR_LR,
    SCALAR_MOMENTUM,
    SCALAR_SHIFT,
    STATE_ADAM,
    STATE_BUFFERS,
    STATE_DTYPES,
    STATE_MOMENTUM,
    STATE_NONE,
    FusedJob,
    Scalars,
    Seeds,
    TensorGroup,
)

__all__ = [
    "perturb_",
    "zo_update_",
    "addax_update_",
    "zo_momentum_update_",
    "zo_adam_update_",
    "noise",
    "available_backends",
    "backend_report",
    "resolve_backend",
    "BACKEND_ENV_VAR",
    "SUPPORTED_DTYPES",
    "ROUNDING_MODES",
]

BACKEND_ENV_VAR = "ADDAX_KERNELS_BACKEND"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ROUNDING_MODES = ("nearest", "stochastic")
_FLOAT32_MAX = float(np.finfo(np.float32).max)

TensorList = Union[torch.Tensor, Sequence[torch.Tensor]]
ScalarLike = Union[float, int, torch.Tensor]
SeedLike = Union[int, torch.Tensor]


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
    fastest available backend for the device; when that is the slow reference backend because
    a faster one is missing, one warning per process and device says why.  An explicitly named
    backend that cannot run raises a RuntimeError saying why.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    return _resolve_backend(backend, str(device), os.environ.get(BACKEND_ENV_VAR, "").strip())


_FALLBACK_WARNED = set()


def _warn_reference_fallback(device: torch.device) -> None:
    if device.type in _FALLBACK_WARNED:
        return
    _FALLBACK_WARNED.add(device.type)
    reasons = "; ".join(
        f"{name}: {_backends.unavailable_reason(name, device)}" for name in _device_backend_order(device)[:-1]
    )
    warnings.warn(
        f"addax_kernels: backend='auto' fell back to the pure-PyTorch reference backend on {device.type}, "
        f"which is tens of times slower ({reasons}). Set {BACKEND_ENV_VAR}=reference to choose it knowingly.",
        RuntimeWarning,
        stacklevel=4,
    )


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
                    if name == "reference":
                        _warn_reference_fallback(device)
                    return name
            raise RuntimeError(f"no addax_kernels backend can run on {device}")
    if backend not in _backends.BACKEND_NAMES:
        raise ValueError(f"backend must be one of {('auto',) + _backends.BACKEND_NAMES}, got {backend!r}")
    reason = _backends.unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} cannot run on {device}: {reason}")
    return backend


# ----------------------------------------------------------------------------- scalar checks


def _is_integer(value) -> bool:
    return isinstance(value, (numbers.Integral, np.integer)) and not isinstance(value, (bool, np.bool_))


def _as_real(value, name: str) -> float:
    """A Python float from a real number (numpy scalars and 0-d arrays included; bool refused)."""
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "fiu":
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def _finite_float32(value, name: str) -> float:
    value = _as_real(value, name)
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


def _check_unit_interval(value, name: str, open_right: bool = False) -> float:
    value = _finite_float32(value, name)
    if not (0.0 <= value < 1.0 if open_right else 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be in [0, 1{')' if open_right else ']'}, got {value}")
    return value


def _check_choice(value, name: str, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _scalar_list(values, name: str) -> list:
    """A scalar or a sequence of scalars as a list (a 1-D array or tensor counts as a sequence)."""
    if isinstance(values, torch.Tensor):
        return [values] if values.dim() == 0 else list(values.unbind(0))
    if isinstance(values, np.ndarray):
        return [values] if values.ndim == 0 else list(values)
    if isinstance(values, (numbers.Real, np.floating, np.integer)):
        return [values]
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name} must be a number, a 0-dim tensor or a sequence of them, got {type(values).__name__}")
    return list(values)


# ----------------------------------------------------------------------------- seeds


def _seed_list(seeds, device: torch.device, name: str) -> list:
    """Seeds as a list of ints and 0-dim int64 tensors on ``device`` (a 1-D tensor is K seeds)."""
    if isinstance(seeds, torch.Tensor) and seeds.dim() == 1:
        items = list(seeds.unbind(0))
    elif isinstance(seeds, torch.Tensor) or _is_integer(seeds):
        items = [seeds]
    elif isinstance(seeds, (str, bytes, bool)) or not hasattr(seeds, "__iter__"):
        raise TypeError(f"{name} must be an int, a 0-dim int64 tensor or a sequence of them, "
                        f"got {type(seeds).__name__} {seeds!r}")
    else:
        items = list(seeds)
    return [_rng.check_seed(seed, f"{name}[{k}]" if len(items) > 1 else name, device) for k, seed in enumerate(items)]


def _pack_seeds(direction_seeds: list, rounding_seed, device: torch.device) -> Seeds:
    entries = list(direction_seeds) + [rounding_seed]
    if not any(isinstance(entry, torch.Tensor) for entry in entries):
        return Seeds(values=tuple(entries))
    parts = [
        entry.reshape(()) if isinstance(entry, torch.Tensor)
        else torch.full((), _rng.seed_as_int64(entry), dtype=torch.int64, device=device)
        for entry in entries
    ]
    return Seeds(tensor=torch.stack(parts))


def _pack_scalars(entries: List[Union[float, torch.Tensor]], device: torch.device) -> Scalars:
    if not any(isinstance(entry, torch.Tensor) for entry in entries):
        return Scalars(values=tuple(float(entry) for entry in entries))
    parts = [
        entry.reshape(()).to(torch.float32) if isinstance(entry, torch.Tensor)
        else torch.full((), entry, dtype=torch.float32, device=device)
        for entry in entries
    ]
    return Scalars(tensor=torch.stack(parts))


def _product(a: Union[float, torch.Tensor], b: Union[float, torch.Tensor], name: str):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a * b
    return _finite_float32(a * b, name)


# ----------------------------------------------------------------------------- tensor checks


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


def _describe(tensor: torch.Tensor, name: str, index: int) -> str:
    return f"{name}[{index}] (shape {tuple(tensor.shape)}, {tensor.dtype}, {tensor.device})"


def _check_storage(tensor: torch.Tensor, name: str, index: int, dtypes, written: bool) -> None:
    if tensor.dtype not in dtypes:
        allowed = ", ".join(str(dtype).replace("torch.", "") for dtype in dtypes)
        raise TypeError(f"{_describe(tensor, name, index)}: dtype must be one of {allowed}")
    if tensor.device.type == "meta":
        raise ValueError(f"{_describe(tensor, name, index)}: a meta tensor has no data to update or read")
    if not tensor.is_contiguous():
        raise ValueError(f"{_describe(tensor, name, index)}: must be contiguous (call .contiguous() and copy back)")
    if written and tensor.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{_describe(tensor, name, index)} is an inference tensor: it can be updated in place only "
            "inside torch.inference_mode() (as for torch's own in-place ops); clone it outside to train it"
        )


def _check_params(params: List[torch.Tensor]) -> torch.device:
    if not params:
        raise ValueError("params is empty")
    device = params[0].device
    for index, param in enumerate(params):
        _check_storage(param, "params", index, SUPPORTED_DTYPES, written=True)
        if param.device != device:
            raise ValueError(f"{_describe(param, 'params', index)}: all tensors of one call must be on one "
                             f"device, params[0] is on {device}")
    return device


def _check_companions(tensors, params: List[torch.Tensor], name: str, dtypes, written: bool) -> List[torch.Tensor]:
    """Gradients or state buffers: one per param, same shape and device, contiguous."""
    tensors = _as_tensor_list(tensors, name)
    if len(tensors) != len(params):
        raise ValueError(f"{name} has {len(tensors)} tensors for {len(params)} params")
    for index, (tensor, param) in enumerate(zip(tensors, params)):
        _check_storage(tensor, name, index, dtypes, written)
        if tensor.shape != param.shape:
            raise ValueError(f"{_describe(tensor, name, index)}: shape differs from params[{index}] {tuple(param.shape)}")
        if tensor.device != param.device:
            raise ValueError(f"{_describe(tensor, name, index)}: must be on the params' device {param.device}")
    return tensors


def _memory_spans(tensors: List[torch.Tensor], name: str) -> List[Tuple[int, int, str, int]]:
    """``(first byte, end byte, list name, index)`` of the non-empty tensors."""
    spans = []
    for index, tensor in enumerate(tensors):
        if tensor.numel():
            start = tensor.data_ptr()
            spans.append((start, start + tensor.numel() * tensor.element_size(), name, index))
    return spans


def _check_no_overlap(written: Dict[str, List[torch.Tensor]], read: Dict[str, List[torch.Tensor]]) -> None:
    """Each written element is written once, and nothing read is written meanwhile.

    Written tensors (params, state buffers) must not share memory with each other; read-only
    tensors (grads) must not share memory with any written one, since the kernels update in
    place while reading.  Skipped while tracing: fake tensors have no addresses.
    """
    if torch.compiler.is_compiling():
        return
    written_spans = sorted(span for name, tensors in written.items() for span in _memory_spans(tensors, name))
    for (_, end_a, name_a, index_a), (start_b, _, name_b, index_b) in zip(written_spans, written_spans[1:]):
        if start_b < end_a:
            raise ValueError(f"{name_a}[{index_a}] and {name_b}[{index_b}] overlap in memory: each element "
                             "must be updated once")
    # Written spans do not overlap, so sorted by start their ends are sorted too: only the last
    # written span starting before a read span's end can overlap it.
    starts = [start for start, _, _, _ in written_spans]
    import bisect

    for name, tensors in read.items():
        for start, end, _, index in _memory_spans(tensors, name):
            candidate = bisect.bisect_left(starts, end) - 1
            if candidate >= 0 and written_spans[candidate][1] > start:
                _, _, other_name, other_index = written_spans[candidate]
                raise ValueError(f"{name}[{index}] overlaps {other_name}[{other_index}] in memory")


def _check_int_list(values, count: int, name: str, default, check) -> Tuple[int, ...]:
    if values is None:
        return tuple(default(i) for i in range(count))
    if _is_integer(values):
        values = [values]
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name} must be a sequence of ints, got {type(values).__name__}")
    values = list(values)
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} entries for {count} tensors")
    return tuple(check(value, f"{name}[{i}]") for i, value in enumerate(values))


def _check_offset(value, name: str) -> int:
    if not _is_integer(value):
        raise TypeError(f"{name} must be a non-negative int, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be non-negative, got {value}")
    return int(value)


def _check_offsets(offsets, params: List[torch.Tensor]) -> Tuple[int, ...]:
    result = _check_int_list(offsets, len(params), "offsets", lambda i: 0, _check_offset)
    for index, (offset, param) in enumerate(zip(result, params)):
        if offset + param.numel() > 2**63:
            raise ValueError(f"offsets[{index}] + numel of params[{index}] exceeds 2**63 (element indices are int64)")
    return result


def _check_weight_decay(weight_decay, decay_mask, count: int) -> Tuple[float, ...]:
    if isinstance(weight_decay, torch.Tensor) or weight_decay is None:
        raise TypeError("weight_decay must be a float or a sequence of floats (one per tensor), got "
                        f"{type(weight_decay).__name__}")
    if isinstance(weight_decay, (str, bytes)) or not hasattr(weight_decay, "__iter__") or (
        isinstance(weight_decay, np.ndarray) and weight_decay.ndim == 0
    ):
        decays = [weight_decay] * count
    else:
        decays = list(weight_decay)
        if len(decays) != count:
            raise ValueError(f"weight_decay has {len(decays)} entries for {count} tensors")
    decays = [_finite_float32(value, f"weight_decay[{i}]" if count > 1 else "weight_decay")
              for i, value in enumerate(decays)]
    if decay_mask is not None:
        if isinstance(decay_mask, (str, bytes, bool, np.bool_, torch.Tensor)) or not hasattr(decay_mask, "__iter__"):
            raise TypeError(f"decay_mask must be a sequence of bools (one per tensor), got {type(decay_mask).__name__}")
        mask = list(decay_mask)
        if len(mask) != count:
            raise ValueError(f"decay_mask has {len(mask)} entries for {count} tensors")
        for index, flag in enumerate(mask):
            if not isinstance(flag, (bool, np.bool_)):
                raise TypeError(f"decay_mask[{index}] must be a bool, got {type(flag).__name__}")
        decays = [value if flag else 0.0 for value, flag in zip(decays, mask)]
    return tuple(decays)


# ----------------------------------------------------------------------------- groups and dispatch


def _groups(params, grads, states, tids, offsets, decays, device) -> List[TensorGroup]:
    """Tensors grouped by (param dtype, grad dtype, state dtype); empty tensors skipped."""
    members: Dict[tuple, List[int]] = {}
    for index, param in enumerate(params):
        if param.numel():
            key = (param.dtype, grads[index].dtype if grads is not None else None,
                   states[0][index].dtype if states else None)
            members.setdefault(key, []).append(index)
    return [
        TensorGroup(
            indices=tuple(indices),
            device=device,
            param_dtype=param_dtype,
            grad_dtype=grad_dtype,
            state_dtype=state_dtype,
            numels=tuple(params[i].numel() for i in indices),
            tids=tuple(tids[i] for i in indices),
            offsets=tuple(offsets[i] for i in indices),
            weight_decay=tuple(decays[i] for i in indices),
        )
        for (param_dtype, grad_dtype, state_dtype), indices in members.items()
    ]


def _bump_versions(tensors: List[torch.Tensor]) -> None:
    """Tell autograd these tensors changed in place (inference tensors have no counter)."""
    torch.autograd.graph.increment_version(tensors)


def _run(params, grads, states, tids, offsets, decays, job: FusedJob, backend: str) -> None:
    module = _backends.load(backend)
    device = params[0].device
    groups = _groups(params, grads, states, tids, offsets, decays, device)
    with torch.no_grad():
        for group in groups:
            prepared = module.prepare(group, params, states)
            module.run(prepared, group, job, params, grads, states)
    _bump_versions(params + [tensor for buffers in states for tensor in buffers])


@torch.library.custom_op("addax_kernels::fused_update_", mutates_args=("params", "state0", "state1"))
def _fused_update_op(
    params: List[torch.Tensor],
    grads: List[torch.Tensor],
    state0: List[torch.Tensor],
    state1: List[torch.Tensor],
    seed_values: List[int],
    seed_tensor: Optional[torch.Tensor],
    scalar_values: List[float],
    scalar_tensor: Optional[torch.Tensor],
    tids: List[int],
    offsets: List[int],
    weight_decay: List[float],
    has_shift: bool,
    num_directions: int,
    has_grad: bool,
    state: int,
    noise_kind: str,
    rounding: str,
    sparsity_threshold: int,
    backend: str,
) -> None:
    seeds = (Seeds(values=tuple(_rng.seed_from_int64(s) for s in seed_values)) if seed_tensor is None
             else Seeds(tensor=seed_tensor))
    scalars = Scalars(values=tuple(scalar_values)) if scalar_tensor is None else Scalars(tensor=scalar_tensor)
    job = FusedJob(seeds=seeds, scalars=scalars, has_shift=has_shift, num_directions=num_directions,
                   has_grad=has_grad, state=state, noise=noise_kind, rounding=rounding,
                   sparsity_threshold=sparsity_threshold)
    states = [buffers for buffers in (state0, state1)][: STATE_BUFFERS[state]]
    _run(params, grads if has_grad else None, states, tids, offsets, weight_decay, job, backend)


@_fused_update_op.register_fake
def _fused_update_fake(params, grads, state0, state1, seed_values, seed_tensor, scalar_values, scalar_tensor,
                       tids, offsets, weight_decay, has_shift, num_directions, has_grad, state, noise_kind,
                       rounding, sparsity_threshold, backend) -> None:
    return None


def _dispatch(params, grads, states, tids, offsets, decays, job: FusedJob, backend: str) -> None:
    if not torch.compiler.is_compiling():
        _run(params, grads, states, tids, offsets, decays, job, backend)
        return
    padded_states = list(states) + [[]] * (2 - len(states))
    _fused_update_op(
        params,
        grads if grads is not None else [],
        padded_states[0],
        padded_states[1],
        [_rng.seed_as_int64(s) for s in job.seeds.values] if job.seeds.values is not None else [],
        job.seeds.tensor,
        list(job.scalars.values) if job.scalars.values is not None else [],
        job.scalars.tensor,
        list(tids),
        list(offsets),
        list(decays),
        job.has_shift,
        job.num_directions,
        job.has_grad,
        job.state,
        job.noise,
        job.rounding,
        job.sparsity_threshold,
        backend,
    )


def _prepare(params, tids, offsets, noise, rounding, sparsity):
    params = _as_tensor_list(params, "params")
    device = _check_params(params)
    tids = _check_int_list(tids, len(params), "tids", lambda i: i, _rng.check_tid)
    offsets = _check_offsets(offsets, params)
    _check_choice(noise, "noise", _rng.NOISE_KINDS)
    _check_choice(rounding, "rounding", ROUNDING_MODES)
    threshold = _rng.sparsity_threshold(sparsity)
    return params, device, tids, offsets, threshold


def _directions(seeds, coeffs, device) -> Tuple[list, list]:
    seed_list = _seed_list(seeds, device, "seeds")
    if not seed_list:
        raise ValueError("seeds is empty: give at least one direction")
    coeff_list = _scalar_list(coeffs, "coeffs")
    if len(coeff_list) != len(seed_list):
        raise ValueError(f"coeffs has {len(coeff_list)} entries for {len(seed_list)} seeds")
    names = [f"coeffs[{k}]" if len(coeff_list) > 1 else "coeffs" for k in range(len(coeff_list))]
    return seed_list, [_check_scalar(c, name, device) for c, name in zip(coeff_list, names)]


def _rounding_seed(rounding_seed, first_seed, device):
    return first_seed if rounding_seed is None else _rng.check_seed(rounding_seed, "rounding_seed", device)


# ----------------------------------------------------------------------------- public ops


_COMMON_ARGS_DOC = """
    Common keyword arguments (SPEC §1, §2):
        tids: per-tensor stream ids (u32 each; "tid" names the tensor's noise stream, not a
            thread), default the positions in ``params``.  The same tensor must keep its id
            across calls to see the same z.
        offsets: per-tensor global flat index of element 0 (shards of one tensor pass their
            global offset and get exactly the unsharded z), default 0; offset + numel <= 2**63.
        noise: ``"gaussian"`` (default) or ``"rademacher"``.
        rounding: ``"nearest"`` (default) or ``"stochastic"``: how float32 results are stored
            in float16/bfloat16 tensors (float32 is stored exactly).
        rounding_seed: key of the stochastic-rounding words (an int in [0, 2**64) or a 0-dim
            int64/uint64 tensor on the params' device), default the (first) seed.  Give each
            pass of a training step its own (SPEC §2).
        sparsity: p in [0, 1): each element is perturbed / updated along z only where its
            purpose-2 uniform is >= p (SPEC §1); default 0 (dense).
        backend: ``"auto"`` (default), ``"reference"``, ``"triton"`` or ``"native"``.

    Tensors: ``params`` is a Tensor or a sequence of contiguous float32/float16/bfloat16
    tensors on one device (cpu or cuda), not overlapping in memory.  Seeds are ints in
    [0, 2**64) or 0-dim int64/uint64 tensors on that device (read by the kernel, no host sync).
    Scalars (``scale``, ``coeffs``, ``zo_grad``, ``lr``, ``restore``) are Python floats (finite,
    within float32) or 0-dim tensors on that device (not checked for NaN, which would sync).

    Raises TypeError/ValueError naming the offending argument or tensor before anything is
    modified; RuntimeError for an inference tensor outside inference mode or a backend that
    cannot run here.
"""


def perturb_(
    params: TensorList,
    seed: SeedLike,
    scale: ScalarLike,
    *,
    tids: Optional[Sequence[int]] = None,
    offsets: Optional[Sequence[int]] = None,
    noise: str = "gaussian",
    rounding: str = "nearest",
    rounding_seed: Optional[SeedLike] = None,
    sparsity: float = 0.0,
    backend: str = "auto",
) -> None:
    """In place, θ ← θ + scale·z(seed) for every tensor in ``params`` (SPEC §2)."""
    params, device, tids, offsets, threshold = _prepare(params, tids, offsets, noise, rounding, sparsity)
    seed = _rng.check_seed(seed, "seed", device)
    scale = _check_scalar(scale, "scale", device)
    rounding_seed = _rounding_seed(rounding_seed, seed, device)
    backend = resolve_backend(backend, device)
    job = FusedJob(
        seeds=_pack_seeds([seed], rounding_seed, device),
        scalars=_pack_scalars([scale] + [0.0] * (SCALAR_FIRST_COEFF - 1), device),
        has_shift=True,
        num_directions=0,
        has_grad=False,
        noise=noise,
        rounding=rounding,
        sparsity_threshold=threshold,
    )
    _dispatch(params, None, [], tids, offsets, (0.0,) * len(params), job, backend)


def _update(params, grads, states, state_kind, directions, lr, restore, state_scalars, weight_decay, decay_mask,
            tids, offsets, noise, rounding, rounding_seed, sparsity, backend, grad_coeff=0.0,
            state_names=()) -> None:
    """The shared body of the updating ops: checks, packing, dispatch."""
    params, device, tids, offsets, threshold = _prepare(params, tids, offsets, noise, rounding, sparsity)
    if grads is not None:
        grads = _check_companions(grads, params, "grads", SUPPORTED_DTYPES, written=False)
    states = [_check_companions(buffers, params, name, STATE_DTYPES, written=True)
              for buffers, name in zip(states, state_names)]
    for name, buffers in zip(state_names[1:], states[1:]):
        for index, (buffer, first) in enumerate(zip(buffers, states[0])):
            if buffer.dtype != first.dtype:
                raise TypeError(f"{name}[{index}] is {buffer.dtype} but {state_names[0]}[{index}] is {first.dtype}: "
                                "the state buffers of one tensor share a dtype")
    _check_no_overlap({"params": params, **dict(zip(state_names, states))},
                      {"grads": grads} if grads is not None else {})
    seed_list, coeff_list = directions
    lr = _check_scalar(lr, "lr", device)
    shift = 0.0 if restore is None else _check_scalar(restore, "restore", device)
    decays = _check_weight_decay(weight_decay, decay_mask, len(params))
    rounding_seed = _rounding_seed(rounding_seed, seed_list[0], device)
    backend = resolve_backend(backend, device)
    scalar_entries = [0.0] * SCALAR_FIRST_COEFF
    scalar_entries[SCALAR_SHIFT] = shift
    scalar_entries[SCALAR_LR] = lr
    scalar_entries[SCALAR_GRAD_COEFF] = grad_coeff
    for slot, value in state_scalars.items():
        scalar_entries[slot] = value
    job = FusedJob(
        seeds=_pack_seeds(seed_list, rounding_seed, device),
        scalars=_pack_scalars(scalar_entries + list(coeff_list), device),
        has_shift=restore is not None,
        num_directions=len(seed_list),
        has_grad=grads is not None,
        state=state_kind,
        noise=noise,
        rounding=rounding,
        sparsity_threshold=threshold,
    )
    _dispatch(params, grads, states, tids, offsets, decays, job, backend)


def _params_device(params) -> torch.device:
    """The device of the first param, for checks that run before the full params check."""
    if isinstance(params, torch.Tensor):
        return params.device
    first = next(iter(params), None) if hasattr(params, "__iter__") and not isinstance(params, (str, bytes)) else None
    return first.device if isinstance(first, torch.Tensor) else torch.device("cpu")


def zo_update_(
    params: TensorList,
    seeds: Union[SeedLike, Sequence[SeedLike]],
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
    rounding_seed: Optional[SeedLike] = None,
    sparsity: float = 0.0,
    backend: str = "auto",
) -> None:
    """In place, θ ← θ' − lr·(Σ_k coeffs[k]·z(seeds[k]) + wd·θ'), θ' = θ + restore·z(seeds[0]).

    Without ``restore``, θ' = θ.  ``coeffs[k]`` is typically the projected gradient of
    direction k divided by the number of directions.  One rounding to the storage dtype.
    """
    device = _params_device(params)
    _update(params, None, [], STATE_NONE, _directions(seeds, coeffs, device), lr, restore, {}, weight_decay,
            decay_mask, tids, offsets, noise, rounding, rounding_seed, sparsity, backend)


def addax_update_(
    params: TensorList,
    grads: TensorList,
    seed: SeedLike,
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
    rounding_seed: Optional[SeedLike] = None,
    sparsity: float = 0.0,
    backend: str = "auto",
) -> None:
    """In place, θ ← θ − lr·(α·zo_grad·z(seed) + (1−α)·grad + wd·θ) (SPEC §2)."""
    device = _params_device(params)
    seed_list = _seed_list(seed, device, "seed")
    if len(seed_list) != 1:
        raise ValueError(f"addax_update_ takes one seed, got {len(seed_list)}")
    zo_grad = _check_scalar(zo_grad, "zo_grad", device)
    alpha = _check_unit_interval(alpha, "alpha")
    zo_coeff = _product(alpha, zo_grad, "alpha * zo_grad")
    _update(params, grads, [], STATE_NONE, (seed_list, [zo_coeff]), lr, None, {}, weight_decay, decay_mask,
            tids, offsets, noise, rounding, rounding_seed, sparsity, backend,
            grad_coeff=_finite_float32(1.0 - alpha, "1 - alpha"))


def zo_momentum_update_(
    params: TensorList,
    momentum_buffers: TensorList,
    seeds: Union[SeedLike, Sequence[SeedLike]],
    coeffs: Union[ScalarLike, Sequence[ScalarLike]],
    lr: ScalarLike,
    momentum: float,
    *,
    restore: Optional[ScalarLike] = None,
    weight_decay: Union[float, Sequence[float]] = 0.0,
    decay_mask: Optional[Sequence[bool]] = None,
    tids: Optional[Sequence[int]] = None,
    offsets: Optional[Sequence[int]] = None,
    noise: str = "gaussian",
    rounding: str = "nearest",
    rounding_seed: Optional[SeedLike] = None,
    sparsity: float = 0.0,
    backend: str = "auto",
) -> None:
    """ZO-SGD with momentum in one pass: ``torch.optim.SGD(momentum=β)`` applied to d (SPEC §3).

    θ' = θ + restore·z(seeds[0]);  d = Σ_k coeffs[k]·z(seeds[k]) + wd·θ';
    buf ← momentum·buf + d;  θ ← θ' − lr·buf.

    ``momentum_buffers``: one float32 or bfloat16 tensor per param, same shape, zero before
    the first step (then the first step stores buf = d, as torch's SGD does).
    """
    device = _params_device(params)
    momentum = _check_unit_interval(momentum, "momentum")
    _update(params, None, [momentum_buffers], STATE_MOMENTUM, _directions(seeds, coeffs, device), lr, restore,
            {SCALAR_MOMENTUM: momentum}, weight_decay, decay_mask, tids, offsets, noise, rounding, rounding_seed,
            sparsity, backend, state_names=("momentum_buffers",))


def _adam_scalars(lr, step, betas, eps, device) -> Tuple[Union[float, torch.Tensor], dict]:
    """(lr / (1 − β1^t), the Adam slots of the scalar vector) as torch.optim.Adam computes them."""
    if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2:
        raise TypeError(f"betas must be a pair of floats, got {betas!r}")
    _check_unit_interval(betas[0], "betas[0]", open_right=True)
    _check_unit_interval(betas[1], "betas[1]", open_right=True)
    # torch.optim.Adam forms 1 − β and β^t from the Python floats; from β rounded to float32
    # first, 1 − β2 would be off by 1.3e-5 relative for β2 = 0.999.
    beta1, beta2 = _as_real(betas[0], "betas[0]"), _as_real(betas[1], "betas[1]")
    eps = _finite_float32(eps, "eps")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    lr = _check_scalar(lr, "lr", device)
    if isinstance(step, torch.Tensor):
        if step.dim() != 0 or step.device != device:
            raise ValueError(f"step must be an int >= 1 or a 0-dim tensor on {device}, got {tuple(step.shape)} "
                             f"on {step.device}")
        step = step.detach().to(torch.float32)
        # torch.full, not torch.tensor: no host-to-device copy inside a captured step.
        bias_correction1 = 1 - torch.pow(torch.full((), beta1, dtype=torch.float32, device=device), step)
        bc2_sqrt = torch.sqrt(1 - torch.pow(torch.full((), beta2, dtype=torch.float32, device=device), step))
        step_size = lr / bias_correction1
    else:
        if not _is_integer(step) or step < 1:
            raise ValueError(f"step must be an int >= 1 (the number of this update, as torch.optim.Adam counts), "
                             f"got {step!r}")
        step = int(step)
        bias_correction1 = 1 - beta1**step
        bc2_sqrt = _finite_float32(math.sqrt(1 - beta2**step), "sqrt(1 - beta2**step)")
        step_size = (lr / bias_correction1 if isinstance(lr, torch.Tensor)
                     else _finite_float32(lr / bias_correction1, "lr / (1 - beta1**step)"))
    slots = {
        SCALAR_ADAM_W1: _finite_float32(1.0 - beta1, "1 - betas[0]"),
        SCALAR_ADAM_BETA2: _finite_float32(beta2, "betas[1]"),
        SCALAR_ADAM_W2: _finite_float32(1.0 - beta2, "1 - betas[1]"),
        SCALAR_ADAM_BC2_SQRT: bc2_sqrt,
        SCALAR_ADAM_EPS: eps,
    }
    return step_size, slots


def zo_adam_update_(
    params: TensorList,
    exp_avgs: TensorList,
    exp_avg_sqs: TensorList,
    seeds: Union[SeedLike, Sequence[SeedLike]],
    coeffs: Union[ScalarLike, Sequence[ScalarLike]],
    lr: ScalarLike,
    step: Union[int, torch.Tensor],
    *,
    betas: Tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    restore: Optional[ScalarLike] = None,
    weight_decay: Union[float, Sequence[float]] = 0.0,
    decay_mask: Optional[Sequence[bool]] = None,
    tids: Optional[Sequence[int]] = None,
    offsets: Optional[Sequence[int]] = None,
    noise: str = "gaussian",
    rounding: str = "nearest",
    rounding_seed: Optional[SeedLike] = None,
    sparsity: float = 0.0,
    backend: str = "auto",
) -> None:
    """ZO-Adam in one pass: ``torch.optim.Adam`` (L2 weight decay) applied to d (SPEC §3).

    θ' = θ + restore·z(seeds[0]);  d = Σ_k coeffs[k]·z(seeds[k]) + wd·θ';
    m ← m + (1−β1)(d − m);  v ← β2·v + (1−β2)·d²;
    θ ← θ' − lr/(1−β1^t) · m / (sqrt(v)/sqrt(1−β2^t) + eps).

    ``exp_avgs``/``exp_avg_sqs``: float32 or bfloat16 tensors shaped like the params (one
    dtype per param), zero before the first step.  ``step`` is t >= 1, this update's number:
    an int, or a 0-dim tensor on the params' device (the bias corrections are then computed
    on the device, for captured steps).
    """
    device = _params_device(params)
    step_size, slots = _adam_scalars(lr, step, betas, eps, device)
    _update(params, None, [exp_avgs, exp_avg_sqs], STATE_ADAM, _directions(seeds, coeffs, device), step_size,
            restore, slots, weight_decay, decay_mask, tids, offsets, noise, rounding, rounding_seed, sparsity,
            backend, state_names=("exp_avgs", "exp_avg_sqs"))


for _op in (perturb_, zo_update_, addax_update_, zo_momentum_update_, zo_adam_update_):
    _op.__doc__ = (_op.__doc__ or "") + "\n" + _COMMON_ARGS_DOC
del _op


def noise(
    shape,
    seed: SeedLike,
    tid: int = 0,
    offset: int = 0,
    *,
    noise: str = "gaussian",
    sparsity: float = 0.0,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device, None] = None,
    backend: str = "reference",
) -> torch.Tensor:
    """z materialized for a tensor of ``shape`` (for tests and references).

    ``tid`` is the tensor's stream id and ``offset`` the global index of its element 0 (as in
    the ops); ``noise`` the kind, ``sparsity`` p zeroes the elements SPEC §1's mask drops.
    ``backend="reference"`` (default) evaluates SPEC §1 in PyTorch (in float64 when
    ``dtype=torch.float64``); any other backend runs its own kernel as θ = 0 + 1·z on a
    float32 buffer, which is exactly the z that backend uses in the fused ops.
    """
    if backend == "reference":
        return _rng.noise(shape, seed, tid, offset, noise=noise, dtype=dtype, device=device, sparsity=sparsity)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"noise dtype must be floating, got {dtype}")
    if dtype == torch.float64:
        raise ValueError("float64 noise comes from the reference backend only")
    out = torch.zeros(shape if not isinstance(shape, numbers.Integral) else (int(shape),),
                      dtype=torch.float32, device=device)
    perturb_(out, seed, 1.0, tids=[tid], offsets=[offset], noise=noise, sparsity=sparsity, backend=backend)
    return out.to(dtype)

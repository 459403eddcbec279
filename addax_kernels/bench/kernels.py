"""Kernel-level benchmark: each fused op against the copy roofline and MeZO-style PyTorch.

For every (dtype, size) one contiguous tensor of ``size`` elements is updated in place by

* each selected backend's fused op (``perturb_``, ``zo_update_`` with ``restore``,
  ``addax_update_``),
* the MeZO-style PyTorch code doing the same work (:func:`mezo_perturb_`,
  :func:`mezo_zo_update_`, :func:`mezo_addax_update_`),
* ``y.copy_(x)`` moving the same number of bytes (the roofline).

Bytes moved count the unavoidable traffic of one fused pass (:func:`bytes_moved`); z is
regenerated in registers and moves no bytes.  The same count is used for the MeZO-style
code, whose real traffic is several times larger: that is the point of the comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import addax_kernels as ak

from .timing import PeakMemoryMeter, Timing, buffer_sets_needed, measure

OPS = ("perturb", "zo_update", "addax_update")

# Passes over the parameter tensor, in units of its size: perturb_ and zo_update_ read and
# write theta; addax_update_ also reads the gradient (stored in the parameter dtype).
_TENSOR_PASSES = {"perturb": 2, "zo_update": 2, "addax_update": 3}

# Representative step values.  ZO_GRAD is a typical |projected gradient|; WEIGHT_DECAY is
# non-zero so both sides evaluate the full MeZO update formula.
EPS = 1e-3
LR = 1e-6
ZO_GRAD = 0.5
ALPHA = 0.5
WEIGHT_DECAY = 0.01

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def bytes_moved(op: str, dtype: torch.dtype, numel: int) -> int:
    """Bytes one fused ``op`` pass must read and write for a tensor of ``numel`` elements."""
    if op not in _TENSOR_PASSES:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if dtype not in DTYPE_NAMES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    if numel < 0:
        raise ValueError(f"numel must be non-negative, got {numel}")
    return _TENSOR_PASSES[op] * numel * torch.empty((), dtype=dtype).element_size()


def update_rounding(rounding: str, dtype: torch.dtype) -> str:
    """The rounding an update pass uses: ``auto`` is the optimizers' default (SPEC §2)."""
    if rounding != "auto":
        return rounding
    return "nearest" if dtype == torch.float32 else "stochastic"


def perturb_rounding(rounding: str) -> str:
    return "nearest" if rounding == "auto" else rounding


# ----------------------------------------------------------------------------- MeZO-style code


def _mezo_z(param: torch.Tensor) -> torch.Tensor:
    return torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype)


def mezo_perturb_(params: Sequence[torch.Tensor], seed: int, eps: float, scaling_factor: float = 1.0) -> None:
    """MeZO's ``zo_perturb_parameters``: z regenerated from ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    for param in params:
        z = _mezo_z(param)
        param.data = param.data + scaling_factor * z * eps


def mezo_zo_update_(
    params: Sequence[torch.Tensor], seed: int, projected_grad: float, lr: float, eps: float, weight_decay: float
) -> None:
    """The end of a MeZO step: restore θ−εz to θ (``zo_perturb_parameters(scaling_factor=1)``),
    then MeZO's ``zo_update`` with z regenerated again from the same seed."""
    mezo_perturb_(params, seed, eps, scaling_factor=1.0)
    torch.manual_seed(seed)
    for param in params:
        z = _mezo_z(param)
        param.data = param.data - lr * (projected_grad * z + weight_decay * param.data)


def mezo_addax_update_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    seed: int,
    projected_grad: float,
    lr: float,
    alpha: float,
    weight_decay: float,
) -> None:
    """Addax's update written the MeZO way: θ ← θ − lr·(α·g0·z + (1−α)·∇θ + wd·θ)."""
    torch.manual_seed(seed)
    for param, grad in zip(params, grads):
        z = _mezo_z(param)
        param.data = param.data - lr * (alpha * projected_grad * z + (1 - alpha) * grad + weight_decay * param.data)


# ----------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class KernelSettings:
    device: torch.device
    backends: Tuple[str, ...]
    ops: Tuple[str, ...]
    dtypes: Tuple[torch.dtype, ...]
    sizes: Tuple[int, ...]
    warmup: int
    repeats: int
    time_budget_s: float
    rounding: str = "auto"
    seed: int = 1234


def _buffers(numel: int, dtype: torch.dtype, device: torch.device, count: int, generator_seed: int):
    # Drawn on the device itself: filling 2^28 elements on the host would take seconds per case.
    generator = torch.Generator(device=device).manual_seed(generator_seed)
    # Weights like a trained LM layer (std 0.02) so low-precision rounding behaves realistically.
    source = (torch.randn(numel, generator=generator, device=device) * 0.02).to(dtype)
    return [source] + [source.clone() for _ in range(count - 1)]


def _fused_call(op: str, backend: str, dtype: torch.dtype, settings: KernelSettings, params, grads):
    perturb_mode = perturb_rounding(settings.rounding)
    update_mode = update_rounding(settings.rounding, dtype)
    seed = settings.seed
    if op == "perturb":
        return lambda i: ak.perturb_(params[i], seed, EPS, rounding=perturb_mode, backend=backend)
    if op == "zo_update":
        return lambda i: ak.zo_update_(
            params[i], seed, ZO_GRAD, LR, restore=EPS, weight_decay=WEIGHT_DECAY, rounding=update_mode, backend=backend
        )
    return lambda i: ak.addax_update_(
        params[i], grads[i], seed, ZO_GRAD, LR, ALPHA, weight_decay=WEIGHT_DECAY, rounding=update_mode, backend=backend
    )


def _mezo_call(op: str, settings: KernelSettings, params, grads):
    seed = settings.seed
    if op == "perturb":
        return lambda i: mezo_perturb_([params[i]], seed, EPS)
    if op == "zo_update":
        return lambda i: mezo_zo_update_([params[i]], seed, ZO_GRAD, LR, EPS, WEIGHT_DECAY)
    return lambda i: mezo_addax_update_([params[i]], [grads[i]], seed, ZO_GRAD, LR, ALPHA, WEIGHT_DECAY)


def mezo_extra_elements(op: str) -> int:
    """Upper bound on the temporaries (in tensor sizes) the MeZO-style code keeps alive."""
    return 5 if op == "addax_update" else 4


def max_numel_for_memory(dtype: torch.dtype, ops: Sequence[str], available_bytes: int, fraction: float = 0.5) -> int:
    """The largest size whose parameters, gradient and MeZO-style temporaries fit in
    ``fraction`` of ``available_bytes`` (rotation only multiplies sizes below the cache)."""
    element = torch.empty((), dtype=dtype).element_size()
    per_element = element * max(2 + mezo_extra_elements(op) for op in ops)
    return int(available_bytes * fraction) // per_element


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else math.nan


def run_kernel_benchmarks(
    settings: KernelSettings,
    progress: Optional[Callable[[str], None]] = None,
    memory: Optional[PeakMemoryMeter] = None,
) -> Dict[str, List[dict]]:
    """Time every case; returns ``{"copy": [...], "mezo": [...], "kernels": [...]}`` records.

    ``progress(label)`` is called once per timed case.  Peak memory costs one extra call per
    case, scheduled on ``memory`` (the caller runs ``memory.finish()`` after all timing).
    """
    device = settings.device
    copy_records: Dict[Tuple[torch.dtype, int], dict] = {}
    mezo_records: List[dict] = []
    kernel_records: List[dict] = []

    def tick(label: str) -> None:
        if progress is not None:
            progress(label)

    def timed(call, num_buffers) -> Timing:
        return measure(
            call,
            device=device,
            num_buffers=num_buffers,
            warmup=settings.warmup,
            repeats=settings.repeats,
            time_budget_s=settings.time_budget_s,
        )

    def case_call(op, backend, dtype, params, grads):
        if backend is None:
            return _mezo_call(op, settings, params, grads)
        return _fused_call(op, backend, dtype, settings, params, grads)

    def measure_memory(record, op, dtype, numel, backend, params, grads) -> None:
        """One more call of the case (backend None = the MeZO-style code) under the meter."""
        if memory is None:
            return
        if memory.must_follow_timing:  # the timing buffers are gone by then: make fresh ones

            def make_call():
                fresh = _buffers(numel, dtype, device, 1, settings.seed)
                fresh_grads = _buffers(numel, dtype, device, 1, settings.seed + 1) if grads is not None else None
                return lambda: case_call(op, backend, dtype, fresh, fresh_grads)(0)

        else:

            def make_call():
                return lambda: case_call(op, backend, dtype, params, grads)(0)

        memory.schedule(record, make_call)

    for dtype in settings.dtypes:
        dtype_name = DTYPE_NAMES[dtype]
        element = torch.empty((), dtype=dtype).element_size()
        for numel in settings.sizes:
            for op in settings.ops:
                nbytes = bytes_moved(op, dtype, numel)
                # The copy moving the same bytes: half read, half written.
                copy_numel = nbytes // (2 * element)
                copy_key = (dtype, copy_numel)
                if copy_key not in copy_records:
                    sets = buffer_sets_needed(2 * copy_numel * element, device)
                    sources = _buffers(copy_numel, dtype, device, sets, settings.seed)
                    # Written targets (not empty_like): first-touch page faults are not copy cost.
                    targets = [source.clone() for source in sources]
                    timing = timed(lambda i: targets[i].copy_(sources[i]), sets)
                    copy_records[copy_key] = {
                        "dtype": dtype_name,
                        "numel": copy_numel,
                        "bytes": 2 * copy_numel * element,
                        "gbps": _gbps(2 * copy_numel * element, timing.median_s),
                        **timing.to_json(),
                    }
                    del sources, targets
                    tick(f"copy {dtype_name} {copy_numel}")
                copy_gbps = copy_records[copy_key]["gbps"]

                footprint = numel * element * (2 if op == "addax_update" else 1)
                sets = buffer_sets_needed(footprint, device)
                params = _buffers(numel, dtype, device, sets, settings.seed)
                grads = _buffers(numel, dtype, device, sets, settings.seed + 1) if op == "addax_update" else None

                mezo_timing = timed(_mezo_call(op, settings, params, grads), sets)
                mezo_record = {
                    "op": op,
                    "dtype": dtype_name,
                    "numel": numel,
                    "bytes_moved": nbytes,
                    "gbps": _gbps(nbytes, mezo_timing.median_s),
                    "copy_fraction": _gbps(nbytes, mezo_timing.median_s) / copy_gbps,
                    "peak_extra_bytes": None,
                    **mezo_timing.to_json(),
                }
                mezo_records.append(mezo_record)
                measure_memory(mezo_record, op, dtype, numel, None, params, grads)
                tick(f"mezo-style {op} {dtype_name} {numel}")

                for backend in settings.backends:
                    timing = timed(_fused_call(op, backend, dtype, settings, params, grads), sets)
                    gbps = _gbps(nbytes, timing.median_s)
                    record = {
                        "backend": backend,
                        "op": op,
                        "dtype": dtype_name,
                        "numel": numel,
                        "rounding": perturb_rounding(settings.rounding)
                        if op == "perturb"
                        else update_rounding(settings.rounding, dtype),
                        "bytes_moved": nbytes,
                        "gbps": gbps,
                        "copy_gbps": copy_gbps,
                        "copy_fraction": gbps / copy_gbps,
                        "mezo_median_s": mezo_timing.median_s,
                        "speedup_vs_mezo": mezo_timing.median_s / timing.median_s,
                        "peak_extra_bytes": None,
                        **timing.to_json(),
                    }
                    kernel_records.append(record)
                    measure_memory(record, op, dtype, numel, backend, params, grads)
                    tick(f"{backend} {op} {dtype_name} {numel}")
                del params, grads

    return {"copy": list(copy_records.values()), "mezo": mezo_records, "kernels": kernel_records}


def count_cases(settings: KernelSettings) -> int:
    """Timed cases :func:`run_kernel_benchmarks` will report through ``progress``."""
    copies = set()
    for dtype in settings.dtypes:
        element = torch.empty((), dtype=dtype).element_size()
        for numel in settings.sizes:
            for op in settings.ops:
                copies.add((dtype, bytes_moved(op, dtype, numel) // (2 * element)))
    per_op = 1 + len(settings.backends)
    return len(copies) + len(settings.dtypes) * len(settings.sizes) * len(settings.ops) * per_op

"""Host side of the Triton backend: the metadata table, scalar packing, tuning and the launch.

The table of a group depends only on the tensors' addresses, sizes, stream ids, offsets
and weight decays, which an optimizer repeats every step, so it is built once and kept on
the device (a small LRU cache): a steady-state step uploads nothing and launches one kernel
per dtype group.
"""

from __future__ import annotations

import contextlib
import struct
from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple

import torch

from .. import FusedJob
from . import kernels as K

_STORAGE_CODES = {torch.float32: K.STORAGE_FP32, torch.float16: K.STORAGE_FP16, torch.bfloat16: K.STORAGE_BF16}
_NOISE_CODES = {"gaussian": K.NOISE_GAUSSIAN, "rademacher": K.NOISE_RADEMACHER}
_ROUNDING_CODES = {"nearest": K.ROUNDING_NEAREST, "stochastic": K.ROUNDING_STOCHASTIC}

# The interpreter runs one fixed configuration: autotuning would only multiply its cost.
INTERPRETER_BLOCK = 512

# Autotuning keys on the group size in three classes; tuning runs on a scratch group of the
# class's representative size (the real tensors are updated in place and cannot be rerun).
_SIZE_CLASS_LIMITS = (1 << 20, 1 << 24)
_SIZE_CLASS_SCRATCH = (1 << 18, 1 << 22, 1 << 24)

_TABLE_CACHE_ENTRIES = 64
_table_cache: "OrderedDict[tuple, _Table]" = OrderedDict()
_tuned_keys = set()


class _Table:
    """A group's device metadata table and its launch geometry for every BLOCK choice."""

    def __init__(self, rows: torch.Tensor, programs: Tuple[int, ...], aligned: bool):
        self.rows = rows
        self.programs = dict(zip(K.BLOCK_CHOICES, programs))
        self.aligned = aligned


def _float32_bits(value: float) -> int:
    return struct.unpack("<i", struct.pack("<f", value))[0]


def _signed_int32(value: int) -> int:
    return value - (1 << 32) if value >= (1 << 31) else value


def _signed_int64(value: int) -> int:
    return value - (1 << 64) if value >= (1 << 63) else value


def _upload(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on ``device`` without a host sync (pinned staging, async copy)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    staged = torch.tensor(values, dtype=dtype, pin_memory=True)
    return staged.to(device, non_blocking=True)


def _element_deltas(tensors: Sequence[torch.Tensor], offsets: Sequence[int]) -> Tuple[List[int], bool]:
    """Per tensor, ``param_base + delta + e`` addresses global element e; and 16-byte alignment."""
    base = tensors[0].data_ptr()
    size = tensors[0].element_size()
    deltas, aligned = [], base % 16 == 0
    for index, (tensor, offset) in enumerate(zip(tensors, offsets)):
        distance = tensor.data_ptr() - base
        if distance % size:
            raise ValueError(f"tensor {index} is not aligned to its element size ({size} bytes)")
        delta = distance // size - offset
        deltas.append(delta)
        aligned = aligned and (delta * size) % 16 == 0
    return deltas, aligned


def _build_table(params, grads, job: FusedJob) -> _Table:
    param_deltas, aligned = _element_deltas(params, job.offsets)
    if grads is not None:
        grad_deltas, grads_aligned = _element_deltas(grads, job.offsets)
        aligned = aligned and grads_aligned
    else:
        grad_deltas = [0] * len(params)
    rows, programs = [], [0] * len(K.BLOCK_CHOICES)
    for index, param in enumerate(params):
        begin = job.offsets[index]
        end = begin + param.numel()
        row = [param_deltas[index], grad_deltas[index], begin, end, job.tids[index],
               _float32_bits(job.weight_decay[index])]
        for choice, block in enumerate(K.BLOCK_CHOICES):
            row.append(programs[choice])
            programs[choice] += (end - 1) // block - begin // block + 1
        rows.append(row)
    table = _upload(rows, torch.int64, params[0].device)
    return _Table(table, tuple(programs), aligned)


def _check_not_capturing(device: torch.device, what: str) -> None:
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"the Triton backend would {what} during CUDA graph capture: run the same call once "
            "before capturing (its table and tuned configuration are then cached); calls with "
            "several directions upload their seeds on every call and cannot be captured"
        )


def _table_for(params, grads, job: FusedJob) -> _Table:
    key = (
        params[0].device,
        tuple((p.data_ptr(), p.numel(), p.element_size()) for p in params),
        tuple((g.data_ptr(), g.element_size()) for g in grads) if grads is not None else None,
        job.offsets,
        job.tids,
        job.weight_decay,
    )
    table = _table_cache.get(key)
    if table is None:
        _check_not_capturing(params[0].device, "upload a new metadata table")
        table = _build_table(params, grads, job)
        _table_cache[key] = table
        if len(_table_cache) > _TABLE_CACHE_ENTRIES:
            _table_cache.popitem(last=False)
    else:
        _table_cache.move_to_end(key)
    return table


def _size_class(numel: int) -> int:
    return sum(numel >= limit for limit in _SIZE_CLASS_LIMITS)


def _kernel_arguments(params, grads, job: FusedJob, table: _Table, size_class: int):
    """Positional runtime arguments and structural constexprs of one launch."""
    device = params[0].device
    scalars = job.scalars
    host_scalars = (0.0, 0.0, 0.0, 0.0)
    if scalars.on_device:
        scalar_tensor = scalars.tensor.to(torch.float32).contiguous()
    elif job.num_directions > 1:
        # Coefficients past the first are read from memory in a loop over directions.
        _check_not_capturing(device, "upload host coefficients")
        scalar_tensor = _upload(scalars.values, torch.float32, device)
    else:
        scalar_tensor = None
        values = tuple(scalars.values) + (0.0,) * (4 - len(scalars.values))
        host_scalars = values[:4]
    seeds_tensor = None
    if job.num_directions > 1:
        _check_not_capturing(device, "upload the seeds of several directions")
        seeds_tensor = _upload([_signed_int64(s) for s in job.seeds], torch.int64, device)
    seed = job.seeds[0]
    param_base = params[0] if params[0].dtype == torch.float32 else params[0].view(torch.int16)
    if grads is not None:
        grad_base = grads[0] if grads[0].dtype == torch.float32 else grads[0].view(torch.int16)
    else:
        grad_base = param_base
    positional = (
        table.rows,
        param_base,
        grad_base,
        scalar_tensor if scalar_tensor is not None else table.rows,
        seeds_tensor if seeds_tensor is not None else table.rows,
        len(params),
        (len(params) - 1).bit_length(),
        _signed_int32(seed & 0xFFFFFFFF),
        _signed_int32(seed >> 32),
        *host_scalars,
        size_class,
    )
    structural = dict(
        ALIGNED=table.aligned,
        STORAGE=_STORAGE_CODES[params[0].dtype],
        GRAD_STORAGE=_STORAGE_CODES[grads[0].dtype] if grads is not None else K.STORAGE_FP32,
        HAS_SHIFT=job.has_shift,
        NUM_DIRECTIONS=job.num_directions,
        HAS_GRAD=grads is not None and job.has_grad,
        HAS_DECAY=any(decay != 0.0 for decay in job.weight_decay),
        NOISE=_NOISE_CODES[job.noise],
        ROUNDING=_ROUNDING_CODES[job.rounding] if params[0].dtype != torch.float32 else K.ROUNDING_NEAREST,
        SCALARS_ON_DEVICE=scalar_tensor is not None,
        FAST=device.type == "cuda" and torch.version.hip is None,
    )
    return positional, structural


def _tune_on_scratch(params, grads, job: FusedJob, size_class: int, structural: dict) -> None:
    """Run the autotuner for this key on scratch tensors, leaving the real ones untouched."""
    numel = _SIZE_CLASS_SCRATCH[size_class]
    device = params[0].device
    scratch_params = [torch.zeros(numel, dtype=params[0].dtype, device=device)]
    scratch_grads = [torch.zeros(numel, dtype=grads[0].dtype, device=device)] if grads is not None else None
    scalars = job.scalars
    if scalars.on_device:
        scalars = type(scalars)(tensor=scalars.tensor.detach().clone())
    scratch_job = FusedJob(
        seeds=job.seeds,
        tids=(0,),
        offsets=(0,),
        weight_decay=(1e-4 if structural["HAS_DECAY"] else 0.0,),
        scalars=scalars,
        has_shift=job.has_shift,
        num_directions=job.num_directions,
        has_grad=job.has_grad,
        noise=job.noise,
        rounding=job.rounding,
    )
    table = _build_table(scratch_params, scratch_grads, scratch_job)
    positional, scratch_structural = _kernel_arguments(scratch_params, scratch_grads, scratch_job, table, size_class)
    scratch_structural["ALIGNED"] = structural["ALIGNED"]
    K.tuned_fused_update_kernel[lambda meta: (table.programs[meta["BLOCK"]],)](*positional, **scratch_structural)


def fused_update_(params: List[torch.Tensor], grads: Optional[List[torch.Tensor]], job: FusedJob) -> None:
    if not params:
        return
    device = params[0].device
    # Uploads, tuning and the launch all go to the params' device and its current stream.
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        table = _table_for(params, grads, job)
        if table.programs[K.BLOCK_CHOICES[0]] == 0:  # only empty tensors
            return
        size_class = _size_class(sum(p.numel() for p in params))
        positional, structural = _kernel_arguments(params, grads, job, table, size_class)
        if K.INTERPRETED:
            block = INTERPRETER_BLOCK
            K.fused_update_kernel[(table.programs[block],)](
                *positional, BLOCK=block, START_COLUMN=K.COL_FIRST_PROGRAM + K.BLOCK_CHOICES.index(block),
                **structural,
            )
            return
        tuning_key = (device, size_class, params[0].dtype, grads[0].dtype if grads is not None else None,
                      tuple(sorted(structural.items())))
        if tuning_key not in _tuned_keys:
            _check_not_capturing(device, "autotune")
            _tune_on_scratch(params, grads, job, size_class, structural)
            _tuned_keys.add(tuning_key)
        K.tuned_fused_update_kernel[lambda meta: (table.programs[meta["BLOCK"]],)](*positional, **structural)

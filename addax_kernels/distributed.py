"""Running the fused ZO / Addax updates under ``torch.distributed``.

Zeroth-order training needs almost no communication: every rank regenerates the same z
from the same seed, so only the projected gradient(s), ``num_directions`` float32 scalars,
cross the network each step.  This module supplies the pieces an optimizer or a training
script needs for that:

* :func:`local_shard` (defined in :mod:`addax_kernels.sharding`, below the optimizers, and
  re-exported here) — the rank-local part of a DTensor parameter (FSDP2 ``fully_shard``,
  ``distribute_tensor``) and the global flat offset of its first element, so that the fused
  ops give a shard exactly the z of the unsharded tensor (SPEC §1).
* :func:`all_reduce_mean` — the ``grad_reduce=`` callable of the optimizers: one all-reduce
  of the projected gradients per step, with an optional timeout and a clear error when
  another rank has failed.
* :func:`check_ranks_agree` — one-off check that every rank builds the same seed stream,
  parameter list and hyperparameters (a mismatch silently trains different models).
* :func:`addax_comm_hook` — a DDP communication hook that applies Addax's fused update to
  each gradient bucket as soon as its all-reduce completes.

This module sits above the optimizers: the rank checks and the DDP hook read an optimizer's
public attributes (``base_seed``, ``step_seed``, ``update_from_grads_``, ...) by duck typing and
import nothing from ``addax_kernels.optim``.  Nothing here imports ``torch.distributed.tensor``
until a DTensor is actually seen.
"""

from __future__ import annotations

import datetime
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from ._numbers import is_real_number
from .sharding import is_dtensor, local_shard

__all__ = [
    "DistributedStepError",
    "AllReduceMean",
    "all_reduce_mean",
    "check_ranks_agree",
    "local_shard",
    "addax_comm_hook",
]

class DistributedStepError(RuntimeError):
    """A collective of a training step failed: another rank crashed, diverged or timed out."""


def _describe_rank(group) -> str:
    return f"rank {dist.get_rank(group)} of {dist.get_world_size(group)}"


# ----------------------------------------------------------------------------- scalar all-reduce


def _require_initialized(what: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{what} needs torch.distributed.init_process_group() to have been called")


def _as_timedelta(timeout) -> Optional[datetime.timedelta]:
    if timeout is None or isinstance(timeout, datetime.timedelta):
        result = timeout
    elif is_real_number(timeout):
        result = datetime.timedelta(seconds=float(timeout))
    else:
        raise TypeError(f"timeout must be None, seconds or a datetime.timedelta, got {type(timeout).__name__}")
    if result is not None and result.total_seconds() <= 0:
        raise ValueError(f"timeout must be positive, got {result}")
    return result


class AllReduceMean:
    """``grad_reduce`` callable: the mean of a small tensor over the ranks of ``group``.

    Returns a new tensor (the argument is left untouched).  All ranks get bit-identical
    results (NCCL and Gloo all-reduce both guarantee it), which keeps replicas identical.
    A failed or timed-out collective raises :class:`DistributedStepError` naming this rank.
    ``calls`` counts the reductions run so far (one per optimizer step).
    """

    def __init__(self, group=None, timeout=None):
        _require_initialized("all_reduce_mean")
        self.group = group
        self.timeout = _as_timedelta(timeout)
        self.world_size = dist.get_world_size(group)
        self.calls = 0

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        if not isinstance(values, torch.Tensor) or not values.dtype.is_floating_point:
            raise TypeError(f"all_reduce_mean takes a floating tensor, got {values!r:.80}")
        reduced = values.detach().clone()
        self.calls += 1
        if self.world_size == 1:
            return reduced
        try:
            work = dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
            # Without a timeout, wait() only orders the current CUDA stream after the
            # collective (no host sync); the process group's own timeout still applies.
            if self.timeout is None:
                work.wait()
            else:
                work.wait(self.timeout)
        except RuntimeError as error:
            raise DistributedStepError(
                f"addax_kernels: the all-reduce of the projected gradient (call {self.calls}) failed on "
                f"{_describe_rank(self.group)}: another rank has probably crashed, stopped calling step() "
                f"(different number of steps or of closures), or is stuck beyond the timeout; check the "
                f"other ranks' logs. Cause: {error}"
            ) from error
        return reduced.div_(self.world_size)

    def __repr__(self) -> str:
        return f"AllReduceMean(world_size={self.world_size}, timeout={self.timeout})"


def all_reduce_mean(group=None, *, timeout=None) -> AllReduceMean:
    """The optimizers' ``grad_reduce=`` for data parallelism: mean over the ranks of ``group``.

    One all-reduce of ``num_directions`` float32 values per step, no parameter traffic.
    ``timeout`` (seconds or timedelta) bounds each wait; it blocks the host until the
    collective completes, so on CUDA leave it None and rely on the process group's timeout
    (``init_process_group(timeout=...)``), which needs no host sync.
    """
    return AllReduceMean(group, timeout)


# ----------------------------------------------------------------------------- rank checks


_SEEDS_COMPARED = 3
# Settings of the addax_kernels optimizers that change z or the update; read when present.
_SETTINGS_COMPARED = ("base_seed", "steps_taken", "num_directions", "noise", "rounding", "fo_in_backward")


def _plain(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _parameter_layout(param: torch.Tensor) -> Tuple[Tuple[int, ...], str]:
    # The global shape of a DTensor: z is defined on the unsharded tensor.
    return tuple(param.shape), str(param.dtype).replace("torch.", "")


_CHECKSUM_CHUNK = 1 << 22
_BITS_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _value_checksum(tensor: torch.Tensor) -> int:
    """An exact, position-sensitive checksum of the bit patterns (equal tensors, equal sums).

    Integer arithmetic, so the result does not depend on reduction order; chunked, so the
    int64 working copy stays small whatever the tensor size.
    """
    flat = tensor.detach().reshape(-1)
    bits_dtype = _BITS_VIEW[flat.element_size()]
    # int64 sums wrap modulo 2**64, identically in any order: still equal for equal tensors.
    total = torch.zeros((), dtype=torch.int64, device=flat.device)
    with torch.no_grad():
        for start in range(0, flat.numel(), _CHECKSUM_CHUNK):
            chunk = flat[start : start + _CHECKSUM_CHUNK].view(bits_dtype).to(torch.int64)
            weights = torch.arange(start, start + chunk.numel(), device=chunk.device, dtype=torch.int64) % 65521 + 1
            total += (chunk * weights).sum()
    return int(total)


def _fingerprint(optimizer, group, compare_values: bool) -> Dict[str, Any]:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    groups = [
        {key: value for key, value in g.items() if key != "params" and _plain(value)} for g in optimizer.param_groups
    ]
    settings = {name: getattr(optimizer, name) for name in _SETTINGS_COMPARED if hasattr(optimizer, name)}
    step_seed = getattr(optimizer, "step_seed", None)
    next_step = int(settings.get("steps_taken", 0))
    fingerprint = {
        "world size": dist.get_world_size(group),
        "optimizer": type(optimizer).__name__,
        "settings": {name: value for name, value in settings.items() if _plain(value)},
        "next step seeds": (
            tuple(step_seed(next_step + k) for k in range(_SEEDS_COMPARED)) if callable(step_seed) else None
        ),
        "parameter count": len(params),
        "parameters (global shape, dtype) in tid order": [_parameter_layout(p) for p in params],
        "param_groups": groups,
    }
    if compare_values:
        # Replicated parameters must start identical (nothing broadcasts them when a ZO run
        # skips DDP); each DTensor element lives on its owning ranks only, so shards are skipped.
        fingerprint["parameter values (checksums; DTensors skipped)"] = [
            None if is_dtensor(p) else _value_checksum(p) for p in params
        ]
    return fingerprint


def _ddp_problem(optimizer, model) -> Optional[str]:
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) and getattr(optimizer, "fo_in_backward", False):
        return (
            "Addax(fo_in_backward=True) under DistributedDataParallel applies each parameter's local, "
            "un-averaged gradient (its hook runs before DDP's all-reduce), so the replicas drift apart. "
            "Build Addax with fo_in_backward=False (the update then reads DDP's averaged .grad after "
            "backward), and optionally register addax_comm_hook(optimizer) to update bucket by bucket."
        )
    return None


def _first_difference(a, b):
    if isinstance(a, dict) and isinstance(b, dict):
        keys = [key for key in {**a, **b} if a.get(key) != b.get(key)]
        return ", ".join(f"{key}={a.get(key)!r} vs {b.get(key)!r}" for key in keys)
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for index, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return f"[{index}]: {x!r} vs {y!r}"
    return f"{a!r:.300} vs {b!r:.300}"


def check_ranks_agree(optimizer, group=None, *, model=None, compare_values: bool = True) -> None:
    """Raise ValueError on every rank unless all ranks of ``group`` built the same optimizer.

    Compares the world size, the base seed, the step count and the seeds of the next steps,
    the number of directions, noise kind, rounding, the parameter list in tid order (global
    shapes and dtypes), the param-group hyperparameters and, with ``compare_values``, an
    exact checksum of every non-DTensor parameter (replicas must start bit-identical).  The
    backend is not compared: backends agree on z by contract.  Given the training ``model``,
    also rejects Addax with ``fo_in_backward=True`` under DDP, which trains on local
    gradients.

    Call it after building (or resuming) the optimizer and before the first step; it costs
    one pass over the parameters and one small all-gather of Python objects (on NCCL, call
    ``torch.cuda.set_device`` first).  A rank that never reaches the call makes the others
    fail with :class:`DistributedStepError` after the process group's timeout.
    """
    _require_initialized("check_ranks_agree")
    fingerprint = _fingerprint(optimizer, group, compare_values)
    # Reported after the gather, so that a rank with a bad setup never leaves the others waiting.
    setup_problem = _ddp_problem(optimizer, model) if model is not None else None
    gathered: List[Optional[Tuple[Dict[str, Any], Optional[str]]]] = [None] * dist.get_world_size(group)
    try:
        dist.all_gather_object(gathered, (fingerprint, setup_problem), group=group)
    except RuntimeError as error:
        raise DistributedStepError(
            f"addax_kernels: check_ranks_agree could not gather from every rank ({_describe_rank(group)}): {error}"
        ) from error
    problems = [f"rank {rank}: {problem}" for rank, (_, problem) in enumerate(gathered) if problem]
    reference = gathered[0][0]
    for rank, (other, _) in enumerate(gathered[1:], start=1):
        for key in reference:
            if other.get(key) != reference[key]:
                difference = _first_difference(other.get(key), reference[key])
                problems.append(f"rank {rank} differs from rank 0 in {key}: {difference}")
    if problems:
        raise ValueError(
            "addax_kernels: the ranks disagree or are set up to diverge:\n  " + "\n  ".join(problems)
        )


# ----------------------------------------------------------------------------- DDP + Addax


def addax_comm_hook(optimizer) -> Callable:
    """A DDP communication hook that applies Addax's update bucket by bucket during backward.

    Register it with ``ddp_model.register_comm_hook(process_group, addax_comm_hook(opt))``
    for an ``Addax`` optimizer built with ``fo_in_backward=False`` over the DDP model's
    parameters.  Each bucket's gradients are averaged over the process group (the usual
    DDP all-reduce); when that completes, ``opt.update_from_grads_`` applies the fused
    θ ← θ − lr·(α·g0·z + (1−α)·grad + wd·θ) to the bucket's parameters, overlapping the
    update with the rest of the backward pass.  A DDP backward outside ``opt.step`` raises
    (there is no step whose update the hook could apply).
    """
    update = getattr(optimizer, "update_from_grads_", None)
    if not callable(update):
        raise TypeError(f"addax_comm_hook needs an Addax optimizer (with update_from_grads_), got {type(optimizer).__name__}")
    if getattr(optimizer, "fo_in_backward", False):
        raise ValueError(
            "addax_comm_hook needs Addax(fo_in_backward=False): with True, each parameter is updated "
            "from its local gradient before DDP's all-reduce reaches the hook"
        )

    def hook(process_group, bucket):
        group = process_group if process_group is not None else dist.group.WORLD
        world_size = dist.get_world_size(group)
        buffer = bucket.buffer()
        buffer.div_(world_size)
        future = dist.all_reduce(buffer, group=group, async_op=True).get_future()

        def apply_update(done):
            averaged = done.value()[0]
            update(list(bucket.parameters()), list(bucket.gradients()))
            return averaged

        return future.then(apply_update)

    return hook

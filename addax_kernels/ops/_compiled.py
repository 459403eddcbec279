"""The ops under ``torch.compile``: one custom op whose implementation is the eager op.

While compiling, a public op records ``addax_kernels::fused_update_`` (registered with
``torch.library``, declared to mutate the params and state buffers) instead of running.  Its
implementation, run by the compiled graph with real tensors, calls the same public op
eagerly, so every check of SPEC §2 runs at run time with the eager errors: overlap and
aliasing (fake tensors have no addresses at trace time), NaN scalars, inference tensors.

Numbers that may change between calls (seeds, step scalars, alpha, momentum, betas, eps, the
Adam step) travel as 0-dim CPU tensors built in the graph (``ones * x``), so a Python float or
int that changes every call (an lr schedule) becomes a graph input instead of a constant: no
recompile per value, and its NaN/range check runs at run time.  The arguments that define the
parameter set (tids, offsets, weight decays, choices, backend) are checked at trace time and
baked into the graph, as dynamo guards them.  Eager calls never go through the dispatcher.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch

from .. import rng as _rng
from . import _checks, _plan
from ._backend_choice import resolve_backend

# How one number of a call travels through the custom op.
_INT = 0  # a Python int in [-2**63, 2**63), as an int64 tensor
_UINT64_HIGH = 1  # a Python int in [2**63, 2**64) (a seed), as the int64 with its bits
_FLOAT = 2  # a Python float, as a float64 tensor (exact)
_TENSOR = 3  # the caller's 0-dim tensor, passed through

# How one argument is laid out in ``numbers``.
_SCALAR = -1
_ABSENT = -2

# op name -> function(params, grads, states, values, config) running the eager op.
_EAGER: Dict[str, Callable] = {}


def register(op_name: str, run_eager: Callable) -> None:
    _EAGER[op_name] = run_eager


@torch.library.custom_op("addax_kernels::fused_update_", mutates_args=("params", "state0", "state1"))
def fused_update_op(
    params: List[torch.Tensor],
    grads: List[torch.Tensor],
    state0: List[torch.Tensor],
    state1: List[torch.Tensor],
    op: str,
    numbers: List[torch.Tensor],
    kinds: List[int],
    layout: List[int],
    tids: Optional[List[int]],
    offsets: Optional[List[int]],
    weight_decay: List[float],
    noise: str,
    rounding: str,
    sparsity: float,
    backend: str,
) -> None:
    values = _unpack(numbers, kinds, layout)
    config = dict(tids=tids, offsets=offsets, noise=noise, rounding=rounding, sparsity=sparsity, backend=backend)
    _EAGER[op](params, grads, [state0, state1], values, weight_decay, config)


@fused_update_op.register_fake
def _fused_update_fake(params, grads, state0, state1, op, numbers, kinds, layout, tids, offsets, weight_decay, noise,
                       rounding, sparsity, backend) -> None:
    return None


def _entry(tensor: torch.Tensor, kind: int):
    if kind == _TENSOR:
        return tensor
    if kind == _FLOAT:
        return float(tensor.item())
    value = int(tensor.item())
    return value + 2**64 if kind == _UINT64_HIGH else value


def _unpack(numbers, kinds, layout) -> list:
    values, position = [], 0
    for length in layout:
        if length == _ABSENT:
            values.append(None)
        elif length == _SCALAR:
            values.append(_entry(numbers[position], kinds[position]))
            position += 1
        else:
            values.append([_entry(numbers[i], kinds[i]) for i in range(position, position + length)])
            position += length
    return values


def _pack_number(value, name: str, check, numbers: list, kinds: list) -> None:
    if isinstance(value, torch.Tensor):
        numbers.append(value)
        kinds.append(_TENSOR)
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        value = check(value, name)  # the eager error for a wrong type; numpy numbers become Python ones
        if isinstance(value, torch.Tensor):
            numbers.append(value)
            kinds.append(_TENSOR)
            return
    if isinstance(value, int):
        if value >= 2**63:
            if value >= 2**64:
                raise ValueError(f"{name} must be in [0, 2**64), got {value}")
            numbers.append(torch.full((), value - 2**64, dtype=torch.int64))
            kinds.append(_UINT64_HIGH)
            return
        if value < -(2**63):
            raise ValueError(f"{name} is out of range, got {value}")
        # ones * x keeps a symbolic int or float symbolic (a graph input), where torch.tensor(x)
        # would specialize the graph on its value.
        numbers.append(torch.ones((), dtype=torch.int64) * value)
        kinds.append(_INT)
        return
    numbers.append(torch.ones((), dtype=torch.float64) * value)
    kinds.append(_FLOAT)


def _check_real(value, name):
    if isinstance(value, torch.Tensor):
        return value
    return _checks.as_real(value, name)


def _check_int(value, name):
    if isinstance(value, torch.Tensor):
        return value
    if not _checks.is_integer(value):
        raise TypeError(f"{name} must be an int or a 0-dim tensor, got {type(value).__name__} {value!r}")
    return int(value)


def _check_seed(value, name):
    if isinstance(value, torch.Tensor):
        return value
    return _rng.check_seed(value, name)


CHECKS = {"real": _check_real, "int": _check_int, "seed": _check_seed}


def record(op_name: str, params, grads, states: Sequence, numbers_in: Sequence[tuple], tids, offsets,
           weight_decay, decay_mask, noise: str, rounding: str, sparsity, backend: str) -> None:
    """Record the custom op for a call made while compiling.

    ``numbers_in`` lists ``(name, value, kind, is_sequence)`` per number argument, ``kind`` a
    key of :data:`CHECKS`; a sequence argument may be a list, a tuple or a 1-D tensor.
    """
    params = _plan.as_tensor_list(params, "params")
    if not params:
        raise ValueError("params is empty")
    grads = _plan.as_tensor_list(grads, "grads") if grads is not None else []
    states = [_plan.as_tensor_list(buffers, name) for buffers, name in states] + [[], []]
    numbers: List[torch.Tensor] = []
    kinds: List[int] = []
    layout: List[int] = []
    for name, value, kind, is_sequence in numbers_in:
        check = CHECKS[kind]
        if value is None:
            layout.append(_ABSENT)
        elif is_sequence and isinstance(value, torch.Tensor) and value.dim() == 1:
            for k, item in enumerate(value.unbind(0)):
                _pack_number(item, f"{name}[{k}]", check, numbers, kinds)
            layout.append(value.shape[0])
        elif is_sequence and isinstance(value, (list, tuple)):
            for k, item in enumerate(value):
                _pack_number(item, f"{name}[{k}]", check, numbers, kinds)
            layout.append(len(value))
        else:
            _pack_number(value, name, check, numbers, kinds)
            layout.append(_SCALAR)
    count = len(params)
    tids = None if tids is None else list(_checks.check_tids(tids, count))
    offsets = None if offsets is None else list(
        _checks.check_int_list(offsets, count, "offsets", (0,) * count, _checks.check_offset))
    decays = list(_checks.check_weight_decay(weight_decay, decay_mask, count))
    _checks.check_choice(noise, "noise", _rng.NOISE_KINDS)
    _checks.check_choice(rounding, "rounding", _checks.ROUNDING_MODES)
    sparsity = float(sparsity) if _rng.sparsity_threshold(sparsity) else 0.0
    backend = resolve_backend(backend, params[0].device)
    fused_update_op(params, grads, states[0], states[1], op_name, numbers, kinds, layout, tids, offsets, decays,
                    noise, rounding, sparsity, backend)


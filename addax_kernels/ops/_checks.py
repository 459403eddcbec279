"""Checks of the ops' non-tensor arguments: numbers, seeds, choices, per-tensor lists.

Every check raises a TypeError/ValueError that names the argument, and builds its message
only when it raises.  The per-call checks (seeds, step scalars, choices) are O(1) per value;
the per-tensor lists (tids, offsets, weight decays) are checked once per parameter set and
cached with it (``_plan.py``).
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple, Union

import numpy as np
import torch

from .._numbers import is_integer, is_real_number
from .. import rng as _rng
from ..backends import Scalars, Seeds

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ROUNDING_MODES = ("nearest", "stochastic")
FLOAT32_MAX = float(np.finfo(np.float32).max)
# Element indices are int64: the last index of a tensor, offset + numel - 1, is at most 2**63 - 1.
INDEX_LIMIT = 2**63


def as_real(value, name: str) -> float:
    """A Python float from a real number (numpy scalars and 0-d arrays included; bool refused)."""
    if type(value) is float:
        return value
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "fiu":
        value = value.item()
    if not is_real_number(value):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    try:
        return float(value)
    except OverflowError:  # an int beyond float64
        raise ValueError(f"{name} overflows float32 (an int beyond float range)") from None


def finite_float32(value, name: str) -> float:
    """``value`` rounded to float32, as a Python float; NaN, inf and float32 overflow refused."""
    value = as_real(value, name)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if abs(value) > FLOAT32_MAX:
        raise ValueError(f"{name}={value} overflows float32")
    return float(np.float32(value))


def check_scalar(value, name: str, device: torch.device) -> Union[float, torch.Tensor]:
    """A step scalar: a finite float32-representable float, or a 0-dim float32 tensor on ``device``.

    Accelerator tensors are not checked for NaN: that would cost a host sync every step.
    0-dim CPU tensors are read on the host and checked like floats.
    """
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"{name} must be a 0-dim tensor, got shape {tuple(value.shape)}")
        if not (value.dtype.is_floating_point or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be a real number, got a {value.dtype} tensor")
        if value.device.type == "cpu":
            return finite_float32(value.item(), name)  # a host value: checking it costs no sync
        if value.device == device:
            return value.detach().to(torch.float32)
        raise ValueError(f"{name} is on {value.device} but params are on {device}")
    return finite_float32(value, name)


def check_unit_interval(value, name: str, open_right: bool = False) -> float:
    """``value`` in [0, 1] (or [0, 1)) as given, then rounded to float32 (0.99999999 is in
    [0, 1) although float32 rounds it to 1, as torch.optim.Adam accepts it)."""
    exact = as_real(value, name)
    rounded = finite_float32(exact, name)
    if not (0.0 <= exact < 1.0 if open_right else 0.0 <= exact <= 1.0):
        raise ValueError(f"{name} must be in [0, 1{')' if open_right else ']'}, got {value}")
    return rounded


def check_choice(value, name: str, choices) -> str:
    if value not in choices or not isinstance(value, str):
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def scalar_list(values, name: str) -> list:
    """A scalar or a sequence of scalars as a list (a 1-D array or tensor counts as a sequence)."""
    if isinstance(values, torch.Tensor):
        return [values] if values.dim() == 0 else list(values.unbind(0))
    if isinstance(values, np.ndarray):
        return [values] if values.ndim == 0 else list(values)
    if is_real_number(values):
        return [values]
    if isinstance(values, (str, bytes, bool, np.bool_)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name} must be a number, a 0-dim tensor or a sequence of them, got "
                        f"{type(values).__name__} {values!r}")
    return list(values)


def product(a: Union[float, torch.Tensor], b: Union[float, torch.Tensor], name: str):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a * b
    return finite_float32(a * b, name)


# ----------------------------------------------------------------------------- seeds


def check_seed(seed, name: str, device: torch.device) -> Union[int, torch.Tensor]:
    if type(seed) is int and 0 <= seed < 2**64:
        return seed
    return _rng.check_seed(seed, name, device)


def seed_list(seeds, device: torch.device, name: str) -> list:
    """Seeds as a list of ints and 0-dim int64 tensors on ``device`` (a 1-D tensor is K seeds)."""
    if type(seeds) is int:
        return [check_seed(seeds, name, device)]
    if isinstance(seeds, torch.Tensor) and seeds.dim() == 1:
        items = list(seeds.unbind(0))
    elif isinstance(seeds, torch.Tensor) or is_integer(seeds):
        items = [seeds]
    elif isinstance(seeds, (str, bytes, bool, np.bool_)) or not hasattr(seeds, "__iter__"):
        raise TypeError(f"{name} must be an int, a 0-dim int64 tensor or a sequence of them, "
                        f"got {type(seeds).__name__} {seeds!r}")
    else:
        items = list(seeds)
    if len(items) == 1:
        return [check_seed(items[0], name if not isinstance(seeds, (list, tuple)) else f"{name}[0]", device)]
    return [check_seed(seed, f"{name}[{k}]", device) for k, seed in enumerate(items)]


def rounding_seed_or(rounding_seed, first_seed, device):
    """The rounding seed: ``rounding_seed`` checked, or the first direction seed by default."""
    return first_seed if rounding_seed is None else check_seed(rounding_seed, "rounding_seed", device)


def pack_seeds(direction_seeds: list, rounding_seed, device: torch.device) -> Seeds:
    entries = list(direction_seeds)
    entries.append(rounding_seed)
    for entry in entries:
        if isinstance(entry, torch.Tensor):
            break
    else:
        return Seeds(values=tuple(entries))
    parts = [
        entry.reshape(()) if isinstance(entry, torch.Tensor)
        else torch.full((), _rng.seed_as_int64(entry), dtype=torch.int64, device=device)
        for entry in entries
    ]
    return Seeds(tensor=torch.stack(parts))


def pack_scalars(entries: List[Union[float, torch.Tensor]], device: torch.device) -> Scalars:
    for entry in entries:
        if isinstance(entry, torch.Tensor):
            break
    else:
        return Scalars(values=tuple(entries))
    parts = [
        entry.reshape(()).to(torch.float32) if isinstance(entry, torch.Tensor)
        else torch.full((), entry, dtype=torch.float32, device=device)
        for entry in entries
    ]
    return Scalars(tensor=torch.stack(parts))


def directions(seeds, coeffs, device) -> Tuple[list, list]:
    """(direction seeds, their coefficients) of the updating ops, checked and paired."""
    seeds_checked = seed_list(seeds, device, "seeds")
    if not seeds_checked:
        raise ValueError("seeds is empty: give at least one direction")
    if type(coeffs) is float:
        coeff_items = [coeffs]
    else:
        coeff_items = scalar_list(coeffs, "coeffs")
    if len(coeff_items) != len(seeds_checked):
        raise ValueError(f"coeffs has {len(coeff_items)} entries for {len(seeds_checked)} seeds")
    if len(coeff_items) == 1:
        names = ["coeffs[0]" if isinstance(coeffs, (list, tuple)) else "coeffs"]
    else:
        names = [f"coeffs[{k}]" for k in range(len(coeff_items))]
    return seeds_checked, [check_scalar(c, name, device) for c, name in zip(coeff_items, names)]


# ----------------------------------------------------------------------------- per-tensor lists


def check_int_list(values, count: int, name: str, default: Tuple[int, ...], check) -> Tuple[int, ...]:
    if values is None:
        return default
    if is_integer(values):
        values = [values]
    if isinstance(values, (str, bytes, torch.Tensor)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name} must be a sequence of ints (one per tensor), got {type(values).__name__}")
    values = list(values)
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} entries for {count} tensors")
    return tuple(check(value, f"{name}[{i}]") for i, value in enumerate(values))


def check_offset(value, name: str) -> int:
    if not is_integer(value):
        raise TypeError(f"{name} must be a non-negative int, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be non-negative, got {value}")
    return int(value)


def check_offsets(offsets, numels: Sequence[int]) -> Tuple[int, ...]:
    result = check_int_list(offsets, len(numels), "offsets", (0,) * len(numels), check_offset)
    for index, (offset, numel) in enumerate(zip(result, numels)):
        if offset + numel > INDEX_LIMIT:
            raise ValueError(f"offsets[{index}] + numel of params[{index}] = {offset + numel} exceeds 2**63: "
                             "element indices are int64")
    return result


def check_tids(tids, count: int) -> Tuple[int, ...]:
    return check_int_list(tids, count, "tids", tuple(range(count)), _rng.check_tid)


def check_weight_decay(weight_decay, decay_mask, count: int) -> Tuple[float, ...]:
    """Per-tensor weight decays: ``weight_decay`` (a float, or one per tensor) where
    ``decay_mask`` (one bool per tensor, default all True) is True, else 0."""
    if weight_decay is None or isinstance(weight_decay, (bool, np.bool_, torch.Tensor, str, bytes)):
        raise TypeError("weight_decay must be a float or a sequence of floats (one per tensor), got "
                        f"{type(weight_decay).__name__} {weight_decay!r}")
    if isinstance(weight_decay, np.ndarray) and weight_decay.ndim == 0:
        weight_decay = weight_decay.item()
    if not hasattr(weight_decay, "__iter__"):
        decay = finite_float32(weight_decay, "weight_decay")
        decays = [decay] * count
    else:
        decays = list(weight_decay)
        if len(decays) != count:
            raise ValueError(f"weight_decay has {len(decays)} entries for {count} tensors")
        decays = [finite_float32(value, f"weight_decay[{i}]") for i, value in enumerate(decays)]
    if decay_mask is not None:
        if isinstance(decay_mask, (str, bytes, bool, np.bool_, torch.Tensor)) or not hasattr(decay_mask, "__iter__"):
            raise TypeError(f"decay_mask must be a sequence of bools (one per tensor), got "
                            f"{type(decay_mask).__name__} {decay_mask!r}")
        mask = list(decay_mask)
        if len(mask) != count:
            raise ValueError(f"decay_mask has {len(mask)} entries for {count} tensors")
        for index, flag in enumerate(mask):
            if not isinstance(flag, (bool, np.bool_)):
                raise TypeError(f"decay_mask[{index}] must be a bool, got {type(flag).__name__} {flag!r}")
        decays = [value if flag else 0.0 for value, flag in zip(decays, mask)]
    return tuple(decays)


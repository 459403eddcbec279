"""The optimizers' seed stream: every seed of every step from (base seed, step, stream).

A seed of step ``t`` is ``derive_seed(base_seed, t, stream)``, a SplitMix64 hash chain::

    derive_seed(b, t, s) = mix(mix(mix(b) ^ t) ^ s)          (all arithmetic mod 2**64)

with ``mix`` SplitMix64's finalizer.  Streams number what a step needs:

* ``stream = k`` (``k < 2**32``): the noise seed of direction ``k``; ``step_seed(t)`` is
  stream 0.
* ``stream = ROUNDING_STREAM + p``: the ``rounding_seed`` of pass ``p`` of the step, passes
  numbered 0, 1, 2, ... in the order the step runs them (SPEC §2: the stochastic-rounding
  words of the passes of one step must be independent, so each pass gets its own key).

The state of the stream is therefore ``(base_seed, steps_taken)``: a resumed run regenerates
the seeds the original would have drawn.  :func:`derive_seeds_on_device` evaluates the same
chain with int64 tensor operations (two's-complement wrapping adds and multiplies, logical
shifts), so a captured CUDA graph derives each replay's seeds from a step counter held on the
device, equal bit for bit to the host ints.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch

__all__ = [
    "ROUNDING_STREAM",
    "splitmix64",
    "step_key",
    "stream_seed",
    "derive_seed",
    "derive_step_seeds",
    "step_streams",
    "derive_seeds_on_device",
    "as_int64",
]

MASK64 = (1 << 64) - 1
ROUNDING_STREAM = 1 << 32

_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def as_int64(value: int) -> int:
    """The int64 holding the bits of u64 ``value`` (two's complement), as a seed tensor does."""
    return value - (1 << 64) if value >= (1 << 63) else value


def splitmix64(value: int) -> int:
    """SplitMix64's finalizer of ``value + golden``: a bijection of u64 whose outputs are well mixed."""
    value = (value + _GOLDEN) & MASK64
    value = ((value ^ (value >> 30)) * _MIX1) & MASK64
    value = ((value ^ (value >> 27)) * _MIX2) & MASK64
    return value ^ (value >> 31)


def step_key(base_seed: int, step: int) -> int:
    """mix(mix(base_seed) ^ step): the part of the chain every seed of one step shares."""
    return splitmix64(splitmix64(base_seed) ^ (step & MASK64))


def stream_seed(key: int, stream: int) -> int:
    """The seed of ``stream`` from the step's :func:`step_key`."""
    return splitmix64(key ^ stream)


def derive_seed(base_seed: int, step: int, stream: int) -> int:
    """The u64 seed of ``stream`` at ``step`` (see the module docstring)."""
    return stream_seed(step_key(base_seed, step), stream)


def step_streams(num_directions: int, num_passes: int) -> Tuple[int, ...]:
    """The streams of one step: its direction seeds, then the rounding seeds of its passes."""
    return tuple(range(num_directions)) + tuple(ROUNDING_STREAM + p for p in range(num_passes))


def derive_step_seeds(base_seed: int, step: int, streams: Sequence[int]) -> Tuple[int, ...]:
    """``derive_seed(base_seed, step, s)`` for every ``s`` in ``streams``."""
    key = step_key(base_seed, step)
    return tuple(stream_seed(key, stream) for stream in streams)


def _shift_right_logical(value: torch.Tensor, bits: int) -> torch.Tensor:
    # int64 >> is arithmetic: clear the copies of the sign bit it shifts in.
    return (value >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64_tensor(value: torch.Tensor) -> torch.Tensor:
    value = value + as_int64(_GOLDEN)
    value = (value ^ _shift_right_logical(value, 30)) * as_int64(_MIX1)
    value = (value ^ _shift_right_logical(value, 27)) * as_int64(_MIX2)
    return value ^ _shift_right_logical(value, 31)


def derive_seeds_on_device(base_seed: int, step: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
    """:func:`derive_step_seeds` with the step held in a tensor, without reading it on the host.

    Args:
        base_seed: u64 Python int.
        step: 0-dim int64 tensor (the optimizer's step counter, on the parameters' device).
        streams: 1-D int64 tensor of stream numbers on the same device.

    Returns a 1-D int64 tensor (the seeds' 64 bits, two's complement) shaped like ``streams``,
    equal bit for bit to ``derive_step_seeds(base_seed, int(step), streams)``.  Relies on
    int64 tensor addition and multiplication wrapping modulo 2**64, as they do on every
    PyTorch device.
    """
    key = _splitmix64_tensor(step ^ as_int64(splitmix64(base_seed)))  # step_key, on the device
    return _splitmix64_tensor(streams ^ key)

"""The pure-PyTorch backend: the fused pass of ``backends/__init__.py`` in bounded chunks.

It runs anywhere PyTorch runs and defines what the fast backends must compute.  z is
regenerated chunk by chunk from ``addax_kernels.rng`` and never built for a whole tensor,
so the extra memory is O(CHUNK_ELEMENTS) whatever the model size.  Seeds and scalars held in
device tensors are used as tensors (never read on the host), so a device-seed call equals the
same call with host values without a sync.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .. import rng
from . import (
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
    STATE_MOMENTUM,
    FusedJob,
    TensorGroup,
)

# A multiple of 128 so chunk boundaries never split a Philox block of either noise kind.
CHUNK_ELEMENTS = 1 << 18


def unavailable_reason(device: torch.device) -> Optional[str]:
    """PyTorch's own ops run on any device torch has: None unless ``device`` is not there."""
    if device.type == "cpu":
        return None
    module = getattr(torch, device.type, None)
    is_available = getattr(module, "is_available", None)
    if callable(is_available) and not is_available():
        return f"torch.{device.type} is not available (no {device.type} device or no {device.type} build of torch)"
    device_count = getattr(module, "device_count", None)
    if device.index is not None and callable(device_count) and device.index >= device_count():
        return f"{device} does not exist ({device_count()} {device.type} devices)"
    return None


def prepare(group: TensorGroup, params, states) -> None:
    """The reference backend keeps nothing between calls."""
    return None


def _scalar(job: FusedJob, index: int):
    if job.scalars.on_device:
        return job.scalars.tensor[index]
    return job.scalars.values[index]


def _seed(job: FusedJob, index: int):
    if job.seeds.on_device:
        return job.seeds.tensor[index]
    return job.seeds.values[index]


def _round(x: torch.Tensor, dtype: torch.dtype, rounding: str, seed, tid: int, first: int) -> torch.Tensor:
    words = None
    if rounding == "stochastic" and dtype != torch.float32:
        words = rng.rounding_words(seed, tid, first, x.numel(), device=x.device)
    return rng.round_to_dtype(x, dtype, rounding, words)


def run(prepared, group: TensorGroup, job: FusedJob, params: Sequence[torch.Tensor],
        grads: Optional[Sequence[torch.Tensor]], states: Sequence[Sequence[torch.Tensor]]) -> None:
    shift = _scalar(job, SCALAR_SHIFT)
    lr = _scalar(job, SCALAR_LR)
    grad_coeff = _scalar(job, SCALAR_GRAD_COEFF)
    coeffs = [_scalar(job, SCALAR_FIRST_COEFF + k) for k in range(job.num_directions)]
    seeds = [_seed(job, k) for k in range(max(1, job.num_directions))]
    rounding_seed = _seed(job, max(1, job.num_directions))
    state_seeds = [rng.state_rounding_seed(rounding_seed, s) for s in range(STATE_BUFFERS[job.state])]
    needs_update = job.needs_update(group)
    with torch.no_grad():
        for position, index in enumerate(group.indices):
            flat = params[index].view(-1)
            grad_flat = grads[index].view(-1) if job.has_grad else None
            state_flats: List[torch.Tensor] = [buffers[index].view(-1) for buffers in states]
            tid, offset, decay = group.tids[position], group.offsets[position], group.weight_decay[position]
            for start in range(0, flat.numel(), CHUNK_ELEMENTS):
                stop = min(start + CHUNK_ELEMENTS, flat.numel())
                first, count = offset + start, stop - start
                device = flat.device

                def z(k):
                    return rng.noise_range(seeds[k], tid, first, count, noise=job.noise, device=device,
                                           sparsity_threshold=job.sparsity_threshold)

                x = flat[start:stop].to(torch.float32)
                z0 = z(0)
                if job.has_shift:
                    x = x + shift * z0
                if needs_update:
                    direction = torch.zeros_like(x)
                    for k, coeff in enumerate(coeffs):
                        direction = direction + coeff * (z0 if k == 0 else z(k))
                    if job.has_grad:
                        direction = direction + grad_coeff * grad_flat[start:stop].to(torch.float32)
                    if decay != 0.0:
                        direction = direction + decay * x
                    if job.state == STATE_MOMENTUM:
                        buffer = _scalar(job, SCALAR_MOMENTUM) * state_flats[0][start:stop].to(torch.float32)
                        buffer = buffer + direction
                        state_flats[0][start:stop] = _round(buffer, state_flats[0].dtype, job.rounding,
                                                            state_seeds[0], tid, first)
                        direction = buffer
                    elif job.state == STATE_ADAM:
                        m = state_flats[0][start:stop].to(torch.float32)
                        m = m + _scalar(job, SCALAR_ADAM_W1) * (direction - m)
                        v = _scalar(job, SCALAR_ADAM_BETA2) * state_flats[1][start:stop].to(torch.float32)
                        v = v + _scalar(job, SCALAR_ADAM_W2) * (direction * direction)
                        state_flats[0][start:stop] = _round(m, state_flats[0].dtype, job.rounding,
                                                            state_seeds[0], tid, first)
                        state_flats[1][start:stop] = _round(v, state_flats[1].dtype, job.rounding,
                                                            state_seeds[1], tid, first)
                        # float64 square root, rounded once: IEEE float32 sqrt (torch.sqrt on the CPU
                        # can be an ulp off), as the contract states.
                        denominator = (torch.sqrt(v.double()).float() / _scalar(job, SCALAR_ADAM_BC2_SQRT)
                                       + _scalar(job, SCALAR_ADAM_EPS))
                        direction = m / denominator
                    x = x - lr * direction
                flat[start:stop] = _round(x, flat.dtype, job.rounding, rounding_seed, tid, first)

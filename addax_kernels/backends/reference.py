"""The pure-PyTorch backend: the fused pass of ``backends/__init__.py`` in bounded chunks.

It runs anywhere PyTorch runs and defines what the fast backends must compute.  z is
regenerated chunk by chunk from ``addax_kernels.noise`` and never built for a whole tensor,
so the extra memory is O(CHUNK_ELEMENTS) whatever the model size.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from .. import rng
from . import SCALAR_FIRST_COEFF, SCALAR_GRAD_COEFF, SCALAR_LR, SCALAR_SHIFT, FusedJob

# A multiple of 128 so chunk boundaries never split a Philox block of either noise kind.
CHUNK_ELEMENTS = 1 << 18


def unavailable_reason(device: torch.device) -> Optional[str]:
    return None


def _scalar(job: FusedJob, index: int):
    if job.scalars.on_device:
        return job.scalars.tensor[index]
    return job.scalars.values[index]


def fused_update_(params: List[torch.Tensor], grads: Optional[List[torch.Tensor]], job: FusedJob) -> None:
    shift = _scalar(job, SCALAR_SHIFT)
    lr = _scalar(job, SCALAR_LR)
    grad_coeff = _scalar(job, SCALAR_GRAD_COEFF)
    coeffs = [_scalar(job, SCALAR_FIRST_COEFF + k) for k in range(job.num_directions)]
    needs_update = job.num_directions > 0 or job.has_grad or any(job.weight_decay)
    for index, param in enumerate(params):
        flat = param.view(-1)
        grad_flat = grads[index].view(-1) if grads is not None else None
        tid, offset, decay = job.tids[index], job.offsets[index], job.weight_decay[index]
        for start in range(0, flat.numel(), CHUNK_ELEMENTS):
            stop = min(start + CHUNK_ELEMENTS, flat.numel())
            first, count = offset + start, stop - start
            device = flat.device

            def z(k):
                return rng.noise_range(job.seeds[k], tid, first, count, noise=job.noise, device=device)

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
                x = x - lr * direction
            words = None
            if job.rounding == "stochastic" and param.dtype != torch.float32:
                words = rng.rounding_words(job.seeds[0], tid, first, count, device=device)
            flat[start:stop] = rng.round_to_dtype(x, param.dtype, job.rounding, words)

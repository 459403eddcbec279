"""``noise``: z materialized (for tests and references)."""

from __future__ import annotations

from typing import Union

import torch

from .. import rng as _rng
from ._perturb import perturb_
from ._types import SeedLike


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
    """z of SPEC §1 materialized as a tensor of ``shape`` (for tests and references).

    Args:
        shape: an int or a sequence of ints.
        seed: the key, an int in [0, 2**64) or a 0-dim int64/uint64 tensor.
        tid: the tensor's noise stream id, an int in [0, 2**32) (as ``tids`` in the ops).
        offset: the global flat index of element 0, an int >= 0 (as ``offsets`` in the ops).
        noise: "gaussian" (default) or "rademacher".
        sparsity: p in [0, 1): the elements SPEC §1's mask drops are 0.
        dtype: a floating dtype; float64 only from the reference backend.
        device: where to build z (default the current default device).
        backend: "reference" (default) evaluates SPEC §1 in PyTorch (in float64 when
            ``dtype=torch.float64``); any other backend runs its own kernel as θ = 0 + 1·z on a
            float32 buffer, which is exactly the z that backend uses in the fused ops.

    Raises:
        TypeError / ValueError: naming the bad argument (a non-floating dtype, float64 from a
            kernel backend, a seed, tid or offset out of range, an unknown noise kind).
        RuntimeError: the named backend cannot run on ``device``.
    """
    if backend == "reference":
        return _rng.noise(shape, seed, tid, offset, noise=noise, dtype=dtype, device=device, sparsity=sparsity)
    shape, tid, offset = _rng.check_noise_layout(shape, tid, offset, dtype)
    if dtype == torch.float64:
        raise ValueError("float64 noise comes from the reference backend only")
    out = torch.zeros(shape, dtype=torch.float32, device=device)
    perturb_(out, seed, 1.0, tids=[tid], offsets=[offset], noise=noise, sparsity=sparsity, backend=backend)
    return out.to(dtype)

"""Where a parameter shard sits in its tensor: the one fact the fused ops need under sharding.

z is defined on the unsharded tensor (SPEC §1), so a rank that holds a block of a DTensor
(FSDP2 ``fully_shard``, ``distribute_tensor``) passes the block and the global flat offset of
its first element to the ops.  :func:`local_shard` computes both.  The optimizers use it, so
it lives below them; the collectives and rank checks of training live in
``addax_kernels.distributed``, above the optimizers.

Nothing here imports ``torch.distributed.tensor`` until a DTensor is actually seen.
"""

from __future__ import annotations

import functools
import math
import sys
from typing import Tuple

import torch
import torch.distributed as dist

__all__ = ["is_dtensor", "local_shard"]

_SUPPORTED_LAYOUTS = (
    "supported: Replicate() on any mesh dimension, and Shard(0) (FSDP2 fully_shard, even or "
    "uneven) on any mesh dimensions; Shard(d) with d > 0 only when every dimension before d "
    "has size 1"
)


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor, without importing torch.distributed.tensor."""
    # A DTensor can only exist once its module is imported; checking sys.modules first keeps
    # plain single-process use free of the import.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def _check_placements(placements, shape) -> None:
    for mesh_dim, placement in enumerate(placements):
        kind = type(placement).__name__
        if "StridedShard" in kind:
            reason = "strided sharding (FSDP2 on top of tensor parallelism on the same tensor dim) interleaves rows"
        elif placement.is_partial():
            reason = "a Partial placement holds unreduced partial sums, not parameter values"
        elif placement.is_replicate() or placement.is_shard():
            continue
        else:
            reason = f"placement {placement!r} is not understood"
        raise ValueError(
            f"local_shard: placements {tuple(placements)} of a tensor of shape {tuple(shape)} "
            f"(mesh dim {mesh_dim}): {reason}; {_SUPPORTED_LAYOUTS}"
        )


def _flat_offset(global_shape, local_shape, global_offset, placements) -> int:
    """The flat index of the local block's first element, if the block is one flat range."""
    partial_dims = [d for d, (g, l) in enumerate(zip(global_shape, local_shape)) if l != g]
    if not partial_dims:
        return 0
    first = partial_dims[0]
    leading = math.prod(global_shape[:first])
    trailing_full = len(partial_dims) == 1
    if leading != 1 or not trailing_full:
        raise ValueError(
            f"local_shard: placements {tuple(placements)} give this rank the block of shape "
            f"{tuple(local_shape)} at {tuple(global_offset)} of a tensor of shape {tuple(global_shape)}, "
            f"which is not one contiguous range of the flattened tensor, so it has no single "
            f"element offset; {_SUPPORTED_LAYOUTS}"
        )
    return int(global_offset[first]) * math.prod(global_shape[first + 1 :])


@functools.lru_cache(maxsize=4096)
def _shard_layout(global_shape: Tuple[int, ...], mesh, placements, rank: int) -> Tuple[Tuple[int, ...], int]:
    """(local shape, flat offset) of this rank's block.

    Cached because the optimizers ask every step and DTensor's layout arithmetic costs
    ~100 µs per call; ``rank`` is part of the key because the layout depends on it.
    """
    _check_placements(placements, global_shape)
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError as error:  # a private helper; present in torch 2.5 through 2.13
        raise RuntimeError(
            f"local_shard needs torch.distributed.tensor._utils.compute_local_shape_and_global_offset, "
            f"which torch {torch.__version__} does not provide"
        ) from error
    local_shape, global_offset = compute_local_shape_and_global_offset(global_shape, mesh, placements)
    local_shape = tuple(int(size) for size in local_shape)
    if math.prod(local_shape) == 0:
        return local_shape, 0
    return local_shape, _flat_offset(global_shape, local_shape, tuple(global_offset), placements)


def local_shard(tensor: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """``(local_tensor, global_element_offset)`` for a parameter (or its gradient).

    For a DTensor, ``local_tensor`` is this rank's block, detached but aliasing the
    DTensor's storage (in-place ops on it update the parameter), and the offset is the flat
    row-major index of its first element in the unsharded tensor.  Passing it as
    ``offsets=[offset]`` to the fused ops gives the shard exactly the z, the rounding bits
    and therefore the result of the unsharded tensor.  A rank whose shard is empty (uneven
    sharding) gets an empty tensor, which the ops skip.

    Any other tensor is returned as ``(tensor, 0)``.

    Raises ValueError for layouts whose local block is not one flat range (``Shard(1)`` of
    a matrix, strided FSDP2+TP shards, ``Partial``) and for non-contiguous local tensors.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"local_shard takes a Tensor, got {type(tensor).__name__}")
    if not is_dtensor(tensor):
        return tensor, 0
    global_shape = tuple(tensor.shape)
    placements = tuple(tensor.placements)
    local_shape, offset = _shard_layout(global_shape, tensor.device_mesh, placements, dist.get_rank())
    with torch.no_grad():
        local = tensor.to_local().detach()
    if tuple(local.shape) != local_shape:
        raise ValueError(
            f"local_shard: the local tensor has shape {tuple(local.shape)} but placements "
            f"{placements} of a tensor of shape {global_shape} imply {local_shape} "
            f"(a padded or hand-built DTensor?)"
        )
    if local.numel() and not local.is_contiguous():
        raise ValueError(
            f"local_shard: the local tensor of shape {tuple(local.shape)} is not contiguous; the "
            f"fused ops update storage in place and cannot work through a copy"
        )
    return local, offset

"""torch.optim optimizers on the fused ops: :class:`MeZO` (ZO-SGD, n-SPSA, and ZO-Bench's
momentum, sign, conservative and one-sided variants), :class:`ZOAdam` and :class:`Addax`.

See ``docs/optimizers.md`` for the step algorithms, the memory story and a training loop.
The rounding policies (:data:`ROUNDING_CHOICES`, :data:`DEFAULT_ROUNDING`,
:func:`pass_roundings`) are defined in :mod:`addax_kernels.optim.rounding` and the seed
stream in :mod:`addax_kernels.optim.seeds`.
"""

from __future__ import annotations

import math
from typing import List

import torch

from ._base import NonFiniteLossError
from .adam import ZOAdam
from .addax import Addax
from .mezo import MeZO
from .rounding import DEFAULT_ROUNDING, ROUNDING_CHOICES, PassRoundings, pass_roundings

__all__ = [
    "MeZO",
    "ZOAdam",
    "Addax",
    "NonFiniteLossError",
    "ROUNDING_CHOICES",
    "DEFAULT_ROUNDING",
    "PassRoundings",
    "pass_roundings",
    "no_decay_param_groups",
]


def _is_norm_module(module: torch.nn.Module) -> bool:
    norm_types = [torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._NormBase]
    if hasattr(torch.nn, "RMSNorm"):
        norm_types.append(torch.nn.RMSNorm)
    if isinstance(module, tuple(norm_types)):
        return True
    # Model code defines its own norms (LlamaRMSNorm, T5LayerNorm, GemmaRMSNorm, ...).
    name = type(module).__name__.lower()
    return name.endswith("layernorm") or name.endswith("rmsnorm")


def no_decay_param_groups(model: torch.nn.Module, weight_decay: float = 0.1) -> List[dict]:
    """MeZO's grouping: biases and the weights of LayerNorm/RMSNorm-style modules get no weight
    decay, every other parameter gets ``weight_decay``.  Only parameters that require grad are
    included; tied parameters appear once.  Empty groups are dropped."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not (
        math.isfinite(weight_decay) and weight_decay >= 0
    ):
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    no_decay_ids = set()
    for module in model.modules():
        if _is_norm_module(module):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in no_decay_ids or name.rsplit(".", 1)[-1] == "bias":
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": decay, "weight_decay": float(weight_decay)},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]

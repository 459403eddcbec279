"""torch.optim optimizers on the fused ops: :class:`MeZO` (ZO-SGD, n-SPSA, and ZO-Bench's
momentum, sign, conservative and one-sided variants), :class:`ZOAdam` and :class:`Addax`, and the
package's weight-decay rule (:func:`decayed_parameter_names`, :func:`no_decay_param_groups`).

See ``docs/optimizers.md`` for the step algorithms, the memory story and a training loop.
The rounding policies (:data:`ROUNDING_CHOICES`, :data:`DEFAULT_ROUNDING`,
:func:`pass_roundings`) are defined in :mod:`addax_kernels.optim.rounding` and the seed
stream in :mod:`addax_kernels.optim.seeds`.
"""

from __future__ import annotations

import math
from typing import List

import torch

from .._numbers import is_real_number
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
    "decayed_parameter_names",
    "mezo_decays",
    "no_decay_param_groups",
]


# ----------------------------------------------------------------------------- weight decay
#
# The package's rule, used by no_decay_param_groups and ZOTrainer: every parameter takes
# weight decay except biases and the parameters of normalization layers.  Defined by module
# type, not by name, so that a Llama final ``model.norm`` or Qwen3's ``q_norm``/``k_norm``
# (RMSNorm modules whose names contain no "layernorm") are exempt like every other norm.
# MeZO's own rule (``mezo_decays``, by name) is kept as a named variant for front ends that
# reproduce MeZO.


def _is_norm_module(module: torch.nn.Module) -> bool:
    norm_types = [torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._NormBase]
    if hasattr(torch.nn, "RMSNorm"):
        norm_types.append(torch.nn.RMSNorm)
    if isinstance(module, tuple(norm_types)):
        return True
    # Model code defines its own norms (LlamaRMSNorm, T5LayerNorm, Qwen3RMSNorm, ...).
    return type(module).__name__.lower().endswith("norm")


def decayed_parameter_names(model: torch.nn.Module) -> List[str]:
    """Names (as ``model.named_parameters()`` gives them) of the parameters that take weight
    decay under the package's rule: all but biases (a parameter whose own name is ``bias``)
    and the parameters of normalization modules (torch's LayerNorm, RMSNorm, GroupNorm,
    BatchNorm/InstanceNorm, or any module class whose name ends in ``Norm``).  Frozen
    parameters are listed too; tied parameters once."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    exempt = set()
    for module in model.modules():
        if _is_norm_module(module):
            exempt.update(id(p) for p in module.parameters(recurse=False))
    return [
        name for name, param in model.named_parameters()
        if id(param) not in exempt and name.rsplit(".", 1)[-1] != "bias"
    ]


def mezo_decays(name: str) -> bool:
    """MeZO's weight-decay rule (princeton-nlp/MeZO, ``large_models/trainer.py``), by name:
    no decay if the name contains ``bias``, ``layer_norm`` or ``layernorm``.

    A named variant for front ends that reproduce MeZO (the MeZO-trainer adapter).  Unlike
    :func:`decayed_parameter_names` it decays norms named otherwise, e.g. a Llama final
    ``model.norm.weight`` and Qwen3's ``q_norm``/``k_norm`` weights, as MeZO does.
    """
    return "bias" not in name and "layer_norm" not in name and "layernorm" not in name


def no_decay_param_groups(model: torch.nn.Module, weight_decay: float = 0.0) -> List[dict]:
    """Two param groups under the package's rule (:func:`decayed_parameter_names`): the
    decayed parameters with ``weight_decay`` (default 0, as in MeZO and the Trainer), the
    biases and norm parameters with 0.  Only parameters that require grad are included, in
    ``model.named_parameters()`` order; tied parameters appear once; empty groups are dropped."""
    if not is_real_number(weight_decay) or not (
        math.isfinite(weight_decay) and weight_decay >= 0
    ):
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    decayed = set(decayed_parameter_names(model))
    trainable = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    groups = [
        {"params": [p for n, p in trainable if n in decayed], "weight_decay": float(weight_decay)},
        {"params": [p for n, p in trainable if n not in decayed], "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]

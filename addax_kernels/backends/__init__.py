"""The contract between the ops layer and the kernels, and the backend registry.

Every public op reduces to one fused elementwise pass over a group of tensors that share a
device and a dtype.  Per element ``e`` of a tensor with stream id ``tid``, global offset
``o`` and weight decay ``wd``, with ``z_k = Z(seeds[k], tid, o + e, 0)`` (SPEC §1) and all
math in float32::

    x = float32(theta[e])
    if has_shift:           x = x + shift * z_0
    d = sum_{k < num_directions} coeffs[k] * z_k          (k ascending)
    if has_grad:            d = d + grad_coeff * float32(grad[e])
    if wd != 0:             d = d + wd * x
    x = x - lr * d
    theta[e] = round_to_dtype(x, theta.dtype, rounding, words=Z-words(seeds[0], tid, o + e, 1))

* ``perturb_``:      has_shift, shift = scale, num_directions = 0, lr = 0 (so x - 0*0 = x).
* ``zo_update_``:    has_shift = restore is given, coeffs = the directions' coefficients.
* ``addax_update_``: coeffs = (alpha * zo_grad,), has_grad, grad_coeff = 1 - alpha.

Scalars travel in one vector laid out as ``[shift, lr, grad_coeff, coeff_0, ...]``: either
host floats (float32-representable, passed to kernels as runtime arguments) or one float32
tensor on the parameters' device (read by the kernel; no host sync, CUDA-graph friendly).

A backend is a module with

* ``unavailable_reason(device: torch.device) -> Optional[str]``: None when it can run on
  ``device``, else a sentence saying why not;
* ``fused_update_(params, grads, job: FusedJob) -> None``: the pass above, in place, on the
  device's current stream.  Inputs are already validated by ``addax_kernels.ops``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

BACKEND_NAMES = ("reference", "triton", "native")

SCALAR_SHIFT = 0
SCALAR_LR = 1
SCALAR_GRAD_COEFF = 2
SCALAR_FIRST_COEFF = 3


@dataclass(frozen=True)
class Scalars:
    """``[shift, lr, grad_coeff, coeff_0, ...]`` as host floats or as one device tensor."""

    values: Optional[Tuple[float, ...]] = None
    tensor: Optional[torch.Tensor] = None

    def __post_init__(self):
        if (self.values is None) == (self.tensor is None):
            raise ValueError("Scalars holds exactly one of values or tensor")

    @property
    def on_device(self) -> bool:
        return self.tensor is not None

    def __len__(self) -> int:
        return len(self.values) if self.values is not None else int(self.tensor.numel())


@dataclass(frozen=True)
class FusedJob:
    """Everything but the tensors for one fused pass (see the module docstring)."""

    seeds: Tuple[int, ...]
    tids: Tuple[int, ...]
    offsets: Tuple[int, ...]
    weight_decay: Tuple[float, ...]
    scalars: Scalars
    has_shift: bool
    num_directions: int
    has_grad: bool
    noise: str = "gaussian"
    rounding: str = "nearest"

    def select(self, indices) -> "FusedJob":
        """The same job restricted to the tensors at ``indices``."""
        return FusedJob(
            seeds=self.seeds,
            tids=tuple(self.tids[i] for i in indices),
            offsets=tuple(self.offsets[i] for i in indices),
            weight_decay=tuple(self.weight_decay[i] for i in indices),
            scalars=self.scalars,
            has_shift=self.has_shift,
            num_directions=self.num_directions,
            has_grad=self.has_grad,
            noise=self.noise,
            rounding=self.rounding,
        )


_MODULES = {
    "reference": "addax_kernels.backends.reference",
    "triton": "addax_kernels.backends.triton",
    "native": "addax_kernels.backends.native",
}


def load(name: str):
    """Import backend ``name``; raises ImportError with the cause if it cannot be imported."""
    if name not in _MODULES:
        raise ValueError(f"backend must be one of {('auto',) + BACKEND_NAMES}, got {name!r}")
    return importlib.import_module(_MODULES[name])


def unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """None if backend ``name`` can run on ``device``, else why not (never raises)."""
    try:
        module = load(name)
    except Exception as error:  # an optional dependency or the extension is missing
        return f"{name} backend cannot be imported: {type(error).__name__}: {error}"
    return module.unavailable_reason(torch.device(device))

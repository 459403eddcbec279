"""``zo_adam_update_``: ZO-Adam, ``torch.optim.Adam`` (L2 weight decay) on d (SPEC §3)."""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

from ..backends import (
    SCALAR_ADAM_BC2_SQRT,
    SCALAR_ADAM_BETA2,
    SCALAR_ADAM_EPS,
    SCALAR_ADAM_W1,
    SCALAR_ADAM_W2,
    SCALAR_LR,
    STATE_ADAM,
)
from . import _checks, _compiled, _dispatch, _docs
from ._types import ScalarLike, SeedLike, TensorList

STATE_NAMES = ("exp_avgs", "exp_avg_sqs")


def _adam_scalars(lr, step, betas, eps, device) -> dict:
    """The Adam slots of the scalar vector, lr / (1 − β1^t) included, as torch.optim.Adam computes them."""
    if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2:
        raise TypeError(f"betas must be a pair of floats, got {betas!r}")
    _checks.check_unit_interval(betas[0], "betas[0]", open_right=True)
    _checks.check_unit_interval(betas[1], "betas[1]", open_right=True)
    # torch.optim.Adam forms 1 − β and β^t from the Python floats; from β rounded to float32
    # first, 1 − β2 would be off by 1.3e-5 relative for β2 = 0.999.
    beta1, beta2 = _checks.as_real(betas[0], "betas[0]"), _checks.as_real(betas[1], "betas[1]")
    eps = _checks.finite_float32(eps, "eps")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    lr = _checks.check_scalar(lr, "lr", device)
    if isinstance(step, torch.Tensor):
        if step.dim() != 0 or step.device != device:
            raise ValueError(f"step must be an int >= 1 or a 0-dim tensor on {device}, got shape "
                             f"{tuple(step.shape)} on {step.device}")
        if step.dtype.is_floating_point or step.dtype.is_complex or step.dtype == torch.bool:
            raise TypeError(f"step must be an integer tensor (a count of updates), got {step.dtype}")
        if step.device.type == "cpu":
            step = step.item()  # a host value: checked, and computed exactly, as an int below
    if isinstance(step, torch.Tensor):
        step = step.detach().to(torch.float32)
        # torch.full, not torch.tensor: no host-to-device copy inside a captured step.
        bias_correction1 = 1 - torch.pow(torch.full((), beta1, dtype=torch.float32, device=device), step)
        bc2_sqrt = torch.sqrt(1 - torch.pow(torch.full((), beta2, dtype=torch.float32, device=device), step))
        step_size = lr / bias_correction1
    else:
        if not _checks.is_integer(step) or step < 1:
            raise ValueError("step must be an int >= 1 (the number of this update, as torch.optim.Adam counts), "
                             f"got {step!r}")
        step = int(step)
        bias_correction1 = 1 - beta1**step
        bc2_sqrt = _checks.finite_float32(math.sqrt(1 - beta2**step), "sqrt(1 - betas[1]**step)")
        step_size = (lr / bias_correction1 if isinstance(lr, torch.Tensor)
                     else _checks.finite_float32(lr / bias_correction1, "lr / (1 - betas[0]**step)"))
    return {
        SCALAR_LR: step_size,
        SCALAR_ADAM_W1: _checks.finite_float32(1.0 - beta1, "1 - betas[0]"),
        SCALAR_ADAM_BETA2: _checks.finite_float32(beta2, "betas[1]"),
        SCALAR_ADAM_W2: _checks.finite_float32(1.0 - beta2, "1 - betas[1]"),
        SCALAR_ADAM_BC2_SQRT: bc2_sqrt,
        SCALAR_ADAM_EPS: eps,
    }


def zo_adam_update_(
    params: TensorList,
    exp_avgs: TensorList,
    exp_avg_sqs: TensorList,
    seeds: Union[SeedLike, Sequence[SeedLike]],
    coeffs: Union[ScalarLike, Sequence[ScalarLike]],
    lr: ScalarLike,
    step: Union[int, torch.Tensor],
    *,
    betas: Tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    restore: Optional[ScalarLike] = None,
    weight_decay: Union[float, Sequence[float]] = 0.0,
    decay_mask: Optional[Sequence[bool]] = None,
    tids: Optional[Sequence[int]] = None,
    offsets: Optional[Sequence[int]] = None,
    noise: str = "gaussian",
    rounding: str = "nearest",
    rounding_seed: Optional[SeedLike] = None,
    sparsity: float = 0.0,
    backend: str = "auto",
) -> None:
    if torch.compiler.is_compiling():
        _compiled.record("zo_adam_update_", params, None, ((exp_avgs, STATE_NAMES[0]), (exp_avg_sqs, STATE_NAMES[1])),
                         (("seeds", seeds, "seed", True), ("coeffs", coeffs, "real", True), ("lr", lr, "real", False),
                          ("step", step, "int", False), ("betas", betas, "real", True), ("eps", eps, "real", False),
                          ("restore", restore, "real", False), ("rounding_seed", rounding_seed, "seed", False)),
                         tids, offsets, weight_decay, decay_mask, noise, rounding, sparsity, backend)
        return
    _dispatch.run_update(params, None, (exp_avgs, exp_avg_sqs), STATE_NAMES, STATE_ADAM,
                         lambda device: _checks.directions(seeds, coeffs, device), lr, restore,
                         lambda device: _adam_scalars(lr, step, betas, eps, device), weight_decay, decay_mask, tids,
                         offsets, noise, rounding, rounding_seed, sparsity, backend)


def _from_record(params, grads, states, values, weight_decay, config) -> None:
    seeds, coeffs, lr, step, betas, eps, restore, rounding_seed = values
    zo_adam_update_(params, states[0], states[1], seeds, coeffs, lr, step, betas=betas, eps=eps, restore=restore,
                    weight_decay=weight_decay, rounding_seed=rounding_seed, **config)


_compiled.register("zo_adam_update_", _from_record)

zo_adam_update_.__doc__ = _docs.compose(
    """ZO-Adam in one pass: ``torch.optim.Adam`` (L2 weight decay) applied to d (SPEC §3)::

    θ' = θ + restore·z(seeds[0]);  d = Σ_k coeffs[k]·z(seeds[k]) + wd·θ'
    m ← m + (1−β1)(d − m);  v ← β2·v + (1−β2)·d²
    θ ← θ' − lr/(1−β1^t) · m / (sqrt(v)/sqrt(1−β2^t) + eps)""",
    _docs.PARAMS,
    """\
    exp_avgs, exp_avg_sqs: m and v, one float32 or bfloat16 tensor per param in each (the
        param's shape and device, contiguous, one dtype per param for both, not overlapping
        anything written), zero before the first step.  Updated in place.""",
    _docs.SEEDS,
    _docs.COEFFS,
    _docs.LR + "\n" + _docs.STEP_SCALAR,
    """\
    step: t >= 1, the number of this update (as torch.optim.Adam counts): an int, or a 0-dim
        integer tensor on the params' device (a CPU tensor is read and checked like an int; on
        an accelerator the bias corrections are computed on the device, for captured steps, and
        the value is not checked, which would cost a host sync).
    betas: (β1, β2), each in [0, 1).
    eps: Adam's epsilon, a float >= 0.""",
    _docs.RESTORE,
    _docs.WEIGHT_DECAY,
)

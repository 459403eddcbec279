"""``zo_momentum_update_``: ZO-SGD with momentum, ``torch.optim.SGD(momentum=β)`` on d (SPEC §3)."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ..backends import SCALAR_MOMENTUM, STATE_MOMENTUM
from . import _checks, _compiled, _dispatch, _docs
from ._types import ScalarLike, SeedLike, TensorList

STATE_NAMES = ("momentum_buffers",)


def zo_momentum_update_(
    params: TensorList,
    momentum_buffers: TensorList,
    seeds: Union[SeedLike, Sequence[SeedLike]],
    coeffs: Union[ScalarLike, Sequence[ScalarLike]],
    lr: ScalarLike,
    momentum: float,
    *,
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
        _compiled.record("zo_momentum_update_", params, None, ((momentum_buffers, STATE_NAMES[0]),),
                         (("seeds", seeds, "seed", True), ("coeffs", coeffs, "real", True), ("lr", lr, "real", False),
                          ("momentum", momentum, "real", False), ("restore", restore, "real", False),
                          ("rounding_seed", rounding_seed, "seed", False)),
                         tids, offsets, weight_decay, decay_mask, noise, rounding, sparsity, backend)
        return
    momentum = _checks.check_unit_interval(momentum, "momentum")
    _dispatch.run_update(params, None, (momentum_buffers,), STATE_NAMES, STATE_MOMENTUM,
                         lambda device: _checks.directions(seeds, coeffs, device), lr, restore,
                         {SCALAR_MOMENTUM: momentum}, weight_decay, decay_mask, tids, offsets, noise, rounding,
                         rounding_seed, sparsity, backend)


def _from_record(params, grads, states, values, weight_decay, config) -> None:
    seeds, coeffs, lr, momentum, restore, rounding_seed = values
    zo_momentum_update_(params, states[0], seeds, coeffs, lr, momentum, restore=restore, weight_decay=weight_decay,
                        rounding_seed=rounding_seed, **config)


_compiled.register("zo_momentum_update_", _from_record)

zo_momentum_update_.__doc__ = _docs.compose(
    """ZO-SGD with momentum in one pass: ``torch.optim.SGD(momentum=β)`` applied to d (SPEC §3)::

    θ' = θ + restore·z(seeds[0]);  d = Σ_k coeffs[k]·z(seeds[k]) + wd·θ'
    buf ← momentum·buf + d;  θ ← θ' − lr·buf""",
    _docs.PARAMS,
    """\
    momentum_buffers: one float32 or bfloat16 tensor per param (the param's shape and device,
        contiguous, not overlapping anything written), zero before the first step (then the
        first step stores buf = d, as torch's SGD does).  Updated in place.""",
    _docs.SEEDS,
    _docs.COEFFS,
    _docs.LR + "\n" + _docs.STEP_SCALAR,
    """\
    momentum: β, a float in [0, 1].""",
    _docs.RESTORE,
    _docs.WEIGHT_DECAY,
)

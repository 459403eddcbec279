"""``zo_update_``: θ ← θ' − lr·(Σ_k coeffs[k]·z(seeds[k]) + wd·θ'), θ' = θ + restore·z(seeds[0])."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ..backends import STATE_NONE
from . import _checks, _compiled, _dispatch, _docs
from ._types import ScalarLike, SeedLike, TensorList


def zo_update_(
    params: TensorList,
    seeds: Union[SeedLike, Sequence[SeedLike]],
    coeffs: Union[ScalarLike, Sequence[ScalarLike]],
    lr: ScalarLike,
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
        _compiled.record("zo_update_", params, None, (),
                         (("seeds", seeds, "seed", True), ("coeffs", coeffs, "real", True), ("lr", lr, "real", False),
                          ("restore", restore, "real", False), ("rounding_seed", rounding_seed, "seed", False)),
                         tids, offsets, weight_decay, decay_mask, noise, rounding, sparsity, backend)
        return
    _dispatch.run_update(params, None, (), (), STATE_NONE, lambda device: _checks.directions(seeds, coeffs, device),
                         lr, restore, _dispatch.NO_STATE_SCALARS, weight_decay, decay_mask, tids, offsets, noise,
                         rounding, rounding_seed, sparsity, backend)


def _from_record(params, grads, states, values, weight_decay, config) -> None:
    seeds, coeffs, lr, restore, rounding_seed = values
    zo_update_(params, seeds, coeffs, lr, restore=restore, weight_decay=weight_decay, rounding_seed=rounding_seed,
               **config)


_compiled.register("zo_update_", _from_record)

zo_update_.__doc__ = _docs.compose(
    """In place, θ ← θ' − lr·(Σ_k coeffs[k]·z(seeds[k]) + wd·θ') with θ' = θ + restore·z(seeds[0])
(θ' = θ without ``restore``): K directions in one pass, math in float32, one rounding to each
tensor's dtype (SPEC §2).""",
    _docs.PARAMS,
    _docs.SEEDS,
    _docs.COEFFS,
    _docs.LR + "\n" + _docs.STEP_SCALAR,
    _docs.RESTORE,
    _docs.WEIGHT_DECAY,
)

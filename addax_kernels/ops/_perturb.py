"""``perturb_``: θ ← θ + scale·z(seed) (SPEC §2)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..backends import SCALAR_FIRST_COEFF, SCALAR_SHIFT, FusedJob
from . import _checks, _compiled, _dispatch, _docs, _plan
from ._types import ScalarLike, SeedLike, TensorList


def perturb_(
    params: TensorList,
    seed: SeedLike,
    scale: ScalarLike,
    *,
    tids: Optional[Sequence[int]] = None,
    offsets: Optional[Sequence[int]] = None,
    noise: str = "gaussian",
    rounding: str = "nearest",
    rounding_seed: Optional[SeedLike] = None,
    sparsity: float = 0.0,
    backend: str = "auto",
) -> None:
    if torch.compiler.is_compiling():
        _compiled.record("perturb_", params, None, (), (("seed", seed, "seed", False), ("scale", scale, "real", False),
                                                         ("rounding_seed", rounding_seed, "seed", False)),
                         tids, offsets, _dispatch.NO_DECAY, None, noise, rounding, sparsity, backend)
        return
    params = _dispatch.as_tensor_list(params, "params")
    plan = _plan.plan_for(params, (), (), tids, offsets, _dispatch.NO_DECAY, None)
    device = plan.device
    seed = _checks.check_seed(seed, "seed", device)
    scale = _checks.check_scalar(scale, "scale", device)
    threshold = _dispatch.check_options(noise, rounding, sparsity)
    rounding_seed = _checks.rounding_seed_or(rounding_seed, seed, device)
    scalar_entries = [0.0] * SCALAR_FIRST_COEFF
    scalar_entries[SCALAR_SHIFT] = scale
    job = FusedJob(
        seeds=_checks.pack_seeds([seed], rounding_seed, device),
        scalars=_checks.pack_scalars(scalar_entries, device),
        has_shift=True,
        num_directions=0,
        has_grad=False,
        noise=noise,
        rounding=rounding,
        sparsity_threshold=threshold,
    )
    _dispatch.execute(plan, backend, job, params, None, None, None, ())


def _from_record(params, grads, states, values, weight_decay, config) -> None:
    seed, scale, rounding_seed = values
    perturb_(params, seed, scale, rounding_seed=rounding_seed, **config)


_compiled.register("perturb_", _from_record)

perturb_.__doc__ = _docs.compose(
    """In place, θ ← θ + scale·z(seed) for every tensor of ``params`` (SPEC §2), math in float32,
one rounding to each tensor's dtype.""",
    _docs.PARAMS,
    _docs.SEED,
    """\
    scale: the multiple of z added, a step scalar.
""" + _docs.STEP_SCALAR,
)

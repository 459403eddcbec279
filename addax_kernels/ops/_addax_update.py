"""``addax_update_``: θ ← θ − lr·(α·zo_grad·z(seed) + (1−α)·grad + wd·θ) (SPEC §2)."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ..backends import STATE_NONE
from . import _checks, _compiled, _dispatch, _docs
from ._types import ScalarLike, SeedLike, TensorList


def addax_update_(
    params: TensorList,
    grads: TensorList,
    seed: SeedLike,
    zo_grad: ScalarLike,
    lr: ScalarLike,
    alpha: float,
    *,
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
        _compiled.record("addax_update_", params, grads, (),
                         (("seed", seed, "seed", False), ("zo_grad", zo_grad, "real", False), ("lr", lr, "real", False),
                          ("alpha", alpha, "real", False), ("rounding_seed", rounding_seed, "seed", False)),
                         tids, offsets, weight_decay, decay_mask, noise, rounding, sparsity, backend)
        return
    if grads is None:  # None means "no gradient term" inside run_update
        raise TypeError("grads must be a Tensor or a sequence of Tensors, got NoneType")
    alpha_checked = _checks.check_unit_interval(alpha, "alpha")
    grad_coeff = _checks.finite_float32(1.0 - alpha_checked, "1 - alpha")

    def directions(device):
        seed_checked = _checks.seed_list(seed, device, "seed")
        if len(seed_checked) != 1:
            raise ValueError(f"addax_update_ takes one seed, got {len(seed_checked)}")
        zo_grad_checked = _checks.check_scalar(zo_grad, "zo_grad", device)
        return seed_checked, [_checks.product(alpha_checked, zo_grad_checked, "alpha * zo_grad")]

    _dispatch.run_update(params, grads, (), (), STATE_NONE, directions, lr, None, _dispatch.NO_STATE_SCALARS,
                         weight_decay, decay_mask, tids, offsets, noise, rounding, rounding_seed, sparsity, backend,
                         grad_coeff=grad_coeff)


def _from_record(params, grads, states, values, weight_decay, config) -> None:
    seed, zo_grad, lr, alpha, rounding_seed = values
    addax_update_(params, grads, seed, zo_grad, lr, alpha, weight_decay=weight_decay, rounding_seed=rounding_seed,
                  **config)


_compiled.register("addax_update_", _from_record)

addax_update_.__doc__ = _docs.compose(
    """In place, θ ← θ − lr·(α·zo_grad·z(seed) + (1−α)·grad + wd·θ) (SPEC §2): Addax's hybrid step,
the zeroth-order estimate and the first-order gradient in one pass, math in float32, one
rounding to each tensor's dtype.""",
    _docs.PARAMS,
    """\
    grads: one gradient per param (a Tensor or a sequence): float32, float16 or bfloat16,
        contiguous, the param's shape and device, sharing no memory with any param.  Read only.""",
    _docs.SEED,
    """\
    zo_grad: the projected gradient of the zeroth-order estimate, a step scalar.""",
    _docs.LR + "\n" + _docs.STEP_SCALAR,
    """\
    alpha: the weight of the zeroth-order term, a float in [0, 1] (1: pure ZO, 0: plain SGD).""",
    _docs.WEIGHT_DECAY,
)

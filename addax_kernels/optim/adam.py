"""ZO-Adam (ZO-Bench's ``zo_adam``): torch.optim.Adam applied to the ZO gradient g·z, with the
restore, the moment updates and the parameter update in one fused pass per dtype group."""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .. import ops
from ._base import ZerothOrderOptimizer, check_betas, check_nonnegative
from .rounding import DEFAULT_ROUNDING


class ZOAdam(ZerothOrderOptimizer):
    """Adam on the zeroth-order gradient (SPEC §3)::

        g = grad_reduce((ℓ+ − ℓ−)/(2ε))        as in MeZO (K directions, one-sided, sign, sparsity)
        d = Σ_k g_k/K·z(s_k) + wd·θ'            θ' = θ + ε·z(s_{K-1}), the restore
        m ← β1·m + (1−β1)·d;  v ← β2·v + (1−β2)·d²
        θ ← θ' − lr/(1−β1^t) · m / (sqrt(v)/sqrt(1−β2^t) + adam_eps)

    exactly ``torch.optim.Adam(lr, betas, adam_eps, weight_decay)`` (L2 weight decay, no
    amsgrad) stepped with ``p.grad = g·z`` at the restored θ, t the number of this update.
    ``exp_avg`` (m) and ``exp_avg_sq`` (v) are the only state: two buffers per parameter in
    ``state_dtype``, created at the first step; t is the optimizer's step counter + 1.

    Args:
        params: parameters or param groups; groups may set ``lr``, ``eps``, ``betas``,
            ``adam_eps``, ``weight_decay``.
        lr: Adam's learning rate (float or 0-dim tensor).
        eps: the perturbation scale ε of the estimate.
        betas: Adam's (β1, β2), each in [0, 1).
        adam_eps: Adam's ε in the denominator.
        weight_decay: L2 weight decay as torch.optim.Adam applies it (added to d).
        num_directions, sign, one_sided, sparsity, state_dtype, noise, rounding, seed, backend,
        grad_reduce, capturable: as in :class:`MeZO`.
    """

    _STATE_KEYS = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr=1e-3, eps: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 adam_eps: float = 1e-8, weight_decay: float = 0.0, num_directions: int = 1, sign: bool = False,
                 one_sided: bool = False, sparsity: float = 0.0, state_dtype: torch.dtype = torch.float32,
                 noise: str = "gaussian", rounding: str = DEFAULT_ROUNDING, seed: int = 0, backend: str = "auto",
                 grad_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, capturable: bool = False):
        super().__init__(params, dict(lr=lr, eps=eps, betas=betas, adam_eps=adam_eps, weight_decay=weight_decay),
                         num_directions=num_directions, noise=noise, rounding=rounding, seed=seed, backend=backend,
                         grad_reduce=grad_reduce, sparsity=sparsity, one_sided=one_sided, sign=sign,
                         state_dtype=state_dtype, capturable=capturable)

    def _group_checks(self):
        checks = super()._group_checks()
        checks["betas"] = check_betas
        checks["adam_eps"] = check_nonnegative
        return checks

    def _update_key(self, group: dict) -> tuple:
        return (tuple(float(beta) for beta in group["betas"]), float(group["adam_eps"]))

    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> torch.Tensor:
        """One step; ``closure()`` returns the loss (called under ``torch.no_grad``, 2K times,
        K + 1 one-sided).  Returns the mean of the losses at θ + ε·z(s_k).  A non-finite loss
        undoes the step as in :class:`MeZO`."""
        if closure is None or not callable(closure):
            raise TypeError(f"ZOAdam.step needs a callable closure that returns the loss, got {type(closure).__name__}")
        self._check_groups()
        plan = self._current_plan()
        seeds = self._step_seeds(plan.device)
        estimate = self._estimate(plan, seeds, closure, "closure")
        self._check_finite(plan, seeds, estimate, "closure")
        rounding_seed = seeds.rounding()
        directions = seeds.update_directions()
        step = self._adam_step()
        cache: dict = {}
        with torch.no_grad():
            for call in plan.update_calls:
                group = self.param_groups[call.groups[0]]
                exp_avgs, exp_avg_sqs = call.states
                ops.zo_adam_update_(
                    call.tensors, exp_avgs, exp_avg_sqs, directions, self._coefficients(estimate, call, cache),
                    self._lr(group, estimate), step, betas=tuple(group["betas"]), eps=float(group["adam_eps"]),
                    restore=self._restore_scale(estimate, call), weight_decay=call.weight_decay,
                    rounding=self._roundings.update, rounding_seed=rounding_seed, **call.kwargs)
        self._advance(estimate.finite)
        self.projected_grads = estimate.projected
        self.zo_loss = self._zo_loss(estimate)
        return self.zo_loss

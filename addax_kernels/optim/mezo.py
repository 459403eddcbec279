"""MeZO (ZO-SGD, Malladi et al. 2023) and its ZO-Bench variants on the fused ops: momentum
(ZO-SGD-MMT), sign (ZO-SGD-Sign), the conservative step (ZO-SGD-Cons), one-sided estimates,
sparse perturbations, n-SPSA; no gradient, no host sync beyond one finiteness read per step."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import ops
from ._base import (
    NonFiniteLossError,
    ZerothOrderOptimizer,
    _Estimate,
    _Plan,
    _StepSeeds,
    check_bool,
    check_nonnegative,
    check_unit_interval,
    loss_scalar,
)
from .rounding import DEFAULT_ROUNDING


class MeZO(ZerothOrderOptimizer):
    """Zeroth-order SGD with regenerated noise (SPEC §3) and the ZO-Bench options.

    One step with seeds s_0 … s_{K-1} (``direction_seeds(steps_taken)``)::

        for k in 0 … K-1:
            θ ← θ + ε·z(s_k)          (fused with the restore of direction k-1 when k > 0)
            ℓ+_k = closure()
            θ ← θ − 2ε·z(s_k);  ℓ−_k = closure()          (two-sided, the default)
        g = grad_reduce((ℓ+ − ℓ−) / (2ε))                   # [K], on the device
        d = Σ_k g_k/K·z(s_k) + wd·θ'                         # θ' = θ + ε·z(s_{K-1}), the restore
        θ ← θ' − lr·d                       (momentum = 0: one fused pass)
        buf ← β·buf + d;  θ ← θ' − lr·buf   (momentum β: torch.optim.SGD(momentum=β) on d, one pass)

    Options from ZO-Bench (ZO-Bench/ZO-LLM):

    * ``one_sided=True``: ℓ0 = closure() at θ first, then only the +ε evaluations, and
      g_k = (ℓ+_k − ℓ0)/ε (K + 1 forward passes, K + 1 passes over the parameters).
    * ``sign=True`` (ZO-SGD-Sign): sign(g_k) in place of g_k.
    * ``conservative=True`` (ZO-SGD-Cons): ℓ0 = ℓ(θ); with d = Σ_k g_k/K·z_k, evaluate
      ℓ(θ − lr·d) and ℓ(θ + lr·d) and keep the point with the lowest loss, ties resolved as
      ZO-Bench does (θ + lr·d, then θ − lr·d, then θ); no momentum, no weight decay.  The
      choice is made on the device (no host read needed), at most three update passes.
    * ``sparsity=p``: each element is perturbed and updated only where its purpose-2 uniform is
      >= p (SPEC §1), the mask regenerated per pass, never stored.

    Each param group has its own ``lr``, ``eps``, ``weight_decay`` and ``momentum``; every group
    is perturbed by its own ε and updated with its own estimate ``(ℓ+ − ℓ−)/(2ε_group)``.

    A non-finite loss undoes the step: the parameters are moved back to θ (up to one restore
    pass's rounding), the step counter does not advance, and :class:`NonFiniteLossError` is
    raised.  Checking costs one host read of a flag per step; with ``capturable=True`` there is
    none: the update is zeroed on the device instead (see ``docs/optimizers.md``).

    Args:
        params: parameters or param groups (see :func:`no_decay_param_groups`).
        lr: learning rate (float or 0-dim tensor; schedulers edit ``group["lr"]``).
        eps: perturbation scale ε.
        weight_decay: added to the update direction as wd·θ' (the restored θ), as in MeZO.
        momentum: β of torch.optim.SGD's momentum (no dampening, no Nesterov), in [0, 1);
            β > 0 keeps a ``"momentum_buffer"`` per parameter in ``state_dtype``.
        num_directions: K, directions averaged per step (n-SPSA); costs 2K forward passes.
        sign: ZO-SGD-Sign.
        one_sided: one-sided estimates.
        conservative: ZO-SGD-Cons.
        sparsity: p in [0, 1), sparse perturbations.
        state_dtype: ``torch.float32`` (default) or ``torch.bfloat16`` (rounded like the update
            pass: stochastically under the default rounding policy).
        noise: ``"gaussian"`` or ``"rademacher"``.
        rounding: a policy of :mod:`addax_kernels.optim.rounding` (which storage rounding each
            kind of pass uses for bf16/fp16 parameters).
        seed: base seed (u64) of the seed stream; data-parallel ranks must share it.
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"native"``.
        grad_reduce: optional ``callable(Tensor[K]) -> Tensor[K]`` applied to the projected
            gradients before the update (e.g. an all-reduce mean across ranks).
        capturable: keep the step counter, seeds and lr on the device so that a whole
            ``step()`` can be captured in a CUDA graph (all parameters on one device).
    """

    def __init__(self, params, lr=1e-6, eps: float = 1e-3, weight_decay: float = 0.0, momentum: float = 0.0,
                 num_directions: int = 1, sign: bool = False, one_sided: bool = False, conservative: bool = False,
                 sparsity: float = 0.0, state_dtype: torch.dtype = torch.float32, noise: str = "gaussian",
                 rounding: str = DEFAULT_ROUNDING, seed: int = 0, backend: str = "auto",
                 grad_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, capturable: bool = False):
        self.conservative = check_bool(conservative, "conservative")
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay, momentum=momentum),
                         num_directions=num_directions, noise=noise, rounding=rounding, seed=seed, backend=backend,
                         grad_reduce=grad_reduce, sparsity=sparsity, one_sided=one_sided, sign=sign,
                         state_dtype=state_dtype, capturable=capturable)

    _STATE_KEYS = ("momentum_buffer",)

    def _group_checks(self):
        checks = super()._group_checks()
        checks["momentum"] = lambda value, name: check_unit_interval(value, name, open_right=True)
        if self.conservative:
            checks["momentum"] = _must_be_zero("conservative=True (ZO-SGD-Cons) takes no momentum")
            checks["weight_decay"] = _must_be_zero(
                "conservative=True (ZO-SGD-Cons) compares θ ∓ lr·g·z and takes no weight decay")
        return checks

    def _update_key(self, group: dict) -> tuple:
        return (float(group["momentum"]),)

    def _needs_state(self, group: dict) -> bool:
        return float(group["momentum"]) != 0.0

    # -------------------------------------------------------------- the step

    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> torch.Tensor:
        """One step; ``closure()`` returns the loss of the current batch (called under
        ``torch.no_grad``; 2K times, K + 1 one-sided, and 2 more for the conservative step).

        Returns the mean of the losses at θ + ε·z(s_k) (the conservative step: the loss of the
        point it kept).
        """
        if closure is None:
            raise TypeError(
                "MeZO.step needs a closure that returns the loss: the optimizer evaluates it at "
                "θ ± ε·z itself (no .backward() is involved)"
            )
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")
        self._check_groups()
        plan = self._current_plan()
        seeds = self._step_seeds(plan.device)
        estimate = self._estimate(plan, seeds, closure, "closure", baseline=self.conservative)
        baseline = [estimate.baseline] if estimate.baseline is not None else []
        self._check_finite(plan, seeds, estimate, "closure", extra=baseline)
        if self.conservative:
            loss, finite = self._conservative_update(plan, seeds, estimate, closure)
        else:
            self._update(plan, seeds, estimate)
            loss, finite = self._zo_loss(estimate), estimate.finite
        self._advance(finite)
        self.projected_grads = estimate.projected
        self.zo_loss = loss
        return loss

    def _update(self, plan: _Plan, seeds: _StepSeeds, estimate: _Estimate) -> None:
        """The fused restore + update pass (state included)."""
        rounding_seed = seeds.rounding()
        directions = seeds.update_directions()
        cache: dict = {}
        with torch.no_grad():
            for call in plan.update_calls:
                group = self.param_groups[call.groups[0]]
                coefficients = self._coefficients(estimate, call, cache)
                lr = self._lr(group, estimate)
                kwargs = dict(restore=self._restore_scale(estimate, call), weight_decay=call.weight_decay,
                              rounding=self._roundings.update, rounding_seed=rounding_seed, **call.kwargs)
                momentum = float(group["momentum"])
                if momentum:
                    ops.zo_momentum_update_(call.tensors, call.states[0], directions, coefficients, lr, momentum,
                                            **kwargs)
                else:
                    ops.zo_update_(call.tensors, directions, coefficients, lr, **kwargs)

    def _conservative_update(self, plan: _Plan, seeds: _StepSeeds, estimate: _Estimate, closure):
        """ZO-SGD-Cons: θ − lr·d and θ + lr·d against θ, keep the lowest loss (see the class doc).

        Three update passes: restore and move to θ − lr·d; move to θ + lr·d; move to the kept
        point (skipped eagerly when it is θ + lr·d).  Returns (the kept point's loss, the
        capturable finite flag or None).
        """
        device = plan.device
        directions = seeds.update_directions()
        cache: dict = {}
        coefficients = [self._coefficients(estimate, call, cache) for call in plan.update_calls]

        def move(multiple, restore: bool) -> None:
            # θ ← θ − lr·multiple·d, every group; multiple may be a device tensor.
            rounding_seed = seeds.rounding()
            for call, coefficient in zip(plan.update_calls, coefficients):
                group = self.param_groups[call.groups[0]]
                ops.zo_update_(call.tensors, directions, coefficient * multiple, self._lr(group, estimate),
                               restore=self._restore_scale(estimate, call) if restore else None,
                               rounding=self._roundings.update, rounding_seed=rounding_seed, **call.kwargs)

        with torch.no_grad():
            position = 0.0  # the parameters sit at θ − position·lr·d
            try:
                move(1.0, restore=True)
                position = 1.0
                loss_down = loss_scalar(closure(), device, "closure")
                move(-2.0, restore=False)
                position = -1.0
                loss_up = loss_scalar(closure(), device, "closure")
            except BaseException:
                if position:
                    move(-position, restore=False)
                raise
            loss_theta = estimate.baseline
            candidates_finite = torch.isfinite(torch.stack([loss_down, loss_up])).all()
            # From θ + lr·d: multiple 0 stays there, 1 moves back to θ, 2 on to θ − lr·d.
            keep = torch.where(loss_down > loss_theta,
                               torch.where(loss_theta < loss_up, 1.0, 0.0),
                               torch.where(loss_down < loss_up, 2.0, 0.0))
            finite = candidates_finite if estimate.finite is None else candidates_finite & estimate.finite
            keep = torch.where(finite, keep, 1.0)
            # index_select, not indexing by a 0-dim tensor (which reads the index on the host).
            kept_loss = torch.index_select(torch.stack([loss_up, loss_theta, loss_down]), 0,
                                           keep.to(torch.int64).reshape(1)).reshape(())
            if self.capturable:
                move(keep, restore=False)
                return kept_loss, finite
            multiple, all_finite = (int(v) for v in torch.stack([keep, finite.to(keep.dtype)]).tolist())
            if multiple:
                move(float(multiple), restore=False)
            if not all_finite:
                raise NonFiniteLossError(
                    f"closure returned a non-finite loss at θ ∓ lr·d (ℓ(θ − lr·d) = {float(loss_down):g}, "
                    f"ℓ(θ + lr·d) = {float(loss_up):g}); the step was undone (parameters back at θ up to "
                    f"rounding, step counter still {self.steps_taken})"
                )
        return kept_loss, None


def _must_be_zero(reason: str):
    """A group-scalar check that accepts only 0, explaining why."""
    def check(value, name):
        if check_nonnegative(value, name) != 0.0:
            raise ValueError(f"{name} must be 0: {reason}, got {value}")
    return check

"""MeZO (ZO-SGD, Malladi et al. 2023) on the fused ops: 2K + 1 passes over the parameters per
step of K directions, no gradient, no optimizer state, no host sync."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import ops
from ._base import ZerothOrderOptimizer, check_lr, check_nonnegative, check_positive


class MeZO(ZerothOrderOptimizer):
    """Zeroth-order SGD with regenerated noise (SPEC §3), optionally with K directions (n-SPSA).

    One step with seeds s_0 … s_{K-1} (``direction_seeds(steps_taken)``)::

        for k in 0 … K-1:
            θ ← θ + ε·z(s_k)          (fused with the restore of direction k-1 when k > 0)
            ℓ+_k = closure()
            θ ← θ − 2ε·z(s_k)
            ℓ−_k = closure()
        g = grad_reduce((ℓ+ − ℓ−) / (2ε))                   # [K], on the device
        θ' = θ + ε·z(s_{K-1});  θ ← θ' − lr·(Σ_k g_k/K·z(s_k) + wd·θ')   # one fused pass

    Each param group has its own ``lr``, ``eps`` and ``weight_decay``; every group is perturbed
    by its own ε and updated with its own estimate ``(ℓ+ − ℓ−)/(2ε_group)``.

    Args:
        params: parameters or param groups (see :func:`no_decay_param_groups`).
        lr: learning rate (float or 0-dim tensor; schedulers edit ``group["lr"]``).
        eps: perturbation scale ε.
        weight_decay: decoupled from the estimate, applied to the restored θ' as in MeZO.
        num_directions: K, directions averaged per step (n-SPSA); costs 2K forward passes.
        noise: ``"gaussian"`` or ``"rademacher"``.
        rounding: ``"auto"`` (perturbations round to nearest, updates stochastically for
            bf16/fp16), ``"nearest"`` or ``"stochastic"`` (every pass).
        seed: base seed (u64) of the seed stream; data-parallel ranks must share it.
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"native"``.
        grad_reduce: optional ``callable(Tensor[K]) -> Tensor[K]`` applied to the projected
            gradients before the update (e.g. an all-reduce mean across ranks).
    """

    def __init__(self, params, lr=1e-6, eps: float = 1e-3, weight_decay: float = 0.0, num_directions: int = 1,
                 noise: str = "gaussian", rounding: str = "auto", seed: int = 0, backend: str = "auto",
                 grad_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        check_lr(lr, "lr")
        check_positive(eps, "eps")
        check_nonnegative(weight_decay, "weight_decay")
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay), num_directions=num_directions,
                         noise=noise, rounding=rounding, seed=seed, backend=backend, grad_reduce=grad_reduce)

    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> torch.Tensor:
        """One MeZO step; ``closure()`` returns the loss of the current batch (called under
        ``torch.no_grad``, 2K times).  Returns the mean of the losses at θ + ε·z(s_k)."""
        if closure is None:
            raise TypeError(
                "MeZO.step needs a closure that returns the loss: the optimizer evaluates it at "
                "θ ± ε·z itself (no .backward() is involved)"
            )
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")
        self._check_groups()
        buckets = self._buckets()
        device = buckets[0].device
        seeds = self.direction_seeds(self._steps_taken)
        eps_ref = float(self.param_groups[0]["eps"])

        losses_plus, losses_minus = [], []
        for k, seed in enumerate(seeds):
            plus, minus = self._measure_direction(buckets, closure, seed, seeds[k - 1] if k else None, device,
                                                  "closure")
            losses_plus.append(plus)
            losses_minus.append(minus)
        projected = self._projected_grads(buckets, seeds[-1], losses_plus, losses_minus, eps_ref)

        count = len(seeds)
        # zo_update_ restores along seeds[0], so the last perturbed direction goes first.
        order = [count - 1] + list(range(count - 1))
        update_rounding = self._roundings()[1]
        for bucket in buckets:
            group = bucket.group
            coeffs = self._group_scaled(projected, eps_ref, group, bucket.device)
            if count > 1:
                coeffs = coeffs / count
            ops.zo_update_(
                bucket.tensors,
                [seeds[k] for k in order],
                [coeffs[k] for k in order],
                group["lr"],
                restore=float(group["eps"]),
                weight_decay=float(group["weight_decay"]),
                **self._op_kwargs(bucket, update_rounding),
            )

        self._steps_taken += 1
        self.projected_grads = projected
        self.zo_loss = torch.stack(losses_plus).mean() if count > 1 else losses_plus[0]
        return self.zo_loss

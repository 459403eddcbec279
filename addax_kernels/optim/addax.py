"""Addax (Li et al., ICLR 2025): a MeZO estimate on long sequences mixed with in-place SGD on
short ones, each parameter updated the moment its gradient is ready."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch

from .. import ops
from ._base import (
    Bucket,
    ZerothOrderOptimizer,
    check_lr,
    check_nonnegative,
    check_positive,
    check_unit_interval,
    local_grad,
    loss_scalar,
)

ParamLocation = Tuple[int, int]  # (bucket index, position in the bucket)


@dataclass
class _FirstOrderPhase:
    """What the gradient hooks and ``update_from_grads_`` need while ``step`` runs backward."""

    seed: int
    buckets: List[Bucket]
    zo_grads: List[Union[float, torch.Tensor]]  # per bucket: the group's ZO estimate, 0.0 without B0
    locations: Dict[int, ParamLocation]
    updated: Set[int] = field(default_factory=set)


class Addax(ZerothOrderOptimizer):
    """Hybrid ZO/FO SGD (SPEC §3).  One step with seed s = ``step_seed(steps_taken)``::

        θ ← θ + ε·z(s);  ℓ+ = zo_closure();  θ ← θ − 2ε·z(s);  ℓ− = zo_closure()
        g0 = grad_reduce((ℓ+ − ℓ−)/(2ε));  θ ← θ + ε·z(s)
        ℓ1 = fo_closure();  ℓ1.backward(), and as each parameter's gradient is ready:
            θ ← θ − lr·(α·g0·z(s) + (1−α)·∇θ + wd·θ);  θ.grad = None

    No gradient buffer for the whole model ever exists: each gradient is consumed and freed by a
    ``register_post_accumulate_grad_hook`` hook.  Parameters that get no gradient receive the ZO
    part alone, θ ← θ − lr·(α·g0·z(s) + wd·θ).

    A missing batch contributes a zero estimate, with α unchanged: without ``fo_closure`` the
    step is θ ← θ' − lr·(α·g0·z + wd·θ') (θ' the restored θ, restore and update fused in one
    pass); without ``zo_closure`` it is θ ← θ − lr·((1−α)·∇θ + wd·θ) on the parameters that get
    a gradient (the others are left alone, as torch.optim.SGD leaves them).  Each source thus
    keeps one step size whatever the length split of the batch produced.  With α = 1 in every
    group the FO closure is never called (the step is exactly MeZO's); with α = 0 the ZO
    closure is never called (the step is exactly SGD's).

    Args:
        params: parameters or param groups; groups may set ``lr``, ``eps``, ``weight_decay``, ``alpha``.
        lr, eps, weight_decay, noise, rounding, seed, backend, grad_reduce: as in :class:`MeZO`.
        alpha: weight of the ZO estimate, in [0, 1].
        fo_in_backward: update each parameter inside backward (True); with False the update
            happens after backward from ``.grad``, or earlier through :meth:`update_from_grads_`
            (DDP comm hooks, which must see the reduced gradient before it is applied).
    """

    def __init__(self, params, lr=1e-4, eps: float = 1e-3, alpha: float = 0.5, weight_decay: float = 0.0,
                 noise: str = "gaussian", rounding: str = "auto", seed: int = 0, backend: str = "auto",
                 grad_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 fo_in_backward: bool = True):
        check_lr(lr, "lr")
        check_positive(eps, "eps")
        check_unit_interval(alpha, "alpha")
        check_nonnegative(weight_decay, "weight_decay")
        if not isinstance(fo_in_backward, bool):
            raise TypeError(f"fo_in_backward must be a bool, got {type(fo_in_backward).__name__}")
        self.fo_in_backward = fo_in_backward
        self.fo_loss: Optional[torch.Tensor] = None
        self._phase: Optional[_FirstOrderPhase] = None
        self._hook_handles: Dict[int, torch.utils.hooks.RemovableHandle] = {}
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay, alpha=alpha), num_directions=1,
                         noise=noise, rounding=rounding, seed=seed, backend=backend, grad_reduce=grad_reduce)

    def _check_group(self, group: dict, index: int) -> None:
        super()._check_group(group, index)
        check_unit_interval(group["alpha"], f"param_groups[{index}]['alpha']")

    # -------------------------------------------------------------- the step

    def step(self, zo_closure: Optional[Callable[[], torch.Tensor]] = None,
             fo_closure: Optional[Callable[[], torch.Tensor]] = None) -> Optional[torch.Tensor]:
        """One Addax step.  ``zo_closure()`` returns the loss of the long batch B0 (called under
        ``torch.no_grad``, twice); ``fo_closure()`` returns the loss of the short batch B1 with
        autograd on (the optimizer calls ``.backward()``).  Either may be None.

        Returns the FO loss if the FO part ran, else the ZO loss (the loss at θ + ε·z), else None.
        """
        for name, closure in (("zo_closure", zo_closure), ("fo_closure", fo_closure)):
            if closure is not None and not callable(closure):
                raise TypeError(f"{name} must be callable or None, got {type(closure).__name__}")
        self._check_groups()
        alphas = [float(group["alpha"]) for group in self.param_groups]
        run_zo = zo_closure is not None and any(alpha > 0.0 for alpha in alphas)
        run_fo = fo_closure is not None and any(alpha < 1.0 for alpha in alphas)
        self.zo_loss = self.fo_loss = self.projected_grads = None
        if not (run_zo or run_fo):
            return None

        buckets = self._buckets()
        device = buckets[0].device
        seed = self.step_seed(self._steps_taken)
        eps_ref = float(self.param_groups[0]["eps"])
        projected = None
        if run_zo:
            loss_plus, loss_minus = self._measure_direction(buckets, zo_closure, seed, None, device, "zo_closure")
            projected = self._projected_grads(buckets, seed, [loss_plus], [loss_minus], eps_ref)
            self.zo_loss = loss_plus
            if run_fo:
                with torch.no_grad():
                    self._perturb(buckets, seed, 1.0)
            else:
                self._zo_only_update(buckets, seed, projected, eps_ref, restore=True)
        if run_fo:
            self.fo_loss = self._first_order_phase(buckets, seed, projected, eps_ref, fo_closure, device)

        self._steps_taken += 1
        self.projected_grads = projected
        return self.fo_loss if self.fo_loss is not None else self.zo_loss

    def _zo_coeff(self, projected: torch.Tensor, eps_ref: float, bucket: Bucket) -> torch.Tensor:
        estimate = self._group_scaled(projected, eps_ref, bucket.group, bucket.device)[0]
        alpha = float(bucket.group["alpha"])
        return estimate if alpha == 1.0 else estimate * alpha

    def _zo_only_update(self, buckets: Sequence[Bucket], seed: int, projected: torch.Tensor, eps_ref: float,
                        restore: bool, skip: Optional[Set[int]] = None) -> None:
        """θ ← θ' − lr·(α·g0·z + wd·θ'), with θ' = θ + ε·z if ``restore`` else θ."""
        update_rounding = self._roundings()[1]
        for bucket in buckets:
            group = bucket.group
            positions = [i for i, p in enumerate(bucket.params) if skip is None or id(p) not in skip]
            no_op = not restore and float(group["alpha"]) == 0.0 and float(group["weight_decay"]) == 0.0
            if not positions or no_op:
                continue
            ops.zo_update_(
                [bucket.tensors[i] for i in positions],
                seed,
                self._zo_coeff(projected, eps_ref, bucket),
                group["lr"],
                restore=float(group["eps"]) if restore else None,
                weight_decay=float(group["weight_decay"]),
                **self._op_kwargs(bucket, update_rounding, positions),
            )

    def _first_order_phase(self, buckets: List[Bucket], seed: int, projected: Optional[torch.Tensor],
                           eps_ref: float, fo_closure, device: torch.device) -> torch.Tensor:
        for bucket in buckets:
            for param in bucket.params:
                param.grad = None  # B1's gradient at θ alone, never a stale accumulation
        phase = _FirstOrderPhase(
            seed=seed,
            buckets=buckets,
            zo_grads=[
                0.0 if projected is None else self._group_scaled(projected, eps_ref, bucket.group, bucket.device)[0]
                for bucket in buckets
            ],
            locations={id(p): (b, i) for b, bucket in enumerate(buckets) for i, p in enumerate(bucket.params)},
        )
        if self.fo_in_backward:
            self._ensure_hooks(buckets)

        with torch.enable_grad():
            loss = fo_closure()
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(f"fo_closure must return a scalar loss tensor, got {type(loss).__name__}"
                             f" {tuple(getattr(loss, 'shape', ()))}")
        if not loss.requires_grad:
            raise ValueError("fo_closure's loss does not require grad: compute it with autograd enabled, "
                             "from parameters that require grad")

        self._phase = phase
        try:
            loss.backward()
            self._apply_remaining_grads(phase)
            if projected is not None:
                self._zo_only_update(buckets, seed, projected, eps_ref, restore=False, skip=phase.updated)
        finally:
            self._phase = None
        return loss_scalar(loss, device, "fo_closure")

    def _apply_remaining_grads(self, phase: _FirstOrderPhase) -> None:
        """After backward: apply gradients no hook consumed (fo_in_backward=False, or gradients
        assigned outside autograd's accumulation, as FSDP2 does), then free every gradient."""
        pending = []
        for bucket_index, bucket in enumerate(phase.buckets):
            for position, param in enumerate(bucket.params):
                if param.grad is None:
                    continue
                if id(param) not in phase.updated:
                    pending.append(((bucket_index, position), param.grad))
        self._apply_first_order(phase, pending)
        for bucket in phase.buckets:
            for param in bucket.params:
                param.grad = None

    # -------------------------------------------------------------- in-backward updates

    def _ensure_hooks(self, buckets: Sequence[Bucket]) -> None:
        optimizer_ref = weakref.ref(self)

        def on_grad_ready(param: torch.Tensor) -> None:
            optimizer = optimizer_ref()
            if optimizer is not None:
                optimizer._consume_grad(param)

        for bucket in buckets:
            for param in bucket.params:
                if param.requires_grad and id(param) not in self._hook_handles:
                    self._hook_handles[id(param)] = param.register_post_accumulate_grad_hook(on_grad_ready)

    def _consume_grad(self, param: torch.Tensor) -> None:
        phase = self._phase
        if phase is None or param.grad is None:
            return  # a backward outside Addax.step: leave its gradients alone
        location = phase.locations.get(id(param))
        if location is None or id(param) in phase.updated:
            return
        self._apply_first_order(phase, [(location, param.grad)])
        param.grad = None

    def _apply_first_order(self, phase: _FirstOrderPhase, items: Sequence[Tuple[ParamLocation, torch.Tensor]]) -> None:
        by_bucket: Dict[int, List[Tuple[int, torch.Tensor]]] = {}
        for (bucket_index, position), grad in items:
            by_bucket.setdefault(bucket_index, []).append((position, grad))
        update_rounding = self._roundings()[1]
        for bucket_index, entries in by_bucket.items():
            bucket = phase.buckets[bucket_index]
            group = bucket.group
            positions = [position for position, _ in entries]
            ops.addax_update_(
                [bucket.tensors[i] for i in positions],
                [local_grad(grad) for _, grad in entries],
                phase.seed,
                phase.zo_grads[bucket_index],
                group["lr"],
                float(group["alpha"]),
                weight_decay=float(group["weight_decay"]),
                **self._op_kwargs(bucket, update_rounding, positions),
            )
            phase.updated.update(id(bucket.params[i]) for i in positions)

    def update_from_grads_(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
        """Apply this step's update θ ← θ − lr·(α·g0·z + (1−α)·grad + wd·θ) to ``params`` with
        ``grads`` (e.g. a DDP comm hook's reduced bucket).  Only valid during the backward that
        :meth:`step` runs; each parameter may be updated once per step, and the step skips it
        afterwards.  Gradients are read, not freed: their owner decides."""
        phase = self._phase
        if phase is None:
            raise RuntimeError("update_from_grads_ can only be called during the backward pass of Addax.step")
        if isinstance(params, torch.Tensor) or isinstance(grads, torch.Tensor):
            raise TypeError("params and grads must be sequences of tensors")
        params, grads = list(params), list(grads)
        if len(params) != len(grads):
            raise ValueError(f"update_from_grads_ got {len(params)} params and {len(grads)} grads")
        items, seen = [], set()
        for index, (param, grad) in enumerate(zip(params, grads)):
            location = phase.locations.get(id(param))
            if location is None:
                raise ValueError(f"params[{index}] is not a parameter of this optimizer")
            if id(param) in phase.updated or id(param) in seen:
                raise RuntimeError(f"params[{index}] was already updated in this step")
            if not isinstance(grad, torch.Tensor):
                raise TypeError(f"grads[{index}] must be a Tensor, got {type(grad).__name__}")
            seen.add(id(param))
            items.append((location, grad))
        # Check every pair before the first bucket is updated, so a bad gradient anywhere leaves
        # all parameters untouched and the error names the caller's index.
        ops._check_grads(
            [local_grad(grad) for _, grad in items],
            [phase.buckets[bucket_index].tensors[position] for (bucket_index, position), _ in items],
        )
        self._apply_first_order(phase, items)

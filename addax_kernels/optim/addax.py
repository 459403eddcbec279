"""Addax (Li et al., ICLR 2025): a MeZO estimate on long sequences mixed with in-place SGD on
short ones, each gradient applied during backward in bounded buckets."""

from __future__ import annotations

import threading
import weakref
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .. import ops
from ._base import (
    NonFiniteLossError,
    ZerothOrderOptimizer,
    _Estimate,
    _Plan,
    _StepSeeds,
    check_bool,
    check_int,
    check_unit_interval,
    local_grad,
    loss_scalar,
)
from .rounding import DEFAULT_ROUNDING

# Gradients held before one fused update is applied to them: bounded by bytes and by count,
# never a buffer for the whole model.  The bytes bound is the memory bound (a 1.3B-parameter
# bf16 model's 2.6 GB of gradients go in ~80 buckets); the count bound only limits the lists
# one op call builds.  Each op call costs ~100-200 µs of host time on 256-512 tensors, so a
# count above the tensor count of most transformer stacks (OPT-1.3B: 388) means one call per
# backward where the bytes allow it.
DEFAULT_FO_BUCKET_BYTES = 32 << 20
DEFAULT_FO_BUCKET_SIZE = 512


class _FirstOrderPhase:
    """What the gradient hooks and ``update_from_grads_`` need while ``step`` runs backward.

    Gradients are queued per update call and applied in one ``addax_update_`` per call when
    the queue holds ``fo_bucket_bytes`` bytes or ``fo_bucket_size`` tensors.  Hooks of
    parameters on different devices run on different autograd threads: the queue is locked.
    """

    def __init__(self, optimizer: "Addax", plan: _Plan, slot_info, seed, rounding_seed, zo_grads, lrs):
        self.optimizer = optimizer
        self.plan = plan
        self.slot_of = optimizer._layout.slot_of
        self.has_shards = bool(optimizer._layout.dtensor_slots)
        self.slot_info = slot_info  # per layout position: (update call index, index in call, bytes)
        self.seed = seed
        self.rounding_seed = rounding_seed
        self.zo_grads: List[Union[float, torch.Tensor]] = zo_grads  # per update call
        self.lrs = lrs  # per update call
        self.updated = bytearray(len(slot_info))  # per layout position
        self.taken = bytearray(len(slot_info))  # per layout position: its gradient came through a hook
        # The queue, in arrival order; grouped by update call only when it is applied.
        self.pending_slots: List[int] = []
        self.pending_grads: List[torch.Tensor] = []
        self.pending_bytes = 0
        self.max_bytes = optimizer.fo_bucket_bytes
        self.max_count = optimizer.fo_bucket_size
        # Hooks of parameters on different devices run on different autograd threads; with one
        # device they all run on one thread and the queue needs no lock.
        # (Update calls are grouped by device: their first tensors name every device.)
        devices = {call.tensors[0].device for call in plan.update_calls if call.tensors}
        self.lock = threading.Lock() if len(devices) > 1 else None

    @property
    def consumed(self) -> int:
        """Parameters updated so far in this step."""
        return self.updated.count(1)

    def take(self, param: torch.Tensor) -> None:
        """The hook's work: queue ``param``'s fresh gradient (once per step) and clear ``.grad``."""
        slot = self.slot_of.get(id(param))
        if slot is None:
            return
        grad = param.grad
        if self.updated[slot]:
            if grad is not None and self.taken[slot]:
                raise RuntimeError(
                    f"Addax: parameter {slot} of the optimizer (shape {tuple(param.shape)}) received a second "
                    "gradient in this step's backward after its update was applied. Autograd accumulates a "
                    "parameter's gradient once per backward; two arrivals mean backward ran in pieces, as "
                    "reentrant activation checkpointing (torch.utils.checkpoint with use_reentrant=True) does "
                    "for a parameter used in two checkpointed segments, whose later piece also recomputes "
                    "its forward with the updated parameter. Use use_reentrant=False, or "
                    "Addax(fo_in_backward=False). This step is incomplete: parameters updated so far keep "
                    "their update, the step counter did not advance.")
            return
        if grad is None:
            return
        param.grad = None
        self.taken[slot] = 1
        self.add(slot, grad)

    def add(self, slot: int, grad: torch.Tensor) -> None:
        """Queue the update of layout position ``slot`` with ``grad``; apply the queue when it is full."""
        if self.lock is None:
            self._queue(slot, grad)
        else:
            with self.lock:
                self._queue(slot, grad)

    def _queue(self, slot: int, grad: torch.Tensor) -> None:
        self.updated[slot] = 1
        self.pending_slots.append(slot)
        self.pending_grads.append(grad)
        self.pending_bytes += self.slot_info[slot][2]
        if self.pending_bytes >= self.max_bytes or len(self.pending_slots) >= self.max_count:
            self.flush_locked()

    def flush(self) -> None:
        if self.lock is None:
            self.flush_locked()
        else:
            with self.lock:
                self.flush_locked()

    def flush_locked(self) -> None:
        """θ ← θ − lr·(α·g0·z + (1−α)·grad + wd·θ) for every queued parameter: one op per call."""
        if not self.pending_slots:
            return
        slots, queued = self.pending_slots, self.pending_grads
        self.pending_slots, self.pending_grads, self.pending_bytes = [], [], 0
        by_call = {}
        for slot, grad in zip(slots, queued):
            call_index, index, _ = self.slot_info[slot]
            entry = by_call.get(call_index)
            if entry is None:
                entry = by_call[call_index] = ([], [])
            entry[0].append(index)
            entry[1].append(grad)
        optimizer = self.optimizer
        for call_index, (indices, grads) in by_call.items():
            call = self.plan.update_calls[call_index]
            tensors, tids, offsets, decays = call.tensors, call.kwargs["tids"], call.kwargs["offsets"], \
                call.weight_decay
            if self.has_shards:
                grads = [local_grad(grad) for grad in grads]
            ops.addax_update_(
                [tensors[i] for i in indices],
                grads,
                self.seed,
                self.zo_grads[call_index],
                self.lrs[call_index],
                float(optimizer.param_groups[call.groups[0]]["alpha"]),
                weight_decay=[decays[i] for i in indices],
                tids=[tids[i] for i in indices],
                offsets=[offsets[i] for i in indices],
                noise=optimizer.noise,
                rounding=optimizer._roundings.update,
                rounding_seed=self.rounding_seed,
                sparsity=optimizer.sparsity,
                backend=optimizer.backend,
            )


class _GradientHook:
    """Every parameter's post-accumulate-grad hook: hands the gradient to the running step.

    It holds the step's phase only while the step runs backward, so hooks that outlive the
    optimizer keep nothing alive; a backward outside ``Addax.step`` leaves gradients alone.
    """

    __slots__ = ("phase",)

    def __init__(self):
        self.phase: Optional[_FirstOrderPhase] = None

    def __call__(self, param: torch.Tensor) -> None:
        phase = self.phase
        if phase is not None:
            phase.take(param)


def _remove_hooks(handles: Dict[int, torch.utils.hooks.RemovableHandle]) -> None:
    for handle in handles.values():
        handle.remove()
    handles.clear()


class Addax(ZerothOrderOptimizer):
    """Hybrid ZO/FO SGD (SPEC §3).  One step with seed s = ``step_seed(steps_taken)``::

        θ ← θ + ε·z(s);  ℓ+ = zo_closure();  θ ← θ − 2ε·z(s);  ℓ− = zo_closure()
        g0 = grad_reduce((ℓ+ − ℓ−)/(2ε));  θ ← θ + ε·z(s)
        ℓ1 = fo_closure();  ℓ1.backward(), and as parameters' gradients become ready:
            θ ← θ − lr·(α·g0·z(s) + (1−α)·∇θ + wd·θ);  θ.grad = None

    No gradient buffer for the whole model ever exists: a ``register_post_accumulate_grad_hook``
    hook takes each gradient as autograd finishes it (and clears ``.grad``); gradients are
    queued and applied in fused ``addax_update_`` calls whenever the queue holds
    ``fo_bucket_bytes`` bytes or ``fo_bucket_size`` tensors, and once more after backward.
    Parameters that get no gradient receive the ZO part alone, θ ← θ − lr·(α·g0·z(s) + wd·θ).

    A missing batch contributes a zero estimate, with α unchanged: without ``fo_closure`` the
    step is θ ← θ' − lr·(α·g0·z + wd·θ') (θ' the restored θ, restore and update fused in one
    pass); without ``zo_closure`` it is θ ← θ − lr·((1−α)·∇θ + wd·θ) on the parameters that get
    a gradient (the others are left alone, as torch.optim.SGD leaves them).  With ``grad_reduce``
    (data parallel) a step without ``zo_closure`` still takes part in the reduction, with a zero
    estimate and the same perturbation passes as the other ranks, and applies the reduced g0:
    ranks whose length split leaves one without a long example stay identical.  With α = 1 in every
    group the FO closure is never called (the step is exactly MeZO's); with α = 0 the ZO
    closure is never called (the step is exactly SGD's).

    A non-finite ZO or FO loss undoes the step before any update (parameters back at θ up to one
    restore pass's rounding, step counter unchanged) and raises :class:`NonFiniteLossError`.

    Args:
        params: parameters or param groups; groups may set ``lr``, ``eps``, ``weight_decay``, ``alpha``.
        lr, eps, weight_decay, sparsity, noise, rounding, seed, backend, grad_reduce, capturable:
            as in :class:`MeZO`.
        alpha: weight of the ZO estimate, in [0, 1].
        fo_in_backward: update parameters during backward (True); with False the update
            happens after backward from ``.grad``, or earlier through :meth:`update_from_grads_`
            (DDP comm hooks, which must see the reduced gradient before it is applied).
        fo_bucket_bytes, fo_bucket_size: bounds of the gradient queue (0 and 1: one update per
            gradient, as soon as it is ready).
    """

    def __init__(self, params, lr=1e-4, eps: float = 1e-3, alpha: float = 0.5, weight_decay: float = 0.0,
                 sparsity: float = 0.0, noise: str = "gaussian", rounding: str = DEFAULT_ROUNDING, seed: int = 0,
                 backend: str = "auto", grad_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 fo_in_backward: bool = True, fo_bucket_bytes: int = DEFAULT_FO_BUCKET_BYTES,
                 fo_bucket_size: int = DEFAULT_FO_BUCKET_SIZE, capturable: bool = False):
        self.fo_in_backward = check_bool(fo_in_backward, "fo_in_backward")
        self.fo_bucket_bytes = check_int(fo_bucket_bytes, "fo_bucket_bytes", 0)
        self.fo_bucket_size = check_int(fo_bucket_size, "fo_bucket_size", 1)
        self.fo_loss: Optional[torch.Tensor] = None
        self._phase: Optional[_FirstOrderPhase] = None
        self._hook = _GradientHook()
        self._hook_handles: Dict[int, torch.utils.hooks.RemovableHandle] = {}
        # The hooks go when the optimizer goes: optimizers rebuilt on one model (a search, a
        # schedule of phases) would otherwise leave one inert hook each on every parameter.
        weakref.finalize(self, _remove_hooks, self._hook_handles)
        self._hooked_layout = None
        self._slot_info: Optional[Tuple[_Plan, list]] = None
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay, alpha=alpha), num_directions=1,
                         noise=noise, rounding=rounding, seed=seed, backend=backend, grad_reduce=grad_reduce,
                         sparsity=sparsity, capturable=capturable)

    def _group_checks(self):
        checks = super()._group_checks()
        checks["alpha"] = check_unit_interval
        return checks

    def _update_key(self, group: dict) -> tuple:
        return (float(group["alpha"]),)

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
        # With grad_reduce (data parallel) every rank must take part in each step's reduction: a
        # rank without a ZO batch contributes a zero estimate (a loss of 0 at both points) and
        # makes the same perturbation passes as the others, so the replicas stay bit-identical.
        join_reduce = zo_closure is None and self.grad_reduce is not None and any(alpha > 0.0 for alpha in alphas)
        self.zo_loss = self.fo_loss = self.projected_grads = None
        if not (run_zo or run_fo or join_reduce):
            return None

        plan = self._current_plan()
        seeds = self._step_seeds(plan.device)
        estimate = None
        if join_reduce:
            zero = torch.zeros((), dtype=torch.float32, device=plan.device)
            zo_closure, run_zo = (lambda: zero), True
        if run_zo:
            estimate = self._estimate(plan, seeds, zo_closure, "zo_closure")
            self._check_finite(plan, seeds, estimate, "zo_closure")
            if run_fo:
                if estimate.restore:
                    with torch.no_grad():
                        self._shift(plan, seeds, estimate.last_seed, estimate.restore)
            else:
                self._zo_only_update(plan, seeds.direction(0), seeds.rounding(), estimate, restore=True)
        fo_loss = None
        if run_fo:
            fo_loss = self._first_order_phase(plan, seeds, estimate, fo_closure)

        self._advance(estimate.finite if estimate is not None else None)
        if estimate is not None:
            self.projected_grads = estimate.projected
            self.zo_loss = None if join_reduce else estimate.losses_plus[0]
        self.fo_loss = fo_loss
        return self.fo_loss if self.fo_loss is not None else self.zo_loss

    def _zo_coefficients(self, plan: _Plan, estimate: Optional[_Estimate]) -> List[Union[float, torch.Tensor]]:
        """g0 for each update call's groups (scaled to the group's ε), 0.0 without a ZO batch."""
        if estimate is None:
            return [0.0] * len(plan.update_calls)
        cache: dict = {}
        return [self._coefficients(estimate, call, cache) for call in plan.update_calls]

    def _zo_only_update(self, plan: _Plan, seed, rounding_seed, estimate: _Estimate, restore: bool,
                        skip: Optional[bytearray] = None) -> None:
        """θ ← θ' − lr·(α·g0·z + wd·θ'), with θ' = θ + ε·z if ``restore`` else θ, on every
        parameter whose ``skip`` flag is 0."""
        zo_grads = self._zo_coefficients(plan, estimate)
        with torch.no_grad():
            for call, zo_grad in zip(plan.update_calls, zo_grads):
                group = self.param_groups[call.groups[0]]
                alpha = float(group["alpha"])
                indices = range(len(call.slots)) if skip is None else \
                    [i for i, slot in enumerate(call.slots) if not skip[slot]]
                if not indices or (not restore and alpha == 0.0 and not any(call.weight_decay[i] for i in indices)):
                    continue
                everything = skip is None
                kwargs = call.kwargs if everything else dict(
                    call.kwargs, tids=[call.kwargs["tids"][i] for i in indices],
                    offsets=[call.kwargs["offsets"][i] for i in indices])
                ops.zo_update_(
                    call.tensors if everything else [call.tensors[i] for i in indices],
                    seed,
                    zo_grad if alpha == 1.0 else zo_grad * alpha,
                    self._lr(group, estimate),
                    restore=self._restore_scale(estimate, call) if restore else None,
                    weight_decay=call.weight_decay if everything else [call.weight_decay[i] for i in indices],
                    rounding=self._roundings.update,
                    rounding_seed=rounding_seed,
                    **kwargs,
                )

    def _fo_slot_info(self, plan: _Plan) -> list:
        """Per layout position: (update call index, index in the call, gradient bytes)."""
        if self._slot_info is None or self._slot_info[0] is not plan:
            tensors = self._layout.tensors
            info = [(call_index, index, tensors[slot].numel() * tensors[slot].element_size())
                    for slot, (call_index, index) in sorted(plan.call_of_slot.items())]
            self._slot_info = (plan, info)
        return self._slot_info[1]

    def _first_order_phase(self, plan: _Plan, seeds: _StepSeeds, estimate: Optional[_Estimate],
                           fo_closure) -> torch.Tensor:
        layout = self._layout
        for param in layout.params:
            param.grad = None  # B1's gradient at θ alone, never a stale accumulation
        lrs = [self._lr(self.param_groups[call.groups[0]], estimate) for call in plan.update_calls]
        phase = _FirstOrderPhase(self, plan, self._fo_slot_info(plan), seeds.direction(0), seeds.rounding(),
                                 self._zo_coefficients(plan, estimate), lrs)
        if self.fo_in_backward and self._hooked_layout is not layout:
            self._ensure_hooks(layout.params)
            self._hooked_layout = layout

        with torch.enable_grad():
            loss = fo_closure()
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(f"fo_closure must return a scalar loss tensor, got {type(loss).__name__}"
                             f" {tuple(getattr(loss, 'shape', ()))}")
        if not loss.requires_grad:
            raise ValueError("fo_closure's loss does not require grad: compute it with autograd enabled, "
                             "from parameters that require grad")
        fo_loss = loss_scalar(loss, plan.device, "fo_closure")
        if not self.capturable and not bool(torch.isfinite(fo_loss)):
            raise NonFiniteLossError(
                f"fo_closure returned a non-finite loss ({float(fo_loss):g}); nothing was updated (parameters "
                f"at θ up to the restore's rounding, step counter still {self.steps_taken})"
            )

        self._phase = self._hook.phase = phase
        try:
            loss.backward()
            phase.flush()
            if phase.consumed < len(layout.params):
                self._apply_remaining_grads(phase, layout)
            if estimate is not None and phase.consumed < len(layout.params):
                self._zo_only_update(plan, phase.seed, phase.rounding_seed, estimate, restore=False,
                                     skip=phase.updated)
        finally:
            self._phase = self._hook.phase = None
        return fo_loss

    def _apply_remaining_grads(self, phase: _FirstOrderPhase, layout) -> None:
        """After backward: apply gradients no hook consumed (fo_in_backward=False, or gradients
        assigned outside autograd's accumulation, as FSDP2 does), then free every gradient."""
        for slot, param in enumerate(layout.params):
            grad = param.grad
            if grad is None:
                continue
            param.grad = None
            if not phase.updated[slot]:
                phase.add(slot, grad)
        phase.flush()

    # -------------------------------------------------------------- in-backward updates

    def _ensure_hooks(self, params: Sequence[torch.Tensor]) -> None:
        for param in params:
            if param.requires_grad and id(param) not in self._hook_handles:
                self._hook_handles[id(param)] = param.register_post_accumulate_grad_hook(self._hook)

    def update_from_grads_(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
        """Apply this step's update θ ← θ − lr·(α·g0·z + (1−α)·grad + wd·θ) to ``params`` with
        ``grads`` now (e.g. a DDP comm hook's reduced bucket).  Only valid during the backward that
        :meth:`step` runs; each parameter may be updated once per step, and the step skips it
        afterwards.  Gradients are read, not freed: their owner decides.  Every pair is checked
        before any parameter is updated."""
        phase = self._phase
        if phase is None:
            raise RuntimeError("update_from_grads_ can only be called during the backward pass of Addax.step")
        if isinstance(params, torch.Tensor) or isinstance(grads, torch.Tensor):
            raise TypeError("params and grads must be sequences of tensors")
        params, grads = list(params), list(grads)
        if len(params) != len(grads):
            raise ValueError(f"update_from_grads_ got {len(params)} params and {len(grads)} grads")
        layout = self._layout
        items, seen = [], set()
        for index, (param, grad) in enumerate(zip(params, grads)):
            slot = layout.slot_of.get(id(param))
            if slot is None:
                raise ValueError(f"params[{index}] is not a parameter of this optimizer")
            if phase.updated[slot] or slot in seen:
                raise RuntimeError(f"params[{index}] was already updated in this step")
            if not isinstance(grad, torch.Tensor):
                raise TypeError(f"grads[{index}] must be a Tensor, got {type(grad).__name__}")
            tensor, local = layout.tensors[slot], local_grad(grad)
            if local.shape != tensor.shape or local.device != tensor.device or \
                    local.dtype not in ops.SUPPORTED_DTYPES:
                raise ValueError(f"grads[{index}] ({tuple(local.shape)}, {local.dtype}, {local.device}) does not fit "
                                 f"params[{index}] ({tuple(tensor.shape)}, {tensor.device}); gradients must be "
                                 f"float32/float16/bfloat16 of the parameter's shape and device")
            seen.add(slot)
            items.append((slot, local))
        phase.flush()
        for slot, grad in items:
            phase.add(slot, grad)
        phase.flush()

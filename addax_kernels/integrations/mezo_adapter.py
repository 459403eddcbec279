"""MeZO's trainer methods with addax_kernels' fused ops underneath; ZO-Bench's trainer too.

MeZO's reference trainer (princeton-nlp/MeZO, ``large_models/trainer.py``) does zeroth-order
SGD with four methods on its ``Trainer`` subclass::

    zo_perturb_parameters(random_seed=None, scaling_factor=1)   θ ← θ + scaling_factor·ε·z
    zo_forward(model, inputs)                                    loss, no grad, dropout off
    zo_step(model, inputs)                                       the two-point estimate → projected_grad
    zo_update(model)                                             θ ← θ − lr·(projected_grad·z + wd·θ)

where z is ``torch.normal`` drawn per parameter after ``torch.manual_seed(zo_random_seed)``.
:class:`MeZOKernelsMixin` implements the same methods, with the same arguments and the same
attributes (``named_parameters_to_optim``, ``zo_random_seed``, ``projected_grad``,
``self.args.zo_eps``, ``self.args.weight_decay``, ``self._get_learning_rate()``,
``self.lr_scheduler``), on :func:`addax_kernels.perturb_` and :func:`addax_kernels.zo_update_`:
one fused pass per call, z regenerated inside the kernel from (seed, tensor position, element
index) instead of materialized per parameter.  Put it first in the bases of an existing MeZO
trainer (``class Fused(MeZOKernelsMixin, OurTrainer)``) and nothing else changes; the user's
own ``zo_forward`` is kept.

ZO-Bench's trainer (ZO-Bench/ZO-LLM, ``zo-bench/trainer.py``) has the same method names, more
settings on its ``args`` (:mod:`._zo_bench` lists them), and takes its update inside its step
methods through a torch optimizer (``p.grad = g·z`` tensor by tensor, then
``optimizer.step()``).  On that trainer (``args.trainer`` one of ``zo_sgd``, ``zo_adam``,
``zo_sign_opt``, ``zo_conserv``) the mixin takes over every step method its loop calls —
``zo_step`` (q = 1), ``zo_step_v1`` (q > 1), ``zo_conserv_step`` — and ``zo_update`` (the
scheduler step only, as ZO-Bench's), and runs ZO-Bench's algorithm on the fused ops: the same
sequence of loss evaluations and seeds, and in place of each ``optimizer.step()`` one fused
pass of :func:`~addax_kernels.zo_update_` (SGD), :func:`~addax_kernels.zo_momentum_update_`
(SGD with momentum) or :func:`~addax_kernels.zo_adam_update_` (Adam) on the gradient
Σ_k c_k·z_k, with its state kept by the mixin in float32.  Sign, one-sided estimates, q
directions, the conservative step and sparse perturbations (``gradient_sparsity=s`` as
``sparsity=Φ(s)``) are served; what cannot be served equally raises a ValueError naming the
setting before anything moves (:func:`zo_bench_unserved_setting`).

:class:`MeZOAdapter` is the same mixin as a standalone object for training loops that are not
a ``transformers.Trainer``.

This module does not import transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .._numbers import is_real_number
from ..ops import BACKEND_CHOICES, addax_update_, perturb_, zo_adam_update_, zo_momentum_update_, zo_update_
from ..optim import mezo_decays
from ..optim.rounding import DEFAULT_ROUNDING, check_rounding, pass_roundings
from ..optim.seeds import ROUNDING_STREAM, derive_seed
from ..rng import NOISE_KINDS
from ._zo_bench import (
    ZO_BENCH_TRAINERS,
    is_zo_bench_host,
    zo_bench_optimizer,
    zo_bench_sparsity,
    zo_bench_unserved_setting,
)

__all__ = ["MeZOKernelsMixin", "MeZOAdapter", "MeZOArguments", "mezo_decays", "zo_bench_unserved_setting"]

# MeZO and ZO-Bench draw each seed as np.random.randint(1000000000).
_MEZO_SEED_BOUND = 1_000_000_000

# The optimizer state the mixin keeps for ZO-Bench's torch optimizers, named as torch names it.
_SGD_MOMENTUM_STATE = ("momentum_buffer",)
_ADAM_STATE = ("exp_avg", "exp_avg_sq")


def _check_zo_bench_host(args: Any) -> None:
    setting = zo_bench_unserved_setting(args)
    if setting is not None:
        raise ValueError(
            f"MeZOKernelsMixin cannot serve the ZO-Bench setting {setting}: with it the mixin would not run "
            "ZO-Bench's algorithm. Remove the mixin from the trainer's bases for this setting, or change it."
        )


class MeZOKernelsMixin:
    """MeZO's and ZO-Bench's trainer methods on fused kernels.

    The host class provides, exactly as MeZO's trainer does: ``self.args.zo_eps``,
    ``self.args.weight_decay``, ``self._get_learning_rate()``, a ``zo_forward(model, inputs)``
    returning a 0-dim loss, and optionally ``self.lr_scheduler`` (stepped by :meth:`zo_update`,
    as MeZO does) and ``self.args.gradient_accumulation_steps`` (must be 1, as in MeZO).

    The kernel settings are class attributes, overridable per subclass or instance:
    ``zo_noise`` ("gaussian" or "rademacher"), ``zo_rounding`` (a policy of
    ``addax_kernels.optim.ROUNDING_CHOICES``, the optimizers' default by default: see
    docs/optimizers.md; under ``"restored"`` with bf16/fp16 parameters each perturbation is
    undone by a pass of its own, +ε, −ε, −ε, +ε, instead of MeZO's +ε, −2ε, +ε),
    ``zo_backend``.  Every pass of a step rounds with its own ``rounding_seed``, derived from
    ``zo_random_seed`` and the pass number (SPEC §2).

    On ZO-Bench's trainer (``self.args.trainer`` one of ZO-Bench's zeroth-order trainers)
    every method first checks ``self.args`` with :func:`zo_bench_unserved_setting` and raises
    a ValueError naming a setting it cannot serve; otherwise :meth:`zo_step`,
    :meth:`zo_step_v1` and :meth:`zo_conserv_step` run ZO-Bench's step, update included, and
    :meth:`zo_update` steps the scheduler only.  The state of ZO-Bench's torch optimizer
    (SGD's ``momentum_buffer``, Adam's ``exp_avg`` / ``exp_avg_sq``) is kept in float32 in
    :attr:`zo_optimizer_state` (parameter → {name: tensor}), Adam's step count in
    :attr:`zo_optimizer_steps`.  Neither goes into the Trainer's checkpoints (which save
    ZO-Bench's torch optimizer, never stepped under the mixin); ZO-Bench itself rebuilds its
    optimizer, state empty, after loading a checkpoint, so a resumed run restarts the state in
    both.

    Stream ids: parameter i of ``named_parameters_to_optim`` uses tid i, so the same set of
    trainable parameters in the same order gives the same z in every call.
    """

    zo_noise: str = "gaussian"
    zo_rounding: str = DEFAULT_ROUNDING
    zo_backend: str = "auto"

    named_parameters_to_optim: List[Tuple[str, torch.nn.Parameter]]
    zo_random_seed: int
    projected_grad: float
    zo_optimizer_state: Dict[torch.Tensor, Dict[str, torch.Tensor]]
    zo_optimizer_steps: int

    # ------------------------------------------------------------------ MeZO's methods

    def zo_perturb_parameters(self, random_seed: Optional[int] = None, scaling_factor: float = 1) -> None:
        """θ ← θ + scaling_factor·ε·z(seed) for every parameter being optimized, in one pass.

        ``random_seed`` defaults to ``self.zo_random_seed``, as in MeZO.  On ZO-Bench's trainer
        z is sparse as its ``gradient_sparsity`` says (see :mod:`._zo_bench`).
        """
        _check_zo_bench_host(self.args)
        seed = self.zo_random_seed if random_seed is None else random_seed
        perturb_(
            self._zo_params(),
            seed,
            float(scaling_factor) * float(self.args.zo_eps),
            noise=self.zo_noise,
            rounding=self._zo_roundings().perturb,
            rounding_seed=self._next_rounding_seed(seed),
            sparsity=self._zo_sparsity(),
            backend=self.zo_backend,
        )

    def zo_step(self, model: torch.nn.Module, inputs: Any) -> torch.Tensor:
        """MeZO's two-point estimate; sets ``projected_grad`` and returns the loss at θ+εz.

        Same sequence as MeZO: collect the trainable parameters, draw
        ``zo_random_seed = np.random.randint(1e9)`` (so seeds follow the global numpy RNG that
        ``transformers.set_seed`` and the Trainer's checkpoints manage), perturb +ε, loss,
        perturb −2ε, loss, ``projected_grad = ((l+ − l−)/(2ε)).item()``, perturb +ε back.

        On ZO-Bench's trainer, ZO-Bench's ``zo_step``: the estimate as its settings say, then
        the update (see :meth:`zo_step_v1`).
        """
        _check_zo_bench_host(self.args)
        self._check_no_accumulation()
        if is_zo_bench_host(self.args):
            return self._zo_bench_step(model, inputs)
        self.named_parameters_to_optim = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.zo_random_seed = int(np.random.randint(_MEZO_SEED_BOUND))
        self._zo_pass = 0

        self.zo_perturb_parameters(scaling_factor=1)
        loss_plus = self.zo_forward(model, inputs)
        loss_minus, _ = self._minus_side_loss(model, inputs)
        self.projected_grad = ((loss_plus - loss_minus) / (2 * self.args.zo_eps)).item()
        self.zo_perturb_parameters(scaling_factor=1)
        return loss_plus

    def zo_update(self, model: Optional[torch.nn.Module] = None) -> None:
        """θ ← θ − lr·(projected_grad·z + wd·θ), wd = 0 where :func:`mezo_decays` says so; one
        fused pass.  Then steps ``self.lr_scheduler`` if there is one, as MeZO does.

        ``model`` is accepted for MeZO's call shape; the parameters are those of the last
        :meth:`zo_step`.  On ZO-Bench's trainer, whose step methods update, only the scheduler
        step, as ZO-Bench's ``zo_update``.
        """
        _check_zo_bench_host(self.args)
        if is_zo_bench_host(self.args):
            self._step_scheduler()
            return
        names = [name for name, _ in self.named_parameters_to_optim]
        zo_update_(
            self._zo_params(),
            self.zo_random_seed,
            self.projected_grad,
            self._get_learning_rate(),
            weight_decay=float(self.args.weight_decay),
            decay_mask=[mezo_decays(name) for name in names],
            noise=self.zo_noise,
            rounding=self._zo_roundings().update,
            rounding_seed=self._next_rounding_seed(self.zo_random_seed),
            backend=self.zo_backend,
        )
        self._step_scheduler()

    # ------------------------------------------------------------------ ZO-Bench's step methods

    def zo_step_v1(self, model: torch.nn.Module, inputs: Any) -> torch.Tensor:
        """ZO-Bench's step for q >= 1 directions (its loop calls ``zo_step`` for q = 1, this for
        q > 1); returns the loss at θ + ε·z of the last direction.

        For each direction k: draw ``zo_random_seed = np.random.randint(1e9)``, perturb +ε,
        loss ℓ+; two-sided: perturb −2ε, loss ℓ−, g_k = (ℓ+ − ℓ−)/(2ε), restore +ε; one-sided
        (``perturbation_mode="one_side"``): perturb −ε (back at θ), loss ℓ0,
        g_k = (ℓ+ − ℓ0)/ε.  Then one step of ZO-Bench's optimizer on the gradient
        Σ_k c_k·z_k / q with c_k = g_k, or sign(g_k) for ``trainer="zo_sign_opt"``: one fused
        pass, the last restore included.  ``projected_grad`` is the last g_k, as in ZO-Bench.
        """
        _check_zo_bench_host(self.args)
        self._check_no_accumulation()
        self._require_zo_bench_host("zo_step_v1")
        return self._zo_bench_step(model, inputs)

    def zo_conserv_step(self, model: torch.nn.Module, inputs: Any) -> torch.Tensor:
        """ZO-Bench's conservative step (``trainer="zo_conserv"``, ZO-SGD-Cons).

        ℓ0 = loss at θ; the estimate g as :meth:`zo_step_v1` (one direction); then, each a step
        of ZO-Bench's optimizer on the gradient m·g·z: m = 1, ℓ1 = loss; m = −2, ℓ2 = loss; and
        if ℓ1 > ℓ0: m = 1 when ℓ0 < ℓ2; else m = 2 when ℓ1 < ℓ2 (with plain SGD: the lowest
        loss of θ − lr·g·z, θ + lr·g·z and θ, ties as ZO-Bench breaks them).  Returns ℓ1.
        """
        _check_zo_bench_host(self.args)
        self._check_no_accumulation()
        self._require_zo_bench_host("zo_conserv_step")
        self._start_zo_bench_step(model)
        loss_theta = self.zo_forward(model, inputs)
        self.zo_random_seed = int(np.random.randint(_MEZO_SEED_BOUND))
        _, self.projected_grad, restore = self._zo_bench_estimate(model, inputs)
        seeds, gradient = [self.zo_random_seed], self.projected_grad
        self._zo_bench_optimizer_step(seeds, [gradient], restore)
        loss_down = self.zo_forward(model, inputs)
        self._zo_bench_optimizer_step(seeds, [-2.0 * gradient])
        loss_up = self.zo_forward(model, inputs)
        if loss_down > loss_theta:
            if loss_theta < loss_up:
                self._zo_bench_optimizer_step(seeds, [gradient])
        elif loss_down < loss_up:
            self._zo_bench_optimizer_step(seeds, [2.0 * gradient])
        return loss_down

    def addax_update(self, model: Optional[torch.nn.Module] = None, alpha: float = 0.5) -> None:
        """Addax's combined update after :meth:`zo_step` and a backward pass on the short batch:
        θ ← θ − lr·(α·projected_grad·z + (1−α)·θ.grad + wd·θ), one fused pass; parameters
        without a ``.grad`` get the ZO part only.  Frees the gradients it consumed and steps
        ``self.lr_scheduler`` if there is one.
        """
        _check_zo_bench_host(self.args)
        if is_zo_bench_host(self.args):
            raise ValueError("addax_update is not a step of ZO-Bench's trainer (args.trainer="
                             f"{self.args.trainer!r}): its zo_step already updated the parameters")
        names_params = self.named_parameters_to_optim
        lr = self._get_learning_rate()
        wd = float(self.args.weight_decay)
        with_grad = [(i, n, p) for i, (n, p) in enumerate(names_params) if p.grad is not None]
        without_grad = [(i, n, p) for i, (n, p) in enumerate(names_params) if p.grad is None]
        common = dict(weight_decay=wd, noise=self.zo_noise, rounding=self._zo_roundings().update,
                      rounding_seed=self._next_rounding_seed(self.zo_random_seed), backend=self.zo_backend)
        if with_grad:
            addax_update_(
                [p for _, _, p in with_grad],
                [p.grad.contiguous() for _, _, p in with_grad],
                self.zo_random_seed,
                self.projected_grad,
                lr,
                alpha,
                decay_mask=[mezo_decays(n) for _, n, _ in with_grad],
                tids=[i for i, _, _ in with_grad],
                **common,
            )
            for _, _, p in with_grad:
                p.grad = None
        if without_grad:
            zo_update_(
                [p for _, _, p in without_grad],
                self.zo_random_seed,
                float(alpha) * float(self.projected_grad),
                lr,
                decay_mask=[mezo_decays(n) for _, n, _ in without_grad],
                tids=[i for i, _, _ in without_grad],
                **common,
            )
        self._step_scheduler()

    # ------------------------------------------------------------------ ZO-Bench's algorithm

    def _start_zo_bench_step(self, model: torch.nn.Module) -> None:
        """Collect the trainable parameters and drop their gradients, as ZO-Bench's steps do."""
        self.named_parameters_to_optim = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        for _, p in self.named_parameters_to_optim:
            p.grad = None
        self._zo_pass = 0

    def _zo_bench_step(self, model: torch.nn.Module, inputs: Any) -> torch.Tensor:
        """ZO-Bench's ``zo_step`` / ``zo_step_v1`` (see :meth:`zo_step_v1`)."""
        args = self.args
        directions = int(args.q)
        sign = args.trainer == "zo_sign_opt"
        self._start_zo_bench_step(model)
        seeds, coefficients, restore = [], [], None
        for _ in range(directions):
            if restore is not None:
                # Undo the previous direction's −ε before the next perturbation.
                self.zo_perturb_parameters(scaling_factor=1)
            self.zo_random_seed = int(np.random.randint(_MEZO_SEED_BOUND))
            loss_plus, self.projected_grad, restore = self._zo_bench_estimate(model, inputs)
            seeds.append(self.zo_random_seed)
            coefficient = float(np.sign(self.projected_grad)) if sign else self.projected_grad
            coefficients.append(coefficient / directions)
        if restore is not None:
            # The update's restore acts on z(seeds[0]): put the direction still to restore first.
            seeds = seeds[-1:] + seeds[:-1]
            coefficients = coefficients[-1:] + coefficients[:-1]
        self._zo_bench_optimizer_step(seeds, coefficients, restore)
        return loss_plus

    def _zo_bench_estimate(self, model: torch.nn.Module, inputs: Any) -> Tuple[torch.Tensor, float, Optional[float]]:
        """One direction of ZO-Bench's estimate at ``zo_random_seed``: (ℓ+, g, restore).

        Leaves the parameters at θ, or at θ − ε·z with ``restore = ε`` for the next update pass
        to fuse (two-sided, unless the rounding policy undoes each perturbation separately).
        """
        eps = self.args.zo_eps
        self.zo_perturb_parameters(scaling_factor=1)
        loss_plus = self.zo_forward(model, inputs)
        if self.args.perturbation_mode == "one_side":
            self.zo_perturb_parameters(scaling_factor=-1)
            loss_theta = self.zo_forward(model, inputs)
            return loss_plus, ((loss_plus - loss_theta) / eps).item(), None
        loss_minus, separate_restore = self._minus_side_loss(model, inputs)
        projected_grad = ((loss_plus - loss_minus) / (2 * eps)).item()
        if separate_restore:
            self.zo_perturb_parameters(scaling_factor=1)
            return loss_plus, projected_grad, None
        return loss_plus, projected_grad, float(eps)

    def _zo_bench_optimizer_step(self, seeds: List[int], coefficients: List[float],
                                 restore: Optional[float] = None) -> None:
        """One ``step()`` of ZO-Bench's torch optimizer on the gradient Σ_k coefficients[k]·z(seeds[k])
        (after θ ← θ + restore·z(seeds[0])), as one fused pass over every parameter."""
        args = self.args
        params = self._zo_params()
        options = dict(restore=restore, noise=self.zo_noise, rounding=self._zo_roundings().update,
                       rounding_seed=self._next_rounding_seed(seeds[0]), sparsity=self._zo_sparsity(),
                       backend=self.zo_backend)
        lr = self._get_learning_rate()
        if zo_bench_optimizer(args) == "adam":
            # ZO-Bench builds Adam(params, lr): torch's betas and eps, the ops' defaults.
            exp_avgs, exp_avg_sqs = self._zo_optimizer_buffers(params, _ADAM_STATE)
            self.zo_optimizer_steps = getattr(self, "zo_optimizer_steps", 0) + 1
            zo_adam_update_(params, exp_avgs, exp_avg_sqs, seeds, coefficients, lr, self.zo_optimizer_steps,
                            **options)
        elif args.momentum:
            (buffers,) = self._zo_optimizer_buffers(params, _SGD_MOMENTUM_STATE)
            zo_momentum_update_(params, buffers, seeds, coefficients, lr, float(args.momentum), **options)
        else:
            zo_update_(params, seeds, coefficients, lr, **options)

    def _zo_optimizer_buffers(self, params: List[torch.Tensor], names: Tuple[str, ...]) -> List[List[torch.Tensor]]:
        """Per name, the float32 state tensor of every parameter (zeros when new, as torch's
        optimizers start)."""
        state = getattr(self, "zo_optimizer_state", None)
        if state is None:
            state = self.zo_optimizer_state = {}
        lists: List[List[torch.Tensor]] = [[] for _ in names]
        for p in params:
            entry = state.get(p)
            if entry is None or any(name not in entry for name in names):
                entry = state.setdefault(p, {})
                for name in names:
                    if name not in entry:
                        entry[name] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            for tensors, name in zip(lists, names):
                tensors.append(entry[name])
        return lists

    # ------------------------------------------------------------------ helpers

    def _zo_params(self) -> List[torch.Tensor]:
        params = getattr(self, "named_parameters_to_optim", None)
        if not params:
            raise ValueError(
                "named_parameters_to_optim is empty or unset: call zo_step(model, inputs) first, "
                "or set it to [(name, parameter), ...] with the trainable parameters"
            )
        return [p for _, p in params]

    def _zo_roundings(self):
        return pass_roundings(check_rounding(self.zo_rounding, "zo_rounding"))

    def _zo_sparsity(self) -> float:
        if not is_zo_bench_host(self.args):
            return 0.0
        return zo_bench_sparsity(getattr(self.args, "gradient_sparsity", None))

    def _minus_side_loss(self, model: torch.nn.Module, inputs: Any) -> Tuple[torch.Tensor, bool]:
        """From θ + ε·z to θ − ε·z, and the loss there: one −2ε pass, or −ε twice when each
        perturbation is undone by a pass of its own.  Returns (ℓ−, whether it was undone apart)."""
        separate_restore = self._separate_restore()
        if separate_restore:
            self.zo_perturb_parameters(scaling_factor=-1)
            self.zo_perturb_parameters(scaling_factor=-1)
        else:
            self.zo_perturb_parameters(scaling_factor=-2)
        return self.zo_forward(model, inputs), separate_restore

    def _separate_restore(self) -> bool:
        """Whether each perturbation is undone by a pass of its own (the rounding policy says
        so for 16-bit parameters)."""
        return self._zo_roundings().separate_restore and any(
            p.dtype in (torch.bfloat16, torch.float16) for _, p in self.named_parameters_to_optim)

    def _check_no_accumulation(self) -> None:
        accumulation = getattr(self.args, "gradient_accumulation_steps", 1)
        if accumulation != 1:
            raise ValueError(f"MeZO's zo_step has no gradient accumulation: gradient_accumulation_steps={accumulation}")

    def _require_zo_bench_host(self, method: str) -> None:
        if not is_zo_bench_host(self.args):
            raise ValueError(f"{method} is a step of ZO-Bench's trainer: args.trainer must be one of "
                             f"{tuple(ZO_BENCH_TRAINERS)}, got {getattr(self.args, 'trainer', None)!r}")

    def _step_scheduler(self) -> None:
        scheduler = getattr(self, "lr_scheduler", None)
        if scheduler is not None:
            scheduler.step()

    def _next_rounding_seed(self, seed: int) -> int:
        """The rounding seed of the next pass of this step: pass p of the step of ``seed`` rounds
        with stream ``ROUNDING_STREAM + p`` of the optimizers' seed derivation (SPEC §2: the passes
        of a step must draw independent rounding words)."""
        number = getattr(self, "_zo_pass", 0)
        self._zo_pass = number + 1
        return derive_seed(seed, 0, ROUNDING_STREAM + number)


@dataclass
class MeZOArguments:
    """The fields of MeZO's ``args`` that :class:`MeZOKernelsMixin` reads."""

    zo_eps: float = 1e-3
    weight_decay: float = 0.0
    gradient_accumulation_steps: int = 1


def _model_loss(model: torch.nn.Module, inputs: Any) -> torch.Tensor:
    outputs = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict):
        if "loss" not in outputs or outputs["loss"] is None:
            raise ValueError("the model returned no loss: pass labels in inputs or give MeZOAdapter a loss_fn")
        return outputs["loss"]
    return outputs[0]


class MeZOAdapter(MeZOKernelsMixin):
    """:class:`MeZOKernelsMixin` for loops that are not a ``transformers.Trainer``.

    ``loss_fn(model, inputs) -> 0-dim tensor`` defaults to ``model(**inputs).loss``.
    The learning rate is read from :attr:`lr` at every update: assign to it to schedule.

    Example (the body of MeZO's training step)::

        zo = MeZOAdapter(eps=1e-3, lr=1e-6, weight_decay=0.0)
        loss = zo.zo_step(model, batch)
        zo.zo_update(model)
    """

    def __init__(
        self,
        *,
        eps: float = 1e-3,
        lr: float = 1e-6,
        weight_decay: float = 0.0,
        loss_fn: Optional[Callable[[torch.nn.Module, Any], torch.Tensor]] = None,
        noise: str = "gaussian",
        rounding: str = DEFAULT_ROUNDING,
        backend: str = "auto",
    ):
        if not is_real_number(eps) or not eps > 0:
            raise ValueError(f"eps must be a positive float, got {eps!r}")
        if noise not in NOISE_KINDS:
            raise ValueError(f"noise must be one of {NOISE_KINDS}, got {noise!r}")
        check_rounding(rounding, "rounding")
        if backend not in BACKEND_CHOICES:
            raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
        self.args = MeZOArguments(zo_eps=float(eps), weight_decay=float(weight_decay))
        self.lr = lr
        self.loss_fn = loss_fn or _model_loss
        self.zo_noise = noise
        self.zo_rounding = rounding
        self.zo_backend = backend
        self.named_parameters_to_optim = []

    def _get_learning_rate(self) -> float:
        return float(self.lr)

    def zo_forward(self, model: torch.nn.Module, inputs: Any) -> torch.Tensor:
        """Loss without autograd and with dropout off, as MeZO's ``zo_forward``."""
        model.eval()
        with torch.no_grad():
            loss = self.loss_fn(model, inputs)
        return loss.detach()

    def set_parameters(self, named_parameters: Sequence[Tuple[str, torch.nn.Parameter]]) -> None:
        """Fix the parameters to perturb without a :meth:`zo_step` (only those with requires_grad)."""
        self.named_parameters_to_optim = [(n, p) for n, p in named_parameters if p.requires_grad]

"""MeZO's trainer methods with addax_kernels' fused ops underneath.

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

ZO-Bench's trainer (ZO-Bench/ZO-LLM, ``zo-bench/trainer.py``) has the same method names but
more settings on its ``args``, and takes its update inside its own ``zo_step`` through a
torch optimizer.  The mixin reproduces only its plain ZO-SGD (``trainer="zo_sgd"``,
``momentum=0``, ``q=1``, two-sided, dense, no weight decay); every other setting raises a
ValueError naming it (:func:`zo_bench_unserved_setting`), because serving it with the mixin's
methods would silently run a different algorithm.

:class:`MeZOAdapter` is the same mixin as a standalone object for training loops that are not
a ``transformers.Trainer``.

This module does not import transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .._numbers import is_real_number
from ..ops import BACKEND_CHOICES, addax_update_, perturb_, zo_update_
from ..optim import mezo_decays
from ..optim.rounding import DEFAULT_ROUNDING, ROUNDING_CHOICES, pass_roundings
from ..optim.seeds import ROUNDING_STREAM, derive_seed
from ..rng import NOISE_KINDS

__all__ = ["MeZOKernelsMixin", "MeZOAdapter", "MeZOArguments", "mezo_decays", "zo_bench_unserved_setting"]

# MeZO draws each step's seed as np.random.randint(1000000000).
_MEZO_SEED_BOUND = 1_000_000_000

# ZO-Bench's zeroth-order trainers (its ``args.trainer``) and what each runs.
_ZO_BENCH_TRAINERS = {
    "zo_sgd": "ZO-SGD",
    "zo_adam": "ZO-Adam: a torch.optim.Adam step on g*z",
    "zo_sign_opt": "ZO-SGD-Sign: sign(g)*z in place of g*z",
    "zo_conserv": "ZO-SGD-Cons: keeps the lowest loss among theta, theta - lr*g*z, theta + lr*g*z",
}


def zo_bench_unserved_setting(args: Any) -> Optional[str]:
    """The first setting of a ZO-Bench ``args`` that :class:`MeZOKernelsMixin` cannot serve,
    as ``"name=value (what ZO-Bench does with it)"``, or None.

    Applies when ``args.trainer`` names one of ZO-Bench's zeroth-order trainers; any other
    host (MeZO's trainer: ``trainer="zo"``, or no ``trainer`` field) has nothing to check.
    The fields read are spelled as in ZO-Bench's ``OurArguments``: ``trainer``, ``momentum``,
    ``q``, ``perturbation_mode``, ``gradient_sparsity``, ``module_wise_perturbation``, and
    the Trainer's ``weight_decay``.
    """
    trainer = getattr(args, "trainer", None)
    if trainer not in _ZO_BENCH_TRAINERS:
        return None
    if trainer != "zo_sgd":
        return f"trainer={trainer!r} ({_ZO_BENCH_TRAINERS[trainer]})"
    momentum = getattr(args, "momentum", 0.0)
    if momentum:
        return f"momentum={momentum!r} (ZO-SGD with momentum: a torch.optim.SGD(momentum=...) step on g*z)"
    q = getattr(args, "q", 1)
    if q != 1:
        return f"q={q!r} ({q} directions per step, averaged)"
    mode = getattr(args, "perturbation_mode", "two_side")
    if mode != "two_side":
        return f"perturbation_mode={mode!r} (the one-sided estimate (l(theta + eps*z) - l(theta)) / eps)"
    sparsity = getattr(args, "gradient_sparsity", None)
    if sparsity is not None:
        return f"gradient_sparsity={sparsity!r} (sparse perturbations: a random share of z set to 0)"
    if getattr(args, "module_wise_perturbation", False):
        return "module_wise_perturbation=True (one perturbation and update per module)"
    weight_decay = getattr(args, "weight_decay", 0.0)
    if weight_decay:
        return (f"weight_decay={weight_decay!r} (ZO-Bench builds its ZO optimizer without weight decay, so it "
                "applies none; the mixin would apply it)")
    return None


def _checked_rounding(rounding: Any, name: str) -> str:
    if rounding not in ROUNDING_CHOICES:
        raise ValueError(f"{name} must be one of {ROUNDING_CHOICES}, got {rounding!r}")
    return rounding


def _check_zo_bench_host(args: Any) -> None:
    setting = zo_bench_unserved_setting(args)
    if setting is not None:
        raise ValueError(
            f"MeZOKernelsMixin cannot serve the ZO-Bench setting {setting}: it runs ZO-Bench's plain ZO-SGD "
            "only (trainer='zo_sgd', momentum=0, q=1, perturbation_mode='two_side', gradient_sparsity=None, "
            "module_wise_perturbation=False, weight_decay=0), and with this setting it would silently run "
            "a different algorithm. Remove the mixin from the trainer's bases for this setting, or change it."
        )


class MeZOKernelsMixin:
    """MeZO's ``zo_perturb_parameters`` / ``zo_step`` / ``zo_update`` on fused kernels.

    The host class provides, exactly as MeZO's trainer does: ``self.args.zo_eps``,
    ``self.args.weight_decay``, ``self._get_learning_rate()``, a ``zo_forward(model, inputs)``
    returning a 0-dim loss, and optionally ``self.lr_scheduler`` (stepped by :meth:`zo_update`,
    as MeZO does) and ``self.args.gradient_accumulation_steps`` (must be 1, as in MeZO).

    The kernel settings are class attributes, overridable per subclass or instance:
    ``zo_noise`` ("gaussian" or "rademacher"), ``zo_rounding`` (a policy of
    ``addax_kernels.optim.ROUNDING_CHOICES``, the optimizers' default by default: see
    docs/optimizers.md; under ``"restored"`` with bf16/fp16 parameters :meth:`zo_step` undoes
    each perturbation by a pass of its own, +ε, −ε, −ε, +ε, instead of MeZO's +ε, −2ε, +ε),
    ``zo_backend``.  Every pass of a step rounds with its own ``rounding_seed``, derived from
    ``zo_random_seed`` and the pass number (SPEC §2).

    On ZO-Bench's trainer every method first checks ``self.args`` with
    :func:`zo_bench_unserved_setting` and raises a ValueError naming a setting it cannot serve.

    Stream ids: parameter i of ``named_parameters_to_optim`` uses tid i, so the same set of
    trainable parameters in the same order gives the same z in every call.
    """

    zo_noise: str = "gaussian"
    zo_rounding: str = DEFAULT_ROUNDING
    zo_backend: str = "auto"

    named_parameters_to_optim: List[Tuple[str, torch.nn.Parameter]]
    zo_random_seed: int
    projected_grad: float

    # ------------------------------------------------------------------ MeZO's methods

    def zo_perturb_parameters(self, random_seed: Optional[int] = None, scaling_factor: float = 1) -> None:
        """θ ← θ + scaling_factor·ε·z(seed) for every parameter being optimized, in one pass.

        ``random_seed`` defaults to ``self.zo_random_seed``, as in MeZO.
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
            backend=self.zo_backend,
        )

    def zo_step(self, model: torch.nn.Module, inputs: Any) -> torch.Tensor:
        """MeZO's two-point estimate; sets ``projected_grad`` and returns the loss at θ+εz.

        Same sequence as MeZO: collect the trainable parameters, draw
        ``zo_random_seed = np.random.randint(1e9)`` (so seeds follow the global numpy RNG that
        ``transformers.set_seed`` and the Trainer's checkpoints manage), perturb +ε, loss,
        perturb −2ε, loss, ``projected_grad = ((l+ − l−)/(2ε)).item()``, perturb +ε back.
        """
        _check_zo_bench_host(self.args)
        accumulation = getattr(self.args, "gradient_accumulation_steps", 1)
        if accumulation != 1:
            raise ValueError(f"MeZO's zo_step has no gradient accumulation: gradient_accumulation_steps={accumulation}")
        self.named_parameters_to_optim = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.zo_random_seed = int(np.random.randint(_MEZO_SEED_BOUND))
        self._zo_pass = 0
        separate_restore = self._zo_roundings().separate_restore and any(
            p.dtype in (torch.bfloat16, torch.float16) for _, p in self.named_parameters_to_optim)

        self.zo_perturb_parameters(scaling_factor=1)
        loss_plus = self.zo_forward(model, inputs)
        if separate_restore:
            self.zo_perturb_parameters(scaling_factor=-1)
            self.zo_perturb_parameters(scaling_factor=-1)
        else:
            self.zo_perturb_parameters(scaling_factor=-2)
        loss_minus = self.zo_forward(model, inputs)
        self.projected_grad = ((loss_plus - loss_minus) / (2 * self.args.zo_eps)).item()
        self.zo_perturb_parameters(scaling_factor=1)
        return loss_plus

    def zo_update(self, model: Optional[torch.nn.Module] = None) -> None:
        """θ ← θ − lr·(projected_grad·z + wd·θ), wd = 0 where :func:`mezo_decays` says so; one
        fused pass.  Then steps ``self.lr_scheduler`` if there is one, as MeZO does.

        ``model`` is accepted for MeZO's call shape; the parameters are those of the last
        :meth:`zo_step`.
        """
        _check_zo_bench_host(self.args)
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
        scheduler = getattr(self, "lr_scheduler", None)
        if scheduler is not None:
            scheduler.step()

    def addax_update(self, model: Optional[torch.nn.Module] = None, alpha: float = 0.5) -> None:
        """Addax's combined update after :meth:`zo_step` and a backward pass on the short batch:
        θ ← θ − lr·(α·projected_grad·z + (1−α)·θ.grad + wd·θ), one fused pass; parameters
        without a ``.grad`` get the ZO part only.  Frees the gradients it consumed and steps
        ``self.lr_scheduler`` if there is one.
        """
        _check_zo_bench_host(self.args)
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
        scheduler = getattr(self, "lr_scheduler", None)
        if scheduler is not None:
            scheduler.step()

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
        return pass_roundings(_checked_rounding(self.zo_rounding, "zo_rounding"))

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
        _checked_rounding(rounding, "rounding")
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

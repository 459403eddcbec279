"""ZO-Bench's trainer settings and what :class:`~.mezo_adapter.MeZOKernelsMixin` runs for each.

ZO-Bench (ZO-Bench/ZO-LLM, ``zo-bench/trainer.py`` and the ``OurArguments`` of ``run.py``)
selects its zeroth-order algorithm with these fields of ``args``:

* ``trainer``: ``"zo_sgd"`` / ``"zo_adam"`` / ``"zo_sign_opt"`` run ``zo_step`` (q = 1) or
  ``zo_step_v1`` (q > 1), ``"zo_conserv"`` runs ``zo_conserv_step``; each step ends with
  ``param.grad = (gradient estimate)`` and ``self.optimizer.step()``, and the loop's
  ``zo_update`` only steps the scheduler.
* the torch optimizer ZO-Bench builds after the Trainer's own: ``zo_sgd`` →
  ``SGD(params, lr, momentum=args.momentum)`` (no dampening, no Nesterov, no weight decay),
  ``zo_adam`` → ``Adam(params, lr)`` (torch's defaults: betas (0.9, 0.999), eps 1e-8, no
  weight decay); for ``zo_sign_opt`` and ``zo_conserv``, ``args.optimizer`` picks one of the
  two (``"sgd"`` / ``"adam"``), and any other value keeps the Trainer's own optimizer.
* ``q`` directions averaged (``zo_step_v1``: one seed per direction, one optimizer step on
  Σ_k g_k·z_k / q), ``perturbation_mode`` ``"two_side"`` or ``"one_side"``.
* ``gradient_sparsity = s``: before each use, z is zeroed where a standard normal draw from a
  generator of its own (re-seeded for every pass of a step, from a seed drawn every
  ``sparse_gradient_resample_steps`` steps) is below s (``fast_random_mask_like``): every
  element independently, with probability Φ(s), Φ the standard normal CDF, whatever the
  argument's name suggests (s = 0.75 zeroes 77% of z; s = 0 zeroes half of it).  SPEC §1's
  ``sparsity=p`` zeroes each element independently with probability p, the mask a function
  of the step's seed, so ``p = Φ(s)`` is the same distribution when the mask is redrawn every
  step (``sparse_gradient_resample_steps=1``, the default) and s is one number for every
  tensor (``sparse_gradient_group="layer"``, the default).
* ``module_wise_perturbation``: one perturbation and update per module.

:func:`zo_bench_unserved_setting` is the one list of what the mixin cannot serve.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional

# ZO-Bench's zeroth-order trainers (its ``args.trainer``) and what each runs.
ZO_BENCH_TRAINERS = {
    "zo_sgd": "ZO-SGD",
    "zo_adam": "ZO-Adam: a torch.optim.Adam step on g*z",
    "zo_sign_opt": "ZO-SGD-Sign: sign(g)*z in place of g*z",
    "zo_conserv": "ZO-SGD-Cons: keeps the lowest loss among theta, theta - lr*g*z, theta + lr*g*z",
}
ZO_BENCH_PERTURBATION_MODES = ("two_side", "one_side")

# The torch optimizer ZO-Bench builds for a trainer, where it does not depend on args.optimizer.
_TRAINER_OPTIMIZER = {"zo_sgd": "sgd", "zo_adam": "adam"}
ZO_BENCH_OPTIMIZERS = ("sgd", "adam")


def is_zo_bench_host(args: Any) -> bool:
    """Whether ``args`` selects one of ZO-Bench's zeroth-order trainers."""
    return getattr(args, "trainer", None) in ZO_BENCH_TRAINERS


def zo_bench_optimizer(args: Any) -> Optional[str]:
    """``"sgd"`` or ``"adam"``: the torch optimizer ZO-Bench steps for ``args`` (None: the
    Trainer's own, which the mixin does not reproduce)."""
    trainer = getattr(args, "trainer", None)
    if trainer in _TRAINER_OPTIMIZER:
        return _TRAINER_OPTIMIZER[trainer]
    optimizer = getattr(args, "optimizer", "adamw")
    return optimizer if optimizer in ZO_BENCH_OPTIMIZERS else None


def zo_bench_sparsity(gradient_sparsity: Optional[float]) -> float:
    """The ``sparsity=`` of the ops for ZO-Bench's ``gradient_sparsity`` s: Φ(s), the share of
    z its mask zeroes (module docstring); 0.0 for None."""
    if gradient_sparsity is None:
        return 0.0
    return 0.5 * (1.0 + math.erf(float(gradient_sparsity) / math.sqrt(2.0)))


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def zo_bench_unserved_setting(args: Any) -> Optional[str]:
    """The first setting of a ZO-Bench ``args`` that :class:`MeZOKernelsMixin` cannot serve,
    as ``"name=value (why)"``, or None.

    Applies when ``args.trainer`` names one of ZO-Bench's zeroth-order trainers; any other
    host (MeZO's trainer: ``trainer="zo"``, or no ``trainer`` field) has nothing to check.
    The fields read are spelled as in ZO-Bench's ``OurArguments``: ``trainer``, ``optimizer``,
    ``momentum``, ``q``, ``perturbation_mode``, ``gradient_sparsity``,
    ``sparse_gradient_group``, ``sparse_gradient_resample_steps``,
    ``module_wise_perturbation``, and the Trainer's ``weight_decay``.  Settings ZO-Bench
    ignores (weight decay, Adam's momentum, zo_conserv's q) are refused rather than ignored.
    """
    trainer = getattr(args, "trainer", None)
    if trainer not in ZO_BENCH_TRAINERS:
        return None
    optimizer = zo_bench_optimizer(args)
    if optimizer is None:
        return (f"optimizer={getattr(args, 'optimizer', 'adamw')!r} (with trainer={trainer!r} ZO-Bench then steps "
                f"the Trainer's own optimizer, not one of {ZO_BENCH_OPTIMIZERS}: use optimizer='sgd' or 'adam')")
    momentum = getattr(args, "momentum", 0.0)
    if not _is_real(momentum):
        return f"momentum={momentum!r} (not a finite number)"
    if optimizer == "adam" and momentum != 0:
        return f"momentum={momentum!r} (ZO-Bench's Adam ignores it)"
    if not 0 <= momentum <= 1:
        return f"momentum={momentum!r} (SGD momentum outside [0, 1])"
    q = getattr(args, "q", 1)
    if not isinstance(q, numbers.Integral) or isinstance(q, bool) or q < 1:
        return f"q={q!r} (the number of directions must be an int >= 1)"
    if trainer == "zo_conserv" and q != 1:
        return f"q={q!r} (ZO-Bench's zo_conserv_step ignores q and runs one direction)"
    mode = getattr(args, "perturbation_mode", "two_side")
    if mode not in ZO_BENCH_PERTURBATION_MODES:
        return f"perturbation_mode={mode!r} (not one of {ZO_BENCH_PERTURBATION_MODES})"
    sparsity = getattr(args, "gradient_sparsity", None)
    if sparsity is not None:
        if not _is_real(sparsity):
            return f"gradient_sparsity={sparsity!r} (not a finite number)"
        group = getattr(args, "sparse_gradient_group", "layer")
        if group != "layer":
            return (f"sparse_gradient_group={group!r} (a sparsity per tensor from the weights' magnitudes; the "
                    "mixin applies one sparsity to every tensor)")
        resample = getattr(args, "sparse_gradient_resample_steps", 1)
        if resample != 1:
            return (f"sparse_gradient_resample_steps={resample!r} (one mask kept for {resample} steps; the mixin "
                    "redraws the mask with z every step)")
        if q != 1:
            return (f"gradient_sparsity={sparsity!r} with q={q!r} (ZO-Bench's zo_step_v1 perturbs with one mask "
                    "for every direction and updates with dense z)")
        if trainer == "zo_conserv":
            return (f"gradient_sparsity={sparsity!r} with trainer='zo_conserv' (ZO-Bench's zo_conserv_step "
                    "perturbs with sparse z and updates with dense z)")
        if not zo_bench_sparsity(sparsity) < 1.0:
            return f"gradient_sparsity={sparsity!r} (zeroes every element of z)"
    if getattr(args, "module_wise_perturbation", False):
        return "module_wise_perturbation=True (one perturbation and update per module)"
    weight_decay = getattr(args, "weight_decay", 0.0)
    if weight_decay:
        return (f"weight_decay={weight_decay!r} (ZO-Bench builds its ZO optimizer without weight decay, so it "
                "applies none)")
    return None

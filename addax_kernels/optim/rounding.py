"""The rounding policies of the optimizers: which storage rounding each pass of a step uses.

The ops round every result to the parameter dtype once per pass, ``"nearest"`` or
``"stochastic"`` (SPEC §2, ``addax_kernels.ops.ROUNDING_MODES``).  An optimizer step has two
kinds of pass: *perturbation* passes (θ ± ε·z before a loss evaluation) and *update* passes
(the fused restore and update, optimizer state included).  A policy names the rounding of
each kind; float32 parameters are stored exactly whatever the policy.

This module is the one definition of the policy names: integrations and the benchmark import
:data:`ROUNDING_CHOICES`, :data:`DEFAULT_ROUNDING` and :func:`pass_roundings` from here.
Every pass also draws its stochastic-rounding words from its own ``rounding_seed``
(:mod:`addax_kernels.optim.seeds`), so the roundings of one step are independent.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["ROUNDING_CHOICES", "DEFAULT_ROUNDING", "PassRoundings", "pass_roundings", "check_rounding"]


class PassRoundings(NamedTuple):
    """How a step's passes round under a policy: the ops' ``rounding=`` of perturbation passes
    and of update passes, and whether each perturbation is undone by a pass of its own
    (rounded like the perturbation) instead of inside the next pass."""

    perturb: str
    update: str
    separate_restore: bool = False


_POLICIES = {
    # Perturbations to nearest, each undone by its own nearest-rounded pass: rn(rn(θ + εz) − εz)
    # is θ again wherever the rounding error of the perturbation is under half the spacing at θ
    # (everywhere but at binade boundaries and ties), so a step leaves no rounding noise behind
    # besides that of its (stochastic) update.  Costs 4K + 1 passes per two-sided step (2K + 1
    # for the others) when some parameter is 16-bit; float32 alone keeps the fused passes.
    "restored": PassRoundings("nearest", "stochastic", separate_restore=True),
    # Every pass stochastic, each with its own words: unbiased at every pass; the restore is
    # fused with the next pass, so every step adds rounding noise (a random walk).
    "stochastic": PassRoundings("stochastic", "stochastic"),
    # Perturbations to nearest (restore fused), updates stochastic.
    "auto": PassRoundings("nearest", "stochastic"),
    # Every pass to nearest.
    "nearest": PassRoundings("nearest", "nearest"),
}

ROUNDING_CHOICES = tuple(_POLICIES)

# Chosen by measurement (scripts/rounding_drift.py; the table is in docs/optimizers.md): the
# smallest bf16-to-float32 loss gap and the smallest drift of individual elements; its mean
# drift is a one-time step of the elements that sit exactly on a binade boundary.
DEFAULT_ROUNDING = "restored"


def check_rounding(rounding, name: str = "rounding") -> str:
    """``rounding`` if it is one of :data:`ROUNDING_CHOICES`, else a ValueError naming ``name``."""
    if not isinstance(rounding, str) or rounding not in _POLICIES:
        raise ValueError(f"{name} must be one of {ROUNDING_CHOICES}, got {rounding!r}")
    return rounding


def pass_roundings(rounding: str) -> PassRoundings:
    """(rounding of perturbation passes, rounding of update passes) under policy ``rounding``.

    Each is one of ``addax_kernels.ops.ROUNDING_MODES``.
    """
    return _POLICIES[check_rounding(rounding)]


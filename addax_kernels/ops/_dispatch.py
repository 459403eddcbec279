"""The eager path every op takes: plan, per-call checks, one FusedJob, the groups, versions.

Order of work in a call: the tensors and per-tensor arguments (a cached :class:`~._plan.Plan`,
or the full checks), gradients against the plan, the per-call arguments (seeds, scalars,
choices: O(number of directions)), the backend; only then the first group runs.  So every
bad input is rejected before anything is modified.  After the pass the version counter of
every written tensor is bumped once here, for every backend, so autograd notices the
in-place update as it does for torch's own in-place ops.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Union

import torch

from .. import rng as _rng
from ..backends import (
    SCALAR_FIRST_COEFF,
    SCALAR_GRAD_COEFF,
    SCALAR_LR,
    SCALAR_SHIFT,
    FusedJob,
)
from . import _checks, _plan
from ._backend_choice import backend_module
from ._checks import ROUNDING_MODES

# What an op without optimizer state or weight decay passes for them.
NO_STATE_SCALARS: Dict[int, float] = {}
NO_DECAY = 0.0


def as_tensor_list(tensors, name: str):
    """A list or tuple of tensors as given (checked with the plan), anything else as a list."""
    if type(tensors) in (list, tuple):
        return tensors
    return _plan.as_tensor_list(tensors, name)


def check_options(noise, rounding, sparsity) -> int:
    """The choices every op takes; returns the sparsity threshold of SPEC §1."""
    if noise not in _rng.NOISE_KINDS or type(noise) is not str:
        _checks.check_choice(noise, "noise", _rng.NOISE_KINDS)
    if rounding not in ROUNDING_MODES or type(rounding) is not str:
        _checks.check_choice(rounding, "rounding", ROUNDING_MODES)
    if type(sparsity) is float and sparsity == 0.0:
        return 0
    return _rng.sparsity_threshold(sparsity)


def execute(plan: _plan.Plan, backend, job: FusedJob, params, grads, grad_key, grad_dtypes, states) -> None:
    """Run ``job`` over the plan's groups on ``backend``, then bump the written tensors' versions."""
    name, module = backend_module(backend, plan.device)
    if plan.inference_error is not None and not torch.is_inference_mode_enabled():
        raise RuntimeError(plan.inference_error)
    groups = plan.groups_for(grad_key, grad_dtypes)
    prepared = plan.prepared_for(name, module, grad_key, groups, params, states)
    _plan.keep_if_captured(plan)
    with torch.no_grad():
        run_groups = getattr(module, "run_groups", None)
        if run_groups is not None and len(groups) > 1:
            run_groups(prepared, groups, job, params, grads, states)
        else:
            for group, group_prepared in zip(groups, prepared):
                module.run(group_prepared, group, job, params, grads, states)
    _plan.bump_versions(plan, params, states)


def run_update(params, grads, states, state_names: Sequence[str], state_kind: int, directions, lr, restore,
               state_scalars, weight_decay, decay_mask, tids, offsets, noise, rounding, rounding_seed, sparsity,
               backend, grad_coeff=0.0) -> None:
    """The shared body of the updating ops (``backends/__init__.py`` gives the pass).

    ``directions(device)`` checks and returns ``(seeds, coeffs)``, one coefficient per seed;
    ``state_scalars`` maps ``SCALAR_*`` slots to values, or is a function of the device
    returning that map (the Adam scalars need it); ``grad_coeff`` weighs the gradient term.
    """
    params = as_tensor_list(params, "params")
    states = [as_tensor_list(buffers, name) for buffers, name in zip(states, state_names)]
    plan = _plan.plan_for(params, states, state_names, tids, offsets, weight_decay, decay_mask)
    device = plan.device
    grad_key = grad_dtypes = grad_addresses = None
    if grads is not None:
        grads, grad_key, grad_dtypes, grad_addresses = _plan.grads_for(plan, grads, params)
    seed_list, coeff_list = directions(device)
    threshold = check_options(noise, rounding, sparsity)
    if callable(state_scalars):
        state_scalars = state_scalars(device)
    lr = _checks.check_scalar(lr, "lr", device)
    shift = 0.0 if restore is None else _checks.check_scalar(restore, "restore", device)
    rounding_seed = _checks.rounding_seed_or(rounding_seed, seed_list[0], device)
    scalar_entries: List[Union[float, torch.Tensor]] = [0.0] * SCALAR_FIRST_COEFF
    scalar_entries[SCALAR_SHIFT] = shift
    scalar_entries[SCALAR_LR] = lr
    scalar_entries[SCALAR_GRAD_COEFF] = grad_coeff
    for slot, value in state_scalars.items():
        scalar_entries[slot] = value
    scalar_entries += coeff_list
    job = FusedJob(
        seeds=_checks.pack_seeds(seed_list, rounding_seed, device),
        scalars=_checks.pack_scalars(scalar_entries, device),
        has_shift=restore is not None,
        num_directions=len(seed_list),
        has_grad=grads is not None,
        state=state_kind,
        noise=noise,
        rounding=rounding,
        sparsity_threshold=threshold,
        grad_addresses=grad_addresses,
    )
    execute(plan, backend, job, params, grads, grad_key, grad_dtypes, states)


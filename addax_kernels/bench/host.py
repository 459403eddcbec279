"""Host time: microseconds of Python, checks and launches per op call and per optimizer step, on
400 tensors of 8 elements shaped like an LLM's parameter list (4 in 5 bf16, 1 in 5 fp32), one
thread: each op (state ops with float32 state), ``MeZO.step`` with a constant closure, and
Addax's first-order hooks (``Addax.step(None, fo_closure)`` minus the same backward without the
optimizer).  The reference backend (the oracle, far slower per tensor) is left out.
"""

from __future__ import annotations

import itertools
from functools import partial
from typing import Callable, List, Optional, Tuple

import torch

import addax_kernels as ak
from addax_kernels.optim.rounding import DEFAULT_ROUNDING, pass_roundings

from .kernels import ALPHA, EPS, LR, MOMENTUM, SEED, WEIGHT_DECAY, ZO_GRAD, guarded
from .timing import host_seconds_added

HOST_OPS = ("perturb_", "zo_update_", "addax_update_", "zo_momentum_update_", "zo_adam_update_")
NUM_TENSORS = 400


def llm_shaped_params(device, count: int = NUM_TENSORS, requires_grad: bool = False) -> List[torch.Tensor]:
    """``count`` tensors of 8 elements, 4 in 5 bf16 and 1 in 5 fp32 (as an LLM's weights, biases
    and norm gains), 4×2 matrices and vectors alternating."""
    generator = torch.Generator(device=device).manual_seed(0)
    params = []
    for index in range(count):
        dtype = torch.float32 if index % 5 == 4 else torch.bfloat16
        shape = (4, 2) if index % 2 == 0 else (8,)
        param = (torch.randn(shape, generator=generator, device=device) * 0.02).to(dtype)
        params.append(param.requires_grad_(requires_grad))
    return params


def op_call(op: str, params: List[torch.Tensor], backend: str, rounding: str = DEFAULT_ROUNDING) -> Callable[[], None]:
    """A call of ``op`` on ``params`` as an optimizer makes it (a new seed each call, weight decay
    with a no-decay mask for vectors); state buffers and gradients are made here, not per call."""
    roundings = pass_roundings(rounding)
    perturb_rounding, update_rounding = roundings.perturb, roundings.update
    seeds = itertools.count(SEED)
    update = dict(backend=backend, rounding=update_rounding, weight_decay=WEIGHT_DECAY,
                  decay_mask=[p.dim() > 1 for p in params])
    if op == "perturb_":
        return lambda: ak.perturb_(params, next(seeds), EPS, backend=backend, rounding=perturb_rounding)
    if op == "zo_update_":
        return lambda: ak.zo_update_(params, next(seeds), ZO_GRAD, LR, restore=EPS, **update)
    if op == "addax_update_":
        grads = [torch.randn_like(p) for p in params]
        return lambda: ak.addax_update_(params, grads, next(seeds), ZO_GRAD, LR, ALPHA, **update)
    state = [[torch.zeros_like(p, dtype=torch.float32) for p in params] for _ in range(2)]
    if op == "zo_momentum_update_":
        return lambda: ak.zo_momentum_update_(params, state[0], next(seeds), ZO_GRAD, LR, MOMENTUM, restore=EPS,
                                              **update)
    if op == "zo_adam_update_":
        steps = itertools.count(1)
        return lambda: ak.zo_adam_update_(params, state[0], state[1], next(seeds), ZO_GRAD, LR, next(steps),
                                          restore=EPS, **update)
    raise ValueError(f"op must be one of {HOST_OPS}, got {op!r}")


def _host_us(fn: Callable[[], object], baseline: Optional[Callable[[], object]], device, **timing) -> float:
    """Median host µs of ``fn()`` (minus ``baseline()``, :func:`.timing.host_seconds_added`) with one
    torch thread: on tiny tensors more threads only add OpenMP fork/join time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return 1e6 * host_seconds_added(fn, baseline, device, **timing)
    finally:
        torch.set_num_threads(threads)


def measure_op_host_us(op: str, backend: str, device, rounding: str = DEFAULT_ROUNDING, count: int = NUM_TENSORS,
                       **timing) -> float:
    """Median host microseconds of one ``op`` call on :func:`llm_shaped_params` (``count`` tensors),
    one thread; ``timing``: ``calls``/``blocks`` of :func:`.timing.host_seconds_added`."""
    device = torch.device(device)
    call = op_call(op, llm_shaped_params(device, count), backend, rounding)
    return _host_us(call, None, device, **timing)


def _fo_loss(params: List[torch.Tensor]) -> torch.Tensor:
    return torch.stack([param.float().sum() for param in params]).sum()


def measure_step_host_us(what: str, backend: str, device, rounding: str = DEFAULT_ROUNDING, count: int = NUM_TENSORS,
                         **timing) -> float:
    """``"mezo"``: host µs of ``MeZO.step`` with a constant closure; ``"addax-hooks"``: host µs
    Addax's FO hooks add to one backward over the tensors (step minus plain backward); one thread."""
    from addax_kernels.optim import Addax, MeZO

    device = torch.device(device)
    params = llm_shaped_params(device, count, requires_grad=what == "addax-hooks")
    if what == "mezo":
        constant = torch.zeros((), device=device)
        optimizer = MeZO(params, lr=LR, eps=EPS, backend=backend, rounding=rounding)
        return _host_us(lambda: optimizer.step(lambda: constant), None, device, **timing)

    if what != "addax-hooks":
        raise ValueError(f"what must be 'mezo' or 'addax-hooks', got {what!r}")

    def plain_backward():
        _fo_loss(params).backward()
        for param in params:
            param.grad = None

    optimizer = Addax(params, lr=LR, eps=EPS, alpha=ALPHA, backend=backend, rounding=rounding)
    return _host_us(lambda: optimizer.step(None, lambda: _fo_loss(params)), plain_backward, device, **timing)


def host_tasks(cfg, results: dict) -> List[Tuple[str, Callable[[], None]]]:
    results["host"] = {"tensors": NUM_TENSORS, "layout": "8 elements each, 4 in 5 bf16, 1 in 5 fp32",
                       "torch_threads": 1, "records": []}
    measures = [(op, partial(measure_op_host_us, op)) for op in HOST_OPS]
    measures += [("MeZO.step", partial(measure_step_host_us, "mezo")),
                 ("Addax FO hooks per backward", partial(measure_step_host_us, "addax-hooks"))]
    tasks = []
    for backend in [name for name in cfg.backends if name != "reference"]:  # the oracle: seconds per call
        for name, measure in measures:
            def task(name=name, measure=measure, backend=backend):
                record = {"op": name, "impl": backend, "tensors": NUM_TENSORS}
                results["host"]["records"].append(
                    guarded(record, lambda: {"us": measure(backend, cfg.device, cfg.rounding)}))

            tasks.append((f"host {name} {backend}", task))
    return tasks

"""Kernel level: each fused op against the copy roofline and the PyTorch it replaces, and the
ZO-Bench-family updates against ZO-Bench's code, all in the same run.

Two cases: ``tensor``, one contiguous tensor per size, and ``list``, the parameter list of an
OPT model (:func:`.steps.opt_param_shapes`).  Bytes moved count the unavoidable traffic of one
fused pass (:func:`bytes_moved`): z is regenerated in registers and moves nothing.  The
baselines are charged the same bytes, so their GB/s is useful bytes per second.
"""

from __future__ import annotations

import itertools
import math
from functools import partial
from typing import Callable, Dict, List, Sequence, Tuple

import torch

import addax_kernels as ak
from addax_kernels.optim.rounding import pass_roundings

from . import baselines
from .steps import opt_param_shapes
from .timing import buffer_sets, peak_extra_bytes, seconds_per_call

OPS = ("perturb", "zo_update", "addax_update")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Passes over the parameters, in units of their size: read and write θ; addax_update_ also
# reads the gradient (stored in the parameter dtype).
TENSOR_PASSES = {"perturb": 2, "zo_update": 2, "addax_update": 3}
ZO_BENCH_UPDATES = ("zo-sgd-momentum", "zo-adam", "zo-sgd-sign", "sparse-mezo")
# Representative step values; weight decay is non-zero so both sides evaluate the whole formula.
SEED, EPS, LR, ZO_GRAD, ALPHA, WEIGHT_DECAY, MOMENTUM, SPARSITY = 1234, 1e-3, 1e-6, 0.5, 0.5, 0.01, 0.9, 0.75


def bytes_moved(op: str, dtype: torch.dtype, numel: int) -> int:
    """Bytes one fused ``op`` pass must read and write over ``numel`` elements of ``dtype``."""
    if op not in TENSOR_PASSES:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if dtype not in DTYPES.values():
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    if numel < 0:
        raise ValueError(f"numel must be non-negative, got {numel}")
    return TENSOR_PASSES[op] * numel * dtype.itemsize


def weights(shapes: Sequence[Tuple[int, ...]], dtype: torch.dtype, device: torch.device, seed: int):
    """Tensors like a trained LM's weights (N(0, 0.02²)), drawn on the device itself."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return [(torch.randn(shape, generator=generator, device=device) * 0.02).to(dtype) for shape in shapes]


def fused_call(op: str, backend: str, rounding: str, params, grads) -> Callable[[], None]:
    roundings = pass_roundings(rounding)
    perturb_rounding, update_rounding = roundings.perturb, roundings.update
    if op == "perturb":
        return partial(ak.perturb_, params, SEED, EPS, rounding=perturb_rounding, backend=backend)
    if op == "zo_update":
        return partial(ak.zo_update_, params, SEED, ZO_GRAD, LR, restore=EPS, weight_decay=WEIGHT_DECAY,
                       rounding=update_rounding, backend=backend)
    return partial(ak.addax_update_, params, grads, SEED, ZO_GRAD, LR, ALPHA, weight_decay=WEIGHT_DECAY,
                   rounding=update_rounding, backend=backend)


def mezo_style_call(op: str, params, grads) -> Callable[[], None]:
    decays = [WEIGHT_DECAY] * len(params)
    if op == "perturb":
        return partial(baselines.mezo_perturb_, params, SEED, EPS)
    if op == "zo_update":
        return partial(baselines.mezo_zo_update_, params, SEED, ZO_GRAD, LR, EPS, decays)
    return partial(baselines.mezo_addax_update_, params, grads, SEED, ZO_GRAD, LR, ALPHA, decays)


def _measure(cfg, make: Callable[[int], Callable[[], None]], sets: int) -> dict:
    """Time ``make(i)()`` cycling i over the buffer sets, then its peak extra memory on set 0."""
    calls = [make(i) for i in range(sets)]
    position = itertools.cycle(range(sets))
    seconds = seconds_per_call(lambda: calls[next(position)](), cfg.device, cfg.budget_s)
    return {"seconds": seconds, "peak_extra_bytes": peak_extra_bytes(calls[0], cfg.device)}


def guarded(record: dict, measure: Callable[[], dict]) -> dict:
    """A failing implementation (a backend that cannot run here) is recorded, not fatal."""
    try:
        record.update(measure())
    except Exception as error:
        record["error"] = f"{type(error).__name__}: {error}"
    return record


def kernel_tasks(cfg, results: dict) -> List[Tuple[str, Callable[[], None]]]:
    groups = [("tensor", dtype, [(1 << k,)]) for dtype in cfg.dtypes for k in cfg.log2_sizes]
    if cfg.list_model:
        groups.append(("list", cfg.list_dtype, opt_param_shapes(cfg.list_model)))
    # One compiled function for the run: each new torch.compile wrapper of the same code would
    # recompile, and past torch._dynamo's recompile limit it silently runs eagerly.
    compiled = baselines.compiled_perturb() if cfg.compile else None
    return [(f"{case} {dtype} {_numel(shapes)} elements",
             partial(_kernel_group, cfg, results, case, dtype, shapes, compiled)) for case, dtype, shapes in groups]


def _numel(shapes) -> int:
    return sum(math.prod(shape) for shape in shapes)


def _kernel_group(cfg, results: dict, case: str, dtype_name: str, shapes, compiled) -> None:
    dtype, device, numel = DTYPES[dtype_name], cfg.device, _numel(shapes)
    sets = buffer_sets(3 * numel * dtype.itemsize, device)
    params = [weights(shapes, dtype, device, seed=i) for i in range(sets)]
    grads = [weights(shapes, dtype, device, seed=1000 + i) for i in range(sets)] if "addax_update" in cfg.ops else None
    for op in cfg.ops:
        nbytes = bytes_moved(op, dtype, numel)
        _copy_roofline(cfg, results, dtype_name, nbytes)
        impls: Dict[str, Callable[[int], Callable[[], None]]] = {
            backend: partial(lambda b, i: fused_call(op, b, cfg.rounding, params[i], grads and grads[i]), backend)
            for backend in cfg.backends
        }
        impls["mezo-style"] = lambda i: mezo_style_call(op, params[i], grads and grads[i])
        if compiled is not None and op == "perturb":
            impls["torch.compile"] = lambda i: partial(compiled, params[i], EPS)
        for impl, make in impls.items():
            record = {"case": case, "op": op, "dtype": dtype_name, "numel": numel, "tensors": len(shapes),
                      "impl": impl, "bytes": nbytes}
            results["kernels"].append(guarded(record, partial(_measure, cfg, make, sets)))


def _copy_roofline(cfg, results: dict, dtype_name: str, nbytes: int) -> None:
    """``y.copy_(x)`` moving ``nbytes`` (half read, half written), once per (dtype, bytes)."""
    if any(r["dtype"] == dtype_name and r["bytes"] == nbytes for r in results["copy"]):
        return
    dtype = DTYPES[dtype_name]
    numel = nbytes // (2 * dtype.itemsize)
    sets = buffer_sets(nbytes, cfg.device)
    sources = [weights([(numel,)], dtype, cfg.device, seed=i)[0] for i in range(sets)]
    targets = [source.clone() for source in sources]  # written once: first-touch faults are no copy cost
    timing = _measure(cfg, lambda i: partial(targets[i].copy_, sources[i]), sets)
    results["copy"].append({"dtype": dtype_name, "numel": numel, "bytes": nbytes, "seconds": timing["seconds"],
                            "gbps": nbytes / timing["seconds"] / 1e9})


# ----------------------------------------------------------------------------- ZO-Bench family


def zo_bench_tasks(cfg, results: dict) -> List[Tuple[str, Callable[[], None]]]:
    return [(f"ZO-Bench {update}", partial(_zo_bench_update, cfg, results, update)) for update in ZO_BENCH_UPDATES]


def _zo_bench_makers(update: str, params, backend_names: Sequence[str], rounding: str):
    """{impl: make()} where make() allocates the update's state and returns one update call."""
    update_rounding = pass_roundings(rounding).update
    common = dict(restore=EPS, rounding=update_rounding)

    def state():
        return [torch.zeros_like(p, dtype=torch.float32) for p in params]

    def fused(backend):
        if update == "zo-sgd-momentum":
            return partial(ak.zo_momentum_update_, params, state(), SEED, ZO_GRAD, LR, MOMENTUM, backend=backend,
                           **common)
        if update == "zo-adam":
            steps, exp_avgs, exp_avg_sqs = itertools.count(1), state(), state()
            return lambda: ak.zo_adam_update_(params, exp_avgs, exp_avg_sqs, SEED, ZO_GRAD, LR, next(steps),
                                              backend=backend, **common)
        sign, sparsity = (1.0, 0.0) if update == "zo-sgd-sign" else (ZO_GRAD, SPARSITY)
        return partial(ak.zo_update_, params, SEED, sign, LR, sparsity=sparsity, backend=backend, **common)

    def zo_bench():
        optimizer = (torch.optim.Adam(params, lr=LR) if update == "zo-adam"
                     else torch.optim.SGD(params, lr=LR, momentum=MOMENTUM if update == "zo-sgd-momentum" else 0.0))
        return partial(baselines.zo_bench_update_, params, optimizer, SEED, ZO_GRAD, EPS,
                       sparsity=SPARSITY if update == "sparse-mezo" else 0.0, sign=update == "zo-sgd-sign")

    makers = {backend: partial(fused, backend) for backend in backend_names}
    makers["zo-bench-style"] = zo_bench
    return makers


def _zo_bench_update(cfg, results: dict, update: str) -> None:
    """One update of the list case in its dtype: time, and peak extra memory of the first update
    from a fresh state (so the state the update keeps counts, as it does for a first step)."""
    shapes = opt_param_shapes(cfg.list_model)
    params = weights(shapes, DTYPES[cfg.list_dtype], cfg.device, seed=0)
    for impl, make in _zo_bench_makers(update, params, cfg.backends, cfg.rounding).items():
        def measure():
            return {"seconds": seconds_per_call(make(), cfg.device, cfg.budget_s),
                    "peak_extra_bytes": peak_extra_bytes(lambda: make()(), cfg.device)}

        record = {"update": update, "impl": impl, "dtype": cfg.list_dtype, "numel": _numel(shapes),
                  "tensors": len(shapes)}
        results["zo_bench"].append(guarded(record, measure))

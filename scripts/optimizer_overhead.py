"""Host time of the optimizers' own work per step, apart from the kernels and the model.

Measures, on a parameter list shaped like an LLM's (400 small tensors by default: 4 in 5
bfloat16 matrices, 1 in 5 float32 vectors, in two param groups as no_decay_param_groups gives):

* ``mezo_step_us``: MeZO.step with a trivial closure (a constant loss), median µs per step;
* ``addax_hook_us``: Addax.step(None, fo_closure) minus the same forward and backward without
  the optimizer, median µs per backward (the two timed in turn within each repeat, so that the
  load of a shared machine hits both alike): the cost of the gradient hooks, the bucketed
  updates and the bookkeeping around them.

Each is taken three ways:

* ``ops``: the real ops, kernels included (whatever ``backend`` runs them);
* ``host``: the real ops with the backend's kernel pass (``run``) replaced by a no-op: the host
  time of a step, optimizer and ops layer together, as a GPU would see it;
* ``optimizer_only``: every op of ``addax_kernels.ops`` replaced by a no-op: the optimizer's own
  share (seeds, plan, estimate, hooks, bookkeeping).

The stubs exist for timing only; nothing is updated while they are installed.

Importable (:func:`measure` returns the figures as a dict); as a script it prints one JSON object:

    python scripts/optimizer_overhead.py [--backend reference] [--params 400] [--repeats 30]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from typing import Callable, Dict, Iterator, List

import torch

from addax_kernels import backends, ops
from addax_kernels.optim import Addax, MeZO

OP_NAMES = ("perturb_", "zo_update_", "addax_update_", "zo_momentum_update_", "zo_adam_update_")


def llm_like_params(count: int = 400, width: int = 16) -> List[torch.nn.Parameter]:
    """``count`` small parameters, every fifth a float32 vector (a norm weight or bias), the
    others bfloat16 matrices (projections)."""
    generator = torch.Generator().manual_seed(0)
    params = []
    for index in range(count):
        if index % 5 == 4:
            params.append(torch.nn.Parameter(torch.ones(width)))
        else:
            params.append(torch.nn.Parameter((torch.randn(width, width, generator=generator) * 0.02)
                                             .to(torch.bfloat16)))
    return params


def param_groups(params: List[torch.nn.Parameter]) -> List[dict]:
    """Two groups as no_decay_param_groups makes them: matrices decayed, vectors not."""
    return [{"params": [p for p in params if p.dim() > 1], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() == 1], "weight_decay": 0.0}]


@contextlib.contextmanager
def no_op_ops() -> Iterator[None]:
    """Replace every public op with a no-op (timing the optimizer's share only)."""
    saved = {name: getattr(ops, name) for name in OP_NAMES}
    try:
        for name in OP_NAMES:
            setattr(ops, name, lambda *args, **kwargs: None)
        yield
    finally:
        for name, op in saved.items():
            setattr(ops, name, op)


@contextlib.contextmanager
def no_op_kernels(backend: str) -> Iterator[None]:
    """Replace ``backend``'s kernel pass with a no-op: the ops still validate, plan and dispatch."""
    module = backends.load(backend)
    saved = module.run
    try:
        module.run = lambda *args, **kwargs: None
        yield
    finally:
        module.run = saved


def median_us(run: Callable[[], None], repeats: int, warmup: int = 3) -> float:
    return interleaved_median_us([run], repeats, warmup)[0]


def interleaved_median_us(runs: List[Callable[[], None]], repeats: int, warmup: int = 3) -> List[float]:
    """Median µs of each of ``runs``, timed in turn within every repeat so that the load of a
    shared machine affects them alike."""
    for _ in range(warmup):
        for run in runs:
            run()
    samples: List[List[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, times in zip(runs, samples):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    return [statistics.median(times) * 1e6 for times in samples]


def mezo_step_us(count: int, backend: str, repeats: int, **options) -> float:
    """Median µs of MeZO.step with a constant-loss closure over ``count`` parameters."""
    params = llm_like_params(count)
    optimizer = MeZO(param_groups(params), lr=1e-6, eps=1e-3, backend=backend, **options)
    loss = torch.tensor(1.0)
    return median_us(lambda: optimizer.step(lambda: loss), repeats)


def addax_hook_us(count: int, backend: str, repeats: int, **options) -> Dict[str, float]:
    """Median µs per backward of Addax's FO part over ``count`` parameters, minus the same
    forward and backward without the optimizer (loss = Σ_i sum(p_i)·c: one cheap node each)."""
    params = llm_like_params(count)
    optimizer = Addax(param_groups(params), lr=1e-6, alpha=0.0, backend=backend, **options)
    scale = torch.tensor(1e-3)

    def loss():
        return sum(p.float().sum() for p in params) * scale

    def plain():
        loss().backward()
        for p in params:
            p.grad = None

    with_optimizer, without = interleaved_median_us([lambda: optimizer.step(None, loss), plain], repeats)
    return {"step_us": with_optimizer, "backward_us": without, "hooks_us": with_optimizer - without}


def measure(count: int = 400, backend: str = "reference", repeats: int = 30) -> Dict[str, Dict[str, float]]:
    """Both measurements, each with the real ops, with no-op kernels and with no-op ops."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = {}
        for label, context in (("ops", contextlib.nullcontext), ("host", lambda: no_op_kernels(backend)),
                               ("optimizer_only", no_op_ops)):
            with context():
                results[label] = {
                    "mezo_step_us": mezo_step_us(count, backend, repeats),
                    "mezo_step_stochastic_us": mezo_step_us(count, backend, repeats, rounding="stochastic"),
                    "addax_hooks": addax_hook_us(count, backend, repeats),
                }
        return results
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="reference")
    parser.add_argument("--params", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    results = measure(args.params, args.backend, args.repeats)
    print(json.dumps({"params": args.params, "backend": args.backend, "torch": torch.__version__,
                      **results}, indent=2))


if __name__ == "__main__":
    main()

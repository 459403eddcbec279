"""Host time per op call on a parameter list shaped like an LLM's, with negligible kernel work.

400 tensors (4 in 5 bfloat16, 1 in 5 float32, as an LLM's weights, biases and norms), a few
elements each, so that what is measured is the host work of a call: argument checks, plan
lookup, packing, dispatch, version counters.  One thread; each call timed on its own and the
median reported, in microseconds.

Usage (from a source checkout)::

    python scripts/host_overhead.py                      # every available backend, cpu
    python scripts/host_overhead.py --backends native --ops perturb_ zo_update_ --calls 2000

For each backend the table shows the whole call and the call with the backend's ``run``
replaced by a no-op ("run stubbed": the ops layer alone; ``--no-stub`` leaves it out).  The
reference backend gets the stubbed row only: its own work is per-tensor PyTorch code, about a
second per call on 400 tensors.  :func:`measure_op_host_us` is importable (the benchmark
reports its figures).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

OPS = ("perturb_", "zo_update_", "addax_update_", "zo_momentum_update_", "zo_adam_update_")
DEFAULT_TENSORS = 400


def llm_like_params(count: int = DEFAULT_TENSORS, device="cpu", elements: int = 8) -> List[torch.Tensor]:
    """``count`` tiny tensors, 4 in 5 bfloat16 (weights) and 1 in 5 float32 (norm gains),
    matrices and vectors alternating as in a transformer's parameter list."""
    params = []
    for index in range(count):
        dtype = torch.float32 if index % 5 == 4 else torch.bfloat16
        shape = (elements // 2, 2) if index % 2 == 0 else (elements,)
        params.append(torch.nn.Parameter(torch.randn(shape, device=device).to(dtype)))
    return params


def _op_call(op_name: str, params: List[torch.Tensor], backend: str) -> Callable[[int], None]:
    """A function of the call number making one typical call of ``op_name`` (as an optimizer
    would: per-tensor weight decay with a no-decay mask for 1-D tensors)."""
    import addax_kernels as ak

    with torch.no_grad():
        grads = [torch.randn_like(p) for p in params]
        states = [[torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params] for _ in range(2)]
    decay_mask = [p.dim() > 1 for p in params]
    common = dict(backend=backend)
    update = dict(weight_decay=0.01, decay_mask=decay_mask, **common)
    if op_name == "perturb_":
        return lambda step: ak.perturb_(params, 1000 + step, 1e-3, **common)
    if op_name == "zo_update_":
        return lambda step: ak.zo_update_(params, 1000 + step, 0.25, 1e-4, restore=1e-3, **update)
    if op_name == "addax_update_":
        return lambda step: ak.addax_update_(params, grads, 1000 + step, 0.25, 1e-4, 0.5, **update)
    if op_name == "zo_momentum_update_":
        return lambda step: ak.zo_momentum_update_(params, states[0], 1000 + step, 0.25, 1e-4, 0.9, restore=1e-3,
                                                   **update)
    if op_name == "zo_adam_update_":
        return lambda step: ak.zo_adam_update_(params, states[0], states[1], 1000 + step, 0.25, 1e-4, step + 1,
                                               restore=1e-3, **update)
    raise ValueError(f"op must be one of {OPS}, got {op_name!r}")


@contextlib.contextmanager
def _stubbed_kernels(backend: str):
    """The backend's ``run`` replaced by a no-op: what remains is the ops layer's host work."""
    from addax_kernels import backends

    module = backends.load(backend)
    original = module.run
    module.run = lambda *args, **kwargs: None
    try:
        yield
    finally:
        module.run = original


def measure_op_host_us(op_name: str, backend: str = "native", *, count: int = DEFAULT_TENSORS, calls: int = 1000,
                       warmup: int = 20, device="cpu", stub_kernels: bool = False,
                       params: Optional[Sequence[torch.Tensor]] = None) -> float:
    """Median microseconds per call of ``op_name`` on ``count`` tiny LLM-like tensors, one thread.

    ``stub_kernels=True`` replaces the backend's ``run`` with a no-op for the measurement.
    """
    params = list(params) if params is not None else llm_like_params(count, device)
    call = _op_call(op_name, params, backend)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _stubbed_kernels(backend) if stub_kernels else contextlib.nullcontext():
            for step in range(warmup):
                call(step)
            times = []
            for step in range(warmup, warmup + calls):
                start = time.perf_counter_ns()
                call(step)
                times.append(time.perf_counter_ns() - start)
    finally:
        torch.set_num_threads(threads)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()  # let the queued kernels finish before the next measurement
    return statistics.median(times) / 1000.0


def host_overhead_table(backends: Sequence[str], ops: Sequence[str] = OPS, *, count: int = DEFAULT_TENSORS,
                        calls: int = 1000, device="cpu", stub: bool = True) -> Dict[str, Dict[str, float]]:
    """``{row: {op: µs}}``: per backend the whole call and, with ``stub``, ``"<backend>, run
    stubbed"``.  The reference backend's whole call is per-tensor PyTorch work (about a second
    per call on 400 tensors), so it gets the stubbed row only."""
    rows: Dict[str, Dict[str, float]] = {}
    for backend in backends:
        variants = [] if backend == "reference" else [(backend, False)]
        if stub or backend == "reference":
            variants.append((f"{backend}, run stubbed", True))
        for label, stub_kernels in variants:
            rows[label] = {op: measure_op_host_us(op, backend, count=count, calls=calls, device=device,
                                                  stub_kernels=stub_kernels) for op in ops}
    return rows


def format_table(rows: Dict[str, Dict[str, float]], count: int) -> str:
    ops = list(next(iter(rows.values())))
    header = f"{'µs per call, ' + str(count) + ' tensors':<34}" + "".join(f"{op:>21}" for op in ops)
    lines = [header, "-" * len(header)]
    for label, values in rows.items():
        lines.append(f"{label:<34}" + "".join(f"{values[op]:>21.1f}" for op in ops))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import addax_kernels as ak

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", nargs="*", help="default: every backend available on the device, except "
                        "triton on the CPU (its interpreter)")
    parser.add_argument("--ops", nargs="*", default=list(OPS), choices=OPS)
    parser.add_argument("--tensors", type=int, default=DEFAULT_TENSORS)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-stub", action="store_true", help="skip the rows with the backend's run stubbed")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    backends = args.backends or [name for name in ak.available_backends(device)
                                 if not (name == "triton" and device.type == "cpu")]
    host_info = getattr(ak.ops, "host_info", None)
    print(f"host extension: {host_info() if host_info else 'not part of this version'}", file=sys.stderr)
    rows = host_overhead_table(backends, args.ops, count=args.tensors, calls=args.calls, device=device,
                               stub=not args.no_stub)
    print(format_table(rows, args.tensors))
    return 0


if __name__ == "__main__":
    sys.exit(main())

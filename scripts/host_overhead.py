"""Host time per op call on a parameter list shaped like an LLM's, with negligible kernel work.

A thin command line over :mod:`addax_kernels.bench.host` (the benchmark's host rows): 400
tensors of 8 elements (4 in 5 bfloat16, 1 in 5 float32), one thread, median microseconds.
Besides the whole call it can show the call with the backend's ``run`` replaced by a no-op
("run stubbed": the ops layer alone), which the benchmark does not.

Usage (from a source checkout)::

    python scripts/host_overhead.py                      # every available backend, cpu
    python scripts/host_overhead.py --backends native --ops perturb_ zo_update_ --calls 200

The reference backend gets the stubbed row only: its own work is per-tensor PyTorch code,
about a second per call on 400 tensors.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Dict, Optional, Sequence

import torch

import addax_kernels as ak
from addax_kernels import backends as backend_registry
from addax_kernels.bench.host import HOST_OPS, NUM_TENSORS, measure_op_host_us, measure_step_host_us

STEPS = {"MeZO.step": "mezo", "Addax FO hooks": "addax-hooks"}


@contextlib.contextmanager
def _stubbed_kernels(backend: str):
    """The backend's ``run`` replaced by a no-op: what remains is the ops layer's host work."""
    module = backend_registry.load(backend)
    original = module.run
    module.run = lambda *args, **kwargs: None
    try:
        yield
    finally:
        module.run = original


def host_overhead_table(backends: Sequence[str], ops: Sequence[str] = HOST_OPS, *, count: int = NUM_TENSORS,
                        calls: int = 100, device="cpu", stub: bool = True) -> Dict[str, Dict[str, float]]:
    """``{row: {op or step: µs}}``: per backend the whole call (ops and optimizer steps) and, with
    ``stub``, the ops with the backend's ``run`` stubbed."""
    rows: Dict[str, Dict[str, float]] = {}
    for backend in backends:
        if backend != "reference":
            row = {op: measure_op_host_us(op, backend, device, count=count, calls=calls) for op in ops}
            for label, what in STEPS.items():
                row[label] = measure_step_host_us(what, backend, device, count=count, calls=max(1, calls // 10))
            rows[backend] = row
        if stub or backend == "reference":
            with _stubbed_kernels(backend):
                rows[f"{backend}, run stubbed"] = {
                    op: measure_op_host_us(op, backend, device, count=count, calls=calls) for op in ops}
    return rows


def format_table(rows: Dict[str, Dict[str, float]], count: int) -> str:
    columns = list(dict.fromkeys(column for values in rows.values() for column in values))
    header = f"{'µs per call, ' + str(count) + ' tensors':<28}" + "".join(f"{column:>21}" for column in columns)
    lines = [header, "-" * len(header)]
    for label, values in rows.items():
        cells = "".join(f"{values[c]:>21.1f}" if c in values else f"{'':>21}" for c in columns)
        lines.append(f"{label:<28}" + cells)
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", nargs="*", help="default: every backend available on the device, except "
                        "triton on the CPU (its interpreter)")
    parser.add_argument("--ops", nargs="*", default=list(HOST_OPS), choices=HOST_OPS)
    parser.add_argument("--tensors", type=int, default=NUM_TENSORS)
    parser.add_argument("--calls", type=int, default=100, help="calls per timing block (7 blocks, median)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-stub", action="store_true", help="skip the rows with the backend's run stubbed")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    backends = args.backends or [name for name in ak.available_backends(device)
                                 if not (name == "triton" and device.type == "cpu")]
    print(f"host extension: {ak.ops.host_info()}", file=sys.stderr)
    rows = host_overhead_table(backends, args.ops, count=args.tensors, calls=args.calls, device=device,
                               stub=not args.no_stub)
    print(format_table(rows, args.tensors))
    return 0


if __name__ == "__main__":
    sys.exit(main())

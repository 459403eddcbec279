"""``python -m addax_kernels sass``: the offline SASS report of both GPU backends (no GPU needed).

Both backends are compiled for an H200 (sm_90a): the native kernels with nvcc and setup.py's
flags (:mod:`addax_kernels.sass.native_backend`), the Triton kernel offline for
``GPUTarget("cuda", 90, 32)`` (:mod:`addax_kernels.sass.triton_backend`).  Each row counts the
SASS instructions one thread issues per element in the steady state, with the per-program
(per thread block, per chunk, per ragged tensor end) work amortized over the reference group
below, and turns the count into an estimated cap on throughput:

    budget per element = issue rate x bytes moved per element / copy bandwidth
    estimated_cap      = min(1, budget / sass_per_element)

An in-place pass over bf16 parameters moves 4 bytes per element (read + write): an H200 issues
3.35e13 thread-instructions per second against 4.3e12 B/s of copy bandwidth, so the pass stays
memory-bound up to 3.35e13 * 4 / 4.3e12 = 31.2 instructions per element.  Compute-bound kernels
reach ~85% of their cap; the cap says how much room the instruction stream leaves, not a
measured speed.

This module is the one home of the budget, the reference group and the variant list; the
backend collectors import them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, fields
from typing import Dict, List, Optional, Sequence, Tuple

from ..backends import STATE_ADAM, STATE_BUFFERS, STATE_MOMENTUM, STATE_NONE

# H200: 132 SMs x 4 schedulers x 1.98 GHz x 32 threads, against ~4.3 TB/s of copy bandwidth.
H200_SMS = 132
H200_THREAD_INSTRUCTIONS_PER_S = 3.35e13  # 132 SMs x 4 schedulers x 1.98 GHz x 32 threads
H200_COPY_BYTES_PER_S = 4.3e12
H200_REGISTERS_PER_SM = 65536
H200_MAX_THREADS_PER_SM = 2048
TARGET_ARCH = 90

# The reference group the per-program work is amortized over: MODEL_TENSORS tensors of equal
# size, MODEL_ELEMENTS elements in all, none a multiple of any tile (each has a ragged end).
MODEL_TENSORS = 400
MODEL_ELEMENTS = 1 << 27

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
OPS = ("perturb", "zo_update", "addax_update")
# A variant's optimizer state by name: the backends' StateKind code (STATE_BUFFERS: buffers per parameter).
STATE_CODES = {None: STATE_NONE, "momentum": STATE_MOMENTUM, "adam": STATE_ADAM}

DEFAULT_OUT = os.path.join("bench", "results", "sass-sm90")

# The caps the kernels are held to, checked in the summary.
TARGET_CAP_PERTURB = 0.95  # perturb fp32/bf16/fp16 Gaussian and every Rademacher variant
TARGET_CAP_UPDATE = 0.90  # zo_update bf16 (restore + 1 direction) and addax_update bf16


def budget_per_element(bytes_per_element: float) -> float:
    """SASS thread-instructions an H200 can issue per element while moving the bytes at copy bandwidth."""
    return H200_THREAD_INSTRUCTIONS_PER_S * bytes_per_element / H200_COPY_BYTES_PER_S


def estimated_cap(bytes_per_element: float, instructions_per_element: float) -> float:
    """The fraction of copy bandwidth the issue rate allows (1.0: memory-bound)."""
    return min(1.0, budget_per_element(bytes_per_element) / instructions_per_element)


def resident_blocks(registers: int, threads: int) -> int:
    """Thread blocks an H200 SM keeps resident for a kernel using ``registers`` per thread."""
    by_registers = H200_REGISTERS_PER_SM // max(1, registers * threads)
    return max(1, min(by_registers, H200_MAX_THREADS_PER_SM // threads))


@dataclass(frozen=True)
class Variant:
    """One row: an op with its dtypes, noise and rounding (host seeds and scalars, no weight decay).

    ``zo_update`` is MeZO's fused restore + ``directions`` directions; ``addax_update`` one
    direction plus the gradient; ``perturb`` has no direction.  ``sparse`` (a sparsity mask),
    more than one direction, or optimizer ``state`` (``"momentum"``: one buffer, ``"adam"``:
    two, of ``state_dtype``) make it a configuration of the native general kernel.
    """

    op: str
    param_dtype: str
    grad_dtype: Optional[str] = None
    noise: str = "gaussian"
    rounding: str = "nearest"
    directions: int = 1
    sparse: bool = False
    state: Optional[str] = None
    state_dtype: Optional[str] = None

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {self.op!r}")
        if (self.state is None) != (self.state_dtype is None) or self.state not in STATE_CODES or \
                self.state_dtype not in (None, "fp32", "bf16"):
            raise ValueError(f"state must be one of {[name for name in STATE_CODES if name]} with a state_dtype of "
                             f"fp32 or bf16, or neither: {self}")
        if self.state is not None and self.op != "zo_update":
            raise ValueError(f"only zo_update carries optimizer state: {self}")
        if self.directions < 1 or (self.op != "zo_update" and self.directions != 1):
            raise ValueError(f"only zo_update takes several directions: {self}")

    def direction_count(self) -> int:
        return 0 if self.op == "perturb" else self.directions

    def is_general(self) -> bool:
        """Whether the native backend runs it in its general kernel (runtime flags)."""
        return self.sparse or self.state is not None or self.directions > 1

    def bytes_per_element(self) -> int:
        size = DTYPE_BYTES[self.param_dtype]
        state = 2 * STATE_BUFFERS[STATE_CODES[self.state]] * DTYPE_BYTES[self.state_dtype] if self.state else 0
        return 2 * size + (DTYPE_BYTES[self.grad_dtype] if self.grad_dtype else 0) + state

    def configuration(self) -> str:
        """The general-kernel part of the row, e.g. ``q=2``, ``sparse``, ``adam fp32``; ``-`` for none."""
        parts = ([f"q={self.directions}"] if self.directions > 1 else []) + (["sparse"] if self.sparse else []) + \
            ([f"{self.state} {self.state_dtype}"] if self.state else [])
        return ", ".join(parts) or "-"

    def target_cap(self) -> Optional[float]:
        """The cap this variant is held to, or None where the report sets none (the general
        kernel's configurations are reported, not held to a cap)."""
        if self.is_general():
            return None
        if self.noise == "rademacher":
            return TARGET_CAP_PERTURB
        if self.op == "perturb":
            return TARGET_CAP_PERTURB if self.rounding == "nearest" else None
        return TARGET_CAP_UPDATE if self.param_dtype == "bf16" else None


VARIANTS: Tuple[Variant, ...] = (
    Variant("perturb", "fp32"),
    Variant("perturb", "bf16"),
    Variant("perturb", "fp16"),
    Variant("perturb", "bf16", rounding="stochastic"),
    Variant("perturb", "fp32", noise="rademacher"),
    Variant("perturb", "bf16", noise="rademacher"),
    Variant("perturb", "fp16", noise="rademacher"),
    Variant("perturb", "bf16", noise="rademacher", rounding="stochastic"),
    Variant("zo_update", "bf16", rounding="stochastic"),
    Variant("zo_update", "bf16", rounding="nearest"),
    Variant("zo_update", "bf16", noise="rademacher", rounding="stochastic"),
    Variant("addax_update", "bf16", "bf16", rounding="stochastic"),
    Variant("addax_update", "bf16", "bf16", rounding="nearest"),
    Variant("addax_update", "bf16", "fp32", rounding="stochastic"),
    Variant("addax_update", "bf16", "fp32", rounding="nearest"),
)

# Configurations of the native general kernel the ZO-Bench family and sparse perturbations run:
# sparse MeZO's perturbation, q = 2 directions, ZO-SGD with momentum, ZO-Adam.
GENERAL_VARIANTS: Tuple[Variant, ...] = (
    Variant("perturb", "bf16", sparse=True),
    Variant("perturb", "bf16", noise="rademacher", sparse=True),
    Variant("perturb", "bf16", rounding="stochastic", sparse=True),
    Variant("zo_update", "bf16", rounding="stochastic", directions=2),
    Variant("zo_update", "bf16", rounding="stochastic", state="momentum", state_dtype="fp32"),
    Variant("zo_update", "bf16", rounding="stochastic", state="momentum", state_dtype="bf16"),
    Variant("zo_update", "bf16", rounding="stochastic", state="adam", state_dtype="fp32"),
    Variant("zo_update", "fp32", state="adam", state_dtype="fp32"),
)

REPORT_VARIANTS: Tuple[Variant, ...] = VARIANTS + GENERAL_VARIANTS

ROW_FIELDS = ("backend", "op", "param_dtype", "grad_dtype", "noise", "rounding", "directions", "sparse", "state",
              "state_dtype", "sass_per_element", "registers",
              "local_accesses", "loop_local_accesses", "access_bytes", "estimated_cap", "compiler")


def opcode_of(instruction: str) -> str:
    """The opcode of one SASS instruction's text, after its predicate (``@P0``) if it has one."""
    words = instruction.split()
    if not words:
        return ""
    return words[1] if words[0].startswith("@") and len(words) > 1 else words[0]


def is_local_access(opcode: str) -> bool:
    """A local-memory load or store (LDL/STL): register spills, or a per-thread array in memory."""
    return opcode.startswith(("LDL", "STL"))


def make_row(backend: str, variant: Variant, sass_per_element: float, registers: int, local_accesses: int,
             loop_local_accesses: int, access_bytes: int, compiler: str, **details) -> dict:
    """A report row (the ROW_FIELDS, then backend-specific ``details``); ``compiler`` names the
    compiler and its version, since the counts depend on them.  ``local_accesses``: LDL/STL
    instructions in the kernel; ``loop_local_accesses``: those in the steady-state loop body,
    where they would cost bandwidth (elsewhere they run a few times per chunk or program)."""
    row = {
        "backend": backend,
        **{key: value for key, value in asdict(variant).items()},
        "sass_per_element": round(sass_per_element, 2),
        "registers": registers,
        "local_accesses": local_accesses,
        "loop_local_accesses": loop_local_accesses,
        "access_bytes": access_bytes,
        "estimated_cap": round(estimated_cap(variant.bytes_per_element(), sass_per_element), 3),
        "compiler": compiler,
    }
    row.update(details)
    return row


def variant_of(row: dict) -> Variant:
    """The variant a report row measured."""
    return Variant(**{field.name: row[field.name] for field in fields(Variant)})


# ----------------------------------------------------------------------------- report


def _collect(name: str, module: str, function: str) -> Tuple[List[dict], List[str]]:
    """(rows, problems) of one backend's collector: the variants it could not count, or the whole
    backend when it cannot run here, one line each."""
    try:
        collector = getattr(__import__(f"addax_kernels.sass.{module}", fromlist=[function]), function)
    except ImportError as error:
        return [], [f"{name}: collector addax_kernels.sass.{module} is not available ({error})"]
    try:
        rows, not_counted = collector()
    except Exception as error:  # a missing compiler or toolkit is a reportable outcome, not a crash
        return [], [f"{name}: {type(error).__name__}: {error}"]
    return list(rows), [f"{name}: {line}" for line in not_counted]


def _format_summary(rows: Sequence[dict], problems: Sequence[str]) -> str:
    lines = [
        "# SASS instructions per element on an H200 (sm_90a), offline",
        "",
        f"Budget: {H200_THREAD_INSTRUCTIONS_PER_S:.3g} thread-instructions/s against {H200_COPY_BYTES_PER_S:.3g} B/s "
        f"of copy bandwidth; per-program work amortized over {MODEL_TENSORS} tensors, {MODEL_ELEMENTS} elements "
        "in all. estimated_cap = min(1, budget / sass_per_element); target: the cap a variant is held to.",
        "",
        "Compiled with: " + "; ".join(sorted({f"{row['backend']}: {row['compiler']}"
                                              for row in rows})) + ".",
        "",
        "| backend | op | param | grad | noise | rounding | config | SASS/elem | budget | cap | target | regs | "
        "local ld/st (in loop) | access B |",
        "| --- | --- | --- | --- | --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for row in rows:
        variant = variant_of(row)
        target = variant.target_cap()
        verdict = "" if target is None else (f">= {target:.2f} " + ("met" if row["estimated_cap"] >= target else "MISSED"))
        lines.append(
            f"| {row['backend']} | {row['op']} | {row['param_dtype']} | {row['grad_dtype'] or '-'} | {row['noise']} | "
            f"{row['rounding']} | {variant.configuration()} | {row['sass_per_element']:.1f} | {budget_per_element(variant.bytes_per_element()):.1f} | "
            f"{row['estimated_cap']:.2f} | {verdict} | {row['registers']} | "
            f"{row['local_accesses']} ({row['loop_local_accesses']}) | {row['access_bytes']} |"
        )
    built = [row for row in rows if "built_registers" in row]
    if built:
        lines += ["", "The general rows count each configuration's path in the general kernel compiled with that "
                      "configuration's runtime flags fixed. The built kernel holds every configuration's code in one "
                      "loop; its registers, spill stores and local loads/stores in that loop (not all on one "
                      "configuration's path):", ""]
        lines += [f"- {row['backend']} {row['op']} {row['param_dtype']} {row['noise']} {row['rounding']} "
                  f"{variant_of(row).configuration()}: {row['built_registers']} registers, "
                  f"{row['built_spill_store_bytes']} B spill stores, {row['built_loop_local_accesses']} in the loop body"
                  for row in built]
    if problems:
        lines += ["", "Not reported:", ""] + [f"- {problem}" for problem in problems]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m addax_kernels sass",
        description="Compile both GPU backends for sm_90a (no GPU needed) and report SASS instructions per "
                    "element against the H200 issue budget.",
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    parser.add_argument("--backends", default="native,triton", help="comma list of native,triton (default: both)")
    args = parser.parse_args(argv)
    wanted = [name.strip() for name in args.backends.split(",") if name.strip()]
    collectors = {"native": ("native_backend", "native_rows"), "triton": ("triton_backend", "triton_rows")}
    unknown = [name for name in wanted if name not in collectors]
    if unknown:
        parser.error(f"unknown backends {unknown}; choose from {sorted(collectors)}")
    rows: List[dict] = []
    problems: List[str] = []
    for name in wanted:
        backend_rows, backend_problems = _collect(name, *collectors[name])
        rows += backend_rows
        problems += backend_problems
    os.makedirs(args.out, exist_ok=True)
    report: Dict[str, object] = {
        "budget": {
            "sms": H200_SMS,
            "thread_instructions_per_s": H200_THREAD_INSTRUCTIONS_PER_S,
            "copy_bytes_per_s": H200_COPY_BYTES_PER_S,
            "model_tensors": MODEL_TENSORS,
            "model_elements": MODEL_ELEMENTS,
        },
        "rows": rows,
        "not_reported": problems,
    }
    with open(os.path.join(args.out, "sass.json"), "w") as handle:
        json.dump(report, handle, indent=1)
        handle.write("\n")
    summary = _format_summary(rows, problems)
    with open(os.path.join(args.out, "summary.md"), "w") as handle:
        handle.write(summary)
    sys.stdout.write(summary)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())

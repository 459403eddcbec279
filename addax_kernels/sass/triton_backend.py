"""Offline SASS instruction counts of the Triton kernel for an H200 (sm_90), no GPU needed.

:func:`triton_rows` compiles the fused-pass kernel of ``backends/triton`` for
``GPUTarget("cuda", 90, 32)`` with Triton's bundled ``ptxas``, disassembles the cubin with
the bundled ``nvdisasm`` and counts, per variant, the SASS instructions one thread issues per
element.  docs/triton.md ("Instruction budget") states the counting rules; in short:

* the steady state is the innermost loop that stores parameters (one full tile per iteration,
  ``BLOCK / (32 * num_warps)`` elements per thread), counted instruction by instruction from
  its head to its backward branch; it must be straight-line (the count is then exact);
* the per-program work is amortized over a model group: :data:`MODEL_TENSORS` tensors of
  :data:`MODEL_ELEMENTS` elements in all, on :data:`H200_SMS` SMs with as many resident
  programs per SM as the registers allow.  Each program runs its prologue once (every block
  before the loops, counted once), a binary search of ``ceil(log2 tensors)`` steps (a search
  loop's body divided by the table loads it makes), and one row visit per tensor it touches
  (the outer loop's body minus the inner loop); each tensor is charged one masked edge tile
  (the edge-program path, counted once) as if no tensor were a multiple of the tile;
* the budget per element is the H200's issue rate times the bytes the pass moves per element
  divided by its copy bandwidth (:func:`addax_kernels.sass.budget_per_element`); the estimated cap is
  ``min(1, budget / instructions per element)``.

Run ``python -m addax_kernels.sass.triton_backend`` for a table.  In a process where the Triton
backend was loaded for the interpreter (``TRITON_INTERPRET=1``), the compile runs in a
subprocess without it.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from . import (
    H200_SMS,
    MODEL_ELEMENTS,
    MODEL_TENSORS,
    TARGET_ARCH,
    REPORT_VARIANTS,
    STATE_CODES,
    Variant,
    is_local_access,
    make_row,
    opcode_of,
)

_STORAGE = {"fp32": 0, "fp16": 1, "bf16": 2}


# ----------------------------------------------------------------------------- compiling


def _triton_binary(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Triton's bundled {name} is missing ({path}): this triton install cannot "
                                "compile for NVIDIA GPUs offline")
    return path


def _compile(variant: Variant, arch: int = TARGET_ARCH, overrides: Optional[dict] = None):
    """The compiled kernel (Triton CompiledKernel) of ``variant`` for ``GPUTarget("cuda", arch, 32)``;
    ``overrides`` replaces constexprs the variant does not name (e.g. ``{"HAS_DECAY": True}``)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from ..backends.triton import kernels as K
    from ..backends.triton import launch

    if K.INTERPRETED:
        raise RuntimeError("the Triton kernels were loaded for the interpreter in this process")
    grad, state = variant.grad_dtype, variant.state_dtype
    pointer = {"fp32": "*fp32", "bf16": "*i16", "fp16": "*i16"}
    param_pointer = pointer[variant.param_dtype]
    state_pointer = pointer[state] if state else param_pointer
    signature = {
        "table_ptr": "*i64", "grad_deltas_ptr": "*i64", "param_base": param_pointer,
        "grad_base": pointer[grad] if grad else param_pointer, "state0_base": state_pointer,
        "state1_base": state_pointer, "seeds_ptr": "*i64", "scalars_ptr": "*i64",
    }
    signature.update({name: "i32" for name in (
        "num_full_rows", "search_steps", "num_full_tiles", "tiles_per_program", "num_edges", "seed_lo", "seed_hi",
        "rounding_lo", "rounding_hi", "sparsity_threshold", "num_directions")})
    signature.update({name: "fp32" for name in (
        "shift", "lr", "grad_coeff", "slot3", "slot4", "slot5", "slot6", "slot7", "coeff0")})
    import torch

    torch_dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    constants = dict(
        BLOCK=launch.BLOCK,
        WIDTH=launch.tile_width(torch_dtypes[variant.param_dtype], torch_dtypes[grad] if grad else None,
                                torch_dtypes[state] if state else None),
        PARAM_STORAGE=_STORAGE[variant.param_dtype],
        GRAD_STORAGE=_STORAGE[grad] if grad else 0,
        STATE_STORAGE=_STORAGE[state] if state else 0,
        ACCESS=K.ACCESS_VECTOR,
        GRAD_ACCESS=K.ACCESS_VECTOR,
        HAS_SHIFT=variant.op != "addax_update",
        DIRECTIONS=variant.direction_count(),
        HAS_GRAD=grad is not None,
        HAS_DECAY=False,
        STATE=STATE_CODES[variant.state],
        NOISE=K.NOISE_GAUSSIAN if variant.noise == "gaussian" else K.NOISE_RADEMACHER,
        ROUNDING=K.ROUNDING_NEAREST if variant.rounding == "nearest" else K.ROUNDING_STOCHASTIC,
        SPARSE=variant.sparse,
        SEEDS_ON_DEVICE=False,
        SCALARS_ON_DEVICE=False,
        FAST=True,
    )
    unknown = set(overrides or ()) - set(constants)
    if unknown:
        raise ValueError(f"unknown constexprs {sorted(unknown)}")
    constants.update(overrides or {})
    signature.update({name: "constexpr" for name in constants})
    pointer_count = 8
    source = triton.compiler.ASTSource(fn=K.fused_pass_kernel, signature=signature, constexprs=constants,
                                       attrs={(i,): [["tt.divisibility", 16]] for i in range(pointer_count)})
    warps = launch.num_warps(constants)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": 1})
    return compiled, warps


def disassemble(cubin: bytes) -> str:
    """SASS text of a cubin (Triton's bundled nvdisasm)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
        handle.write(cubin)
        path = handle.name
    try:
        result = subprocess.run([_triton_binary("nvdisasm"), "-c", path], capture_output=True, text=True, check=True)
    finally:
        os.unlink(path)
    return result.stdout


def registers(cubin: bytes) -> int:
    """Registers per thread of the cubin's kernel (Triton's bundled cuobjdump)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
        handle.write(cubin)
        path = handle.name
    try:
        result = subprocess.run([_triton_binary("cuobjdump"), "-res-usage", path], capture_output=True, text=True,
                                check=True)
    finally:
        os.unlink(path)
    match = re.search(r"REG:(\d+)", result.stdout)
    if match is None:
        raise RuntimeError(f"cuobjdump reported no register count:\n{result.stdout}")
    return int(match.group(1))


# ----------------------------------------------------------------------------- the SASS control flow

_INSTRUCTION = re.compile(r"^\s+/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


@dataclass
class _Block:
    start: int  # index of the first instruction
    end: int  # one past the last
    successors: Tuple[int, ...] = ()


class Sass:
    """The main function of a disassembled kernel as instructions, basic blocks and loops."""

    def __init__(self, text: str):
        self.instructions: List[str] = []
        labels: Dict[str, int] = {}
        in_function = False
        for line in text.splitlines():
            if line.startswith(".text.") or line.startswith("\t.section\t.text."):
                in_function = line.startswith(".text.")
                continue
            label = _LABEL.match(line)
            if label and in_function:
                labels[label.group(1)] = len(self.instructions)
                continue
            instruction = _INSTRUCTION.match(line)
            if instruction and in_function:
                self.instructions.append(instruction.group(2))
        self.labels = labels
        self._build_blocks()
        self._find_loops()

    def _target(self, instruction: str) -> Optional[int]:
        match = _BRANCH_TARGET.search(instruction)
        return self.labels[match.group(1)] if match else None

    def _build_blocks(self) -> None:
        starts = {0, *self.labels.values()}
        for index, instruction in enumerate(self.instructions):
            if opcode_of(instruction) in ("BRA", "EXIT", "RET.REL.NODEC", "RET"):
                starts.add(index + 1)
        starts = sorted(start for start in starts if start < len(self.instructions))
        self.blocks: List[_Block] = []
        block_of = {}
        for number, start in enumerate(starts):
            end = starts[number + 1] if number + 1 < len(starts) else len(self.instructions)
            self.blocks.append(_Block(start, end))
            block_of[start] = number
        self.block_of_instruction = {}
        for number, block in enumerate(self.blocks):
            for index in range(block.start, block.end):
                self.block_of_instruction[index] = number
        for number, block in enumerate(self.blocks):
            last = self.instructions[block.end - 1]
            opcode = opcode_of(last)
            predicated = last.split()[0].startswith("@")
            successors = []
            if opcode == "BRA":
                successors.append(block_of[self._target(last)])
                if predicated and number + 1 < len(self.blocks):
                    successors.append(number + 1)
            elif opcode in ("EXIT", "RET.REL.NODEC", "RET"):
                if predicated and number + 1 < len(self.blocks):
                    successors.append(number + 1)
            elif number + 1 < len(self.blocks):
                successors.append(number + 1)
            block.successors = tuple(successors)
        reachable, stack = set(), [0]
        while stack:
            number = stack.pop()
            if number not in reachable:
                reachable.add(number)
                stack.extend(self.blocks[number].successors)
        self.reachable = reachable  # subroutines (reached by CALL) and padding are left out

    def _find_loops(self) -> None:
        """Natural loops of the backward branches: header -> set of blocks."""
        predecessors = {number: set() for number in range(len(self.blocks))}
        for number in self.reachable:
            for successor in self.blocks[number].successors:
                predecessors[successor].add(number)
        self.loops: List[Tuple[int, frozenset]] = []
        for number in sorted(self.reachable):
            for header in self.blocks[number].successors:
                if header <= number:  # a backward edge
                    body, stack = {header, number}, [number]
                    while stack:
                        node = stack.pop()
                        if node == header:
                            continue
                        for predecessor in predecessors[node]:
                            if predecessor not in body:
                                body.add(predecessor)
                                stack.append(predecessor)
                    self.loops.append((header, frozenset(body)))

    def count(self, blocks) -> int:
        return sum(self.blocks[number].end - self.blocks[number].start for number in blocks)

    def opcodes(self, blocks) -> List[str]:
        return [opcode_of(self.instructions[index]) for number in sorted(blocks)
                for index in range(self.blocks[number].start, self.blocks[number].end)]


def _access_bytes(opcode: str) -> int:
    for suffix, size in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if suffix in opcode:
            return size
    return 4


@dataclass(frozen=True)
class KernelCounts:
    """Static counts of one compiled variant (instructions per thread)."""

    loop: int  # the steady-state loop body (one full tile)
    prologue: int  # once per persistent program
    search_step: float  # one binary-search step
    visit: int  # once per tensor a program visits
    edge: int  # the masked edge-tile program
    registers: int
    local_accesses: int  # local-memory instructions (LDL/STL) in the kernel
    loop_local_accesses: int  # those in the steady-state loop body
    access_bytes: int  # narrowest global access of the steady state


def analyze(sass: Sass, register_count: int) -> KernelCounts:
    stores = lambda blocks: sum(op.startswith("STG") for op in sass.opcodes(blocks))  # noqa: E731
    storing = [(header, body) for header, body in sass.loops if stores(body)]
    if not storing:
        raise RuntimeError("no loop stores parameters: not the persistent fused-pass kernel")
    inner_header, inner = min(storing, key=lambda loop: len(loop[1]))
    if len(inner) != 1:
        raise NotCountable("the steady-state loop is not one straight-line block (an inner loop or a branch); "
                           "its count would not be exact")
    enclosing = [body for _, body in storing if inner < body]
    outer = min(enclosing, key=len) if enclosing else inner
    searches = [body for _, body in sass.loops if not body & outer and not stores(body)]
    search_step = 0.0
    for body in searches:
        loads = sum(op.startswith("LDG") for op in sass.opcodes(body))
        if loads:
            search_step = max(search_step, sass.count(body) / loads)
    in_loops = set(outer).union(*searches) if searches else set(outer)
    # Blocks of the full path: those that reach the loops or are reached from them.
    successors = {n: sass.blocks[n].successors for n in sass.reachable}
    from_loops, stack = set(), list(outer)
    while stack:
        node = stack.pop()
        for successor in successors[node]:
            if successor not in from_loops:
                from_loops.add(successor)
                stack.append(successor)
    to_loops = set()
    changed = True
    while changed:
        changed = False
        for node in sass.reachable:
            if node not in to_loops and any(s in outer or s in to_loops for s in successors[node]):
                to_loops.add(node)
                changed = True
    full_path = (to_loops | from_loops) - in_loops
    edge_path = sass.reachable - full_path - in_loops
    loop_opcodes = sass.opcodes(inner)
    accesses = [_access_bytes(op) for op in loop_opcodes if op.startswith(("LDG", "STG"))]
    every = sass.opcodes(sass.reachable)
    return KernelCounts(
        loop=sass.count(inner),
        prologue=sass.count(full_path),
        search_step=search_step,
        visit=sass.count(outer - inner),
        edge=sass.count(edge_path),
        registers=register_count,
        local_accesses=sum(is_local_access(op) for op in every),
        loop_local_accesses=sum(is_local_access(op) for op in loop_opcodes),
        access_bytes=min(accesses) if accesses else 0,
    )


def per_element(counts: KernelCounts, block: int, num_warps: int) -> float:
    """Instructions per element of the model group (see the module docstring)."""
    threads = 32 * num_warps
    elements_per_thread = block // threads
    from ..backends.triton import launch

    programs = H200_SMS * launch.resident_programs(counts.registers, num_warps)
    search = counts.search_step * math.ceil(math.log2(MODEL_TENSORS))
    overhead = (programs * (counts.prologue + search) + (MODEL_TENSORS + programs) * counts.visit
                + MODEL_TENSORS * counts.edge)
    return counts.loop / elements_per_thread + overhead * threads / MODEL_ELEMENTS


def variant_row(variant: Variant) -> dict:
    import triton

    from ..backends.triton import launch

    compiled, warps = _compile(variant)
    cubin = compiled.asm["cubin"]
    counts = analyze(Sass(disassemble(cubin)), registers(cubin))
    instructions = per_element(counts, launch.BLOCK, warps)
    return make_row("triton", variant, instructions, counts.registers, counts.local_accesses,
                    counts.loop_local_accesses, counts.access_bytes,
                    f"triton {triton.__version__}")


class NotCountable(RuntimeError):
    """A variant whose steady-state loop the counting rules cannot count exactly."""


def _rows_here(variants) -> Tuple[List[dict], List[str]]:
    rows, problems = [], []
    for variant in variants:
        try:
            rows.append(variant_row(variant))
        except NotCountable as error:
            problems.append(f"{variant.op} {variant.param_dtype} {variant.noise} {variant.rounding} "
                            f"{variant.configuration()}: {error}")
    return rows, problems


def triton_rows(variants: Tuple[Variant, ...] = REPORT_VARIANTS) -> Tuple[List[dict], List[str]]:
    """(one row per variant, fields in the module docstring; one line per variant that could not
    be counted); compiles offline, needs no GPU."""
    from ..backends.triton import kernels as K

    if not K.INTERPRETED:
        return _rows_here(variants)
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = package_root + os.pathsep + env.get("PYTHONPATH", "")
    payload = json.dumps([variant.__dict__ for variant in variants])
    code = ("import json, sys\nfrom addax_kernels.sass import triton_backend as s\n"
            "variants = tuple(s.Variant(**v) for v in json.loads(sys.argv[1]))\n"
            "json.dump(s._rows_here(variants), sys.stdout)\n")
    result = subprocess.run([sys.executable, "-c", code, payload], env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"offline Triton compile failed:\n{result.stderr[-3000:]}")
    rows, problems = json.loads(result.stdout)
    return rows, problems


def format_table(rows: List[dict]) -> str:
    from . import variant_of

    header = ("op", "param", "grad", "noise", "rounding", "config", "SASS/elem", "regs", "local ld/st (in loop)",
              "access B", "cap")
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for row in rows:
        lines.append(" | ".join(str(value) for value in (
            row["op"], row["param_dtype"], row["grad_dtype"] or "-", row["noise"], row["rounding"],
            variant_of(row).configuration(),
            row["sass_per_element"], row["registers"], f"{row['local_accesses']} ({row['loop_local_accesses']})",
            row["access_bytes"], row["estimated_cap"])))
    return "\n".join(lines)


if __name__ == "__main__":
    table_rows, not_counted = triton_rows()
    print(format_table(table_rows))
    for line in not_counted:
        print("not counted:", line)

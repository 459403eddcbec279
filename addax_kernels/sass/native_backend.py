"""Offline SASS instruction counts of the native CUDA kernels for an H200 (sm_90a), no GPU needed.

:func:`native_rows` compiles ``csrc/cuda/fused_cuda.cu`` to a cubin with nvcc, setup.py's
flags (``csrc/build_flags.py``) and ``-lineinfo`` (which annotates, and does not change, the
code), disassembles it with ``nvdisasm -g`` and counts, for each variant of
:data:`addax_kernels.sass.REPORT_VARIANTS`, the instructions one thread issues per element.

How an instruction is counted (docs/native.md, "Instruction counts"):

* **Steady state.**  The loops that carry the bulk of the work are marked in the source with
  ``// SASS-LOOP gaussian`` (one 16-byte unit per thread and iteration: 4 fp32 or 8 bf16/fp16
  elements) and ``// SASS-LOOP rademacher`` (one 4096-element tile per warp and iteration: 128
  elements per thread).  In the disassembly the loop is the backward branch whose line is the
  marked line; its body is every instruction from the branch target to the branch, NOPs
  excluded.  A kernel holds up to four copies (with and without weight decay; keys and
  coefficients in the constant bank for host values or in registers for device values); the
  rows (host values, no decay) take the shortest.  The body is straight-line code except for one
  rare path: a forward branch over calls to the exact stochastic-rounding functions, taken only
  for elements beyond the largest finite bf16, fp16-subnormal magnitudes, inf and NaN.  Those
  skipped instructions are not counted.
* **Per chunk.**  A thread block walks chunks of kChunk elements (``// SASS-CHUNK`` loop).  A
  full chunk runs the fewest instructions of any control-flow path from the chunk loop's head
  into the steady-state loop and from its exit back to the next chunk (other inner loops not
  entered); if ptxas peeled the loop's first iteration onto that path, one loop body is taken
  off (it is steady-state work).  Every chunk is charged to all of the block's threads.
* **Per block.**  The fewest instructions from the kernel's entry to the chunk loop run once
  per resident block; the grid is H200_SMS times the blocks an SM keeps resident with the
  kernel's registers.
* **Ragged ends.**  Each tensor is charged the masked path (``// SASS-MASKED`` loop, 4 elements
  per thread and iteration) for half a granule of elements (the fast loops work on whole
  units of E elements, Rademacher on whole 4096-element tiles), at least one warp's issue.

    sass_per_element = loop_body / elements_per_iteration
                       + (chunk_overhead * threads * chunks + prologue * threads * grid
                          + masked_body * masked_thread_iterations * tensors) / MODEL_ELEMENTS

over the reference group of :mod:`addax_kernels.sass` (MODEL_TENSORS tensors of equal
size, MODEL_ELEMENTS elements in all, each starting a chunk).  ``access_bytes`` is the widest
global load or store of the steady-state loop; ``local_accesses`` counts the kernel's LDL/STL
and ``loop_local_accesses`` those of the loop body (its cold ranges excluded).
"""

from __future__ import annotations

import math
import os
import re
import runpy
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from . import (
    MODEL_ELEMENTS,
    MODEL_TENSORS,
    H200_SMS,
    REPORT_VARIANTS,
    Variant,
    is_local_access,
    make_row,
    opcode_of,
    resident_blocks,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CSRC = os.path.join(ROOT, "csrc")
SOURCE = os.path.join(CSRC, "cuda", "fused_cuda.cu")
JOB_HEADER = os.path.join(CSRC, "fused_job.h")

_LINE = re.compile(r'//## File "([^"]+)", line (\d+)')
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;?\s*$")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_SECTION = re.compile(r"^\.text\.(\S+):")
_BRANCH = re.compile(r"\bBRA\b.*?`?\(?(\.L_x_\d+)\)?")
_ACCESS = re.compile(r"\b(?:LDG|STG|LD|ST)\.E(?:\.[A-Z0-9]+)*?\.(64|128)\b")


# ----------------------------------------------------------------------------- tools


def _cuda_home() -> str:
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    raise FileNotFoundError("nvcc not found (set CUDA_HOME): the native SASS report compiles csrc/cuda with it")


def _tool(name: str, cuda_home: str) -> str:
    """A CUDA binary tool from the toolkit, else the one bundled with Triton."""
    path = os.path.join(cuda_home, "bin", name)
    if os.path.exists(path):
        return path
    try:
        import triton

        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.exists(bundled):
            return bundled
    except ImportError:
        pass
    found = shutil.which(name)
    if found:
        return found
    raise FileNotFoundError(f"{name} not found in {cuda_home}/bin, in Triton's bundled tools or on PATH")


def compile_cubin(out_dir: str, defines: Sequence[Tuple[str, int]] = ()) -> Tuple[str, str]:
    """nvcc -cubin of fused_cuda.cu for the report's architecture, with the preprocessor
    ``defines`` (name, value); returns (cubin path, ptxas -v log)."""
    if not os.path.exists(SOURCE):
        raise FileNotFoundError(f"{SOURCE} is missing: the SASS report needs the source tree (csrc/)")
    flags = runpy.run_path(os.path.join(CSRC, "build_flags.py"))
    cuda_home = _cuda_home()
    cubin = os.path.join(out_dir, "fused_cuda.cubin")
    command = [os.path.join(cuda_home, "bin", "nvcc"), *flags["NVCC_FLAGS"], f"-arch={flags['SASS_REPORT_ARCH']}",
               "-cubin", "-lineinfo", "-Xptxas", "-v", *[f"-D{name}={value}" for name, value in defines], SOURCE,
               "-o", cubin]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"nvcc failed ({' '.join(command)}):\n{result.stderr[-4000:]}")
    return cubin, result.stderr


def nvcc_version() -> str:
    """``nvcc V13.0.88``-style name of the compiler the report used (its counts depend on it)."""
    output = subprocess.run([os.path.join(_cuda_home(), "bin", "nvcc"), "--version"], capture_output=True,
                            text=True).stdout
    match = re.search(r"\bV(\d+(?:\.\d+)+)", output)
    return f"nvcc {match.group(0)}" if match else "nvcc (version not reported)"


# ----------------------------------------------------------------------------- the source's facts


def _enum_values(text: str, name: str) -> Dict[str, int]:
    """{enumerator: value} of ``enum class name ... { ... }`` in C++ source ``text``."""
    match = re.search(r"enum class " + name + r"\b[^{]*\{([^}]*)\}", text)
    if not match:
        raise ValueError(f"enum class {name} not found")
    values, next_value = {}, 0
    for item in re.sub(r"//[^\n]*", "", match.group(1)).split(","):
        item = item.strip()
        if not item:
            continue
        key, _, value = item.partition("=")
        next_value = int(value.strip(), 0) if value.strip() else next_value
        values[key.strip()] = next_value
        next_value += 1
    return values


@dataclass(frozen=True)
class SourceFacts:
    storage: Dict[str, int]
    noise: Dict[str, int]
    ops: Dict[str, int]
    chunk: int
    threads: int
    loop_lines: Dict[int, str]  # line -> marker kind (gaussian, rademacher, general, CHUNK, MASKED)
    flags: Dict[str, int]  # the general kernel's flag bits (kFlagShift -> 1) and field shifts (kFlagStateShift -> 6)
    states: Dict[str, int]  # StateKind


def source_facts() -> SourceFacts:
    with open(JOB_HEADER) as handle:
        header = handle.read()
    with open(SOURCE) as handle:
        source = handle.read()
    storage = _enum_values(header, "StorageType")
    noise = _enum_values(header, "NoiseKind")
    loop_lines = {}
    for number, line in enumerate(source.splitlines(), start=1):
        marker = re.search(r"// SASS-(LOOP (\w+)|CHUNK|MASKED)\b", line)
        if marker:
            loop_lines[number] = marker.group(2) or marker.group(1)
    return SourceFacts(
        storage={"fp32": storage["kFloat32"], "fp16": storage["kFloat16"], "bf16": storage["kBFloat16"]},
        noise={"gaussian": noise["kGaussian"], "rademacher": noise["kRademacher"]},
        ops=_enum_values(source, "Op"),
        chunk=int(re.search(r"constexpr int64_t kChunk = (\d+);", source).group(1)),
        threads=int(re.search(r"constexpr int kThreads = (\d+);", source).group(1)),
        loop_lines=loop_lines,
        flags={**{name: 1 << int(bit) for name, bit in re.findall(r"constexpr uint32_t (kFlag\w+) = 1u << (\d+);", source)},
               **{name: int(shift) for name, shift in re.findall(r"constexpr int (kFlag\w+Shift) = (\d+);", source)}},
        states=_enum_values(header, "StateKind"),
    )


def kernel_key(variant: Variant, facts: SourceFacts) -> Tuple[int, int, int, int, int]:
    """(param type, noise, stochastic, op, grad type) of the kernel the dispatcher picks for ``variant``."""
    param = facts.storage[variant.param_dtype]
    # float32 parameters never round; their state (general kernel) may.
    stochastic = int(variant.rounding == "stochastic" and (variant.param_dtype != "fp32" or variant.state is not None))
    if variant.is_general():
        return param, facts.noise[variant.noise], stochastic, facts.ops["kGeneral"], param
    op = {"perturb": "kPerturb", "zo_update": "kStepShift", "addax_update": "kGrad"}[variant.op]
    grad = facts.storage[variant.grad_dtype] if variant.grad_dtype else param
    return param, facts.noise[variant.noise], stochastic, facts.ops[op], grad


def general_defines(variant: Variant, facts: SourceFacts) -> Tuple[Tuple[str, int], ...]:
    """The preprocessor values that fix the general kernel's runtime flags to ``variant``'s
    configuration (run_group's flags for that job), or () for a specialized kernel's variant."""
    if not variant.is_general():
        return ()
    flags = facts.flags
    bits = flags["kFlagShift"] if variant.op != "addax_update" else 0
    if variant.op != "perturb":
        bits |= flags["kFlagUpdate"]
    if variant.grad_dtype:
        bits |= flags["kFlagGrad"] | facts.storage[variant.grad_dtype] << flags["kFlagGradTypeShift"]
    if variant.state:
        state = {"momentum": "kMomentum", "adam": "kAdam"}[variant.state]
        bits |= facts.states[state] << flags["kFlagStateShift"]
        if variant.state_dtype == "bf16":
            bits |= flags["kFlagStateBF16"]
    return (("ADDAX_SASS_PIN_FLAGS", bits), ("ADDAX_SASS_PIN_DIRECTIONS", variant.direction_count()),
            ("ADDAX_SASS_PIN_SPARSE", int(variant.sparse)))


_KERNEL_NAME = re.compile(r"StorageTypeE(\d+)ELNS_9NoiseKindE(\d+)ELb([01])EL\w+?OpE(\d+)EL\w+?_(\d+)EE")


# ----------------------------------------------------------------------------- disassembly


@dataclass
class Instruction:
    address: int
    text: str
    line: Optional[int]  # line in fused_cuda.cu, None for other files


def disassemble(cubin: str, cuda_home: Optional[str] = None) -> Dict[str, tuple]:
    """{mangled kernel name: (instructions, labels)} of every kernel in ``cubin``."""
    nvdisasm = _tool("nvdisasm", cuda_home or _cuda_home())
    result = subprocess.run([nvdisasm, "-g", "-c", cubin], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"nvdisasm failed: {result.stderr[-2000:]}")
    return parse_disassembly(result.stdout)


def parse_disassembly(listing: str) -> Dict[str, tuple]:
    """{kernel: (instructions, {label: index})} of an ``nvdisasm -g`` listing; each instruction
    carries its line in fused_cuda.cu (None for lines of other files)."""
    kernels: Dict[str, tuple] = {}
    name, instructions, labels, line = None, [], {}, None
    source_name = os.path.basename(SOURCE)
    for text in listing.splitlines():
        section = _SECTION.match(text)
        if section:
            if name:
                kernels[name] = (instructions, labels)
            name, instructions, labels, line = section.group(1), [], {}, None
            continue
        location = _LINE.search(text)
        if location:
            line = int(location.group(2)) if os.path.basename(location.group(1)) == source_name else None
            continue
        label = _LABEL.match(text)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        instruction = _INSTRUCTION.match(text)
        if instruction and name:
            instructions.append(Instruction(int(instruction.group(1), 16), instruction.group(2), line))
    if name:
        kernels[name] = (instructions, labels)
    return kernels


def _loops(instructions: Sequence[Instruction], labels: Dict[str, int]) -> List[Tuple[int, int]]:
    """(head index, back-edge index) of every backward branch."""
    loops = []
    for index, instruction in enumerate(instructions):
        branch = _BRANCH.search(instruction.text)
        if branch and branch.group(1) in labels and labels[branch.group(1)] <= index:
            loops.append((labels[branch.group(1)], index))
    return loops


def _is_counted(instruction: Instruction) -> bool:
    return not instruction.text.startswith("NOP")


def _cold_ranges(instructions: Sequence[Instruction], labels: Dict[str, int], head: int, tail: int):
    """Index ranges inside [head, tail] that a forward branch skips and that call a function:
    the rare special-value paths of the stochastic roundings."""
    ranges = []
    for index in range(head, tail + 1):
        branch = _BRANCH.search(instructions[index].text)
        if not branch or branch.group(1) not in labels:
            continue
        target = labels[branch.group(1)]
        if index < target <= tail + 1 and any("CALL" in i.text for i in instructions[index + 1:target]):
            ranges.append((index + 1, target))
    return ranges


def _count(instructions, labels, head: int, tail: int, exclude=(), skip_cold: bool = False) -> int:
    """Instructions in [head, tail] outside the ``exclude`` ranges (and, for a steady-state loop,
    outside its cold special-value ranges), NOPs not counted."""
    skipped = set()
    cold = _cold_ranges(instructions, labels, head, tail) if skip_cold else []
    for first, stop in list(cold) + list(exclude):
        skipped.update(range(first, stop))
    return sum(1 for index in range(head, tail + 1) if index not in skipped and _is_counted(instructions[index]))


def _successors(instructions: Sequence[Instruction], labels: Dict[str, int], index: int) -> List[int]:
    text = instructions[index].text
    predicated = text.startswith("@")
    opcode = opcode_of(text)
    following = [] if (opcode in ("EXIT", "BRA", "RET") or opcode.startswith("RET")) and not predicated else [index + 1]
    branch = _BRANCH.search(text)
    if branch and branch.group(1) in labels:
        following.append(labels[branch.group(1)])
    return [successor for successor in following if successor < len(instructions)]


def _shortest_path(instructions, labels, start: int, goal: int, avoid=()) -> int:
    """Fewest counted instructions executed from ``start`` up to (not including) ``goal`` on any
    control-flow path that stays out of the ``avoid`` ranges."""
    import heapq

    blocked = set()
    for first, stop in avoid:
        blocked.update(range(first, stop))
    best = {start: 0}
    queue = [(0, start)]
    while queue:
        cost, index = heapq.heappop(queue)
        if index == goal:
            return cost
        if cost > best.get(index, math.inf):
            continue
        step = cost + (1 if _is_counted(instructions[index]) else 0)
        for successor in _successors(instructions, labels, index):
            if successor in blocked and successor != goal:
                continue
            if step < best.get(successor, math.inf):
                best[successor] = step
                heapq.heappush(queue, (step, successor))
    raise ValueError(f"no control-flow path from instruction {start} to {goal}")


def _stores_a_unit(instructions, labels, start: int, goal: int, avoid) -> bool:
    """Whether every path from ``start`` to ``goal`` (outside ``avoid``) passes a 16-byte store:
    a peeled copy of the steady-state loop's first iteration."""
    blocked = set()
    for first, stop in avoid:
        blocked.update(range(first, stop))
    stores = {index for index in range(start, goal)
              if re.search(r"\bSTG\.E\.128\b", instructions[index].text)}
    seen, stack = set(), [start]
    while stack:  # can goal be reached without passing a store?
        index = stack.pop()
        if index == goal:
            return False
        if index in seen or index in stores:
            continue
        seen.add(index)
        stack.extend(successor for successor in _successors(instructions, labels, index)
                     if successor == goal or successor not in blocked)
    return bool(stores)


@dataclass
class KernelCounts:
    loop: int
    loop_kind: str
    chunk_overhead: int
    prologue: int
    masked: int
    access_bytes: int
    local_accesses: int  # LDL/STL in the kernel
    loop_local_accesses: int  # LDL/STL in the steady-state loop body (its cold paths excluded)


def count_kernel(instructions, labels, facts: SourceFacts) -> KernelCounts:
    """The counts of one kernel, per the rules in the module docstring."""
    loops = _loops(instructions, labels)
    by_kind: Dict[str, List[Tuple[int, int]]] = {}
    for head, tail in loops:
        kind = facts.loop_lines.get(instructions[tail].line)
        if kind:
            by_kind.setdefault(kind, []).append((head, tail))
    hot = [(kind, loop) for kind in ("gaussian", "rademacher", "general") for loop in by_kind.get(kind, [])]
    if not hot or "CHUNK" not in by_kind or "MASKED" not in by_kind:
        raise ValueError(f"marked loops not found in the disassembly (found {sorted(by_kind)})")
    kind, (head, tail) = min(hot, key=lambda item: _count(instructions, labels, *item[1], skip_cold=True))
    loop = _count(instructions, labels, head, tail, skip_cold=True)
    # The chunk loop around it (kernels hold one copy per key source: constant bank or registers).
    chunk_head, chunk_tail = next((h, t) for h, t in by_kind["CHUNK"] if h <= head and tail <= t)
    # Per chunk: into the steady-state loop, and from its exit back to the next chunk.
    inner = [(h, t + 1) for h, t in loops if chunk_head <= h and t < chunk_tail and (h, t) != (head, tail)]
    into_loop = _shortest_path(instructions, labels, chunk_head, head, avoid=inner)
    if _stores_a_unit(instructions, labels, chunk_head, head, inner):
        # ptxas peeled the first iteration in front of the loop: one body of that path is
        # steady-state work on a unit, already counted per element.
        into_loop = max(0, into_loop - loop)
    chunk_overhead = into_loop + _shortest_path(instructions, labels, tail + 1, chunk_tail, avoid=inner) + 1
    prologue = _shortest_path(instructions, labels, 0, chunk_head) if chunk_head else 0
    masked = min(_count(instructions, labels, h, t) for h, t in by_kind["MASKED"]
                 if chunk_head <= h and t <= chunk_tail)
    widths = [int(match.group(1)) // 8 for instruction in instructions[head:tail + 1]
              for match in [_ACCESS.search(instruction.text)] if match]
    cold = {index for first, stop in _cold_ranges(instructions, labels, head, tail) for index in range(first, stop)}
    local = [index for index, instruction in enumerate(instructions) if is_local_access(opcode_of(instruction.text))]
    in_loop = sum(1 for index in local if head <= index <= tail and index not in cold)
    return KernelCounts(loop, kind, chunk_overhead, prologue, masked, max(widths, default=4), len(local), in_loop)


def _ptxas_resources(log: str) -> Dict[str, Tuple[int, int]]:
    """{mangled kernel: (registers, spill store bytes)} from ``ptxas -v``."""
    resources, current, spills = {}, None, 0
    for line in log.splitlines():
        properties = re.search(r"Function properties for (\S+)", line)
        if properties:
            current, spills = properties.group(1), 0
            continue
        spill = re.search(r"(\d+) bytes spill stores", line)
        if spill and current:
            spills = int(spill.group(1))
        used = re.search(r"Used (\d+) registers", line)
        if used and current:
            resources[current] = (int(used.group(1)), spills)
            current = None
    return resources


def per_element(counts: KernelCounts, variant: Variant, registers: int, facts: SourceFacts) -> dict:
    """sass_per_element and its parts for ``variant`` (see the module docstring)."""
    unit = 16 // (4 if variant.param_dtype == "fp32" else 2)
    per_unit = counts.loop_kind in ("gaussian", "general")  # one 16-byte unit per thread and iteration
    elements_per_iteration = unit if per_unit else 4096 // 32
    granule = unit if per_unit else 4096
    tensor_elements = MODEL_ELEMENTS // MODEL_TENSORS
    chunks = MODEL_TENSORS * math.ceil(tensor_elements / facts.chunk)
    grid = H200_SMS * resident_blocks(registers, facts.threads)
    masked_thread_iterations = max(32, math.ceil(granule / 2 / 4 / 32) * 32)
    steady = counts.loop / elements_per_iteration
    chunk_part = counts.chunk_overhead * facts.threads * chunks / MODEL_ELEMENTS
    block_part = counts.prologue * facts.threads * grid / MODEL_ELEMENTS
    ragged_part = counts.masked * masked_thread_iterations * MODEL_TENSORS / MODEL_ELEMENTS
    return {
        "sass_per_element": steady + chunk_part + block_part + ragged_part,
        "loop_instructions": counts.loop,
        "loop_elements_per_thread": elements_per_iteration,
        "steady_state_per_element": round(steady, 2),
        "chunk_overhead_instructions": counts.chunk_overhead,
        "block_prologue_instructions": counts.prologue,
        "masked_loop_instructions": counts.masked,
        "amortized_per_element": round(chunk_part + block_part + ragged_part, 3),
    }


def _compiled_kernels(defines: Tuple[Tuple[str, int], ...]):
    """(kernels of the disassembly, ptxas resources) of one compile of fused_cuda.cu."""
    with tempfile.TemporaryDirectory(prefix="addax-sass-") as directory:
        cubin, log = compile_cubin(directory, defines)
        return disassemble(cubin), _ptxas_resources(log)


def native_rows(variants: Sequence[Variant] = REPORT_VARIANTS) -> Tuple[List[dict], List[str]]:
    """(one report row per variant for the native CUDA kernels, sm_90a, compiled here; no
    variant left uncounted: any that cannot be counted raises).  The specialized kernels come
    from one compile, each general-kernel configuration from its own compile with the kernel's
    runtime flags fixed (general_defines), side by side."""
    from concurrent.futures import ThreadPoolExecutor

    facts = source_facts()
    # The build's own compile too: the general rows also report its general kernel's resources.
    builds = sorted({general_defines(variant, facts) for variant in variants} | {()})
    with ThreadPoolExecutor(max_workers=max(1, min(len(builds), os.cpu_count() or 1))) as pool:
        compiled = dict(zip(builds, pool.map(_compiled_kernels, builds)))
    compiler = nvcc_version()
    rows = []
    for variant in variants:
        key = kernel_key(variant, facts)
        kernels, resources = compiled[general_defines(variant, facts)]
        name = _kernel_named(kernels, key, variant)
        instructions, labels = kernels[name]
        counts = count_kernel(instructions, labels, facts)
        registers, spill_store_bytes = resources.get(name, (0, 0))
        parts = per_element(counts, variant, registers, facts)
        if variant.is_general():
            parts.update(_built_general_kernel(*compiled[()], key, variant, facts))
        rows.append(make_row("native", variant, parts.pop("sass_per_element"), registers, counts.local_accesses,
                             counts.loop_local_accesses, counts.access_bytes, compiler,
                             spill_store_bytes=spill_store_bytes, **parts))
    return rows, []


def _kernel_named(kernels, key: Tuple[int, ...], variant: Variant) -> str:
    for name in kernels:
        match = _KERNEL_NAME.search(name)
        if match and tuple(int(value) for value in match.groups()) == key:
            return name
    raise ValueError(f"no kernel for {variant} (expected template arguments {key})")


def _built_general_kernel(kernels, resources, key: Tuple[int, ...], variant: Variant, facts: SourceFacts) -> dict:
    """What the built general kernel (runtime flags: every configuration's code in one loop)
    holds that the configuration's own compile does not show: its registers, spill stores and
    local loads/stores anywhere in its loop body (on any configuration's path: a forward branch
    over a call there may skip a whole configuration, so no range counts as cold)."""
    name = _kernel_named(kernels, key, variant)
    instructions, labels = kernels[name]
    registers, spill_store_bytes = resources.get(name, (0, 0))
    loop_locals = 0
    for head, tail in _loops(instructions, labels):
        if facts.loop_lines.get(instructions[tail].line) == "general":
            loop_locals = max(loop_locals, sum(1 for index in range(head, tail + 1)
                                               if is_local_access(opcode_of(instructions[index].text))))
    return {"built_registers": registers, "built_spill_store_bytes": spill_store_bytes,
            "built_loop_local_accesses": loop_locals}


if __name__ == "__main__":
    import json

    print(json.dumps(native_rows()[0], indent=1))

"""Host side of the Triton backend: alignment classes, metadata tables, and the launch.

``prepare`` turns a validated parameter set into launch classes (one per memory-access
mode), each with an int64 metadata table uploaded once; ``run`` then only packs seeds and
scalars into kernel arguments and launches, so a steady-state call is O(1) in Python apart
from reading the gradients' addresses (which change from call to call for ``addax_update_``:
their per-row deltas are cached by address, and the caching allocator repeats addresses).
No tensor is referenced after ``prepare`` returns: classes keep addresses and sizes only.
"""

from __future__ import annotations

import contextlib
import inspect
import operator
import struct
from collections import OrderedDict
from typing import Sequence, Tuple

import torch

from .. import STATE_NONE, FusedJob, TensorGroup
from . import kernels as K

_STORAGE_CODES = {torch.float32: K.STORAGE_FP32, torch.float16: K.STORAGE_FP16, torch.bfloat16: K.STORAGE_BF16}
_NOISE_CODES = {"gaussian": K.NOISE_GAUSSIAN, "rademacher": K.NOISE_RADEMACHER}
_ROUNDING_CODES = {"nearest": K.ROUNDING_NEAREST, "stochastic": K.ROUNDING_STOCHASTIC}
# Typed views for each storage: 16-bit values travel as int16 bit patterns.
_POINTER_DTYPES = {torch.float32: torch.float32, torch.float16: torch.int16, torch.bfloat16: torch.int16}

# Tile size of the compiled kernel.  8 warps give 16 elements per thread; passes that keep
# more live values per element (see num_warps) use 16 warps, 8 elements per thread.
BLOCK = 4096
NUM_WARPS = 8
HEAVY_NUM_WARPS = 16
# The interpreter runs small tiles and a few programs, so that small test tensors still span
# several tiles, edges and programs.
INTERPRETER_BLOCK = 512
INTERPRETER_PROGRAMS = 3
# Resident programs per SM assumed when a compiled kernel does not report its register count.
DEFAULT_PROGRAMS_PER_SM = 2
_REGISTERS_PER_SM = 65536
_MAX_THREADS_PER_SM = 2048
_GRAD_CACHE_ENTRIES = 8

_INT64_WRAP = 1 << 64
# Position of tiles_per_program among the kernel's arguments (set once the grid is sized).
_TILES_PER_PROGRAM_ARGUMENT = list(inspect.signature(K.fused_pass_kernel.fn).parameters).index("tiles_per_program")


class _Pointer:
    """A base address for a kernel pointer argument (Triton reads ``data_ptr()`` and ``dtype``)."""

    __slots__ = ("_address", "dtype")

    def __init__(self, address: int, dtype: torch.dtype):
        self._address = address
        self.dtype = dtype

    def data_ptr(self) -> int:
        return self._address


def _float32_bits(value: float) -> int:
    return struct.unpack("<i", struct.pack("<f", value))[0]


def _signed_int32(value: int) -> int:
    return value - (1 << 32) if value >= (1 << 31) else value


def _wrap_int64(value: int) -> int:
    """``value`` modulo 2**64 as a signed int64: the kernel's address sums wrap the same way."""
    value %= _INT64_WRAP
    return value - _INT64_WRAP if value >= (1 << 63) else value


def _check_not_capturing(device: torch.device, what: str) -> None:
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"the Triton backend would {what} during CUDA graph capture, which a replay would not "
            "repeat: run the same call once before capturing (tables and compiled kernels are then "
            "cached), pass seeds as int64 device tensors and scalars (lr, coefficients) as 0-dim "
            "device tensors, and keep gradients at addresses seen before capture"
        )


def _upload(values: Sequence, dtype: torch.dtype, device: torch.device, what: str) -> torch.Tensor:
    """A small host list on ``device`` without a host sync (pinned staging, async copy)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    _check_not_capturing(device, what)
    staged = torch.tensor(values, dtype=dtype, pin_memory=True)
    return staged.to(device, non_blocking=True)


def block_for_mode() -> int:
    return INTERPRETER_BLOCK if K.INTERPRETED else BLOCK


def tile_width(param_dtype, grad_dtype, state_dtype) -> int:
    """Elements per row of a tile: 8 (16-byte accesses of 16-bit storage) when any buffer is
    16-bit, else 4 (16-byte float32 accesses; one Gaussian Philox block per row)."""
    sixteen_bit = any(dtype in (torch.float16, torch.bfloat16) for dtype in (param_dtype, grad_dtype, state_dtype))
    return 8 if sixteen_bit else 4


def num_warps(structure: dict) -> int:
    """Warps per program for a kernel variant (its constexprs).

    Offline sm_90 compiles (addax_kernels/sass/triton_backend.py) put the passes below at 39-64
    registers with 16 elements per thread, but optimizer state, several directions, a third
    Philox stream (sparse mask plus stochastic rounding), float32 parameters in 8-wide rows,
    and fp16 stochastic rounding at 113-218 registers (one or two resident programs per SM,
    some spilling); with 8 elements per thread those take 39-120 registers without spills
    (only everything at once, Adam with several sparse directions, still spills).
    """
    stochastic_16bit = structure["ROUNDING"] == K.ROUNDING_STOCHASTIC and structure["PARAM_STORAGE"] != K.STORAGE_FP32
    heavy = (
        structure["STATE"] != STATE_NONE
        or structure["DIRECTIONS"] > 1
        or (structure["SPARSE"] and stochastic_16bit)
        or (structure["PARAM_STORAGE"] == K.STORAGE_FP32 and structure["WIDTH"] == 8)
        or (structure["PARAM_STORAGE"] == K.STORAGE_FP16 and stochastic_16bit)
    )
    return HEAVY_NUM_WARPS if heavy else NUM_WARPS


def _access_mode(address: int, offset: int, size: int) -> int:
    """The fastest access mode a buffer allows: tiles start at global multiples of BLOCK."""
    if address % size:
        return K.ACCESS_BYTES
    if (address - offset * size) % 16:
        return K.ACCESS_ELEMENT
    return K.ACCESS_VECTOR


def _base_address(first_address: int, access: int) -> int:
    """The class base: 16-byte aligned for VECTOR (compiled kernels learn it by specialization);
    the interpreter addresses everything from the first tensor itself."""
    if access == K.ACCESS_VECTOR and not K.INTERPRETED:
        return first_address - first_address % 16
    return first_address


def _delta(address: int, base: int, offset: int, size: int, access: int) -> int:
    """Row delta: element e (global) is at ``base + delta + e`` elements (bytes: ``+ e * size``)."""
    if access == K.ACCESS_BYTES:
        return _wrap_int64(address - base - offset * size)
    return _wrap_int64((address - base) // size - offset)


class _Class:
    """One launch: the tensors of a group that share an access mode, and their table."""

    __slots__ = ("members", "access", "table", "row_members", "member_offsets", "num_full_rows",
                 "search_steps", "num_full_tiles", "num_edges", "param_base", "state_bases")

    def __init__(self, members, access, rows, row_members, member_offsets, num_full_rows, num_full_tiles,
                 num_edges, param_base, state_bases, device):
        self.members = members  # positions in the op's lists, in group order
        self.access = access
        self.table = _upload(rows, torch.int64, device, "upload a new metadata table")
        self.row_members = row_members  # for each table row, the index into members (gradient deltas)
        self.member_offsets = member_offsets
        self.num_full_rows = num_full_rows
        self.search_steps = (num_full_rows - 1).bit_length() if num_full_rows > 1 else 0
        self.num_full_tiles = num_full_tiles
        self.num_edges = num_edges
        self.param_base = param_base
        self.state_bases = state_bases


class Prepared:
    """What ``run`` needs for one group: its classes, and caches of launches (per job structure)
    and of gradient deltas (per set of gradient addresses)."""

    __slots__ = ("device", "block", "width", "classes", "all_indices", "pick", "launches", "grad_cache",
                 "__weakref__")

    def __init__(self, device, block, width, classes, indices):
        self.device = device
        self.block = block
        self.width = width
        self.classes = classes
        self.all_indices = indices == tuple(range(len(indices)))
        self.pick = (lambda tensors: (tensors[indices[0]],)) if len(indices) == 1 else operator.itemgetter(*indices)
        self.launches = {}
        self.grad_cache: "OrderedDict[tuple, _GradClasses]" = OrderedDict()


def _tiles(begin: int, numel: int, block: int):
    """(first full global tile, number of full tiles, edge tile indices) of [begin, begin + numel)."""
    end = begin + numel
    first_full = -(-begin // block)
    full = max(0, end // block - first_full)
    edges = []
    for tile in sorted({begin // block, (end - 1) // block}):
        if not (full and first_full <= tile < first_full + full):
            edges.append(tile)
    return first_full, full, edges


def prepare(group: TensorGroup, params, states) -> Prepared:
    """Alignment classes of ``group`` and their tables, uploaded to the group's device.

    ``params`` and each list of ``states`` are the op's whole lists (the group's tensors are at
    ``group.indices``).  Raises only under CUDA graph capture (an upload cannot be captured).
    """
    device = group.device
    block = block_for_mode()
    width = tile_width(group.param_dtype, group.grad_dtype, group.state_dtype)
    param_size = torch.empty((), dtype=group.param_dtype).element_size()
    state_size = torch.empty((), dtype=group.state_dtype).element_size() if group.state_dtype is not None else 0
    state_lists = list(states)

    by_access = {}
    for position, index in enumerate(group.indices):
        offset = group.offsets[position]
        access = _access_mode(params[index].data_ptr(), offset, param_size)
        for buffers in state_lists:
            access = max(access, _access_mode(buffers[index].data_ptr(), offset, state_size))
        by_access.setdefault(access, []).append(position)

    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    classes = []
    with guard:
        for access in sorted(by_access):
            positions = by_access[access]
            members = tuple(group.indices[p] for p in positions)
            param_base = _base_address(params[members[0]].data_ptr(), access)
            state_bases = tuple(_base_address(buffers[members[0]].data_ptr(), access) for buffers in state_lists)
            full_rows, edge_rows, full_members, edge_members = [], [], [], []
            full_tiles = 0
            member_offsets = []
            for member, position in enumerate(positions):
                index = group.indices[position]
                offset, numel = group.offsets[position], group.numels[position]
                member_offsets.append(offset)
                row = [0] * K.TABLE_COLUMNS
                row[K.COL_PARAM_DELTA] = _delta(params[index].data_ptr(), param_base, offset, param_size, access)
                for column, buffers, base in zip((K.COL_STATE0_DELTA, K.COL_STATE1_DELTA), state_lists, state_bases):
                    row[column] = _delta(buffers[index].data_ptr(), base, offset, state_size, access)
                row[K.COL_TID] = group.tids[position]
                row[K.COL_DECAY_BITS] = _float32_bits(group.weight_decay[position])
                row[K.COL_LOW], row[K.COL_HIGH] = offset, offset + numel - 1
                first_full, full, edges = _tiles(offset, numel, block)
                if full:
                    row[K.COL_TILE], row[K.COL_FIRST] = first_full - full_tiles, full_tiles
                    full_rows.append(row)
                    full_members.append(member)
                    full_tiles += full
                for tile in edges:
                    edge_row = list(row)
                    edge_row[K.COL_TILE], edge_row[K.COL_FIRST] = tile, 0
                    edge_rows.append(edge_row)
                    edge_members.append(member)
            sentinel = [0] * K.TABLE_COLUMNS
            sentinel[K.COL_FIRST] = full_tiles
            rows = full_rows + [sentinel] + edge_rows
            classes.append(_Class(
                members, access, rows, full_members + [0] + edge_members, member_offsets, len(full_rows),
                full_tiles, len(edge_rows), param_base, state_bases, device,
            ))
    return Prepared(device, block, width, tuple(classes), tuple(group.indices))


# ----------------------------------------------------------------------------- run

_sm_counts = {}
_programs_per_sm = {}


def _multiprocessors(device: torch.device) -> int:
    count = _sm_counts.get(device.index)
    if count is None:
        count = torch.cuda.get_device_properties(device).multi_processor_count
        _sm_counts[device.index] = count
    return count


def resident_programs(n_regs: int, warps: int) -> int:
    """Programs of ``warps`` warps one SM holds at once with ``n_regs`` registers per thread."""
    registers_per_warp = -(-max(n_regs, 1) * 32 // 256) * 256  # allocated per warp in units of 256
    by_registers = _REGISTERS_PER_SM // (registers_per_warp * warps)
    return max(1, min(_MAX_THREADS_PER_SM // (32 * warps), by_registers))


def _view(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The interpreter's pointer argument: the tensor itself, flat, read as ``dtype``."""
    flat = tensor.reshape(-1)
    return flat if flat.dtype == dtype else flat.view(dtype)


class _GradClasses:
    """Per class: the gradients' delta table, access mode and base pointer, for one set of addresses."""

    __slots__ = ("tables", "accesses", "bases", "firsts")

    def __init__(self, prepared: "Prepared", group: TensorGroup, addresses: Tuple[int, ...], size: int):
        by_index = dict(zip(group.indices, addresses))
        self.tables, self.accesses, self.bases, self.firsts = [], [], [], []
        for launch_class in prepared.classes:
            members, offsets = launch_class.members, launch_class.member_offsets
            access = max(_access_mode(by_index[index], offset, size) for index, offset in zip(members, offsets))
            base = _base_address(by_index[members[0]], access)
            deltas = [_delta(by_index[members[m]], base, offsets[m], size, access) for m in launch_class.row_members]
            self.tables.append(_upload(deltas, torch.int64, prepared.device, "upload the gradients' addresses"))
            self.accesses.append(access)
            self.bases.append(base)
            self.firsts.append(members[0])
        self.accesses = tuple(self.accesses)


def _grad_classes(prepared: "Prepared", group: TensorGroup, grads: Sequence[torch.Tensor],
                  address_bytes) -> _GradClasses:
    """The gradients' per-class deltas, cached by their addresses (O(1) beyond reading them).

    ``address_bytes``: every gradient's data_ptr() as native uint64 bytes when the ops layer
    read them (``FusedJob.grad_addresses``), else None and each tensor is asked."""
    if address_bytes is not None:
        every = memoryview(address_bytes).cast("Q")
        addresses = tuple(every) if prepared.all_indices and len(every) == len(group.indices) else tuple(
            prepared.pick(every))
    elif prepared.all_indices and len(grads) == len(group.indices):
        addresses = tuple([grad.data_ptr() for grad in grads])
    else:
        addresses = tuple(map(torch.Tensor.data_ptr, prepared.pick(grads)))
    entry = prepared.grad_cache.get(addresses)
    if entry is not None:
        prepared.grad_cache.move_to_end(addresses)
        return entry
    entry = _GradClasses(prepared, group, addresses, grads[group.indices[0]].element_size())
    prepared.grad_cache[addresses] = entry
    if len(prepared.grad_cache) > _GRAD_CACHE_ENTRIES:
        prepared.grad_cache.popitem(last=False)
    return entry


class _Launch:
    """One class's launch for one job structure: constexprs, warps and grid."""

    __slots__ = ("launch_class", "constexprs", "warps", "grid", "tiles_per_program", "occupancy_key",
                 "param_pointer", "state_pointers", "sized")

    def __init__(self, prepared: "Prepared", group: TensorGroup, launch_class: _Class, structure: dict,
                 grad_access: int):
        self.launch_class = launch_class
        self.constexprs = dict(structure, ACCESS=launch_class.access, GRAD_ACCESS=grad_access)
        self.warps = num_warps(self.constexprs)
        device = prepared.device
        self.occupancy_key = (device.index, tuple(self.constexprs.values()))
        self.param_pointer = _Pointer(launch_class.param_base, _pointer_dtype(group.param_dtype, launch_class.access))
        self.state_pointers = tuple(_Pointer(base, _pointer_dtype(group.state_dtype, launch_class.access))
                                    for base in launch_class.state_bases)
        # A variant whose register count is known was compiled before: nothing left to size.
        self.sized = K.INTERPRETED or self.occupancy_key in _programs_per_sm
        self.set_geometry(prepared)

    def set_geometry(self, prepared: "Prepared") -> None:
        full_tiles = self.launch_class.num_full_tiles
        if K.INTERPRETED:
            programs = min(full_tiles, INTERPRETER_PROGRAMS)
        else:
            per_sm = _programs_per_sm.get(self.occupancy_key, DEFAULT_PROGRAMS_PER_SM)
            programs = min(full_tiles, _multiprocessors(prepared.device) * per_sm)
        # Contiguous runs of equal length: the longest run sets the time either way.
        self.tiles_per_program = -(-full_tiles // programs) if programs else 0
        programs = -(-full_tiles // self.tiles_per_program) if programs else 0
        self.grid = (self.launch_class.num_edges + programs,)


def _pointer_dtype(dtype: torch.dtype, access: int) -> torch.dtype:
    return torch.uint8 if access == K.ACCESS_BYTES else _POINTER_DTYPES[dtype]


def _launches(prepared: "Prepared", group: TensorGroup, job: FusedJob, grad_accesses) -> Tuple[_Launch, ...]:
    """The launches of ``job``'s structure (cached on ``prepared``: new values of seeds and
    scalars reuse them)."""
    key = (job.has_shift, min(job.num_directions, 2), job.has_grad, job.state, job.noise, job.rounding,
           job.sparsity_threshold > 0, job.seeds.on_device, job.scalars.on_device, grad_accesses)
    launches = prepared.launches.get(key)
    if launches is None:
        structure = dict(
            BLOCK=prepared.block,
            WIDTH=prepared.width,
            PARAM_STORAGE=_STORAGE_CODES[group.param_dtype],
            GRAD_STORAGE=_STORAGE_CODES[group.grad_dtype] if job.has_grad else K.STORAGE_FP32,
            STATE_STORAGE=_STORAGE_CODES[group.state_dtype] if group.state_dtype is not None else K.STORAGE_FP32,
            HAS_SHIFT=job.has_shift,
            DIRECTIONS=min(job.num_directions, 2),
            HAS_GRAD=job.has_grad,
            HAS_DECAY=group.has_decay,
            STATE=job.state,
            NOISE=_NOISE_CODES[job.noise],
            ROUNDING=_ROUNDING_CODES[job.rounding],
            SPARSE=job.sparsity_threshold > 0,
            SEEDS_ON_DEVICE=job.seeds.on_device,
            SCALARS_ON_DEVICE=job.scalars.on_device,
            FAST=prepared.device.type == "cuda" and torch.version.hip is None,
        )
        launches = tuple(
            _Launch(prepared, group, launch_class, structure,
                    grad_accesses[number] if grad_accesses is not None else K.ACCESS_VECTOR)
            for number, launch_class in enumerate(prepared.classes)
        )
        prepared.launches[key] = launches
    return launches


def _host_seed_arguments(job: FusedJob) -> Tuple[int, int, int, int]:
    seed, rounding_seed = job.seeds.values[0], job.seeds.values[-1]
    return (_signed_int32(seed & 0xFFFFFFFF), _signed_int32(seed >> 32),
            _signed_int32(rounding_seed & 0xFFFFFFFF), _signed_int32(rounding_seed >> 32))


def run(prepared: Prepared, group: TensorGroup, job: FusedJob, params, grads, states) -> None:
    run_groups([prepared], [group], job, params, grads, states)


def run_groups(prepared_groups: Sequence[Prepared], groups: Sequence[TensorGroup], job: FusedJob, params, grads,
               states) -> None:
    """Every group of one op call (one device): first each group's uploads and the compiles of
    new kernel variants, then the launches, so that a failure of either (a compile error, an
    upload refused during graph capture) leaves every tensor of the call unchanged."""
    device = prepared_groups[0].device
    guard = torch.cuda.device(device) if device.type == "cuda" and device.index != torch.cuda.current_device() \
        else contextlib.nullcontext()
    with guard:
        staged = [_stage(prepared, group, job, params, grads, states)
                  for prepared, group in zip(prepared_groups, groups)]
        for calls in staged:
            for launch, arguments in calls:
                if launch.grid[0]:
                    K.fused_pass_kernel[launch.grid](*arguments, num_warps=launch.warps, num_stages=1,
                                                     **launch.constexprs)


def _stage(prepared: Prepared, group: TensorGroup, job: FusedJob, params, grads, states) -> list:
    """``(launch, arguments)`` of each launch of ``group``, every new variant compiled and sized."""
    device = prepared.device
    directions = job.num_directions
    # Seeds and scalars: device tensors are read by the kernel; host values are arguments, and
    # only the seeds and coefficients of directions past the first need a (small) upload.
    if job.seeds.on_device:
        seeds_tensor, seed_arguments = job.seeds.tensor, (0, 0, 0, 0)
    else:
        seed_arguments = _host_seed_arguments(job)
        seeds_tensor = None
        if directions > 1:
            seeds_tensor = _upload([_wrap_int64(seed) for seed in job.seeds.values], torch.int64, device,
                                   "upload the seeds of several directions (pass them as a device tensor)")
    if job.scalars.on_device:
        scalars_tensor, scalar_arguments = job.scalars.tensor, (0.0,) * 9
    else:
        values = job.scalars.values
        scalar_arguments = values[:9] if len(values) >= 9 else tuple(values) + (0.0,) * (9 - len(values))
        scalars_tensor = None
        if directions > 1:
            scalars_tensor = _upload(values, torch.float32, device,
                                     "upload the coefficients of several directions (pass 0-dim device tensors)")
    grad_classes = _grad_classes(prepared, group, grads, job.grad_addresses) if job.has_grad else None
    launches = _launches(prepared, group, job, grad_classes.accesses if grad_classes is not None else None)
    calls = []
    for number, launch in enumerate(launches):
        launch_class = launch.launch_class
        if K.INTERPRETED:
            # The interpreter reads tensors, not addresses: the class's first tensors, viewed.
            first = launch_class.members[0]
            param_base = _view(params[first], launch.param_pointer.dtype)
            state_pointers = [_view(buffers[first], pointer.dtype)
                              for pointer, buffers in zip(launch.state_pointers, states)]
        else:
            param_base, state_pointers = launch.param_pointer, list(launch.state_pointers)
        state_pointers += [param_base] * (2 - len(state_pointers))
        if grad_classes is not None:
            grad_table = grad_classes.tables[number]
            access = grad_classes.accesses[number]
            if K.INTERPRETED:
                grad_base = _view(grads[grad_classes.firsts[number]], _pointer_dtype(group.grad_dtype, access))
            else:
                grad_base = _Pointer(grad_classes.bases[number], _pointer_dtype(group.grad_dtype, access))
        else:
            grad_table, grad_base = launch_class.table, param_base
        calls.append((launch, [
            launch_class.table, grad_table, param_base, grad_base, state_pointers[0], state_pointers[1],
            seeds_tensor if seeds_tensor is not None else launch_class.table,
            scalars_tensor if scalars_tensor is not None else launch_class.table,
            launch_class.num_full_rows, launch_class.search_steps, launch_class.num_full_tiles,
            launch.tiles_per_program, launch_class.num_edges, *seed_arguments, job.sparsity_threshold,
            directions, *scalar_arguments,
        ]))
    for launch, arguments in calls:
        if not launch.sized:
            _size(prepared, launch, arguments)
    return calls


def _size(prepared: Prepared, launch: _Launch, arguments: list) -> None:
    """Compile a new variant before anything of the call is launched (a compile error then
    modifies nothing), and size its persistent grid from its register count."""
    compiled = K.fused_pass_kernel.warmup(*arguments, grid=launch.grid, num_warps=launch.warps, num_stages=1,
                                          **launch.constexprs)
    compiled.run  # loads the binary (raising here, before any launch, if it cannot run) and sets n_regs
    n_regs = getattr(compiled, "n_regs", None)
    if n_regs:
        _programs_per_sm[launch.occupancy_key] = resident_programs(n_regs, launch.warps)
    launch.set_geometry(prepared)
    launch.sized = True
    arguments[_TILES_PER_PROGRAM_ARGUMENT] = launch.tiles_per_program

"""Validated parameter sets ("plans") and the cache that makes the ops O(1) in Python per call.

What the tensor checks of SPEC §2 depend on is fixed for a parameter list across calls: each
tensor's address, size, shape, dtype, device, contiguity and inference flag, plus the
per-tensor arguments (tids, offsets, weight decays).  A :class:`Plan` is the result of checking
them once: the device, the per-tensor values, the dtype groups and each backend's
``prepare()`` result.  Per call the ops fingerprint the tensors in C++
(``addax_kernels._host.fingerprint``: those facts as raw bytes plus a hash), look the plan up,
and compare the per-tensor arguments against the plan's at C speed; every mismatch rebuilds
the plan through the full Python checks, so what is accepted never depends on the cache.

A plan holds no tensors (addresses and sizes only), so caching it never keeps a model alive;
the cache is bounded (least recently used plans are dropped).

Without the extension (not built) every call runs the Python checks: the same checks and
results, milliseconds of host time per call on hundreds of tensors; :func:`host_info` says why,
and the first call warns once per process.
"""

from __future__ import annotations

import bisect
import collections
import struct
import threading
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..backends import STATE_DTYPES, TensorGroup
from . import _checks
from ._checks import SUPPORTED_DTYPES

try:
    from .. import _host
except ImportError as _error:  # not built: ADDAX_KERNELS_NO_NATIVE=1, a failed build, no compiler
    _host = None
    _HOST_IMPORT_ERROR: Optional[BaseException] = _error
else:
    _HOST_IMPORT_ERROR = None

HOST_BUILD_HINT = ("to build it, reinstall from the source checkout or sdist with a C++ compiler present and torch "
                   "importable at build time: `ADDAX_KERNELS_REQUIRE_NATIVE=1 pip install --no-build-isolation "
                   "--no-deps --force-reinstall <checkout or sdist>` (docs/native.md)")
CACHE_SIZE = 128


def host_info() -> Dict[str, object]:
    """Whether the host extension ``addax_kernels._host`` is built, and if not why and how to."""
    if _host is None:
        return {"built": False, "reason": f"{type(_HOST_IMPORT_ERROR).__name__}: {_HOST_IMPORT_ERROR}",
                "effect": "every op call checks its tensors in Python: milliseconds per call on hundreds of "
                          "tensors instead of tens of microseconds",
                "fix": HOST_BUILD_HINT}
    return {"built": True}


_HOST_WARNED = []


def _warn_no_host() -> None:
    if _HOST_WARNED:
        return
    _HOST_WARNED.append(True)
    warnings.warn(
        f"addax_kernels: the host extension addax_kernels._host is not available ({_HOST_IMPORT_ERROR}), so every "
        "op call checks its tensors in Python (milliseconds per call on hundreds of tensors instead of tens of "
        f"microseconds); {HOST_BUILD_HINT}.",
        RuntimeWarning,
        stacklevel=4,
    )


# ----------------------------------------------------------------------------- tensor checks


def as_tensor_list(tensors, name: str) -> List[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    if type(tensors) is list:
        result = tensors
    elif isinstance(tensors, (str, bytes)) or not hasattr(tensors, "__iter__"):
        raise TypeError(f"{name} must be a Tensor or a sequence of Tensors, got {type(tensors).__name__}")
    else:
        result = list(tensors)
    for index, tensor in enumerate(result):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}[{index}] must be a Tensor, got {type(tensor).__name__}")
    return result


def describe(tensor: torch.Tensor, name: str, index: int) -> str:
    return f"{name}[{index}] (shape {tuple(tensor.shape)}, {tensor.dtype}, {tensor.device})"


def _dtype_names(dtypes) -> str:
    return ", ".join(str(dtype).replace("torch.", "") for dtype in dtypes)


def _check_storage(tensor: torch.Tensor, name: str, index: int, dtypes) -> None:
    if tensor.dtype not in dtypes:
        raise TypeError(f"{describe(tensor, name, index)}: dtype must be one of {_dtype_names(dtypes)}")
    if tensor.is_meta or type(tensor).__name__ == "FakeTensor":
        raise ValueError(f"{describe(tensor, name, index)}: a meta (or fake) tensor has no data to update or read")
    if tensor.layout != torch.strided:
        raise ValueError(f"{describe(tensor, name, index)}: must be a dense (strided) tensor, got {tensor.layout}")
    if not tensor.is_contiguous():
        raise ValueError(f"{describe(tensor, name, index)}: must be contiguous (call .contiguous() and copy back)")
    spanned = tensor.nbytes
    if spanned:
        first = tensor.storage_offset()
        if first:
            spanned += first * tensor.element_size()
        if tensor.untyped_storage().nbytes() < spanned:
            raise ValueError(f"{describe(tensor, name, index)}: its storage holds fewer bytes than the tensor spans "
                             "(freed or resized under it)")
        if tensor.data_ptr() == 0:
            raise ValueError(f"{describe(tensor, name, index)}: a {type(tensor).__name__} has no memory of its own "
                             "(a wrapper tensor subclass, as DTensor is); pass its local tensor and element offset "
                             "(addax_kernels.sharding.local_shard gives both for a DTensor)")


def check_params(params: List[torch.Tensor]) -> torch.device:
    if not params:
        raise ValueError("params is empty")
    device = params[0].device
    for index, param in enumerate(params):
        _check_storage(param, "params", index, SUPPORTED_DTYPES)
        if param.device != device:
            raise ValueError(f"{describe(param, 'params', index)}: all tensors of one call must be on one "
                             f"device, params[0] is on {device}")
    return device


def check_companions(tensors, params: List[torch.Tensor], name: str, dtypes) -> List[torch.Tensor]:
    """Gradients or state buffers: one per param, same shape and device, contiguous."""
    tensors = as_tensor_list(tensors, name)
    if len(tensors) != len(params):
        raise ValueError(f"{name} has {len(tensors)} tensors for {len(params)} params")
    for index, (tensor, param) in enumerate(zip(tensors, params)):
        _check_storage(tensor, name, index, dtypes)
        if tensor.shape != param.shape:
            raise ValueError(f"{describe(tensor, name, index)}: shape differs from params[{index}] "
                             f"{tuple(param.shape)}")
        if tensor.device != param.device:
            raise ValueError(f"{describe(tensor, name, index)}: must be on the params' device {param.device}")
    return tensors


def check_inference(tensors: List[torch.Tensor], name: str) -> Optional[str]:
    """The message for the first inference tensor of a written list, None if there is none."""
    for index, tensor in enumerate(tensors):
        if tensor.is_inference():
            return (f"{describe(tensor, name, index)} is an inference tensor: it can be updated in place only "
                    "inside torch.inference_mode() (as for torch's own in-place ops); clone it outside "
                    "inference mode to train it")
    return None


def memory_spans(tensors: List[torch.Tensor], name: str) -> List[Tuple[int, int, str, int]]:
    """``(first byte, end byte, list name, index)`` of the non-empty tensors."""
    spans = []
    for index, tensor in enumerate(tensors):
        numel = tensor.numel()
        if numel:
            start = tensor.data_ptr()
            spans.append((start, start + numel * tensor.element_size(), name, index))
    return spans


def check_written_disjoint(written: Dict[str, List[torch.Tensor]]) -> List[Tuple[int, int, str, int]]:
    """Each written element is written once: the written tensors' memory is disjoint.
    Returns their spans sorted by start."""
    spans = sorted(span for name, tensors in written.items() for span in memory_spans(tensors, name))
    for (_, end_a, name_a, index_a), (start_b, _, name_b, index_b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise ValueError(f"{name_a}[{index_a}] and {name_b}[{index_b}] overlap in memory: each element "
                             "must be updated once")
    return spans


def check_reads_disjoint(written_spans, tensors: List[torch.Tensor], name: str) -> None:
    """Nothing read is written meanwhile: the kernels update in place while reading ``tensors``."""
    # Written spans are disjoint, so sorted by start their ends are sorted too: only the last
    # written span starting before a read span's end can overlap it.
    starts = [start for start, _, _, _ in written_spans]
    for start, end, _, index in memory_spans(tensors, name):
        candidate = bisect.bisect_left(starts, end) - 1
        if candidate >= 0 and written_spans[candidate][1] > start:
            _, _, other_name, other_index = written_spans[candidate]
            raise ValueError(f"{name}[{index}] overlaps {other_name}[{other_index}] in memory")


def check_grads(grads, params: List[torch.Tensor], written_spans=None) -> List[torch.Tensor]:
    """``grads`` against ``params``: one float32/float16/bfloat16 gradient per param, same shape
    and device, contiguous, sharing no memory with the params (or with ``written_spans``, the
    sorted spans of every tensor the call writes).  Returns the grads as a list."""
    grads = check_companions(grads, params, "grads", SUPPORTED_DTYPES)
    if written_spans is None:
        written_spans = check_written_disjoint({"params": params})
    check_reads_disjoint(written_spans, grads, "grads")
    return grads


# ----------------------------------------------------------------------------- plans


class Plan:
    """A validated parameter set (see the module docstring).  Holds no tensors."""

    __slots__ = ("raw", "state_names", "tids_in", "offsets_in", "decay_in", "mask_in", "device", "count",
                 "numels", "tids", "offsets", "decays", "written_spans", "spans_bytes", "inference_error",
                 "param_dtypes", "state_dtypes", "groups", "prepared")

    def matches(self, state_names, tids, offsets, weight_decay, decay_mask) -> bool:
        return (state_names == self.state_names and _same_argument(tids, self.tids_in)
                and _same_argument(offsets, self.offsets_in) and _same_argument(weight_decay, self.decay_in)
                and _same_argument(decay_mask, self.mask_in))

    def groups_for(self, grad_key, grad_dtypes) -> List[TensorGroup]:
        """The launch groups for gradients of ``grad_dtypes`` (None: no gradients), cached by ``grad_key``."""
        groups = self.groups.get(grad_key)
        if groups is None:
            groups = _build_groups(self, grad_dtypes() if grad_dtypes is not None else None)
            self.groups[grad_key] = groups
        return groups

    def prepared_for(self, backend: str, module, grad_key, groups: List[TensorGroup], params, states) -> list:
        key = (backend, grad_key)
        prepared = self.prepared.get(key)
        if prepared is None:
            prepared = [module.prepare(group, params, states) for group in groups]
            self.prepared[key] = prepared
        return prepared


_UNMATCHABLE = object()


def _argument_key(value):
    """What a plan keeps of a per-tensor argument to recognise it later: None, the scalar
    itself (int/float), or a tuple of its items when every item is an exact int, float or bool;
    anything else (numpy values, tensors) is never recognised and re-checked each call."""
    if value is None or type(value) in (int, float):
        return value
    if type(value) in (list, tuple) and all(type(item) in (int, float, bool) for item in value):
        return tuple(value)
    return _UNMATCHABLE


def _same_argument(given, cached) -> bool:
    if given is None or cached is None:
        return given is cached
    if type(cached) is tuple:
        return _host.same_values(given, cached)
    return type(given) is type(cached) and given == cached


def _build_groups(plan: Plan, grad_dtypes) -> List[TensorGroup]:
    """Tensors grouped by (param dtype, grad dtype, state dtype); empty tensors left out here, once."""
    members: Dict[tuple, List[int]] = {}
    for index in range(plan.count):
        if plan.numels[index]:
            key = (plan.param_dtypes[index], grad_dtypes[index] if grad_dtypes is not None else None,
                   plan.state_dtypes[index] if plan.state_dtypes is not None else None)
            members.setdefault(key, []).append(index)
    return [
        TensorGroup(
            indices=tuple(indices),
            device=plan.device,
            param_dtype=param_dtype,
            grad_dtype=grad_dtype,
            state_dtype=state_dtype,
            numels=tuple(plan.numels[i] for i in indices),
            tids=tuple(plan.tids[i] for i in indices),
            offsets=tuple(plan.offsets[i] for i in indices),
            weight_decay=tuple(plan.decays[i] for i in indices),
        )
        for (param_dtype, grad_dtype, state_dtype), indices in members.items()
    ]


def build_plan(params: List[torch.Tensor], states: Sequence[List[torch.Tensor]], state_names: Sequence[str],
               tids, offsets, weight_decay, decay_mask, raw: Optional[bytes]) -> Plan:
    """Every check of SPEC §2 on the tensors and per-tensor arguments, in Python."""
    params = as_tensor_list(params, "params")
    device = check_params(params)
    count = len(params)
    states = [check_companions(buffers, params, name, STATE_DTYPES) for buffers, name in zip(states, state_names)]
    for name, buffers in zip(state_names[1:], states[1:]):
        for index, (buffer, first) in enumerate(zip(buffers, states[0])):
            if buffer.dtype != first.dtype:
                raise TypeError(f"{name}[{index}] is {buffer.dtype} but {state_names[0]}[{index}] is {first.dtype}: "
                                "the state buffers of one tensor share a dtype")
    numels = tuple(param.numel() for param in params)
    plan = Plan()
    plan.tids = _checks.check_tids(tids, count)
    plan.offsets = _checks.check_offsets(offsets, numels)
    plan.decays = _checks.check_weight_decay(weight_decay, decay_mask, count)
    written = {"params": params, **dict(zip(state_names, states))}
    plan.written_spans = check_written_disjoint(written)
    plan.inference_error = None
    for name, tensors in written.items():
        plan.inference_error = plan.inference_error or check_inference(tensors, name)
    plan.raw = raw
    plan.state_names = tuple(state_names)
    plan.tids_in, plan.offsets_in = _argument_key(tids), _argument_key(offsets)
    plan.decay_in, plan.mask_in = _argument_key(weight_decay), _argument_key(decay_mask)
    plan.device = device
    plan.count = count
    plan.numels = numels
    plan.param_dtypes = tuple(param.dtype for param in params)
    plan.state_dtypes = tuple(buffer.dtype for buffer in states[0]) if states else None
    # The written spans as the C++ gradient check reads them: (start, end) uint64 pairs.
    plan.spans_bytes = (b"".join(struct.pack("=QQ", start, end) for start, end, _, _ in plan.written_spans)
                        if raw is not None else b"")
    plan.groups = {}
    plan.prepared = {}
    return plan


class _PlanCache:
    """Plans by fingerprint hash, least recently used dropped beyond ``CACHE_SIZE``."""

    def __init__(self, size: int):
        self.size = size
        self.entries: "collections.OrderedDict[int, List[Plan]]" = collections.OrderedDict()
        self.lock = threading.Lock()

    def find(self, key: int, raw: bytes, state_names, tids, offsets, weight_decay, decay_mask) -> Optional[Plan]:
        plans = self.entries.get(key)
        if plans is not None:
            for plan in plans:
                if plan.raw == raw and plan.matches(state_names, tids, offsets, weight_decay, decay_mask):
                    with self.lock:
                        if key in self.entries:
                            self.entries.move_to_end(key)
                    return plan
        return None

    def add(self, key: int, plan: Plan) -> None:
        with self.lock:
            plans = self.entries.pop(key, [])
            plans = [old for old in plans if old.raw == plan.raw][-3:] + [plan]  # a few argument variants
            self.entries[key] = plans
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()


CACHE = _PlanCache(CACHE_SIZE)

# Plans used while a CUDA graph was being captured: the graph's kernels read their device tables
# (and the native groups' device memory) at every replay, so these plans stay for the process's
# lifetime, whatever the cache evicts.
_CAPTURED: Dict[int, Plan] = {}


def keep_if_captured(plan: Plan) -> None:
    """Keep ``plan`` (and the tables its backends prepared) alive if this call is being captured."""
    if plan.device.type == "cuda" and id(plan) not in _CAPTURED and torch.cuda.is_current_stream_capturing():
        _CAPTURED[id(plan)] = plan


def plan_for(params: List[torch.Tensor], states: Sequence[List[torch.Tensor]], state_names: Sequence[str],
             tids, offsets, weight_decay, decay_mask) -> Plan:
    """The plan of this call's tensors and per-tensor arguments: cached, or built (and checked)."""
    if _host is None:
        _warn_no_host()
        return build_plan(params, states, state_names, tids, offsets, weight_decay, decay_mask, None)
    fingerprint = _host.fingerprint(params, *states)
    if fingerprint is None:  # a tensor subclass, a meta tensor, ...: checked in Python every call
        return build_plan(params, states, state_names, tids, offsets, weight_decay, decay_mask, None)
    key, raw = fingerprint
    plan = CACHE.find(key, raw, tuple(state_names), tids, offsets, weight_decay, decay_mask)
    if plan is None:
        plan = build_plan(params, states, state_names, tids, offsets, weight_decay, decay_mask, raw)
        CACHE.add(key, plan)
    return plan


def grads_for(plan: Plan, grads, params: List[torch.Tensor]):
    """``(grads as a list, group key, dtype getter, addresses)`` after checking them against the
    plan; ``addresses`` is each grad's data_ptr() as native uint64 bytes when the host extension
    checked them (``FusedJob.grad_addresses``), else None."""
    if _host is not None and type(grads) in (list, tuple):
        checked = _host.check_grads(grads, params, plan.spans_bytes)
        if checked is not None:
            codes, addresses = checked
            return grads, codes, lambda: tuple(grad.dtype for grad in grads), addresses
    grads = check_companions(grads, params, "grads", SUPPORTED_DTYPES)
    check_reads_disjoint(plan.written_spans, grads, "grads")
    dtypes = tuple(grad.dtype for grad in grads)
    return grads, dtypes, lambda: dtypes, None


def bump_versions(plan: Plan, params, states) -> None:
    """Tell autograd the written tensors changed in place (inference tensors have no counter)."""
    if _host is not None and type(params) in (list, tuple):
        _host.bump_versions(params, *states)
        return
    tensors = list(params) + [tensor for buffers in states for tensor in buffers]
    if plan.inference_error is not None:
        tensors = [tensor for tensor in tensors if not tensor.is_inference()]
    if tensors:
        torch.autograd.graph.increment_version(tensors)

"""What the zeroth-order optimizers share: hyperparameter checks, the parameter layout and the
op-call plan, the seed stream, the ZO estimate, optimizer state, capturable steps.

A step is a fixed sequence of fused passes over the parameters (SPEC §3).  Everything a pass
needs that depends only on the parameter set (local shards, stream ids, offsets) is built once
into a :class:`_Layout`; what depends on the groups' hyperparameters (which groups share an op
call, per-tensor weight decay, state buffer lists) into a :class:`_Plan`, rebuilt only when
those values change.  A step then costs a few op calls per pass, whatever the number of
parameters.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .._numbers import is_integer, is_real_number
from .. import ops
from .. import rng
from ..sharding import is_dtensor, local_shard
from .rounding import check_rounding, pass_roundings
from .seeds import ROUNDING_STREAM, as_int64, derive_seed, derive_seeds_on_device, step_key, stream_seed

STATE_DTYPES = (torch.float32, torch.bfloat16)
STATE_KEY = "zo_state"

_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


class NonFiniteLossError(ValueError):
    """A closure returned NaN or ±inf (or the estimate overflowed): the step was undone."""


# ----------------------------------------------------------------------------- checks


def _real(value, name: str) -> float:
    if not is_real_number(value):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def check_nonnegative(value, name: str) -> float:
    """A float that is finite, >= 0 and representable in float32 (the kernels' precision)."""
    value = _real(value, name)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    if value > _FLOAT32_MAX:
        raise ValueError(f"{name}={value} overflows float32")
    return value


def check_positive(value, name: str) -> float:
    """As :func:`check_nonnegative`, and nonzero in float32 (no underflow to 0)."""
    value = check_nonnegative(value, name)
    if np.float32(value) == 0.0:
        raise ValueError(f"{name} must be > 0 in float32, got {value}")
    return value


def check_unit_interval(value, name: str, open_right: bool = False) -> float:
    value = check_nonnegative(value, name)
    if value > 1 or (open_right and value == 1):
        raise ValueError(f"{name} must be in [0, 1{')' if open_right else ']'}, got {value}")
    return value


def check_lr(value, name: str) -> None:
    """lr: a float (finite, >= 0, within float32) or a 0-dim floating tensor.

    A CPU tensor is read and checked like a float; an accelerator tensor is not read (that
    would cost a host sync every step).
    """
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or not value.dtype.is_floating_point:
            raise ValueError(f"{name} must be a float or a 0-dim floating tensor, got a {value.dtype} tensor "
                             f"of shape {tuple(value.shape)}")
        if value.device.type == "cpu":
            check_nonnegative(float(value), name)
        return
    check_nonnegative(value, name)


def check_betas(value, name: str) -> Tuple[float, float]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise TypeError(f"{name} must be a pair of floats, got {value!r}")
    return (check_unit_interval(value[0], f"{name}[0]", open_right=True),
            check_unit_interval(value[1], f"{name}[1]", open_right=True))


def check_int(value, name: str, minimum: int) -> int:
    if not is_integer(value) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_options(noise: str, rounding: str, backend: str, grad_reduce) -> None:
    if noise not in rng.NOISE_KINDS:
        raise ValueError(f"noise must be one of {rng.NOISE_KINDS}, got {noise!r}")
    check_rounding(rounding)
    if backend not in ops.BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {ops.BACKEND_CHOICES}, got {backend!r}")
    if grad_reduce is not None and not callable(grad_reduce):
        raise TypeError(f"grad_reduce must be None or a callable, got {type(grad_reduce).__name__}")


def check_param(param, where: str) -> None:
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"{where} must be a Tensor, got {type(param).__name__}")
    if param.dtype not in ops.SUPPORTED_DTYPES:
        raise TypeError(f"{where} ({tuple(param.shape)}, {param.dtype}): dtype must be float32, float16 or bfloat16")
    if param.is_sparse:
        raise TypeError(f"{where}: sparse parameters are not supported")
    if not is_dtensor(param) and not param.is_contiguous():
        raise ValueError(f"{where} ({tuple(param.shape)}): must be contiguous; the kernels update flat storage")


def local_view(tensor: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """(the tensor the kernels update, the global flat index of its first element)."""
    if is_dtensor(tensor):
        return local_shard(tensor)
    return tensor, 0


def local_grad(grad: torch.Tensor) -> torch.Tensor:
    if is_dtensor(grad):
        grad = grad.to_local()
    if grad.is_sparse:
        raise TypeError("sparse gradients are not supported")
    return grad.contiguous()


def loss_scalar(loss, device: torch.device, name: str) -> torch.Tensor:
    """A closure's loss as a detached 0-dim float32 tensor on ``device``, without a host sync."""
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(f"{name} must return a scalar loss, got a tensor of shape {tuple(loss.shape)}")
        if not loss.dtype.is_floating_point:
            raise TypeError(f"{name} must return a floating loss, got {loss.dtype}")
        return loss.detach().reshape(()).to(device=device, dtype=torch.float32, non_blocking=True)
    if is_real_number(loss):
        return torch.tensor(float(loss), dtype=torch.float32, device=device)
    raise TypeError(f"{name} must return a 0-dim tensor or a number, got {type(loss).__name__}")


# ----------------------------------------------------------------------------- layout and plan


@dataclass
class _Layout:
    """The parameter set, flattened in group order (the position is the tensor's stream id)."""

    params: List[torch.Tensor]
    tensors: List[torch.Tensor]  # what the kernels update (a DTensor's local shard)
    offsets: List[int]
    group_of: List[int]
    slot_of: Dict[int, int]  # id(param) -> position
    dtensor_slots: List[int]
    low_precision: bool  # some parameter is stored in float16 or bfloat16

    @classmethod
    def build(cls, param_groups: Sequence[dict]) -> "_Layout":
        params, tensors, offsets, group_of = [], [], [], []
        for group_index, group in enumerate(param_groups):
            for param in group["params"]:
                tensor, offset = local_view(param)
                params.append(param)
                tensors.append(tensor)
                offsets.append(offset)
                group_of.append(group_index)
        frozen = sum(not p.requires_grad for p in params)
        if 0 < frozen < len(params):
            warnings.warn(
                f"{frozen} of the optimizer's {len(params)} parameters do not require grad. A ZO optimizer "
                "perturbs and updates every parameter it is given (it needs no gradient); if these are "
                "frozen (a PEFT base model, say), pass only the trainable ones: "
                "[p for p in model.parameters() if p.requires_grad]", stacklevel=6)
        return cls(params, tensors, offsets, group_of, {id(p): i for i, p in enumerate(params)},
                   [i for i, p in enumerate(params) if is_dtensor(p)],
                   any(tensor.dtype != torch.float32 for tensor in tensors))

    def refresh_shards(self) -> None:
        for slot in self.dtensor_slots:
            self.tensors[slot], self.offsets[slot] = local_view(self.params[slot])


@dataclass
class _Call:
    """One op call of a pass: tensors of one device whose groups agree on the pass's scalars."""

    device: torch.device
    groups: Tuple[int, ...]  # param group indices; groups[0] supplies lr and the other scalars
    slots: Tuple[int, ...]  # layout positions
    tensors: List[torch.Tensor]
    eps: float
    kwargs: dict  # tids, offsets, noise, sparsity, backend
    weight_decay: Tuple[float, ...] = ()
    states: List[List[torch.Tensor]] = field(default_factory=list)  # per state key, aligned with tensors


@dataclass
class _Plan:
    """The op calls of a step: perturbation passes (grouped by device and ε) and update
    passes (grouped by device and every scalar of the update)."""

    key: Any
    perturb_calls: List[_Call]
    update_calls: List[_Call]
    call_of_slot: Dict[int, Tuple[int, int]]  # layout position -> (update call index, index in call)
    device: torch.device


class _StepSeeds:
    """The seeds of one step: direction seeds and one rounding seed per pass, in pass order.

    Host ints, or (capturable) one int64 tensor on the device derived from the device step
    counter; the two are equal bit for bit (:mod:`addax_kernels.optim.seeds`).
    """

    def __init__(self, num_directions: int, host: Optional[Tuple[int, int]] = None,
                 device_values: Optional[torch.Tensor] = None):
        self.num_directions = num_directions
        self._key = None if host is None else step_key(*host)
        self._values = device_values
        self.next_pass = 0

    def _seed(self, stream_index: int, stream: int):
        if self._values is not None:
            return self._values[stream_index]
        return stream_seed(self._key, stream)

    def direction(self, k: int):
        return self._seed(k, k)

    def update_directions(self):
        """Direction seeds with the last perturbed one first (the fused restore runs along seeds[0])."""
        count = self.num_directions
        if self._values is not None:
            return torch.roll(self._values[:count], 1) if count > 1 else self._values[0]
        if count == 1:
            return self.direction(0)
        return [self.direction(count - 1)] + [self.direction(k) for k in range(count - 1)]

    def rounding(self):
        """The rounding seed of the next pass."""
        index = self.next_pass
        self.next_pass += 1
        return self._seed(self.num_directions + index, ROUNDING_STREAM + index)


@dataclass
class _Estimate:
    """The ZO estimate of a step, and where it left the parameters."""

    projected: torch.Tensor  # g, float32 [K] on the device, after grad_reduce
    losses_plus: List[torch.Tensor]
    losses_minus: List[torch.Tensor]
    baseline: Optional[torch.Tensor]  # ℓ(θ) when it was evaluated
    restore: float  # multiple of ε·z(last seed) that brings the parameters back to θ
    last_seed: Any
    finite: Optional[torch.Tensor] = None  # capturable: device bool, all losses finite


# ----------------------------------------------------------------------------- the base class


class ZerothOrderOptimizer(torch.optim.Optimizer):
    """Base class: checks, layout and plan, seeds, the ZO estimate, state, capturable steps.

    Subclasses declare ``_STATE_KEYS`` (per-parameter state buffers, in the order the op takes
    them), ``_group_checks`` (their group scalars) and ``_update_key`` (the group scalars an
    update call must share), and implement ``step``.
    """

    _STATE_KEYS: Tuple[str, ...] = ()

    def __init__(self, params, defaults: dict, *, num_directions: int = 1, noise: str, rounding: str, seed: int,
                 backend: str, grad_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]], sparsity: float = 0.0,
                 one_sided: bool = False, sign: bool = False, state_dtype: torch.dtype = torch.float32,
                 capturable: bool = False):
        check_options(noise, rounding, backend, grad_reduce)
        self.num_directions = check_int(num_directions, "num_directions", 1)
        rng.sparsity_threshold(sparsity)
        self.sparsity = float(sparsity)
        self.one_sided = check_bool(one_sided, "one_sided")
        self.sign = check_bool(sign, "sign")
        self.capturable = check_bool(capturable, "capturable")
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype must be one of {STATE_DTYPES}, got {state_dtype!r}")
        self.state_dtype = state_dtype
        self.noise = noise
        self.rounding = rounding
        self._roundings = pass_roundings(rounding)
        self.backend = backend
        self.grad_reduce = grad_reduce
        self._base_seed = rng.check_seed(seed)
        self._steps_taken = 0
        self._device: Optional[torch.device] = None  # capturable: the one device of every parameter
        self._step_tensor: Optional[torch.Tensor] = None
        self._streams: Optional[torch.Tensor] = None
        self._layout: Optional[_Layout] = None
        self._plan: Optional[_Plan] = None
        self.step_skipped: Optional[torch.Tensor] = None
        self.projected_grads: Optional[torch.Tensor] = None
        self.zo_loss: Optional[torch.Tensor] = None
        self._check_scalars(defaults, lambda key: key)
        super().__init__(params, defaults)

    # -------------------------------------------------------------- hyperparameters

    def _group_checks(self) -> Dict[str, Callable[[Any, str], Any]]:
        """Checker of every group scalar, by key (subclasses extend)."""
        return {"lr": check_lr, "eps": check_positive, "weight_decay": check_nonnegative}

    def _update_key(self, group: dict) -> tuple:
        """The group scalars that groups sharing one update call must agree on (besides ε, lr)."""
        return ()

    def _check_scalars(self, values: dict, name_of: Callable[[str], str]) -> None:
        for key, check in self._group_checks().items():
            if key in values:
                check(values[key], name_of(key))

    def _check_group(self, group: dict, index: int) -> None:
        self._check_scalars(group, lambda key: f"param_groups[{index}][{key!r}]")

    def _check_groups(self) -> None:
        # Schedulers and users edit groups between steps: every scalar of every group is checked
        # before the first pass, so a bad value never leaves a step half-applied.
        for index, group in enumerate(self.param_groups):
            self._check_group(group, index)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        group = self.param_groups[index]
        try:
            self._check_group(group, index)
            first_tid = sum(len(g["params"]) for g in self.param_groups[:index])
            for position, param in enumerate(group["params"]):
                check_param(param, f"parameter {first_tid + position} (group {index})")
            if self.capturable:
                self._make_capturable(group, index)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        self._layout = self._plan = None

    def _make_capturable(self, group: dict, index: int) -> None:
        """Pin the device, and hold the group's lr in a 0-dim float32 tensor there (schedulers
        ``fill_`` it in place, so a captured step reads the current value at replay)."""
        for position, param in enumerate(group["params"]):
            device = local_view(param)[0].device
            if self._device is None:
                self._device = device
            elif device != self._device:
                raise ValueError(f"capturable=True needs every parameter on one device: param_groups[{index}]"
                                 f"['params'][{position}] is on {device}, the others on {self._device}")
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            if self._device is not None and lr.device != self._device:
                raise ValueError(f"param_groups[{index}]['lr'] is on {lr.device}; capturable=True needs it on "
                                 f"the parameters' device {self._device}")
        elif self._device is not None:
            group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=self._device)

    # -------------------------------------------------------------- layout and plan

    def _current_layout(self) -> _Layout:
        layout = self._layout
        if layout is None or len(layout.params) != sum(len(g["params"]) for g in self.param_groups):
            layout = self._layout = _Layout.build(self.param_groups)
            self._plan = None
            if not layout.params:
                raise ValueError("the optimizer has no parameters")
        elif layout.dtensor_slots:
            layout.refresh_shards()
            self._plan = None
        return layout

    def _lr_key(self, lr) -> Any:
        return ("tensor", id(lr)) if isinstance(lr, torch.Tensor) else float(lr)

    def _current_plan(self) -> _Plan:
        """The op calls of this step; rebuilt only when the parameter set or the values that
        decide which groups share a call (ε, lr, the subclass's update key, weight decay) change."""
        layout = self._current_layout()
        groups = self.param_groups
        # Groups share an update call when ε, lr and the update key agree.  The key records that
        # partition, not the lr values (a scheduler changes them every step; calls read them).
        signatures = [(float(g["eps"]), self._lr_key(g["lr"]), self._update_key(g)) for g in groups]
        first_equal: Dict[Any, int] = {}
        update_classes = tuple(first_equal.setdefault(s, i) for i, s in enumerate(signatures))
        # Which groups carry state is part of the key: momentum turned on mid-run needs buffers.
        key = (tuple(s[0] for s in signatures), update_classes, tuple(float(g["weight_decay"]) for g in groups),
               tuple(self._needs_state(g) for g in groups))
        plan = self._plan
        if plan is not None and plan.key == key:
            return plan
        plan = self._plan = self._build_plan(layout, key)
        return plan

    def _build_plan(self, layout: _Layout, key) -> _Plan:
        common = dict(noise=self.noise, sparsity=self.sparsity, backend=self.backend)

        def calls_by(call_key_of) -> List[_Call]:
            members: Dict[Any, List[int]] = {}
            for slot, tensor in enumerate(layout.tensors):
                members.setdefault((tensor.device, call_key_of(layout.group_of[slot])), []).append(slot)
            calls = []
            for (device, _), slots in members.items():
                group_indices = tuple(dict.fromkeys(layout.group_of[s] for s in slots))
                tensors = [layout.tensors[s] for s in slots]
                calls.append(_Call(
                    device=device,
                    groups=group_indices,
                    slots=tuple(slots),
                    tensors=tensors,
                    eps=float(self.param_groups[group_indices[0]]["eps"]),
                    kwargs=dict(tids=tuple(slots), offsets=tuple(layout.offsets[s] for s in slots), **common),
                    weight_decay=tuple(float(self.param_groups[layout.group_of[s]]["weight_decay"]) for s in slots),
                ))
            return calls

        eps_of, update_class_of, _, _ = key
        perturb_calls = calls_by(lambda g: eps_of[g])
        update_calls = calls_by(lambda g: update_class_of[g])
        call_of_slot = {slot: (c, i) for c, call in enumerate(update_calls) for i, slot in enumerate(call.slots)}
        if self._STATE_KEYS:
            for call in update_calls:
                if self._needs_state(self.param_groups[call.groups[0]]):
                    call.states = self._state_lists(layout, call)
        return _Plan(key, perturb_calls, update_calls, call_of_slot, layout.tensors[0].device)

    # -------------------------------------------------------------- optimizer state

    def _needs_state(self, group: dict) -> bool:
        """Whether the parameters of ``group`` carry the ``_STATE_KEYS`` buffers."""
        return bool(self._STATE_KEYS)

    def _state_lists(self, layout: _Layout, call: _Call) -> List[List[torch.Tensor]]:
        """The call's state buffers per key, created (zero, ``state_dtype``, shaped like the local
        tensor) on first use: torch.optim's lazy state, declared and nothing else."""
        lists = [[] for _ in self._STATE_KEYS]
        for slot in call.slots:
            state = self.state[layout.params[slot]]
            tensor = layout.tensors[slot]
            for buffers, key in zip(lists, self._STATE_KEYS):
                buffer = state.get(key)
                if buffer is None:
                    buffer = state[key] = torch.zeros(tensor.shape, dtype=self.state_dtype, device=tensor.device)
                buffers.append(buffer)
        return lists

    def state_bytes(self) -> int:
        """Bytes held in optimizer state buffers (the whole of the optimizer's extra memory)."""
        return sum(buffer.numel() * buffer.element_size()
                   for state in self.state.values() for buffer in state.values() if isinstance(buffer, torch.Tensor))

    # -------------------------------------------------------------- seeds and counters

    @property
    def base_seed(self) -> int:
        return self._base_seed

    @property
    def steps_taken(self) -> int:
        """Steps applied so far; the next step uses ``direction_seeds(steps_taken)``.  With
        ``capturable=True`` the counter lives on the device and reading it syncs."""
        if self._step_tensor is not None:
            return int(self._step_tensor)
        return self._steps_taken

    def direction_seeds(self, step: int) -> Tuple[int, ...]:
        """The u64 seeds of every direction at ``step`` (the first is ``step_seed(step)``)."""
        step = check_int(step, "step", 0)
        return tuple(derive_seed(self._base_seed, step, k) for k in range(self.num_directions))

    def step_seed(self, step: int) -> int:
        """The u64 seed used at ``step`` (of its first direction, the only one unless n-SPSA)."""
        return self.direction_seeds(step)[0]

    def _max_passes(self) -> int:
        # 2K perturbation passes, up to three update passes (ZO-SGD-Cons), one undo.
        return 4 * self.num_directions + 4

    def _step_seeds(self, device: torch.device) -> _StepSeeds:
        count = self.num_directions
        if not self.capturable:
            return _StepSeeds(count, host=(self._base_seed, self._steps_taken))
        if self._step_tensor is None:
            self._init_device_counter(device, self._steps_taken)
        values = derive_seeds_on_device(self._base_seed, self._step_tensor, self._streams)
        return _StepSeeds(count, device_values=values)

    def _init_device_counter(self, device: torch.device, step: int) -> None:
        count = self.num_directions
        streams = list(range(count)) + [ROUNDING_STREAM + p for p in range(self._max_passes())]
        self._streams = torch.tensor([as_int64(s) for s in streams], dtype=torch.int64, device=device)
        self._step_tensor = torch.full((), step, dtype=torch.int64, device=device)
        self.step_skipped = torch.zeros((), dtype=torch.bool, device=device)

    def _advance(self, finite: Optional[torch.Tensor]) -> None:
        """Count the step: on the host, or (capturable) on the device by the finite flag."""
        if self._step_tensor is None:
            self._steps_taken += 1
            return
        if finite is None:
            self._step_tensor.add_(1)
        else:
            self._step_tensor.add_(finite.to(torch.int64))
            torch.logical_not(finite, out=self.step_skipped)

    def _adam_step(self):
        """t of torch.optim.Adam for the coming update: an int, or a device tensor (capturable)."""
        if self._step_tensor is not None:
            return self._step_tensor + 1
        return self._steps_taken + 1

    # -------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        state = super().state_dict()
        state[STATE_KEY] = {"seed": self._base_seed, "step": self.steps_taken}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim's ``load_state_dict``, checked in full before anything changes.

        State buffers keep ``state_dtype`` (torch would cast floating state to the parameter's
        dtype) and are copied into the existing buffers when there are some, so a captured
        step keeps reading the buffers it was captured with; so are capturable lrs.
        """
        state_dict = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        zo_state = state_dict.get(STATE_KEY)
        if zo_state is not None:
            seed = rng.check_seed(zo_state.get("seed"), f"state_dict['{STATE_KEY}']['seed']")
            step = check_int(zo_state.get("step"), f"state_dict['{STATE_KEY}']['step']", 0)
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} param groups, the optimizer {len(self.param_groups)}")
        saved_ids = []
        for index, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"state_dict's param_groups[{index}] has {len(saved['params'])} parameters, "
                                 f"the optimizer's {len(group['params'])}")
            self._check_group({**group, **{k: v for k, v in saved.items() if k != "params"}}, index)
            saved_ids.extend(saved["params"])
        layout = _Layout.build(self.param_groups)
        saved_state = state_dict.get("state", {})
        loaded: Dict[int, Dict[str, torch.Tensor]] = {}
        for slot, saved_id in enumerate(saved_ids):
            entry = saved_state.get(saved_id)
            if not entry:
                continue
            tensor = layout.tensors[slot]
            for key, value in entry.items():
                if key not in self._STATE_KEYS:
                    raise ValueError(f"state_dict['state'][{saved_id}] has {key!r}; {type(self).__name__} keeps "
                                     f"only {self._STATE_KEYS}")
                if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point or \
                        value.shape != tensor.shape:
                    raise ValueError(f"state_dict['state'][{saved_id}][{key!r}] must be a floating tensor of shape "
                                     f"{tuple(tensor.shape)}, got {type(value).__name__} "
                                     f"{tuple(getattr(value, 'shape', ()))}")
            loaded[slot] = entry

        for saved, group in zip(saved_groups, self.param_groups):
            for key, value in saved.items():
                if key == "params":
                    continue
                current = group.get(key)
                if self.capturable and key == "lr" and isinstance(current, torch.Tensor):
                    current.copy_(value) if isinstance(value, torch.Tensor) else current.fill_(float(value))
                else:
                    group[key] = value
        for slot, param in enumerate(layout.params):
            state = self.state[param]
            entry = loaded.get(slot, {})
            for key in self._STATE_KEYS:
                buffer = state.get(key)
                value = entry.get(key)
                if buffer is not None:
                    # Absent state is zero state (torch's lazy init gives the same first update).
                    buffer.copy_(value) if value is not None else buffer.zero_()
                elif value is not None:
                    state[key] = value.to(device=layout.tensors[slot].device, dtype=self.state_dtype, copy=True)
        self._layout = self._plan = None
        if zo_state is None:
            warnings.warn(
                f"state_dict has no '{STATE_KEY}' entry (base seed and step count); the seed stream "
                f"continues from seed={self._base_seed}, step={self.steps_taken}, so a resumed run "
                "will not repeat the original one",
                stacklevel=2,
            )
        else:
            self._base_seed = seed
            self._steps_taken = step
            if self._step_tensor is not None:
                self._step_tensor.fill_(step)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    # -------------------------------------------------------------- passes

    def _shift(self, plan: _Plan, seeds: _StepSeeds, seed, multiple: float) -> None:
        """θ ← θ + multiple·ε·z(seed), each call with its own ε; one pass."""
        rounding_seed = seeds.rounding()
        for call in plan.perturb_calls:
            ops.perturb_(call.tensors, seed, multiple * call.eps, rounding=self._roundings.perturb,
                         rounding_seed=rounding_seed, **call.kwargs)

    def _shift_pair(self, plan: _Plan, seeds: _StepSeeds, previous, restore: float, seed) -> None:
        """θ + restore·ε·z(previous) + ε·z(seed) in one pass instead of two.

        ``zo_update_`` computes θ' − lr·Σ c_k z_k with θ' = θ + restore·z(seeds[0]); with
        lr = 1 and coefficients (0, −ε) that is θ + restore·z(previous) + ε·z(seed), and in
        float32 the products by 1 and 0 are exact, so it equals two perturbation passes but
        for one storage rounding.
        """
        rounding_seed = seeds.rounding()
        for call in plan.perturb_calls:
            ops.zo_update_(call.tensors, [previous, seed], [0.0, -call.eps], 1.0, restore=restore * call.eps,
                           rounding=self._roundings.perturb, rounding_seed=rounding_seed, **call.kwargs)

    def _estimate(self, plan: _Plan, seeds: _StepSeeds, closure, name: str, baseline: bool = False) -> _Estimate:
        """The K-direction estimate g (SPEC §3), two-sided or one-sided, through grad_reduce.

        Leaves the parameters at θ + restore·ε·z(last seed) (restore = −1 one-sided, +1
        two-sided).  ``baseline`` (or one-sided) evaluates ℓ(θ) first.  If a closure or
        grad_reduce raises, the parameters are moved back to θ (up to one pass's rounding)
        before the exception propagates.
        """
        device = plan.device
        eps_ref = float(self.param_groups[0]["eps"])
        losses_plus: List[torch.Tensor] = []
        losses_minus: List[torch.Tensor] = []
        loss_at_theta = None
        displacement, previous = 0.0, None
        separate = self._separate_restores()
        with torch.no_grad():
            try:
                if baseline or self.one_sided:
                    loss_at_theta = loss_scalar(closure(), device, name)
                for k in range(self.num_directions):
                    seed = seeds.direction(k)
                    if previous is None:
                        self._shift(plan, seeds, seed, 1.0)
                    elif separate:
                        self._shift(plan, seeds, previous, -displacement)
                        displacement = 0.0
                        self._shift(plan, seeds, seed, 1.0)
                    else:
                        self._shift_pair(plan, seeds, previous, -displacement, seed)
                    displacement, previous = 1.0, seed
                    losses_plus.append(loss_scalar(closure(), device, name))
                    if not self.one_sided:
                        if separate:
                            self._shift(plan, seeds, seed, -1.0)
                            displacement = 0.0
                            self._shift(plan, seeds, seed, -1.0)
                        else:
                            self._shift(plan, seeds, seed, -2.0)
                        displacement = -1.0
                        losses_minus.append(loss_scalar(closure(), device, name))
                plus = torch.stack(losses_plus)
                if self.one_sided:
                    projected = (plus - loss_at_theta) / eps_ref
                else:
                    projected = (plus - torch.stack(losses_minus)) / (2.0 * eps_ref)
                projected = self._reduce(projected)
                if separate:
                    self._shift(plan, seeds, previous, -displacement)
                    displacement = 0.0
            except BaseException:
                if displacement:
                    self._shift(plan, seeds, previous, -displacement)
                raise
        estimate = _Estimate(projected, losses_plus, losses_minus, loss_at_theta, -displacement, previous)
        return estimate

    def _separate_restores(self) -> bool:
        """Whether perturbations are undone by passes of their own (the policy asks for it, and
        some parameter is 16-bit: float32 stores every pass exactly, so it keeps the fused passes)."""
        return self._roundings.separate_restore and self._layout.low_precision

    def _reduce(self, projected: torch.Tensor) -> torch.Tensor:
        if self.grad_reduce is None:
            return projected
        reduced = self.grad_reduce(projected)
        if not isinstance(reduced, torch.Tensor) or reduced.shape != projected.shape:
            raise ValueError(
                f"grad_reduce must return a tensor of shape {tuple(projected.shape)}, got "
                f"{type(reduced).__name__} {tuple(getattr(reduced, 'shape', ()))}"
            )
        return reduced.to(device=projected.device, dtype=torch.float32)

    def _check_finite(self, plan: _Plan, seeds: _StepSeeds, estimate: _Estimate, name: str,
                      extra: Sequence[torch.Tensor] = ()) -> None:
        """Non-finite losses: eagerly, undo the perturbation and raise (one host read per step);
        capturable, record a device flag that zeroes the update and holds the step counter."""
        values = [estimate.projected] + [t.reshape(1) for t in extra]
        values = values[0] if len(values) == 1 else torch.cat(values)
        finite = torch.isfinite(values).all()
        if self.capturable:
            estimate.finite = finite
            return
        if bool(finite):
            return
        if estimate.restore:
            with torch.no_grad():
                self._shift(plan, seeds, estimate.last_seed, estimate.restore)
        described = ", ".join(f"{label} = {float(value):g}" for label, value in self._loss_labels(estimate, extra))
        raise NonFiniteLossError(
            f"{name} returned a non-finite loss or the estimate overflowed ({described}); the step was undone "
            f"(parameters back at θ up to one rounding, step counter still {self.steps_taken})"
        )

    def _loss_labels(self, estimate: _Estimate, extra) -> List[Tuple[str, torch.Tensor]]:
        labels = [(f"ℓ+[{k}]", v) for k, v in enumerate(estimate.losses_plus)]
        labels += [(f"ℓ−[{k}]", v) for k, v in enumerate(estimate.losses_minus)]
        if estimate.baseline is not None:
            labels.append(("ℓ(θ)", estimate.baseline))
        labels += [(f"ℓ[{i}]", v) for i, v in enumerate(extra)]
        labels += [(f"g[{k}]", v) for k, v in enumerate(estimate.projected)]
        return labels

    def _coefficients(self, estimate: _Estimate, call: _Call, cache: dict) -> torch.Tensor:
        """Σ_k coeffs[k]·z_k of the update for ``call``'s groups: g_k/K, scaled to the group's ε
        (or sign(g_k)/K), zeroed when a capturable step saw a non-finite loss; ordered as
        :meth:`_StepSeeds.update_directions`."""
        eps_ref = float(self.param_groups[0]["eps"])
        scale = 1.0 if self.sign else eps_ref / call.eps
        # One tensor per scale and device: calls on other devices must not get this one's copy.
        coefficients = cache.get((scale, call.device))
        if coefficients is None:
            g = estimate.projected
            if estimate.finite is not None:
                g = torch.where(estimate.finite, g, torch.zeros_like(g))
            g = torch.sign(g) if self.sign else g
            factor = scale / self.num_directions
            coefficients = g if factor == 1.0 else g * factor
            count = self.num_directions
            # The last perturbed direction first, as in _StepSeeds.update_directions.
            coefficients = torch.roll(coefficients, 1) if count > 1 else coefficients[0]
            cache[scale, call.device] = coefficients = coefficients.to(call.device, non_blocking=True)
        return coefficients

    @staticmethod
    def _restore_scale(estimate: _Estimate, call: _Call) -> Optional[float]:
        """The ``restore=`` of an update op fused with the restore (None when already restored)."""
        return estimate.restore * call.eps if estimate.restore else None

    def _lr(self, group: dict, estimate: Optional[_Estimate]):
        lr = group["lr"]
        if estimate is not None and estimate.finite is not None:
            return lr * estimate.finite  # lr, or 0 for a skipped step (lr is finite: exact)
        return lr

    def _zo_loss(self, estimate: _Estimate) -> torch.Tensor:
        plus = estimate.losses_plus
        return torch.stack(plus).mean() if len(plus) > 1 else plus[0]

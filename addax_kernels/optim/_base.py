"""What MeZO and Addax share: option checks, the seed stream, tensor buckets, the ZO passes.

Both optimizers keep no per-parameter state.  Their whole state is the base seed and the
number of steps taken: the seeds of step ``t`` are a pure function of the two, so a resumed
run regenerates exactly the directions it would have drawn.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import ops
from ..sharding import is_dtensor, local_shard
from .. import rng
from ..backends import BACKEND_NAMES

ROUNDING_CHOICES = ("auto", "nearest", "stochastic")
BACKEND_CHOICES = ("auto",) + BACKEND_NAMES
STATE_KEY = "zo_state"

_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    """SplitMix64's finalizer: a bijection of u64 whose outputs are well mixed."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def derive_seed(base_seed: int, step: int, direction: int) -> int:
    """The u64 Philox key of ``direction`` at ``step``: a hash chain, so nearby base seeds,
    steps and directions give unrelated keys and no state beyond (base_seed, step) exists."""
    return _splitmix64(_splitmix64(_splitmix64(base_seed) ^ (step & _MASK64)) ^ direction)


# ----------------------------------------------------------------------------- checks


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_nonnegative(value, name: str) -> float:
    if not _is_real(value):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return float(value)


def check_positive(value, name: str) -> float:
    value = check_nonnegative(value, name)
    if value == 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def check_lr(value, name: str) -> None:
    """lr may be a float or a 0-dim tensor (``ops`` reads device tensors without a host sync)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or not value.dtype.is_floating_point:
            raise ValueError(f"{name} must be a float or a 0-dim floating tensor, got {value.dtype} {tuple(value.shape)}")
        return
    check_nonnegative(value, name)


def check_unit_interval(value, name: str) -> float:
    value = check_nonnegative(value, name)
    if value > 1:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def check_options(noise: str, rounding: str, backend: str, grad_reduce) -> None:
    if noise not in rng.NOISE_KINDS:
        raise ValueError(f"noise must be one of {rng.NOISE_KINDS}, got {noise!r}")
    if rounding not in ROUNDING_CHOICES:
        raise ValueError(f"rounding must be one of {ROUNDING_CHOICES}, got {rounding!r}")
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
    if grad_reduce is not None and not callable(grad_reduce):
        raise TypeError(f"grad_reduce must be None or a callable, got {type(grad_reduce).__name__}")


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


def check_param(param, where: str) -> None:
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"{where} must be a Tensor, got {type(param).__name__}")
    if param.dtype not in ops.SUPPORTED_DTYPES:
        raise TypeError(f"{where} ({tuple(param.shape)}, {param.dtype}): dtype must be float32, float16 or bfloat16")
    if param.is_sparse:
        raise TypeError(f"{where}: sparse parameters are not supported")
    if not is_dtensor(param) and not param.is_contiguous():
        raise ValueError(f"{where} ({tuple(param.shape)}): must be contiguous; the kernels update flat storage")


def loss_scalar(loss, device: torch.device, name: str) -> torch.Tensor:
    """A closure's loss as a detached 0-dim float32 tensor on ``device``, without a host sync."""
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(f"{name} must return a scalar loss, got a tensor of shape {tuple(loss.shape)}")
        if not (loss.dtype.is_floating_point):
            raise TypeError(f"{name} must return a floating loss, got {loss.dtype}")
        return loss.detach().reshape(()).to(device=device, dtype=torch.float32, non_blocking=True)
    if _is_real(loss):
        return torch.tensor(float(loss), dtype=torch.float32, device=device)
    raise TypeError(f"{name} must return a 0-dim tensor or a number, got {type(loss).__name__}")


# ----------------------------------------------------------------------------- buckets


@dataclass
class Bucket:
    """The tensors of one param group on one device: one op call per pass."""

    group: dict
    params: List[torch.Tensor] = field(default_factory=list)
    tensors: List[torch.Tensor] = field(default_factory=list)
    tids: List[int] = field(default_factory=list)
    offsets: List[int] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device


class ZerothOrderOptimizer(torch.optim.Optimizer):
    """Base class: the seed stream, group checks and the fused ZO passes of SPEC §3."""

    def __init__(self, params, defaults: dict, *, num_directions: int, noise: str, rounding: str,
                 seed: int, backend: str, grad_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]]):
        check_options(noise, rounding, backend, grad_reduce)
        if isinstance(num_directions, bool) or not isinstance(num_directions, numbers.Integral) or num_directions < 1:
            raise ValueError(f"num_directions must be an int >= 1, got {num_directions!r}")
        self.num_directions = int(num_directions)
        self.noise = noise
        self.rounding = rounding
        self.backend = backend
        self.grad_reduce = grad_reduce
        self._base_seed = rng.check_seed(seed)
        self._steps_taken = 0
        self.projected_grads: Optional[torch.Tensor] = None
        self.zo_loss: Optional[torch.Tensor] = None
        super().__init__(params, defaults)

    # -------------------------------------------------------------- groups and parameters

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        group = self.param_groups[index]
        try:
            self._check_group(group, index)
            first_tid = sum(len(g["params"]) for g in self.param_groups[:index])
            for position, param in enumerate(group["params"]):
                check_param(param, f"parameter {first_tid + position} (group {index})")
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def _check_group(self, group: dict, index: int) -> None:
        check_lr(group["lr"], f"param_groups[{index}]['lr']")
        check_positive(group["eps"], f"param_groups[{index}]['eps']")
        check_nonnegative(group["weight_decay"], f"param_groups[{index}]['weight_decay']")

    def _check_groups(self) -> None:
        # Schedulers and users edit groups between steps: recheck the host values each step.
        for index, group in enumerate(self.param_groups):
            self._check_group(group, index)

    def _buckets(self) -> List[Bucket]:
        """One bucket per (group, device); tids are positions in the flattened groups."""
        buckets: List[Bucket] = []
        tid = 0
        for group in self.param_groups:
            by_device: Dict[torch.device, Bucket] = {}
            for param in group["params"]:
                tensor, offset = local_view(param)
                bucket = by_device.get(tensor.device)
                if bucket is None:
                    bucket = by_device[tensor.device] = Bucket(group)
                    buckets.append(bucket)
                bucket.params.append(param)
                bucket.tensors.append(tensor)
                bucket.tids.append(tid)
                bucket.offsets.append(offset)
                tid += 1
        if not buckets:
            raise ValueError("the optimizer has no parameters")
        return buckets

    # -------------------------------------------------------------- seeds and state

    @property
    def base_seed(self) -> int:
        return self._base_seed

    @property
    def steps_taken(self) -> int:
        """Steps applied so far; the next step uses ``direction_seeds(steps_taken)``."""
        return self._steps_taken

    def direction_seeds(self, step: int) -> Tuple[int, ...]:
        """The u64 seeds of every direction at ``step`` (the first is ``step_seed(step)``)."""
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        return tuple(derive_seed(self._base_seed, int(step), k) for k in range(self.num_directions))

    def step_seed(self, step: int) -> int:
        """The u64 seed used at ``step`` (of its first direction, the only one unless n-SPSA)."""
        return self.direction_seeds(step)[0]

    def state_dict(self) -> dict:
        state = super().state_dict()
        state[STATE_KEY] = {"seed": self._base_seed, "step": self._steps_taken}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        zo_state = state_dict.pop(STATE_KEY, None)
        if zo_state is not None:
            seed = rng.check_seed(zo_state.get("seed"), f"state_dict['{STATE_KEY}']['seed']")
            step = zo_state.get("step")
            if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
                raise ValueError(f"state_dict['{STATE_KEY}']['step'] must be an int >= 0, got {step!r}")
        super().load_state_dict(state_dict)
        if zo_state is None:
            warnings.warn(
                f"state_dict has no '{STATE_KEY}' entry (base seed and step count); the seed stream "
                f"continues from seed={self._base_seed}, step={self._steps_taken}, so a resumed run "
                "will not repeat the original one",
                stacklevel=2,
            )
            return
        self._base_seed = seed
        self._steps_taken = int(step)

    # -------------------------------------------------------------- the fused passes

    def _roundings(self) -> Tuple[str, str]:
        """(rounding of perturbations, rounding of updates); SPEC §2 explains the "auto" split."""
        if self.rounding == "auto":
            return "nearest", "stochastic"
        return self.rounding, self.rounding

    def _op_kwargs(self, bucket: Bucket, rounding: str, positions: Optional[Sequence[int]] = None) -> dict:
        """Keyword arguments of an op call on the whole bucket, or on its tensors at ``positions``."""
        tids, offsets = bucket.tids, bucket.offsets
        if positions is not None:
            tids = [tids[i] for i in positions]
            offsets = [offsets[i] for i in positions]
        return dict(tids=tids, offsets=offsets, noise=self.noise, rounding=rounding, backend=self.backend)

    def _perturb(self, buckets: Sequence[Bucket], seed: int, eps_multiple: float) -> None:
        rounding = self._roundings()[0]
        for bucket in buckets:
            ops.perturb_(bucket.tensors, seed, eps_multiple * float(bucket.group["eps"]),
                         **self._op_kwargs(bucket, rounding))

    def _restore_and_perturb(self, buckets: Sequence[Bucket], previous_seed: int, seed: int) -> None:
        """θ + ε·z(previous) + ε·z(seed) in one pass instead of two.

        ``zo_update_`` computes θ' − lr·Σ c_k z_k with θ' = θ + restore·z(seeds[0]); with
        lr = 1 and coefficients (0, −ε) that is θ + ε·z(previous) + ε·z(seed), and in float32
        the products by 1 and 0 are exact, so it equals two perturbation passes.
        """
        rounding = self._roundings()[0]
        for bucket in buckets:
            eps = float(bucket.group["eps"])
            ops.zo_update_(bucket.tensors, [previous_seed, seed], [0.0, -eps], 1.0, restore=eps,
                           **self._op_kwargs(bucket, rounding))

    def _measure_direction(self, buckets: Sequence[Bucket], closure, seed: int, previous_seed: Optional[int],
                           device: torch.device, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """Losses at θ + ε·z(seed) and θ − ε·z(seed); leaves θ − ε·z(seed) in place.

        If the closure raises, the pending perturbation is undone (up to rounding) first.
        """
        displacement = 0.0
        with torch.no_grad():
            try:
                if previous_seed is None:
                    self._perturb(buckets, seed, 1.0)
                else:
                    self._restore_and_perturb(buckets, previous_seed, seed)
                displacement = 1.0
                loss_plus = loss_scalar(closure(), device, name)
                self._perturb(buckets, seed, -2.0)
                displacement = -1.0
                loss_minus = loss_scalar(closure(), device, name)
            except BaseException:
                if displacement:
                    self._perturb(buckets, seed, -displacement)
                raise
        return loss_plus, loss_minus

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

    def _projected_grads(self, buckets: Sequence[Bucket], last_seed: int, losses_plus, losses_minus,
                         eps_ref: float) -> torch.Tensor:
        """g_k = (ℓ+ − ℓ−)/(2ε) for every direction, on the device, passed through grad_reduce.

        The parameters sit at θ − ε·z(last_seed) meanwhile; if the reduction fails (a
        collective timing out, say), they are moved back to θ before the error propagates.
        """
        projected = (torch.stack(losses_plus) - torch.stack(losses_minus)) / (2.0 * eps_ref)
        try:
            return self._reduce(projected)
        except BaseException:
            with torch.no_grad():
                self._perturb(buckets, last_seed, 1.0)
            raise

    @staticmethod
    def _group_scaled(projected: torch.Tensor, eps_ref: float, group: dict, device: torch.device) -> torch.Tensor:
        """The gradient estimate for one group's coordinates.

        With per-group step sizes the perturbation is D·z, D = diag(ε_group), and
        E[z_i (ℓ+ − ℓ−)/2] = ε_i ∇_i, so group i's estimate is (ℓ+ − ℓ−)/(2ε_i) = g·ε_ref/ε_i.
        """
        eps = float(group["eps"])
        scaled = projected if eps == eps_ref else projected * (eps_ref / eps)
        return scaled.to(device, non_blocking=True) if scaled.device != device else scaled

"""The contract between the ops layer and the kernels, and the backend registry.

Every public op reduces to one fused elementwise pass over a group of tensors that share a
device and a (param, grad, state) dtype combination.  Per element ``e`` of a tensor with
stream id ``tid``, global offset ``o`` and weight decay ``wd``, all math in float32, with

    keep_k(e) = sparsity_threshold == 0  or  2 * (w >> 9) + 1 >= sparsity_threshold,
                w = word (o + e) & 3 of Philox block (o + e) >> 2, counter purpose 2, key seeds[k]
    z_k       = Z(seeds[k], tid, o + e, 0) if keep_k(e) else 0.0          (SPEC §1)

the pass computes::

    x = float32(theta[e])
    if has_shift:            x = x + shift * z_0
    if needs_update:
        d = 0
        for k in 0 .. num_directions - 1:  d = d + coeffs[k] * z_k       (k ascending)
        if has_grad:         d = d + grad_coeff * float32(grad[e])
        if wd != 0:          d = d + wd * x
        state NONE:          x = x - lr * d
        state MOMENTUM:      b = momentum * float32(buf[e]) + d
                             buf[e] = round_state(b, 0);  x = x - lr * b
        state ADAM:          m = float32(m[e]);  m = m + adam_w1 * (d - m)
                             v = adam_beta2 * float32(v[e]) + adam_w2 * (d * d)
                             m[e] = round_state(m, 0);  v[e] = round_state(v, 1)
                             x = x - lr * (m / (sqrt(v) / adam_bc2_sqrt + adam_eps))
    theta[e] = round(x, theta.dtype, rounding, word: purpose 1, key rounding_seed)

with ``needs_update = num_directions > 0 or has_grad or state != NONE or any wd of the group
!= 0`` (the reference backend's rule; perturb_ has none of them and only shifts).  The
parameter update uses the float32 state values before they are rounded to the state dtype.
``round_state(y, s)`` rounds to the state dtype (float32: unchanged; bfloat16: like the
parameter, with ``rounding``, drawing purpose-1 words under the key
``rng.state_rounding_seed(rounding_seed, s)``).  sqrt and the division are IEEE
(correctly rounded); backends may contract ``a * b + c`` into FMA where SPEC §4's tolerance
allows (GPU kernels), the CPU kernels and the reference round every product and sum.

* ``perturb_``:              has_shift, shift = scale, no directions, lr = 0.
* ``zo_update_``:            has_shift = restore given, coeffs = the directions' coefficients.
* ``addax_update_``:         coeffs = (alpha * zo_grad,), has_grad, grad_coeff = 1 - alpha.
* ``zo_momentum_update_``:   as zo_update_, state MOMENTUM: torch.optim.SGD(momentum=β) on d.
* ``zo_adam_update_``:       as zo_update_, state ADAM: torch.optim.Adam on d (lr = lr / (1 - β1^t),
                             adam_w1 = 1 - β1, adam_w2 = 1 - β2, adam_bc2_sqrt = sqrt(1 - β2^t)).

Seeds travel as ``max(1, num_directions)`` direction seeds followed by the rounding seed
(:class:`Seeds`): host ints, or one int64 tensor on the parameters' device read by the kernel
(CUDA-graph friendly: a replay reads the seed the tensor holds then).  Scalars travel as one
vector laid out as in the ``SCALAR_*`` constants below (:class:`Scalars`): host floats
(float32-representable, passed to kernels as runtime arguments) or one float32 tensor on the
parameters' device (read by the kernel; no host sync).

A backend is a module with

* ``unavailable_reason(device: torch.device) -> Optional[str]``: None when it can run on
  ``device``, else a sentence saying why not;
* ``prepare(group: TensorGroup, params, states) -> object``: whatever the backend wants to
  keep for a group (launch tables, addresses), built once per validated parameter set and
  cached by the ops layer.  It must not keep references to the tensors (a cache entry must
  not keep a model alive): addresses and sizes only;
* ``run(prepared, group: TensorGroup, job: FusedJob, params, grads, states) -> None``: the
  pass above, in place, on the device's current stream.  ``params`` (and ``grads``, and each
  list of ``states``) are the caller's whole lists: the group's tensors are at
  ``group.indices``.  Inputs are validated by ``addax_kernels.ops`` before the first group runs;
  a backend raises only for conditions the ops layer cannot see (a CUDA launch failure);
* optionally ``run_groups(prepared_list, groups, job, params, grads, states) -> None``: every
  group of one call, used instead of ``run`` per group when present, for a backend whose
  failures can come before its launches (Triton compiles new kernel variants at first use):
  it fails, if it fails, before any group is launched.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

BACKEND_NAMES = ("reference", "triton", "native")

# The layout of the scalar vector.  Slots 3..7 belong to the optimizer state; they are 0 for
# the stateless ops.
SCALAR_SHIFT = 0
SCALAR_LR = 1
SCALAR_GRAD_COEFF = 2
SCALAR_MOMENTUM = 3  # state MOMENTUM: β
SCALAR_ADAM_W1 = 3  # state ADAM: 1 - β1 (the weight of torch's exp_avg.lerp_)
SCALAR_ADAM_BETA2 = 4
SCALAR_ADAM_W2 = 5  # 1 - β2
SCALAR_ADAM_BC2_SQRT = 6  # sqrt(1 - β2^t)
SCALAR_ADAM_EPS = 7
SCALAR_FIRST_COEFF = 8

# Optimizer state updated in the pass, and how many state buffers each kind has.
STATE_NONE = 0
STATE_MOMENTUM = 1
STATE_ADAM = 2
STATE_BUFFERS = {STATE_NONE: 0, STATE_MOMENTUM: 1, STATE_ADAM: 2}
STATE_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class _HostOrDevice:
    """A vector held either as host values (kernel runtime arguments) or as one device tensor
    (read by the kernels: no host sync, CUDA-graph safe)."""

    values: Optional[Tuple] = None
    tensor: Optional[torch.Tensor] = None

    def __post_init__(self):
        if (self.values is None) == (self.tensor is None):
            raise ValueError(f"{type(self).__name__} holds exactly one of values or tensor")

    @property
    def on_device(self) -> bool:
        return self.tensor is not None

    def __len__(self) -> int:
        return len(self.values) if self.values is not None else int(self.tensor.numel())


@dataclass(frozen=True)
class Scalars(_HostOrDevice):
    """The scalar vector (``SCALAR_*`` layout) as host floats or as one float32 device tensor."""

    values: Optional[Tuple[float, ...]] = None


@dataclass(frozen=True)
class Seeds(_HostOrDevice):
    """``max(1, K)`` direction seeds then the rounding seed: u64 host ints, or one int64 tensor
    of that length on the parameters' device holding the same 64 bits (two's complement)."""

    values: Optional[Tuple[int, ...]] = None


@dataclass(frozen=True)
class TensorGroup:
    """The tensors of one fused launch, as positions in the op's lists plus their metadata.

    Built once per validated parameter set; ``indices`` lists non-empty tensors only.
    """

    indices: Tuple[int, ...]
    device: torch.device
    param_dtype: torch.dtype
    grad_dtype: Optional[torch.dtype]
    state_dtype: Optional[torch.dtype]
    numels: Tuple[int, ...]
    tids: Tuple[int, ...]
    offsets: Tuple[int, ...]
    weight_decay: Tuple[float, ...]

    @property
    def has_decay(self) -> bool:
        return any(decay != 0.0 for decay in self.weight_decay)


@dataclass(frozen=True)
class FusedJob:
    """Everything but the tensors for one fused pass (see the module docstring)."""

    seeds: Seeds
    scalars: Scalars
    has_shift: bool
    num_directions: int
    has_grad: bool
    state: int = STATE_NONE
    noise: str = "gaussian"
    rounding: str = "nearest"
    sparsity_threshold: int = 0
    # Each gradient's data_ptr() by position in the op's list, native-endian uint64 bytes, when
    # the ops layer read them while checking (its C++ check does); None: ask the tensors.
    grad_addresses: Optional[bytes] = None

    def needs_update(self, group: TensorGroup) -> bool:
        return self.num_directions > 0 or self.has_grad or self.state != STATE_NONE or group.has_decay


_MODULES = {
    "reference": "addax_kernels.backends.reference",
    "triton": "addax_kernels.backends.triton",
    "native": "addax_kernels.backends.native",
}


def load(name: str):
    """Import backend ``name``; raises ImportError with the cause if it cannot be imported."""
    if name not in _MODULES:
        raise ValueError(f"backend must be one of {('auto',) + BACKEND_NAMES}, got {name!r}")
    return importlib.import_module(_MODULES[name])


def unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """None if backend ``name`` can run on ``device``, else why not (never raises)."""
    try:
        module = load(name)
    except Exception as error:  # an optional dependency or the extension is missing
        return f"{name} backend cannot be imported: {type(error).__name__}: {error}"
    return module.unavailable_reason(torch.device(device))

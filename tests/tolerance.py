"""The test suite's one comparison with the reference: run an op on a backend and on the reference
backend (``on_backend_and_reference``), then hold the results to the bounds below
(``assert_matches_reference``).

Why these bounds:
* Philox words, uniforms, Rademacher z, sparsity masks and the rounding rules are integer
  arithmetic: a backend agrees with the reference bit for bit given the same float32 input.
* Gaussian z: each backend evaluates the Box–Muller formula in float32 with its own log / sincos
  (the reference with torch's); two such evaluations differ by at most Z_DISAGREEMENT (CPU
  kernels: measured ~7e-7 at |z| ~ 6; GPU fast transcendentals within SPEC §1: up to ~4e-6).
* float32 results therefore agree within ``noise_weight · Z_DISAGREEMENT + 4 ulp`` per element,
  where noise_weight bounds the factor in front of z in the formula (FMA contraction on GPUs is
  covered by the ulps).
* A float32 difference that small flips a bf16/fp16 rounding (nearest or stochastic) rarely, and
  by one storage ulp: every element is equal or one ulp apart, and at most MAX_FLIPPED_FRACTION
  of the elements of one call differ.  Where an update cancels the parameter almost exactly the
  result is so small that the float32 difference spans several storage ulps: such an element
  may differ by more than one ulp as long as it differs by no more than that float32 bound.
"""

from __future__ import annotations

from typing import Sequence

import torch

Z_DISAGREEMENT = {"cpu": 4e-6, "cuda": 1e-5}
MAX_FLIPPED_FRACTION = 0.01


def clones(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [t.clone() for t in tensors]


def misaligned(values: torch.Tensor, byte_offset: int) -> torch.Tensor:
    """A CPU tensor holding ``values`` at an address ``byte_offset`` past a 16-byte boundary (an
    input whose kernels must take their element-by-element path)."""
    size = values.numel() * values.element_size()
    storage = torch.zeros(size + 32, dtype=torch.uint8)
    start = (-storage.data_ptr()) % 16 + byte_offset
    tensor = torch.frombuffer(memoryview(storage.numpy()), dtype=values.dtype, count=values.numel(), offset=start)
    tensor.copy_(values.flatten())
    tensor._keep_alive = storage  # frombuffer does not own the memory
    return tensor


def on_backend_and_reference(op, backend: str, tensor_lists, *args, **kwargs):
    """``op(*lists, *args, backend=..., **kwargs)`` on clones of ``tensor_lists`` (the lists the op
    updates in place), once with ``backend`` and once with the reference; returns (got, expected),
    each a list of the updated lists in the order given."""
    got = [clones(tensors) for tensors in tensor_lists]
    expected = [clones(tensors) for tensors in tensor_lists]
    op(*got, *args, backend=backend, **kwargs)
    op(*expected, *args, backend="reference", **kwargs)
    return got, expected


def _positions(bits16: torch.Tensor) -> torch.Tensor:
    """Sign-magnitude 16-bit patterns to positions on the number line (neighbours differ by 1)."""
    bits = bits16.to(torch.int32)
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def assert_matches_reference(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor],
                             noise_weight: float, exact: bool = False, names: str = "params") -> None:
    """``actual`` (a backend's tensors after one call) against ``expected`` (the reference's).

    ``noise_weight``: an upper bound of |factor in front of z| in the op (e.g. |scale|, or
    |restore| + lr·Σ|coeffs|).  ``exact``: every element bit-identical (Rademacher noise on the
    CPU, or two paths of one backend that must agree).
    """
    flipped = []
    for index, (got, want) in enumerate(zip(actual, expected)):
        name = f"{names}[{index}]"
        assert got.dtype == want.dtype and got.shape == want.shape, name
        a = got.detach().cpu().reshape(-1)
        e = want.detach().cpu().reshape(-1)
        if exact:
            same = (a.view(torch.int16 if a.element_size() == 2 else torch.int32)
                    == e.view(torch.int16 if e.element_size() == 2 else torch.int32))
            assert bool(same.all()), f"{name}: {int((~same).sum())} elements differ (max |diff| {(a.float() - e.float()).abs().max()})"
            continue
        assert torch.equal(torch.isnan(a), torch.isnan(e)), f"{name}: NaN positions differ"
        keep = ~torch.isnan(e)
        a, e = a[keep], e[keep]
        device = got.device.type
        if got.dtype == torch.float32:
            tolerance = 4 * torch.finfo(torch.float32).eps * e.abs() + noise_weight * Z_DISAGREEMENT[device]
            excess = ((a - e).abs() - tolerance).max().item() if a.numel() else 0.0
            assert excess <= 0.0, f"{name}: float32 difference exceeds the tolerance by {excess}"
            continue
        distance = (_positions(a.view(torch.int16)) - _positions(e.view(torch.int16))).abs()
        within_float32_bound = (a.float() - e.float()).abs() <= noise_weight * Z_DISAGREEMENT[got.device.type]
        far = (distance > 1) & ~within_float32_bound
        assert not bool(far.any()), f"{name}: differs by {int(distance[far].max())} storage ulps"
        flipped.append(distance)
    if flipped:
        fraction = (torch.cat(flipped) > 0).double().mean().item()
        assert fraction <= MAX_FLIPPED_FRACTION, f"{fraction:.4%} of elements one storage ulp apart"

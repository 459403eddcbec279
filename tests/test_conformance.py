"""Every fast backend against the reference backend, feature by feature (SPEC §1–§3).

One suite for all backends: each test runs once per (backend, device) that can run here —
native on the CPU, Triton under its interpreter on the CPU (TRITON_INTERPRET=1, set by
conftest), the native backend's CUDA kernels compiled for the CPU emulation of
tests/cuda_emulation ("cuda-emulation", on CPU tensors), and both fast backends compiled on
CUDA when a GPU exists — and compares the public op's result
with the pure-PyTorch reference backend (itself checked against float64 formulas and
torch.optim in test_ops.py / test_optim.py).  Tolerances: tests/tolerance.py.  Backend-specific
behaviour (ISA variants, offline compiles, launch limits) lives in test_native_backend.py and
test_triton_backend.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import addax_kernels as ak
from addax_kernels import rng
from cuda_emulation import backend as cuda_emulation
from known_answers import spec_kept
from tolerance import assert_matches_reference, clones, on_backend_and_reference

from conftest import HAS_CUDA

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NOISES = ("gaussian", "rademacher")
ROUNDINGS = ("nearest", "stochastic")
STATE_DTYPES = (torch.float32, torch.bfloat16)
BIG_SEED = 2**64 - 12345  # >= 2**63: both key words, and the int64 encoding of seed tensors
# A single element, partial Philox blocks, a tail past a 4096 tile, a Rademacher block edge, a prime.
SIZES = (1, 3, 4097, 133, 128, 640)


EMULATION = "cuda-emulation"


def _cases():
    cases = [("native", "cpu"), ("triton", "cpu")]
    if HAS_CUDA:
        cases += [("triton", "cuda"), ("native", "cuda")]
    params = [pytest.param((backend, device), id=f"{backend}-{device}") for backend, device in cases]
    # tests/conftest.py installs the emulation for tests marked cuda_emulation (a failed build
    # is an error, not a skip).
    return params + [pytest.param(("native", EMULATION), marks=pytest.mark.cuda_emulation,
                                  id=f"native-{EMULATION}")]


@pytest.fixture(params=_cases())
def backend_device(request):
    backend, device = request.param
    if device == EMULATION:
        return backend, torch.device("cpu")
    reason = ak.backend_report(device)[backend]
    if reason != "available":
        pytest.skip(f"{backend} on {device}: {reason}")
    return backend, torch.device(device)


def _params(sizes, dtype, device, seed=0, scale=0.05):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, generator=generator) * scale).to(dtype).to(device) for size in sizes]


def _exact(noise: str, device: torch.device) -> bool:
    """Rademacher z is exact; without FMA contraction (CPU kernels) the pass is then bit-exact."""
    return noise == "rademacher" and device.type == "cpu" and not cuda_emulation.active()


# ----------------------------------------------------------------------------- the three ops


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_perturb(backend_device, dtype, noise, rounding):
    backend, device = backend_device
    params = _params(SIZES, dtype, device)
    (got,), (expected,) = on_backend_and_reference(
        ak.perturb_, backend, [params], BIG_SEED, 1e-2, noise=noise, rounding=rounding,
        offsets=[7 * i for i in range(len(SIZES))])
    assert_matches_reference(got, expected, 1e-2, exact=_exact(noise, device))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_zo_update_with_restore_directions_and_masked_decay(backend_device, dtype, noise, rounding):
    backend, device = backend_device
    params = _params((3, 4097, 129, 640), dtype, device, seed=1)
    (got,), (expected,) = on_backend_and_reference(
        ak.zo_update_, backend, [params], [11, 2**40 + 3, BIG_SEED], [0.7, -1.3, 0.25], 1e-2,
        restore=1e-3, weight_decay=0.1, decay_mask=[True, False, True, True], noise=noise, rounding=rounding,
    )
    assert_matches_reference(got, expected, 1e-3 + 1e-2 * 2.25, exact=_exact(noise, device))


@pytest.mark.parametrize("restore", (None, 1e-3))
@pytest.mark.parametrize("dtype", DTYPES)
def test_single_direction_update(backend_device, dtype, restore):
    """MeZO's update: restore + one direction, the case kernels specialize."""
    backend, device = backend_device
    params = _params((3, 4097, 129), dtype, device, seed=4)
    (got,), (expected,) = on_backend_and_reference(
        ak.zo_update_, backend, [params], BIG_SEED, -0.9, 1e-2, restore=restore,
        weight_decay=0.1, decay_mask=[True, False, True], rounding="stochastic")
    assert_matches_reference(got, expected, (restore or 0.0) + 1e-2 * 0.9)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_single_direction_sparse_update_with_per_tensor_decay(backend_device, dtype):
    """Restore, one masked direction and weight decay (zero for one tensor) in one pass."""
    backend, device = backend_device
    params = _params((4097, 129, 640), dtype, device, seed=5)
    (got,), (expected,) = on_backend_and_reference(
        ak.zo_update_, backend, [params], 77, 0.6, 1e-2, restore=1e-3, weight_decay=[0.1, 0.0, 0.3], sparsity=0.5,
        rounding="stochastic")
    assert_matches_reference(got, expected, 1e-3 + 1e-2 * 0.6)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # Triton's interpreter: numpy on inf/NaN, on purpose
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_single_direction_update_of_non_finite_parameters(backend_device, dtype):
    """inf and NaN end where the reference's formula sends them: θ' − lr·(c·z + wd·θ') is NaN
    for an infinite θ' under weight decay (inf − inf) and stays ±inf without decay."""
    backend, device = backend_device
    values = torch.tensor([float("inf"), float("-inf"), float("nan"), 1.0, -0.5, 0.0] * 700)
    params = [values.to(dtype).to(device) for _ in range(2)]
    (got,), (expected,) = on_backend_and_reference(ak.zo_update_, backend, [params], 5, 0.5, 1e-2, restore=1e-3,
                                                   weight_decay=[0.1, 0.0])
    infinite = torch.isinf(values)
    assert bool(torch.isnan(expected[0].float().cpu())[infinite].all())  # decay: inf − inf
    assert torch.equal(expected[1].float().cpu()[infinite], values[infinite])  # no decay: ±inf stays
    for index, (g, e) in enumerate(zip(got, expected)):
        g, e = g.float().cpu(), e.float().cpu()
        assert torch.equal(torch.isnan(g), torch.isnan(e)), f"params[{index}]: NaN positions differ"
        assert torch.equal(g[torch.isinf(e)], e[torch.isinf(e)]), f"params[{index}]: infinities differ"
    finite = torch.isfinite(values)
    assert_matches_reference([g[finite.to(g.device)] for g in got], [e[finite.to(e.device)] for e in expected],
                             1e-3 + 1e-2 * 0.5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grad_dtype", DTYPES)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_addax_update_for_every_grad_dtype(backend_device, dtype, grad_dtype, rounding):
    backend, device = backend_device
    params = _params((5, 4097, 1031), dtype, device, seed=2)
    grads = [g.to(grad_dtype) for g in _params((5, 4097, 1031), torch.float32, device, seed=3)]
    (got,), (expected,) = on_backend_and_reference(
        lambda p, *a, **k: ak.addax_update_(p, grads, *a, **k), backend, [params],
        99, 0.8, 1e-2, 0.3, weight_decay=0.01, rounding=rounding)
    assert_matches_reference(got, expected, 1e-2 * 0.8)


# ----------------------------------------------------------------------------- optimizer state


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
@pytest.mark.parametrize("noise", NOISES)
def test_momentum_update_over_three_steps(backend_device, dtype, state_dtype, noise):
    backend, device = backend_device
    params = _params((5, 4097, 640), dtype, device, seed=6)
    buffers = [torch.zeros(p.shape, dtype=state_dtype, device=device) for p in params]
    got, expected = [clones(params), clones(buffers)], [clones(params), clones(buffers)]
    for step, (coeff, lr) in enumerate(((0.5, 1e-2), (-1.5, 2e-2), (0.25, 1e-2))):
        for (p, b), name in ((got, backend), (expected, "reference")):
            ak.zo_momentum_update_(p, b, [BIG_SEED - step], [coeff], lr, 0.9, restore=1e-3, weight_decay=0.05,
                                   noise=noise, rounding="stochastic", rounding_seed=1000 + step, backend=name)
    # Three steps of momentum 0.9 accumulate at most 1 + 1.9 + 2.71 times one step's z term.
    exact = _exact(noise, device)
    assert_matches_reference(got[0], expected[0], 1e-3 + 5.61 * 2e-2 * 1.5, exact=exact)
    assert_matches_reference(got[1], expected[1], 5.61 * 1.5, exact=exact, names="momentum_buffers")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
@pytest.mark.parametrize("noise", NOISES)
def test_adam_update_over_three_steps(backend_device, dtype, state_dtype, noise):
    """adam eps = 1e-2 keeps the step a smooth function of z, so a z difference δ moves θ by at
    most ~lr·w1·δ/eps per step (the tolerance below), and m, v by the usual bound."""
    backend, device = backend_device
    params = _params((5, 4097, 640), dtype, device, seed=7)
    exp_avgs = [torch.zeros(p.shape, dtype=state_dtype, device=device) for p in params]
    exp_avg_sqs = [torch.zeros(p.shape, dtype=state_dtype, device=device) for p in params]
    got = [clones(params), clones(exp_avgs), clones(exp_avg_sqs)]
    expected = [clones(params), clones(exp_avgs), clones(exp_avg_sqs)]
    for step, coeff in enumerate((0.5, -1.5, 0.25), start=1):
        for (p, m, v), name in ((got, backend), (expected, "reference")):
            ak.zo_adam_update_(p, m, v, [BIG_SEED - step], [coeff], 1e-3, step, betas=(0.8, 0.9), eps=1e-2,
                               weight_decay=0.01, noise=noise, rounding="stochastic", rounding_seed=77 * step,
                               backend=name)
    exact = _exact(noise, device)
    assert_matches_reference(got[0], expected[0], 3 * 1e-3 / (1 - 0.8**3) * 1.5 / 1e-2, exact=exact)
    assert_matches_reference(got[1], expected[1], 3 * 1.5, exact=exact, names="exp_avgs")
    assert_matches_reference(got[2], expected[2], 3 * 2 * 1.5 * 1.5 * 6, exact=exact, names="exp_avg_sqs")


# ----------------------------------------------------------------------------- seeds, masks, rounding


@pytest.mark.parametrize("noise", NOISES)
def test_sparsity_mask_is_the_purpose_two_words(backend_device, noise):
    """Dropped elements keep their value exactly; kept ones move; the result equals the reference."""
    backend, device = backend_device
    params = _params((4097, 133), torch.float32, device, seed=8)
    (got,), (expected,) = on_backend_and_reference(ak.perturb_, backend, [params], 12345, 0.5, noise=noise,
                                                   sparsity=0.3, tids=[3, 9])
    assert_matches_reference(got, expected, 0.5, exact=_exact(noise, device))
    for tid, before, after in zip((3, 9), params, got):
        kept = torch.tensor([spec_kept(12345, tid, e, 0.3) for e in range(before.numel())])
        moved = (after.cpu() != before.cpu())
        assert not bool(moved[~kept].any()), "an element the mask drops was perturbed"
        assert float(moved[kept].float().mean()) > 0.99
        # The dropped fraction is Binomial(n, 0.3)/n: within 5 standard deviations of 0.3.
        assert abs(float((~kept).float().mean()) - 0.3) <= 5 * (0.3 * 0.7 / kept.numel()) ** 0.5


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_sparse_update_with_directions_and_state(backend_device, dtype):
    backend, device = backend_device
    params = _params((4097, 640), dtype, device, seed=9)
    buffers = [torch.zeros(p.shape, dtype=torch.float32, device=device) for p in params]
    got, expected = on_backend_and_reference(ak.zo_momentum_update_, backend, [params, buffers], [5, 6], [0.5, -0.5],
                                             1e-2, 0.9, restore=1e-3, sparsity=0.75, rounding="stochastic")
    assert_matches_reference(got[0], expected[0], 1e-3 + 1e-2)
    assert_matches_reference(got[1], expected[1], 1.0, names="momentum_buffers")


def test_rounding_seed_keys_the_rounding_words(backend_device):
    backend, device = backend_device
    params = _params((4097, 640), torch.bfloat16, device, seed=10)
    (got,), (expected,) = on_backend_and_reference(ak.zo_update_, backend, [params], 5, 0.5, 1e-3, restore=1e-3,
                                                   rounding="stochastic", rounding_seed=BIG_SEED)
    assert_matches_reference(got, expected, 2e-3)
    default = clones(params)
    ak.zo_update_(default, 5, 0.5, 1e-3, restore=1e-3, rounding="stochastic", backend=backend)
    assert any(not torch.equal(a, b) for a, b in zip(got, default)), "rounding_seed had no effect"


def _seed_tensor(seed: int, device, dtype=torch.int64):
    tensor = torch.tensor(rng.seed_as_int64(seed), dtype=torch.int64, device=device)
    return tensor if dtype == torch.int64 else tensor.view(dtype)


@pytest.mark.parametrize("seed_dtype", ["int64", "uint64"])
def test_seed_tensors_equal_python_int_seeds(backend_device, seed_dtype):
    """SPEC §1: a 0-dim int64/uint64 tensor on the params' device is the same seed as the int."""
    backend, device = backend_device
    dtype = getattr(torch, seed_dtype, None)
    if dtype is None:
        pytest.skip(f"this torch has no {seed_dtype}")
    params = _params((4097, 133), torch.bfloat16, device, seed=11)
    buffers = [torch.zeros(p.shape, dtype=torch.bfloat16, device=device) for p in params]
    seeds = [BIG_SEED, 7, 2**63]
    host_p, host_b = clones(params), clones(buffers)
    dev_p, dev_b = clones(params), clones(buffers)
    ak.perturb_(host_p, BIG_SEED, 1e-2, rounding="stochastic", rounding_seed=2**64 - 1, backend=backend)
    ak.perturb_(dev_p, _seed_tensor(BIG_SEED, device, dtype), 1e-2, rounding="stochastic",
                rounding_seed=_seed_tensor(2**64 - 1, device, dtype), backend=backend)
    ak.zo_momentum_update_(host_p, host_b, seeds, [0.5, -0.25, 1.0], 1e-2, 0.9, restore=1e-3,
                           rounding="stochastic", sparsity=0.1, backend=backend)
    ak.zo_momentum_update_(dev_p, dev_b, torch.stack([_seed_tensor(s, device, dtype) for s in seeds]),
                           [0.5, -0.25, 1.0], 1e-2, 0.9, restore=1e-3, rounding="stochastic", sparsity=0.1,
                           backend=backend)
    assert_matches_reference(dev_p, host_p, 0.0, exact=True)
    assert_matches_reference(dev_b, host_b, 0.0, exact=True, names="momentum_buffers")


def test_device_tensor_scalars_equal_python_floats(backend_device):
    backend, device = backend_device
    params = _params((4097, 33), torch.float32, device, seed=5)
    with_floats, with_tensors = clones(params), clones(params)
    ak.zo_update_(with_floats, [1, 2], [0.5, -0.25], 1e-2, restore=1e-3, backend=backend)
    scalar = lambda value: torch.tensor(value, device=device)  # noqa: E731
    ak.zo_update_(with_tensors, [1, 2], [scalar(0.5), scalar(-0.25)], scalar(1e-2), restore=scalar(1e-3),
                  backend=backend)
    assert_matches_reference(with_tensors, with_floats, 0.0, exact=True)


# ----------------------------------------------------------------------------- layout and indexing


@pytest.mark.parametrize("noise", NOISES)
def test_shards_with_global_offsets_equal_the_whole_tensor(backend_device, noise):
    backend, device = backend_device
    whole = _params((10001,), torch.bfloat16, device, seed=12)[0]
    cuts = (0, 3, 7, 130, 2047, 4096, 10001)
    shards = [whole[a:b].clone() for a, b in zip(cuts, cuts[1:])]
    ak.perturb_([whole], 31, 1e-2, tids=[4], noise=noise, rounding="stochastic", backend=backend)
    ak.perturb_(shards, 31, 1e-2, tids=[4] * len(shards), offsets=list(cuts[:-1]), noise=noise,
                rounding="stochastic", backend=backend)
    assert torch.equal(torch.cat(shards).view(torch.int16), whole.view(torch.int16))


@pytest.mark.parametrize("offset", (2**32 - 3, 2**40 + 5, 2**63 - 4097))
def test_offsets_past_32_bits_up_to_the_int64_end(backend_device, offset):
    """offset + numel may reach 2**63 (the last element index is 2**63 - 1)."""
    backend, device = backend_device
    params = _params((4097,), torch.float32, device, seed=13)
    (got,), (expected,) = on_backend_and_reference(ak.perturb_, backend, [params], 3, 1e-2, offsets=[offset])
    assert_matches_reference(got, expected, 1e-2)


def test_many_tensors_of_odd_sizes_and_empty_ones_in_one_call(backend_device):
    backend, device = backend_device
    sizes = [1, 3, 0, 2, 513, 13, 127, 31, 0, 1, 129] * 4
    params = _params(sizes, torch.bfloat16, device, seed=14)
    (got,), (expected,) = on_backend_and_reference(ak.perturb_, backend, [params], 5, 1e-3, rounding="stochastic",
                                                   tids=[(7919 * i) % 2**32 for i in range(len(sizes))])
    assert_matches_reference(got, expected, 1e-3)


def test_mixed_dtypes_in_one_call_equal_separate_calls(backend_device):
    backend, device = backend_device
    params = (_params((257, 4097), torch.float32, device, seed=15) + _params((129,), torch.bfloat16, device, seed=16)
              + _params((33,), torch.float16, device, seed=17))
    together = clones(params)
    ak.zo_update_(together, 3, 0.5, 1e-2, restore=1e-3, rounding="stochastic", backend=backend)
    for index, param in enumerate(params):
        alone = param.clone()
        ak.zo_update_([alone], 3, 0.5, 1e-2, restore=1e-3, rounding="stochastic", tids=[index], backend=backend)
        assert torch.equal(alone, together[index]), f"params[{index}]"


def test_misaligned_tensors_equal_aligned_copies(backend_device):
    """A 16-bit tensor starting off a 16-byte boundary, and (CPU kernels) an fp32 tensor whose
    address is not even a multiple of 4, get the z of their element indices like aligned
    tensors do.  (CUDA memory is always element-aligned, and the emulation traps otherwise.)"""
    backend, device = backend_device
    storage = _params((4100,), torch.bfloat16, device, seed=18)[0]
    odd_view = storage[1:4098]  # starts 2 bytes past an aligned address
    aligned = odd_view.clone()
    tensors = [odd_view, aligned]
    unaligned_floats = device.type == "cpu" and not cuda_emulation.active()
    if unaligned_floats:
        raw = bytearray(4 * 1000 + 2)
        misaligned = torch.frombuffer(raw, dtype=torch.float32, offset=2, count=1000)
        misaligned.copy_(torch.linspace(-1, 1, 1000))
        tensors += [misaligned, misaligned.clone()]
    ak.perturb_(tensors, 8, 1e-2, tids=[5, 5, 6, 6][: len(tensors)], rounding="stochastic", backend=backend)
    assert torch.equal(odd_view.view(torch.int16), aligned.view(torch.int16))
    if unaligned_floats:
        assert torch.equal(tensors[2], tensors[3])


def test_writes_bump_autograd_version_counters(backend_device):
    """A node that saved a parameter must see that an op changed it (issue 14 item 3)."""
    backend, device = backend_device
    w = torch.nn.Parameter(torch.ones(4, device=device))
    x = torch.ones(4, device=device, requires_grad=True)
    loss = (w * x).sum()
    with torch.no_grad():
        ak.perturb_([w], 1, 0.5, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_noise_of_each_backend_is_its_z(backend_device):
    backend, device = backend_device
    z = ak.noise((64, 33), BIG_SEED, tid=7, offset=5, backend=backend, device=device, sparsity=0.2)
    reference = ak.noise((64, 33), BIG_SEED, tid=7, offset=5, device=device, sparsity=0.2)
    assert torch.equal(z == 0, reference == 0)
    assert_matches_reference([z], [reference], 1.0)
    assert np.isfinite(z.cpu().numpy()).all()

"""The CUDA kernels of csrc/cuda, run by the CPU emulation of tests/cuda_emulation, where the
conformance suite's small tensors (which it also runs there) do not reach: tensors over several
65536-element chunks from unaligned offsets, warps with more than one Rademacher tile, the
weight-decay vector loops, every one-direction kernel with each gradient type, and the exact
(non-finite, saturating, subnormal) branch of the stochastic roundings after an addition.  Each
result is compared with the pure-PyTorch reference backend.  The CUDA tests of
test_native_backend.py that need no GPU feature (launch splitting, many directions, the
roundings, shards) run on the emulation too (their ``cuda_kernels`` fixture).
"""

from __future__ import annotations

import subprocess

import pytest
import torch

import addax_kernels as ak
import cuda_emulation as emulation_build
from cuda_emulation import backend as emulation_backend
from tolerance import assert_matches_reference, clones, misaligned, on_backend_and_reference

# backend="native" is the emulation in every test here (tests/conftest.py installs it; it skips
# where the emulation cannot be built for want of a compiler).
pytestmark = pytest.mark.cuda_emulation

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NOISES = ("gaussian", "rademacher")
CHUNK = emulation_build.kernel_constant("kChunk")  # elements per chunk of csrc/cuda/fused_cuda.cu
TILE = emulation_build.kernel_constant("kTile")  # its Rademacher warp tile
# Three chunks from offset 5 (a partial first chunk, a full one: two tiles per warp, a tail),
# nine tiles in one chunk (warp 0 takes two), and two chunks from a chunk boundary.
SIZES = (2 * CHUNK + 3 * TILE + 5, 9 * TILE + 3, CHUNK + 4465)
OFFSETS = (5, 0, 3 * CHUNK)


def _params(sizes, dtype, seed, scale=0.05):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, generator=generator) * scale).to(dtype) for size in sizes]


def _emulated_and_reference(op, params):
    """``op(params, backend=...)`` on two copies: the emulated CUDA kernels' result and the reference's."""
    assert emulation_backend.active(), "backend='native' is not the CUDA emulation here"
    (got,), (expected,) = on_backend_and_reference(op, "native", [params])
    return got, expected


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("noise", NOISES)
def test_perturb_over_several_chunks(dtype, noise):
    params = _params(SIZES, dtype, seed=1)
    got, expected = _emulated_and_reference(
        lambda p, backend: ak.perturb_(p, 2**64 - 7, 1e-2, noise=noise, rounding="stochastic", offsets=OFFSETS,
                                       backend=backend), params)
    # A Rademacher perturbation is one exact addition per element: bit-identical.
    assert_matches_reference(got, expected, 1e-2, exact=noise == "rademacher")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("noise", NOISES)
def test_restore_and_step_with_and_without_weight_decay_over_several_chunks(dtype, noise):
    params = _params(SIZES, dtype, seed=2)
    got, expected = _emulated_and_reference(
        lambda p, backend: ak.zo_update_(p, 77, 0.5, 1e-2, restore=1e-3, weight_decay=0.1,
                                         decay_mask=[True, False, True], noise=noise, rounding="stochastic",
                                         offsets=OFFSETS, backend=backend), params)
    assert_matches_reference(got, expected, 1e-3 + 1e-2 * 0.5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grad_dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("noise", NOISES)
def test_addax_update_over_several_chunks(dtype, grad_dtype, noise):
    params = _params(SIZES, dtype, seed=3)
    grads = [g.to(grad_dtype) for g in _params(SIZES, torch.float32, seed=4, scale=1.0)]
    got, expected = _emulated_and_reference(
        lambda p, backend: ak.addax_update_(p, grads, 99, 0.8, 1e-2, 0.3, weight_decay=0.01, noise=noise,
                                            rounding="stochastic", backend=backend), params)
    assert_matches_reference(got, expected, 1e-2 * 0.8)


@pytest.mark.parametrize("noise", NOISES)
def test_shards_across_chunk_boundaries_equal_the_whole_tensor(noise):
    whole = _params((3 * CHUNK + 11,), torch.bfloat16, seed=8)[0]
    cuts = (0, CHUNK - 1, CHUNK + 1, CHUNK + TILE + 3, 2 * CHUNK + 7, 3 * CHUNK + 11)
    shards = [whole[a:b].clone() for a, b in zip(cuts, cuts[1:])]
    assert emulation_backend.active()
    ak.perturb_([whole], 31, 1e-2, tids=[4], noise=noise, rounding="stochastic", backend="native")
    ak.perturb_(shards, 31, 1e-2, tids=[4] * len(shards), offsets=list(cuts[:-1]), noise=noise,
                rounding="stochastic", backend="native")
    assert torch.equal(torch.cat(shards).view(torch.int16), whole.view(torch.int16))


# The general kernel (sparsity, several directions, optimizer state): whole 16-byte parameter
# units in its vector loop, everything else (ragged ends, tensors whose global index and address
# disagree modulo 16 bytes) element by element.
_GENERAL_OPS = {
    "sparse-perturb": lambda p, backend, **k: ak.perturb_(p, 2**63 + 5, 1e-2, sparsity=0.4, rounding="stochastic",
                                                          backend=backend, **k),
    "two-directions": lambda p, backend, **k: ak.zo_update_(p, [11, 12], [0.5, -0.25], 1e-2, restore=1e-3,
                                                            weight_decay=0.1, rounding="stochastic", backend=backend,
                                                            **k),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("op", sorted(_GENERAL_OPS))
def test_general_kernel_over_several_chunks(dtype, noise, op):
    params = _params(SIZES, dtype, seed=10)
    got, expected = _emulated_and_reference(
        lambda p, backend: _GENERAL_OPS[op](p, backend, offsets=OFFSETS, noise=noise), params)
    assert_matches_reference(got, expected, 1e-2 + 1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("state_dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("noise", NOISES)
def test_general_kernel_state_over_several_chunks(dtype, state_dtype, noise):
    params = _params(SIZES, dtype, seed=11)
    buffers = [(0.1 * p.float()).to(state_dtype) for p in _params(SIZES, torch.float32, seed=12, scale=1.0)]
    squares = [(b.float() ** 2).to(state_dtype) for b in buffers]
    (got_p, got_b), (want_p, want_b) = on_backend_and_reference(
        ak.zo_momentum_update_, "native", [params, buffers], [21, 22], [0.5, -1.0], 1e-2, 0.9, restore=1e-3,
        weight_decay=0.05, sparsity=0.3, noise=noise, rounding="stochastic", offsets=OFFSETS)
    assert_matches_reference(got_p, want_p, 1e-3 + 1.5e-2)
    assert_matches_reference(got_b, want_b, 1.5, names="momentum_buffers")
    got, want = on_backend_and_reference(
        ak.zo_adam_update_, "native", [params, buffers, squares], [23], [0.75], 1e-3, 3, betas=(0.8, 0.9), eps=1e-2,
        noise=noise, rounding="stochastic", offsets=OFFSETS)
    assert_matches_reference(got[0], want[0], 1e-3 * 0.2 * 0.75 / 1e-2 / (1 - 0.8**3))
    assert_matches_reference(got[1], want[1], 0.2 * 0.75, names="exp_avgs")
    assert_matches_reference(got[2], want[2], 0.1 * 2 * 0.75 * 0.75 * 6, names="exp_avg_sqs")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("grad_dtype", (torch.float32, torch.float16))
@pytest.mark.parametrize("noise", NOISES)
def test_general_kernel_with_gradients_and_state_off_the_parameters_alignment(dtype, grad_dtype, noise):
    """Aligned parameters take the vector loop while their gradients (a masked addax_update_)
    or state buffers sit one element off a 16-byte boundary: those are read element by element."""
    params = _params((CHUNK + 1000, 5000), dtype, seed=14)
    grads = [misaligned(g.to(grad_dtype), grad_dtype.itemsize)
             for g in _params((CHUNK + 1000, 5000), torch.float32, seed=15, scale=1.0)]
    assert all(grad.data_ptr() % 16 for grad in grads)
    got, expected = _emulated_and_reference(
        lambda p, backend: ak.addax_update_(p, grads, 9, 0.8, 1e-2, 0.3, weight_decay=0.05, sparsity=0.3, noise=noise,
                                            rounding="stochastic", offsets=(0, 3 * CHUNK), backend=backend), params)
    assert_matches_reference(got, expected, 1e-2 * 0.8)
    # (clones would be aligned: each side gets its own misaligned buffers)
    runs = {}
    for backend in ("native", "reference"):
        p = clones(params)
        b = [misaligned(0.1 * t.float(), 4) for t in params]
        assert all(buffer.data_ptr() % 16 for buffer in b)
        ak.zo_momentum_update_(p, b, [21], [0.5], 1e-2, 0.9, restore=1e-3, noise=noise, rounding="stochastic",
                               offsets=(0, 3 * CHUNK), backend=backend)
        runs[backend] = (p, b)
    assert_matches_reference(runs["native"][0], runs["reference"][0], 1e-3 + 0.5e-2)
    assert_matches_reference(runs["native"][1], runs["reference"][1], 0.5, names="momentum_buffers")


@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("op", sorted(_GENERAL_OPS))
def test_general_kernel_shards_equal_the_whole_tensor(noise, op):
    """Shards cut at odd offsets take the element-by-element path where the whole tensor takes
    the vector loop: each element's result must not depend on the path."""
    whole = _params((2 * CHUNK + 11,), torch.bfloat16, seed=13)[0]
    cuts = (0, 3, CHUNK - 1, CHUNK + 8, 2 * CHUNK + 11)
    shards = [whole[a:b].clone() for a, b in zip(cuts, cuts[1:])]
    assert emulation_backend.active()
    _GENERAL_OPS[op]([whole], "native", tids=[4], noise=noise)
    _GENERAL_OPS[op](shards, "native", tids=[4] * len(shards), offsets=list(cuts[:-1]), noise=noise)
    assert torch.equal(torch.cat(shards).view(torch.int16), whole.view(torch.int16))


# Values at the edges of each 16-bit format, and shifts that carry them past the edge.  FLT_MAX
# (below, on zeros): float32 results within a few ulps of the largest float, where the fp16
# stochastic fast path's carry once overflowed into inf/NaN patterns.
FLT_MAX = 3.4028234663852886e38
_EDGES = {
    torch.bfloat16: ([float("inf"), float("-inf"), float("nan"), 3.3895313892515355e38, -3.3895313892515355e38,
                      1e-40, -1e-40, 0.0, -0.0, 1.0], (1e36, 1e-40)),
    torch.float16: ([float("inf"), float("-inf"), float("nan"), 65504.0, -65504.0, 6e-8, -1e-5, 6.1035e-5, 0.0,
                     1.0], (16.0, 3e-6)),
}


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("rounding", ("nearest", "stochastic"))
def test_edge_values_round_like_the_reference(dtype, rounding):
    """Non-finite values, saturation at the largest finite value and subnormals take the exact
    branch of the stochastic roundings (and the hardware conversions' edges for nearest): with
    Rademacher noise every element is one exact float32 addition, so the results are
    bit-identical to the reference's, NaNs aside (any NaN pattern is a NaN)."""
    values, scales = _EDGES[dtype]
    mixed = torch.tensor(values * 1000, dtype=torch.float32).to(dtype)  # vector path and ragged tail
    # Zeros: no lane of a vector is special, so the fast rounding path sees results near FLT_MAX.
    zeros = torch.zeros(4099, dtype=dtype)
    for param, scale in [(mixed, scale) for scale in scales] + [(zeros, FLT_MAX), (zeros, 3.40282e38)]:
        got, expected = _emulated_and_reference(
            lambda p, backend: ak.perturb_(p, 12, scale, noise="rademacher", rounding=rounding, backend=backend),
            [param])
        nan = torch.isnan(expected[0])
        assert torch.equal(torch.isnan(got[0]), nan)
        assert torch.equal(got[0][~nan].view(torch.int16), expected[0][~nan].view(torch.int16))


# ----------------------------------------------------------------------------- the emulator itself


@pytest.fixture(scope="module")
def self_check(tmp_path_factory):
    return emulation_build.compile_program("self_check", tmp_path_factory.mktemp("cuda_emulation"))


def _run_self_check(program, mode):
    return subprocess.run([str(program), mode], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("mode", ("coverage", "shuffle"))
def test_emulated_launch_runs_every_thread_once_and_shuffles_like_a_warp(self_check, mode):
    result = _run_self_check(self_check, mode)
    assert result.returncode == 0 and f"{mode} ok" in result.stdout, result.stdout + result.stderr


def test_emulated_shuffle_that_half_a_warp_never_reaches_fails_the_launch(self_check):
    result = _run_self_check(self_check, "divergent")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cudaErrorLaunchFailure" in result.stdout and "while 16 have exited" in result.stdout, result.stdout


def test_emulated_misaligned_vector_access_traps(self_check):
    result = _run_self_check(self_check, "misaligned")
    assert result.returncode < 0, f"exit status {result.returncode}: {result.stdout}"  # killed by the trap


# ----------------------------------------------------------------------------- the Gaussian transform


@pytest.fixture(scope="module")
def gaussian_bound_check(tmp_path_factory):
    return emulation_build.compile_program("gaussian_bound_check", tmp_path_factory.mktemp("cuda_emulation"))


def _transform_errors(program, mode: int) -> dict:
    """max and mean |z - z_float64| of the CUDA transform over every radius and angle uniform."""
    result = subprocess.run([str(program), str(mode)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    words = result.stdout.split()
    return {"max": float(words[1]), "mean": float(words[3]), "nonfinite": int(words[5])}


def test_gaussian_transform_with_exact_special_functions_is_float32_accurate(gaussian_bound_check):
    """With exact lg2/sqrt/sin/cos the factored transform (constant folded into the coefficient,
    the angle formed from u' - 1/2) is as accurate as the CPU kernels' (5e-6 max, 1e-7 mean)."""
    errors = _transform_errors(gaussian_bound_check, 0)
    assert errors["nonfinite"] == 0 and errors["max"] <= 5e-6 and errors["mean"] <= 1e-7, errors


@pytest.mark.parametrize("mode", (1, -1, 2), ids=("all-high", "all-low", "hashed-directions"))
def test_gaussian_transform_meets_spec_when_the_special_functions_err_by_their_bound(gaussian_bound_check, mode):
    """SPEC §1 (max 1e-3, mean 1e-6) over every uniform, with each MUFU approximation off by its
    documented bound.  Near u -> 1 an upward lg2 error exceeds -log2 u itself: the kernel's lower
    bound 1 - u keeps the radius finite, and |dz| within the 4e-4 device_math.cuh states."""
    errors = _transform_errors(gaussian_bound_check, mode)
    assert errors["nonfinite"] == 0, errors
    assert errors["max"] <= 4e-4 and errors["mean"] <= 1e-6, errors

"""The Triton backend against the independent references of SPEC §1–§2.

Without CUDA every test runs the kernels under Triton's interpreter on CPU tensors (conftest
sets TRITON_INTERPRET=1); with CUDA the same tests run the compiled kernels on the GPU, and
the ``requires_cuda`` tests add large sizes, the fast PTX transcendentals and the no-sync check.
References: ``addax_kernels.rng`` (Philox words, uniforms, z, rounding), the reference backend
(the fused pass), and float64 evaluations of the Gaussian formula.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

import addax_kernels as ak
from addax_kernels import rng
from conftest import HAS_CUDA, requires_cuda

triton = pytest.importorskip("triton")
tl = triton.language

from addax_kernels.backends import triton as triton_backend  # noqa: E402
from addax_kernels.backends.triton import kernels as K  # noqa: E402
from addax_kernels.backends.triton import launch  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
# The PTX approximations exist only in compiled kernels; the interpreter evaluates the same
# formulas with exact float32 log2/sin/cos.
FAST = HAS_CUDA
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SPEC_Z_MAX_ABS = 1e-3
SPEC_Z_MEAN_ABS = 1e-6
# Two float32 evaluations of z (this kernel's and rng's, each within a few float32 ulps of
# the float64 value for |z| <= 6) differ by at most a few 1e-7 near |z| = 6.  The PTX
# approximations add up to about 4e-6 (docs/triton.md), hence the larger bound on GPUs.
Z_FLOAT32_DISAGREEMENT = 1e-5 if FAST else 4e-6
# A float32 disagreement δ flips a 16-bit rounding (nearest or stochastic) with probability
# about δ / ulp(θ); with δ ≈ noise_weight · 3e-7 and the N(0, 0.02) test weights that is
# below 1e-3 on average (measured: about 2e-4), so 1% leaves room without hiding a bug.
MAX_FLIPPED_FRACTION = 0.01
HUGE_SEED = 2**64 - 12345  # >= 2**63: exercises the high key word and the signed encoding

# The interpreter evaluates kernels with numpy, which warns about inf/NaN inputs that the
# rounding tests feed on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


# ----------------------------------------------------------------------------- helpers


def _randn(shape, dtype, generator, scale=0.02):
    return (torch.randn(shape, generator=generator) * scale).to(dtype).to(DEVICE)


def _clone_all(tensors):
    return [t.clone() for t in tensors]


def assert_close_to_reference(actual, expected, noise_weight: float):
    """Equality with the reference backend up to the documented float32 differences.

    ``actual`` and ``expected`` are lists of tensors from one call.  float32 storage:
    |Δ| <= 4 ulp(result) + noise_weight · Z_FLOAT32_DISAGREEMENT per element, where
    noise_weight is the total factor in front of z in the update (the z formula and FMA
    contraction are the only differences).  16-bit storage: every element equal or one
    storage ulp apart, and at most MAX_FLIPPED_FRACTION of all elements of the call apart.
    """
    steps = []
    for index, (got, want) in enumerate(zip(actual, expected)):
        name = f"params[{index}]"
        assert got.dtype == want.dtype and got.shape == want.shape, name
        a = got.detach().cpu().flatten()
        e = want.detach().cpu().flatten()
        assert torch.equal(torch.isnan(a), torch.isnan(e)), f"{name}: NaN positions differ"
        a, e = a[~torch.isnan(e)], e[~torch.isnan(e)]
        if got.dtype == torch.float32:
            ulp = torch.finfo(torch.float32).eps * e.abs()
            tolerance = 4 * ulp + noise_weight * Z_FLOAT32_DISAGREEMENT
            excess = ((a - e).abs() - tolerance).max().item()
            assert excess <= 0.0, f"{name}: float32 difference exceeds the tolerance by {excess}"
            continue
        # Sign-magnitude bits to positions on the number line: neighbours differ by one.
        a_bits = a.view(torch.int16).to(torch.int32)
        e_bits = e.view(torch.int16).to(torch.int32)
        a_position = torch.where(a_bits < 0, -(a_bits & 0x7FFF), a_bits)
        e_position = torch.where(e_bits < 0, -(e_bits & 0x7FFF), e_bits)
        distance = (a_position - e_position).abs()
        assert int(distance.max()) <= 1, f"{name}: differs by {int(distance.max())} storage ulps"
        steps.append(distance)
    if steps:
        flipped = (torch.cat(steps) > 0).double().mean().item()
        assert flipped <= MAX_FLIPPED_FRACTION, f"{flipped:.4%} of elements one storage ulp apart"


def _run_both(op, params, *args, **kwargs):
    """Run ``op`` with the Triton backend and with the reference backend on copies."""
    mine = _clone_all(params)
    reference = _clone_all(params)
    op(mine, *args, backend="triton", **kwargs)
    op(reference, *args, backend="reference", **kwargs)
    return mine, reference


# Sizes: a single element, a partial Philox block, more than one tile with a tail, and primes.
MIXED_SIZES = ((1,), (3,), (4097,), (7, 19), (131,))


def _mixed_params(dtype, generator):
    return [_randn(shape, dtype, generator) for shape in MIXED_SIZES]


# ----------------------------------------------------------------------------- availability


def test_availability_reasons(monkeypatch):
    if HAS_CUDA:
        assert triton_backend.unavailable_reason(torch.device("cuda")) is None
    else:
        assert triton_backend.unavailable_reason(torch.device("cpu")) is None
        assert "CPU tensors only" in triton_backend.unavailable_reason(torch.device("cuda"))
    assert "not on meta" in triton_backend.unavailable_reason(torch.device("meta"))
    monkeypatch.setitem(sys.modules, "triton", None)  # as if triton were not installed
    reason = triton_backend.unavailable_reason(DEVICE)
    assert reason is not None and "triton cannot be imported" in reason


# ----------------------------------------------------------------------------- z itself


@triton.jit
def _words_kernel(out_words, out_uniforms, block_index_ptr, seed_lo, seed_hi, tid, COUNT: tl.constexpr):
    index = tl.arange(0, COUNT)
    blocks = tl.load(block_index_ptr + index)
    seed = (seed_hi.to(tl.uint32, bitcast=True).to(tl.uint64) << 32) | seed_lo.to(tl.uint32, bitcast=True).to(tl.uint64)
    w0, w1, w2, w3 = K._philox_words(seed, blocks, tid.to(tl.uint32), 0)
    tl.store(out_words + index * 4, w0.to(tl.int32, bitcast=True))
    tl.store(out_words + index * 4 + 1, w1.to(tl.int32, bitcast=True))
    tl.store(out_words + index * 4 + 2, w2.to(tl.int32, bitcast=True))
    tl.store(out_words + index * 4 + 3, w3.to(tl.int32, bitcast=True))
    tl.store(out_uniforms + index * 4, K._uniform(w0))
    tl.store(out_uniforms + index * 4 + 1, K._uniform(w1))
    tl.store(out_uniforms + index * 4 + 2, K._uniform(w2))
    tl.store(out_uniforms + index * 4 + 3, K._uniform(w3))


@pytest.mark.parametrize("seed", [0, 1, 0xDEADBEEF, 2**63, HUGE_SEED])
def test_philox_words_and_uniforms_are_bit_exact(seed):
    count = 64
    tid = 0xFFFFFFFE
    # Block indices past 2**32 exercise the high counter word.
    blocks = torch.tensor([0, 1, 2**32 - 1, 2**32, 2**40 + 5] + list(range(1000, 1000 + count - 5)), dtype=torch.int64)
    words = torch.empty(count * 4, dtype=torch.int32, device=DEVICE)
    uniforms = torch.empty(count * 4, dtype=torch.float32, device=DEVICE)
    _words_kernel[(1,)](words, uniforms, blocks.to(DEVICE), launch._signed_int32(seed & 0xFFFFFFFF),
                        launch._signed_int32(seed >> 32), tid, COUNT=count)
    counter = torch.stack(
        [blocks & 0xFFFFFFFF, blocks >> 32, torch.full_like(blocks, tid), torch.zeros_like(blocks)], -1
    )
    key = torch.tensor([seed & 0xFFFFFFFF, seed >> 32])
    expected_words = rng.philox4x32(counter, key).reshape(-1)
    assert torch.equal(words.cpu().to(torch.int64) & 0xFFFFFFFF, expected_words)
    assert torch.equal(uniforms.cpu(), rng.uniforms(expected_words))


@triton.jit
def _box_muller_kernel(out_even, out_odd, radius_ptr, angle_ptr, BLOCK: tl.constexpr, FAST_MATH: tl.constexpr):
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    even, odd = K._box_muller(tl.load(radius_ptr + index), tl.load(angle_ptr + index), FAST_MATH)
    tl.store(out_even + index, even)
    tl.store(out_odd + index, odd)


def test_gaussian_transform_over_every_uniform():
    """Every one of the 2**23 possible uniforms as radius and as angle input, against float64."""
    # The interpreter is fastest with few large programs; compiled code wants small tiles.
    count, block = 1 << 23, (1 << 10 if HAS_CUDA else 1 << 18)
    all_uniforms = rng.uniforms(torch.arange(count, dtype=torch.int64) << 9)
    radius_u = all_uniforms
    angle_u = all_uniforms.flip(0)
    even = torch.empty(count, device=DEVICE)
    odd = torch.empty(count, device=DEVICE)
    _box_muller_kernel[(count // block,)](even, odd, radius_u.to(DEVICE), angle_u.to(DEVICE), BLOCK=block,
                                          FAST_MATH=FAST)
    radius = torch.sqrt(-2.0 * torch.log(radius_u.double()))
    angle = 2.0 * math.pi * angle_u.double()
    for got, want in ((even, radius * torch.cos(angle)), (odd, radius * torch.sin(angle))):
        got = got.cpu().double()
        assert torch.isfinite(got).all()
        error = (got - want).abs()
        assert error.max().item() <= SPEC_Z_MAX_ABS
        assert error.mean().item() <= SPEC_Z_MEAN_ABS


@pytest.mark.parametrize("seed, tid, offset", [(0, 0, 0), (HUGE_SEED, 7, 3), (2**63, 2**32 - 1, 2**40 + 1)])
def test_gaussian_noise_matches_spec_bound(seed, tid, offset):
    count = 1 << 12 if not HAS_CUDA else 1 << 20
    z = ak.noise(count, seed, tid=tid, offset=offset, backend="triton", device=DEVICE).cpu().double()
    exact = rng.noise(count, seed, tid, offset, dtype=torch.float64)
    error = (z - exact).abs()
    assert torch.isfinite(z).all()
    assert error.max().item() <= SPEC_Z_MAX_ABS
    assert error.mean().item() <= SPEC_Z_MEAN_ABS


@pytest.mark.parametrize("seed, tid, offset", [(5, 0, 0), (HUGE_SEED, 3, 77), (2**63, 2**32 - 1, 2**36 + 5)])
def test_rademacher_noise_is_bit_exact(seed, tid, offset):
    count = 1000
    z = ak.noise(count, seed, tid=tid, offset=offset, noise="rademacher", backend="triton", device=DEVICE)
    assert torch.equal(z.cpu(), rng.noise(count, seed, tid, offset, noise="rademacher"))


# ----------------------------------------------------------------------------- rounding


def _special_float32_values(generator):
    """Random bit patterns of every exponent, plus the edge cases of SPEC §2."""
    random_bits = torch.randint(-(2**31), 2**31, (3000,), generator=generator, dtype=torch.int64).to(torch.int32)
    edges = torch.tensor(
        [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1.0, -1.0, 3.3895e38, -3.3895e38, 3.4e38,
         65504.0, 65519.0, 65520.0, -65519.0, 70000.0, 6.0e-8, 2.9e-8, 3.0e-8, -1.0e-9, 1.0e-40, -1.0e-45,
         1.00390625, 1.001953125, 1.0029296875, 0.1, -0.3],
        dtype=torch.float32,
    )
    # Exact midpoints between neighbouring bf16 (float32 bits + 0x8000) and normal fp16 values
    # (+ 2**12: fp16 keeps 10 of float32's 23 fraction bits), and their float32 neighbours.
    base = torch.randn(400, generator=generator)
    bf16_ties = base.to(torch.bfloat16).float().view(torch.int32) + 0x8000
    fp16_ties = base.to(torch.float16).float().view(torch.int32) + (1 << 12)
    ties = torch.cat([bf16_ties, fp16_ties])
    near_ties = torch.cat([ties - 1, ties, ties + 1]).view(torch.float32)
    return torch.cat([random_bits.view(torch.float32), edges, near_ties])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_rounding_is_bit_exact(dtype, rounding, generator):
    """θ = 0, α = 0, lr = 1: the float32 result is exactly x = 0 - grad, so only the rounding is tested."""
    values = _special_float32_values(generator)
    grads = (-values).to(DEVICE)
    seed, tid, offset = HUGE_SEED, 9, 13
    param = torch.zeros(values.numel(), dtype=dtype, device=DEVICE)
    ak.addax_update_([param], [grads], seed, 0.0, 1.0, 0.0, tids=[tid], offsets=[offset],
                     rounding=rounding, backend="triton")
    words = rng.rounding_words(seed, tid, offset, values.numel()) if rounding == "stochastic" else None
    expected = rng.round_to_dtype(0.0 - grads.cpu(), dtype, rounding, words)
    got = param.cpu()
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan].view(torch.int16), expected[~nan].view(torch.int16))


# ----------------------------------------------------------------------------- the ops


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_perturb_matches_reference(dtype, noise, rounding, generator):
    if dtype == torch.float32 and rounding == "stochastic":
        pytest.skip("float32 storage is never rounded")
    params = _mixed_params(dtype, generator)
    mine, reference = _run_both(ak.perturb_, params, HUGE_SEED, 1e-3, noise=noise, rounding=rounding)
    assert_close_to_reference(mine, reference, 1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_zo_update_several_directions_with_restore_and_decay(dtype, noise, rounding, generator):
    params = _mixed_params(dtype, generator)
    seeds = [11, 2**63 + 5, 123456789]
    coeffs = [0.7, -1.3, 0.25]
    lr, restore = 0.01, 1e-3
    decay = [0.1, 0.0, 0.05, 0.0, 0.2]
    mine, reference = _run_both(ak.zo_update_, params, seeds, coeffs, lr, restore=restore, weight_decay=decay,
                                tids=[4, 0, 9, 2, 1], noise=noise, rounding=rounding)
    weight = restore + lr * sum(abs(c) for c in coeffs)
    assert_close_to_reference(mine, reference, weight)


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_zo_update_single_direction_and_decay_mask(noise, generator):
    params = _mixed_params(torch.float32, generator)
    mine, reference = _run_both(ak.zo_update_, params, 77, 2.5, 0.1, weight_decay=0.01,
                                decay_mask=[True, False, True, False, True], noise=noise)
    assert_close_to_reference(mine, reference, 0.25)


@pytest.mark.parametrize("param_dtype, grad_dtype", [
    (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
    (torch.bfloat16, torch.float16), (torch.float16, torch.float16),
])
@pytest.mark.parametrize("noise, rounding", [("gaussian", "nearest"), ("gaussian", "stochastic"),
                                             ("rademacher", "stochastic")])
def test_addax_update_with_grads_of_another_dtype(param_dtype, grad_dtype, noise, rounding, generator):
    params = _mixed_params(param_dtype, generator)
    grads = [_randn(p.shape, grad_dtype, generator, scale=1.0) for p in params]
    lr, alpha, zo_grad = 0.01, 0.3, -4.0
    mine, reference = _run_both(
        lambda ps, *a, **k: ak.addax_update_(ps, grads, *a, **k), params, HUGE_SEED, zo_grad, lr, alpha,
        weight_decay=[0.0, 0.1, 0.0, 0.1, 0.0], noise=noise, rounding=rounding,
    )
    assert_close_to_reference(mine, reference, lr * alpha * abs(zo_grad))


@pytest.mark.parametrize("dtype", DTYPES)
def test_device_tensor_scalars_equal_host_floats(dtype, generator):
    """0-dim tensors on the params' device take the in-kernel load path; values are the same."""
    params = _mixed_params(dtype, generator)
    grads = [_randn(p.shape, torch.float32, generator, scale=1.0) for p in params]

    def scalar(value):
        return torch.tensor(value, dtype=torch.float32, device=DEVICE)

    host, device_scalars = _clone_all(params), _clone_all(params)
    ak.perturb_(host, 3, 1e-3, backend="triton")
    ak.perturb_(device_scalars, 3, scalar(1e-3), backend="triton")
    ak.zo_update_(host, [3, 4], [0.5, -0.25], 0.1, restore=1e-3, backend="triton")
    ak.zo_update_(device_scalars, [3, 4], [scalar(0.5), scalar(-0.25)], scalar(0.1), restore=scalar(1e-3),
                  backend="triton")
    ak.addax_update_(host, grads, 5, 2.0, 0.01, 0.5, rounding="stochastic", backend="triton")
    ak.addax_update_(device_scalars, grads, 5, scalar(2.0), scalar(0.01), 0.5, rounding="stochastic",
                     backend="triton")
    for a, e in zip(device_scalars, host):
        assert torch.equal(a, e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_shards_equal_the_unsharded_tensor(dtype, noise, generator):
    """Shards at odd global offsets (unaligned tiles) reproduce the whole tensor bit for bit."""
    whole = _randn((4099,), dtype, generator)
    cuts = [0, 1, 130, 1003, 4099]
    shards = [whole[a:b].clone() for a, b in zip(cuts, cuts[1:])]
    offsets = cuts[:-1]
    ak.zo_update_([whole], [21, HUGE_SEED], [1.0, -0.5], 0.01, restore=1e-3, weight_decay=0.1, tids=[6],
                  noise=noise, rounding="stochastic", backend="triton")
    ak.zo_update_(shards, [21, HUGE_SEED], [1.0, -0.5], 0.01, restore=1e-3, weight_decay=0.1,
                  tids=[6] * len(shards), offsets=offsets, noise=noise, rounding="stochastic", backend="triton")
    assert torch.equal(torch.cat(shards), whole)


def test_repeated_calls_on_the_same_tensors_follow_changed_metadata(generator):
    """Steps on the same tensors (same addresses: cached tables) with new tids, offsets, decay."""
    params = _mixed_params(torch.float32, generator)
    mine, reference = _clone_all(params), _clone_all(params)
    steps = (([0, 1, 2, 3, 4], [0] * 5, 0.0), ([4, 3, 2, 1, 0], [0] * 5, 0.0),
             ([4, 3, 2, 1, 0], [8, 0, 1, 0, 5], 0.0), ([4, 3, 2, 1, 0], [8, 0, 1, 0, 5], 0.5),
             ([0, 1, 2, 3, 4], [0] * 5, 0.0))
    for step, (tids, offsets, decay) in enumerate(steps):
        for tensors, backend in ((mine, "triton"), (reference, "reference")):
            ak.zo_update_(tensors, 99 + step, 1.0, 0.1, weight_decay=decay, tids=tids, offsets=offsets,
                          backend=backend)
        # Differences of earlier steps carry over: the bound grows with the step count.
        assert_close_to_reference(mine, reference, 0.1 * (step + 1))


class _RawTensor:
    """Only what the launcher reads from a tensor: its address and element size."""

    def __init__(self, pointer, size):
        self._pointer, self._size = pointer, size

    def data_ptr(self):
        return self._pointer

    def element_size(self):
        return self._size


def test_rejects_addresses_that_are_not_whole_elements_apart():
    with pytest.raises(ValueError, match="not aligned"):
        launch._element_deltas([_RawTensor(4096, 4), _RawTensor(4096 + 4 * 10 + 2, 4)], [0, 0])
    deltas, aligned = launch._element_deltas([_RawTensor(4096, 4), _RawTensor(4096 + 4 * 10, 4)], [0, 2])
    assert deltas == [0, 8] and aligned
    assert not launch._element_deltas([_RawTensor(4096, 4), _RawTensor(4096 + 4 * 10, 4)], [0, 1])[1]


def test_custom_op_opcheck():
    params = [torch.randn(33, device=DEVICE), torch.randn(4, device=DEVICE)]
    args = (
        params, [], [7, -5], [0, 1], [0, 0], [0.0, 0.1], [1e-3, 0.01, 0.0, 0.5, -0.5], None,
        True, 2, False, "gaussian", "nearest", "triton",
    )
    torch.library.opcheck(torch.ops.addax_kernels.fused_update_.default, args)


# ----------------------------------------------------------------------------- compiled code, offline

# Compiles the kernel for sm_90 and sm_80 with Triton's bundled ptxas, in a process without
# TRITON_INTERPRET, so the GPU-only paths (PTX approximations, alignment hints, hardware bf16
# conversion, the autotuned configurations) are built and inspected even without a GPU.
_OFFLINE_COMPILE = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from addax_kernels.backends.triton import kernels as K
assert not K.INTERPRETED
pointer = {0: "*fp32", 1: "*i16", 2: "*i16"}
report = {}
for name, arch, storage, grad_storage, noise, rounding, directions, block, warps in (
    ("perturb-fp32", 90, 0, 0, 0, 0, 0, 4096, 8),
    ("zo-bf16-stochastic-3dirs", 90, 2, 0, 1, 1, 3, 2048, 4),
    ("addax-fp16-grad-bf16", 80, 1, 2, 0, 1, 1, 8192, 16),
):
    has_grad = grad_storage != 0
    signature = {"table_ptr": "*i64", "param_base": pointer[storage],
                 "grad_base": pointer[grad_storage] if has_grad else pointer[storage],
                 "scalars_ptr": "*fp32" if directions > 1 else "*i64", "seeds_ptr": "*i64",
                 "num_tensors": "i32", "search_steps": "i32", "seed_lo": "i32", "seed_hi": "i32",
                 "shift": "fp32", "lr": "fp32", "grad_coeff": "fp32", "coeff0": "fp32", "size_bucket": "i32"}
    constants = dict(BLOCK=block, START_COLUMN=K.COL_FIRST_PROGRAM + K.BLOCK_CHOICES.index(block),
                     ALIGNED=True, STORAGE=storage, GRAD_STORAGE=grad_storage, HAS_SHIFT=directions != 1,
                     NUM_DIRECTIONS=directions, HAS_GRAD=has_grad, HAS_DECAY=True, NOISE=noise,
                     ROUNDING=rounding, SCALARS_ON_DEVICE=directions > 1, FAST=True)
    signature.update({key: "constexpr" for key in constants})
    source = triton.compiler.ASTSource(fn=K.fused_update_kernel, signature=signature, constexprs=constants,
                                       attrs={(i,): [["tt.divisibility", 16]] for i in range(5)})
    ptx = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                         options={"num_warps": warps, "num_stages": 1}).asm["ptx"]
    report[name] = {"loads": sorted(set(re.findall(r"ld\.global[.\w:]*", ptx))),
                    "stores": sorted(set(re.findall(r"st\.global[.\w:]*", ptx))),
                    "lg2": "lg2.approx.ftz.f32" in ptx, "sin": "sin.approx.ftz.f32" in ptx,
                    "cos": "cos.approx.ftz.f32" in ptx, "local": "ld.local" in ptx or "st.local" in ptx}
json.dump(report, sys.stdout)
"""


def test_offline_compile_for_sm90_and_sm80():
    if HAS_CUDA:
        pytest.skip("the CUDA tests run the compiled kernels themselves")
    import json
    import os
    import subprocess
    from pathlib import Path

    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", _OFFLINE_COMPILE], env=env, capture_output=True, text=True,
                            timeout=600)
    if result.returncode and ("ptxas" in result.stderr and "not found" in result.stderr):
        pytest.skip("this triton install has no ptxas")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    fp32 = report["perturb-fp32"]
    # Full tiles: 16-byte accesses; the tail tile is masked and scalar.
    assert any(load.endswith("v4.b32") for load in fp32["loads"]), fp32
    assert "st.global.v4.b32" in fp32["stores"], fp32
    assert fp32["lg2"] and fp32["sin"] and fp32["cos"]
    sixteen_bit = report["zo-bf16-stochastic-3dirs"]
    assert any(load.endswith("v2.b32") for load in sixteen_bit["loads"]), sixteen_bit
    assert not sixteen_bit["lg2"]  # Rademacher noise needs no transcendentals
    for name, entry in report.items():
        assert not entry["local"], f"{name} spills to local memory"


# ----------------------------------------------------------------------------- GPU only


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_gpu_large_tensors_match_reference(dtype, rounding):
    generator = torch.Generator().manual_seed(7)
    shapes = [(1 << 22,), (4093, 1021), (1,), (65537,)]
    params = [_randn(shape, dtype, generator) for shape in shapes]
    grads = [_randn(shape, torch.bfloat16, generator, scale=1.0) for shape in shapes]
    mine, reference = _run_both(ak.perturb_, params, HUGE_SEED, 1e-3, rounding=rounding)
    assert_close_to_reference(mine, reference, 1e-3)
    mine, reference = _run_both(ak.zo_update_, params, [1, 2], [0.5, 1.5], 0.01, restore=1e-3,
                                weight_decay=0.1, rounding=rounding)
    assert_close_to_reference(mine, reference, 1e-3 + 0.02)
    mine, reference = _run_both(lambda ps, *a, **k: ak.addax_update_(ps, grads, *a, **k), params, 3, 2.0, 0.01,
                                0.5, rounding=rounding)
    assert_close_to_reference(mine, reference, 0.01)


@requires_cuda
def test_gpu_gaussian_noise_over_sixteen_million_elements():
    count = 1 << 24
    z = ak.noise(count, HUGE_SEED, tid=3, backend="triton", device="cuda").double()
    exact = rng.noise(count, HUGE_SEED, 3, 0, dtype=torch.float64, device="cuda")
    error = (z - exact).abs()
    assert torch.isfinite(z).all()
    assert error.max().item() <= SPEC_Z_MAX_ABS
    assert error.mean().item() <= SPEC_Z_MEAN_ABS


@requires_cuda
def test_gpu_device_scalars_do_not_sync():
    params = [torch.randn(1 << 20, device="cuda", dtype=torch.bfloat16), torch.randn(333, device="cuda")]
    scale = torch.tensor(1e-3, device="cuda")
    lr = torch.tensor(0.01, device="cuda")
    ak.perturb_(params, 1, scale, backend="triton")  # first call: tuning and table upload
    ak.zo_update_(params, [1, 2], [scale, scale], lr, backend="triton")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(3):
            ak.perturb_(params, step, scale, backend="triton")
            ak.zo_update_(params, [step, step + 1], [scale, scale], lr, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")


@requires_cuda
def test_gpu_runs_on_the_tensors_device_and_current_stream():
    params = [torch.randn(1 << 16, device="cuda")]
    expected = params[0].clone()
    ak.perturb_([expected], 8, 1e-2, backend="reference")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        ak.perturb_(params, 8, 1e-2, backend="triton")
    stream.synchronize()
    assert_close_to_reference(params, [expected], 1e-2)

"""Native-backend-specific tests of the extension addax_kernels._C (csrc/).

What every backend must do (each op, dtype, noise, rounding, state, sparsity, seeds, shards,
offsets) is tested once for all backends in test_conformance.py.  Here: the extension's own
Philox and transform, its CPU paths (SIMD variants, thread counts, the fused one-direction loop,
the SIMD counter-wrap path, 2^31+ elements, the rounding of every fp16 gap), the backend
protocol's mechanics (no references kept, gradients read at the group's positions, argument
checks), the CUDA kernels' structure (vector and masked paths, chunks, launch splitting, device
seeds under graph replay) and the rules of the SASS report.

Independent references: the Random123 known-answer vectors (tests/known_answers.py),
``addax_kernels.rng``, the float64 evaluation of the Box–Muller formula and the reference
backend; comparisons with the reference use the suite's one helper (tests/tolerance.py).
Integer rules (words, uniforms, signs, masks, roundings) are bit-exact on every device; the
CPU transform is pinned at 5e-6 / 1e-7 (measured ~7e-7 max, ~3e-8 mean), well inside SPEC §1;
the CUDA transform is held to SPEC §1 (1e-3 max, 1e-6 mean over a million).
"""

from __future__ import annotations

import math
import os
import re

import numpy as np
import pytest
import torch

import addax_kernels as ak
from addax_kernels import rng
from addax_kernels.backends import native
from cuda_emulation import backend as cuda_emulation
from known_answers import PHILOX_KAT
from tolerance import assert_matches_reference, on_backend_and_reference

from conftest import HAS_CUDA

NATIVE_REASON = native.unavailable_reason(torch.device("cpu"))
requires_native = pytest.mark.skipif(NATIVE_REASON is not None, reason=f"native backend: {NATIVE_REASON}")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NOISES = ("gaussian", "rademacher")
ROUNDINGS = ("nearest", "stochastic")
BIG_SEED = 2**64 - 12345  # exercises both key words


def test_extension_is_built_unless_skipped_on_purpose():
    """A broken build must fail CI, not silently skip every test below."""
    if os.environ.get("ADDAX_KERNELS_NO_NATIVE"):
        pytest.skip("ADDAX_KERNELS_NO_NATIVE is set")
    assert NATIVE_REASON is None, NATIVE_REASON
    info = native.build_info()
    assert info["built"] and info["cpu_simd"] in ("avx512", "avx2", "baseline")


def test_unavailable_reason_explains_devices():
    assert "cpu and cuda" in native.unavailable_reason(torch.device("meta")) or NATIVE_REASON is not None
    reason = native.unavailable_reason(torch.device("cuda"))
    if not HAS_CUDA:
        assert reason is not None and len(reason) > 10


# ----------------------------------------------------------------------------- words and uniforms

@requires_native
def test_philox_known_answers():
    counters = np.array([c for c, _, _ in PHILOX_KAT], dtype=np.uint32)
    keys = np.array([k for _, k, _ in PHILOX_KAT], dtype=np.uint32)
    expected = np.array([w for _, _, w in PHILOX_KAT], dtype=np.uint32)
    np.testing.assert_array_equal(native.philox4x32(counters, keys), expected)


@requires_native
def test_philox_words_match_reference_bit_exactly():
    generator = np.random.default_rng(7)
    counters = generator.integers(0, 2**32, size=(20000, 4), dtype=np.uint64)
    keys = generator.integers(0, 2**32, size=(20000, 2), dtype=np.uint64)
    counters[:8] = [[2**32 - 1 - i, i, 2**32 - 1, i & 1] for i in range(8)]  # carries and extremes
    expected = rng.philox4x32(counters.astype(np.int64), keys.astype(np.int64))
    np.testing.assert_array_equal(native.philox4x32(counters, keys), expected)


@requires_native
def test_uniforms_match_reference_bit_exactly():
    words = np.concatenate(
        [np.random.default_rng(8).integers(0, 2**32, size=100000, dtype=np.uint64),
         np.array([0, 1, 511, 512, 2**31, 2**32 - 513, 2**32 - 512, 2**32 - 1], dtype=np.uint64)]
    )
    got = native.uniforms(words)
    expected = rng.uniforms(torch.from_numpy(words.astype(np.int64))).numpy()
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))
    assert got.min() > 0 and got.max() < 1


# ----------------------------------------------------------------------------- Gaussian z


def _float64_box_muller(words: np.ndarray) -> np.ndarray:
    u = (2.0 * (words >> 9).astype(np.float64) + 1.0) * 2.0**-24
    r0, r1 = np.sqrt(-2.0 * np.log(u[:, 0])), np.sqrt(-2.0 * np.log(u[:, 2]))
    t0, t1 = 2.0 * math.pi * u[:, 1], 2.0 * math.pi * u[:, 3]
    return np.stack([r0 * np.cos(t0), r0 * np.sin(t0), r1 * np.cos(t1), r1 * np.sin(t1)], axis=1)


@requires_native
def test_gaussian_z_within_spec_bound_over_a_million_elements():
    z = ak.noise(1 << 20, BIG_SEED, tid=3, offset=2**33 + 1, backend="native")
    exact = rng.noise(1 << 20, BIG_SEED, tid=3, offset=2**33 + 1, dtype=torch.float64)
    error = (z.double() - exact).abs()
    assert torch.isfinite(z).all()
    assert error.max().item() <= 1e-3 and error.mean().item() <= 1e-6  # SPEC §1
    assert error.max().item() <= 5e-6 and error.mean().item() <= 1e-7  # measured ~5e-7 / ~3e-8


@requires_native
def test_gaussian_transform_at_the_ends_of_the_uniform_range():
    """u -> 1 is where a fast log turns positive (NaN radius); u -> 0 gives the largest |z|."""
    top = 0xFFFFFFFF  # u = 1 - 2^-24
    near_top = [top - (k << 9) for k in range(64)]
    bottom = [k << 9 for k in range(64)]  # u = (2k + 1) 2^-24
    quarter = [((1 << 21) + d) << 9 for d in range(-32, 32)]  # u around 1/4: sin/cos swap
    half = [((1 << 22) + d) << 9 for d in range(-32, 32)]
    values = np.array(near_top + bottom + quarter + half, dtype=np.uint64)
    blocks = np.stack(np.meshgrid(values, values[::7], indexing="ij"), -1).reshape(-1, 2)
    words = np.concatenate([blocks, blocks[:, ::-1]], axis=1).astype(np.uint32)
    z = native._C.gaussian_from_words(words)
    assert np.isfinite(z).all()
    np.testing.assert_allclose(z, _float64_box_muller(words.astype(np.uint64)), rtol=0, atol=5e-6)


# ----------------------------------------------------------------------------- the fused one-direction loop


def _random_params(sizes, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, generator=generator) * 0.05).to(dtype) for size in sizes]


@requires_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("restore", (None, 1e-3))
def test_fused_one_direction_loop_equals_the_general_path(dtype, noise, restore):
    """One direction without state (MeZO's step) runs as one fused loop per tile; it must equal,
    bit for bit, the general path (a second direction with coefficient 0 adds exactly +0)."""
    params = _random_params((3, 4097, 129), dtype, seed=4)
    kwargs = dict(restore=restore, weight_decay=0.1, decay_mask=[True, False, True], noise=noise)
    fused = [p.clone() for p in params]
    ak.zo_update_(fused, [BIG_SEED], [-0.9], 1e-2, backend="native", **kwargs)
    general = [p.clone() for p in params]
    ak.zo_update_(general, [BIG_SEED, 5], [-0.9, 0.0], 1e-2, backend="native", **kwargs)
    for a, b in zip(fused, general):
        assert torch.equal(a.view(torch.int8), b.view(torch.int8))


# ----------------------------------------------------------------------------- indexing and threads


@requires_native
@pytest.mark.parametrize("dtype", DTYPES)
def test_results_do_not_depend_on_the_thread_count(dtype):
    params = _random_params((100003, 5, 4097), dtype, seed=6)
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out = [p.clone() for p in params]
            ak.zo_update_(out, [3, 4], [1.0, -2.0], 1e-3, restore=1e-3, rounding="stochastic", backend="native")
            results.append(out)
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a.view(-1).float(), b.view(-1).float())


@requires_native
def test_every_instruction_set_variant_gives_identical_results():
    """The AVX-512, AVX2 and baseline tile kernels that this CPU supports agree bit for bit."""
    variants = native._C.supported_tile_kernels()
    default = native._C.simd_target()
    params = _random_params((5, 4097, 1031), torch.bfloat16, seed=11)
    grads = _random_params((5, 4097, 1031), torch.float32, seed=12)
    results = {}
    try:
        for variant in variants:
            assert native._C.use_tile_kernel(variant)
            for noise in NOISES:
                out = [p.clone() for p in params]
                ak.addax_update_(out, grads, 2**33 + 1, 0.5, 1e-2, 0.5, weight_decay=0.1, noise=noise,
                                 rounding="stochastic", offsets=[0, 2**34 - 6, 2**39 - 300], backend="native")
                results[variant, noise] = out
    finally:
        native._C.use_tile_kernel(default)
    assert not native._C.use_tile_kernel("sse9")
    for (variant, noise), out in results.items():
        for a, b in zip(out, results[variants[0], noise]):
            assert torch.equal(a.view(torch.int16), b.view(torch.int16)), (variant, noise)


@requires_native
@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize(
    "offset",
    [2**31 - 5, 2**32 - 3, 2**34 - 6, 2**39 - 300, 2**62 + 1, 2**63 - 5000],
    ids=["2^31", "2^32", "block-2^32", "rademacher-block-2^32", "2^62", "2^63-end"],
)
def test_offsets_past_32_bits(noise, offset):
    """Global indices past 2^31/2^32, and Philox block indices whose high counter word carries
    inside a tile (the SIMD Philox then falls back to its scalar loop)."""
    params = _random_params((4001,), torch.float16, seed=8)
    (got,), (expected,) = on_backend_and_reference(ak.perturb_, "native", [params], BIG_SEED, 1e-2, noise=noise,
                                                   rounding="stochastic", offsets=[offset])
    assert_matches_reference(got, expected, 1e-2, exact=noise == "rademacher")


def _available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@requires_native
@pytest.mark.slow
@pytest.mark.skipif(_available_memory_bytes() < 12 * 2**30, reason="needs ~4.5 GiB for a 2^31+ element tensor")
def test_tensor_past_2_to_the_31_elements():
    """Local element indices past int32 inside one tensor (4 GiB of bf16; Rademacher keeps it fast).

    The checked windows cover the start, the 2^31 boundary of the local element index and the
    last, partial tile; count_nonzero checks that every element was written (±1, never 0).
    """
    numel = 2**31 + 4099
    tensor = torch.zeros(numel, dtype=torch.bfloat16)
    ak.perturb_(tensor, 77, 1.0, noise="rademacher", tids=[9], backend="native")
    for start in (0, 2**31 - 2048, numel - 3000):
        window = tensor[start : start + 3000].float()
        expected = rng.noise(window.numel(), 77, tid=9, offset=start, noise="rademacher")
        assert torch.equal(window, expected), f"window at {start}"
    assert int(torch.count_nonzero(tensor.view(torch.int16))) == numel  # every element written: ±1
    del tensor


# ----------------------------------------------------------------------------- rounding edge cases


@requires_native
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_rounding_of_special_and_boundary_values_matches_reference(dtype, rounding):
    """Only the float32 -> dtype step runs (see _round_through_native), against rng.round_to_dtype."""
    info = torch.finfo(dtype)
    base = torch.tensor(
        [0.0, -0.0, info.tiny, -info.tiny, info.tiny / 4, info.max, -info.max, 1.0, -1.0, 65504.0, 70000.0,
         float("inf"), -float("inf"), float("nan"), 3.0e38, -3.0e38, 1e-7, -1e-7, 5.96e-8, 2.0**-25],
        dtype=torch.float32,
    )
    sweep = torch.linspace(-4, 4, 4001, dtype=torch.float32) + 1.0 / 3.0
    x32 = torch.cat([base, sweep, torch.randn(8000, generator=torch.Generator().manual_seed(9)) * 1e-3])
    words = rng.rounding_words(21, 0, 0, x32.numel())
    expected = rng.round_to_dtype(x32, dtype, rounding, words if rounding == "stochastic" else None)
    got = _round_through_native(x32, dtype, rounding)
    same = (got.float() == expected.float()) | (torch.isnan(got.float()) & torch.isnan(expected.float()))
    assert bool(same.all()), x32[~same][:10]


@requires_native
def test_fp16_stochastic_rounding_in_every_gap_matches_reference_on_every_variant():
    """The kernels decide fp16 stochastic rounding without a division: an integer comparison of
    mantissa bits where fp16 is normal, a scaled float comparison below 2^-14.  Every gap between
    adjacent finite fp16 magnitudes (subnormal and normal, both signs), its two ends and points
    inside it, through every CPU tile kernel, against rng.round_to_dtype bit for bit."""
    low = torch.arange(0, 0x7BFF, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    gap = torch.arange(1, 0x7C00, dtype=torch.int32).to(torch.int16).view(torch.float16).float() - low
    fractions = torch.rand(low.numel(), generator=torch.Generator().manual_seed(5))
    inside = low + fractions * gap
    just_below_high = (low + gap).nextafter(torch.zeros(()))
    x32 = torch.cat([low, inside, just_below_high, torch.tensor([65504.0, 65520.0, 1e30])])
    x32 = torch.cat([x32, -x32[x32 != 0]])  # _round_through_native turns -0 into +0 (0 - (+0))
    words = rng.rounding_words(21, 0, 0, x32.numel())
    expected = rng.round_to_dtype(x32, torch.float16, "stochastic", words).view(torch.int16)
    default = native._C.simd_target()
    try:
        for variant in native._C.supported_tile_kernels():
            assert native._C.use_tile_kernel(variant)
            got = _round_through_native(x32, torch.float16, "stochastic").view(torch.int16)
            mismatch = got != expected
            assert not bool(mismatch.any()), (variant, x32[mismatch][:10])
    finally:
        native._C.use_tile_kernel(default)


def _round_through_native(x32: torch.Tensor, dtype: torch.dtype, rounding: str) -> torch.Tensor:
    """Store float32 ``x32`` into ``dtype`` with the native kernel: an addax step with lr = 1,
    grad = -x32 and a zero parameter computes 0 - 1 * (0 * z + 1 * (-x32)) = x32 exactly."""
    param = torch.zeros(x32.shape, dtype=dtype)
    ak.addax_update_(param, [-x32], 21, 0.0, 1.0, 0.0, tids=[0], rounding=rounding, backend="native")
    return param


# ----------------------------------------------------------------------------- the backend protocol


@requires_native
def test_prepare_keeps_no_tensor_references():
    """A cached prepared group must not keep a model's tensors alive."""
    import gc
    import weakref

    from addax_kernels.backends import TensorGroup

    params = _random_params((33, 4097), torch.bfloat16)
    buffers = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    group = TensorGroup(indices=(0, 1), device=torch.device("cpu"), param_dtype=torch.bfloat16, grad_dtype=None,
                        state_dtype=torch.float32, numels=(33, 4097), tids=(0, 1), offsets=(0, 0),
                        weight_decay=(0.0, 0.0))
    prepared = native.prepare(group, params, [buffers])
    watchers = [weakref.ref(t) for t in params + buffers]
    del params, buffers
    gc.collect()
    assert all(watcher() is None for watcher in watchers)
    assert prepared.num_tensors == 2


@requires_native
def test_run_reads_gradients_at_the_groups_positions():
    """Two dtype groups in one call: each reads its own gradients out of the caller's whole list."""
    params = _random_params((7, 4097, 129, 1025), torch.float32, seed=20)
    params[1], params[3] = params[1].to(torch.bfloat16), params[3].to(torch.bfloat16)
    grads = [g.to(p.dtype) for g, p in zip(_random_params((7, 4097, 129, 1025), torch.float32, seed=21), params)]
    (got,), (expected,) = on_backend_and_reference(ak.addax_update_, "native", [params], grads, 5, 0.5, 1e-2, 0.3,
                                                   noise="rademacher")
    assert_matches_reference(got, expected, 0.0, exact=True)


@requires_native
def test_scalar_layout_of_the_extension_is_the_contracts():
    from addax_kernels import backends

    layout = native._C.scalar_layout()
    assert layout and all(getattr(backends, name) == slot for name, slot in layout.items())


# ----------------------------------------------------------------------------- argument checks


@requires_native
def test_extension_rejects_inconsistent_arguments():
    with pytest.raises(ValueError, match="one entry per tensor"):
        native._C.prepare(-1, [0], [1, 2], [0], [0], [0.0], [0], 0, 0, 0, [], (0, 0))
    with pytest.raises(ValueError, match="numels must be positive"):
        native._C.prepare(-1, [0], [0], [0], [0], [0.0], [0], 0, 0, 0, [], (0, 0))
    with pytest.raises(ValueError, match="param_type"):
        native._C.prepare(-1, [0], [1], [0], [0], [0.0], [0], 7, 0, 0, [], (0, 0))
    param = torch.zeros(8)
    prepared = native._C.prepare(-1, [param.data_ptr()], [8], [0], [0], [0.0], [0], 0, 0, 0, [], (0, 0))
    scalars = [0.0] * 8
    with pytest.raises(ValueError, match="seeds"):
        native._C.run(prepared, None, [1], 0, 0, scalars, 0, 0, 0, 0, 0, 0, True, False, 0, 1, 0)
    with pytest.raises(ValueError, match="scalars"):
        native._C.run(prepared, None, [1, 2], 0, 0, scalars[:3], 0, 0, 0, 0, 0, 0, True, False, 0, 1, 0)
    with pytest.raises(ValueError, match="state"):
        native._C.run(prepared, None, [1, 2], 0, 0, scalars + [1.0], 0, 0, 0, 0, 1, 1, True, False, 0, 1, 0)
    with pytest.raises(ValueError, match="philox4x32"):
        native._C.philox4x32(np.zeros((3, 3), np.uint32), np.zeros((3, 2), np.uint32))
    assert torch.equal(param, torch.zeros(8))  # nothing ran


# ----------------------------------------------------------------------------- CUDA

# These complement test_conformance.py's native-cuda cases with what the kernels' structure
# needs: sizes past a chunk, the masked path, launch limits.  Words, signs, masks and roundings
# are integer rules: bit-exact.  z uses the special-function unit: the SPEC §1 bound.  Updates
# contract into FMA: tests/tolerance.py's bound.  Tests taking `cuda_kernels` run on a GPU and
# on the CPU emulation of the kernels (tests/cuda_emulation); those about MUFU's accuracy,
# streams, graphs or 2^31 elements need the GPU.

NATIVE_CUDA_REASON = (native.unavailable_reason(torch.device("cuda")) if HAS_CUDA else "no CUDA device")
requires_native_cuda = pytest.mark.skipif(NATIVE_CUDA_REASON is not None, reason=f"native CUDA: {NATIVE_CUDA_REASON}")


@pytest.fixture(params=["cuda", pytest.param("cuda-emulation", marks=pytest.mark.cuda_emulation)])
def cuda_kernels(request):
    """The device whose tensors backend="native" runs through the CUDA kernels: the GPU, or the
    CPU with the kernels compiled for the CPU emulation (installed by tests/conftest.py for the
    tests marked cuda_emulation)."""
    if request.param == "cuda":
        if NATIVE_CUDA_REASON is not None:
            pytest.skip(f"native CUDA: {NATIVE_CUDA_REASON}")
        return torch.device("cuda")
    return torch.device("cpu")


@requires_native_cuda
@pytest.mark.parametrize("offset", [0, 2**33 + 1, 2**62 + 3])
def test_cuda_gaussian_z_within_spec_bound(offset):
    count = 1 << 22
    z = ak.noise(count, BIG_SEED, tid=3, offset=offset, device="cuda", backend="native").double().cpu()
    exact = rng.noise(count, BIG_SEED, tid=3, offset=offset, dtype=torch.float64)
    error = (z - exact).abs()
    assert torch.isfinite(z).all()
    assert error.max().item() <= 1e-3 and error.mean().item() <= 1e-6  # SPEC §1


@requires_native_cuda
def test_cuda_gaussian_z_near_u_one_is_finite_and_within_bound():
    """The elements whose radius uniform is closest to 1 among 2^26 (u within a few 2^-24 of 1,
    where a fast log can turn positive): finite and within the SPEC bound."""
    count = 1 << 26
    z = ak.noise(count, 11, tid=0, device="cuda", backend="native")
    blocks = torch.arange(count // 4, device="cuda")
    zeros = torch.zeros_like(blocks)
    words = rng.philox4x32(torch.stack([blocks, zeros, zeros, zeros], -1), torch.tensor([11, 0], device="cuda"))
    radius_words = words[:, [0, 2]].reshape(-1)  # block j: pair 0 from w0, pair 1 from w2
    largest = torch.argsort(radius_words, descending=True)[:256]
    first_of_pair = 4 * (largest // 2) + 2 * (largest % 2)
    elements = torch.cat([first_of_pair, first_of_pair + 1])
    exact = rng.noise(count, 11, tid=0, dtype=torch.float64, device="cuda")
    assert torch.isfinite(z).all()
    assert (z[elements].double() - exact[elements]).abs().max().item() <= 1e-3


def test_cuda_rademacher_z_and_masks_are_exact(cuda_kernels):
    for offset in (0, 4093, 2**39 - 300):
        z = ak.noise(1 << 20, BIG_SEED, tid=9, offset=offset, noise="rademacher", sparsity=0.25, device=cuda_kernels,
                     backend="native").cpu()
        expected = rng.noise(1 << 20, BIG_SEED, tid=9, offset=offset, noise="rademacher", sparsity=0.25)
        assert torch.equal(z, expected), offset


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_cuda_roundings_are_bit_exact(cuda_kernels, dtype, rounding):
    """The float32 -> dtype step alone (an addax step with lr 1, grad -x and a zero parameter
    computes x exactly), on the vector path and on the masked path (a misaligned view)."""
    info = torch.finfo(dtype)
    base = torch.tensor(
        [0.0, info.tiny, -info.tiny, info.tiny / 4, info.max, -info.max, 1.0, -1.0, 65504.0, 65520.0, 70000.0,
         float("inf"), -float("inf"), float("nan"), 3.0e38, -3.0e38, 3.3895314e38, 3.39e38, 1e-7, 5.96e-8, 2.0**-25],
        dtype=torch.float32,
    )
    sweep = torch.linspace(-4, 4, 40001, dtype=torch.float32) + 1.0 / 3.0
    x32 = torch.cat([base, sweep, torch.randn(80000, generator=torch.Generator().manual_seed(9)) * 1e-3])
    words = rng.rounding_words(21, 0, 0, x32.numel())
    expected = rng.round_to_dtype(x32, dtype, rounding, words if rounding == "stochastic" else None).float()
    for start in (0, 3):  # aligned (vector path), misaligned (masked path)
        storage = torch.zeros(x32.numel() + start, dtype=dtype, device=cuda_kernels)
        param = storage[start:]
        ak.addax_update_(param, [-x32.to(cuda_kernels)], 21, 0.0, 1.0, 0.0, tids=[0], rounding=rounding, rounding_seed=21,
                         backend="native")
        got = param.cpu().float()
        same = (got == expected) | (torch.isnan(got) & torch.isnan(expected))
        assert bool(same.all()), (start, x32[~same][:10])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_cuda_ops_match_reference(cuda_kernels, dtype, noise, rounding):
    sizes = [1, 3, 4, 5, 127, 128, 129, 1023, 4097, 65537, 70001, 300007]
    params = [p.to(cuda_kernels) for p in _random_params(sizes, dtype, seed=10)]
    offsets = [(2**32 - 2 + 3 * i) if i % 3 else 8 * i for i in range(len(params))]
    common = dict(noise=noise, rounding=rounding, offsets=offsets, rounding_seed=77)
    calls = [
        (ak.perturb_, (BIG_SEED, 1e-2), {}),
        (ak.zo_update_, ([BIG_SEED], [0.7], 1e-2), dict(restore=1e-3)),
        (ak.zo_update_, ([BIG_SEED], [0.7], 1e-2), dict(restore=1e-3, weight_decay=0.05)),
        (ak.zo_update_, ([3, 4, 5], [0.7, -0.2, 0.1], 1e-2), dict(weight_decay=0.05)),
        (ak.zo_update_, ([BIG_SEED], [0.7], 1e-2), dict(restore=1e-3, sparsity=0.5)),
    ]
    for op, args, kwargs in calls:
        (got,), (expected,) = on_backend_and_reference(op, "native", [params], *args, **common, **kwargs)
        assert_matches_reference(got, expected, 1e-2 + 1e-3)
    for grad_dtype in DTYPES:
        grads = [(p.float() * 0.5).to(grad_dtype) for p in params]
        for decay in (0.0, 0.05):
            (got,), (expected,) = on_backend_and_reference(ak.addax_update_, "native", [params], grads, BIG_SEED, 0.6,
                                                           1e-2, 0.4, weight_decay=decay, **common)
            assert_matches_reference(got, expected, 1e-2)


@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_shards_equal_the_whole_tensor(cuda_kernels, noise, dtype):
    """Vector path, masked path and chunk boundaries give every element the same arithmetic."""
    whole = _random_params((300007,), dtype, seed=7)[0].to(cuda_kernels)
    sharded = whole.clone()
    cuts = (0, 1, 5, 130, 4096, 65536 + 3, 70001, 300007)
    kwargs = dict(restore=1e-3, noise=noise, rounding="stochastic", weight_decay=0.01)
    ak.zo_update_(whole, [8], [1.0], 1e-2, tids=[4], backend="native", **kwargs)
    shards = [sharded[a:b] for a, b in zip(cuts, cuts[1:])]
    ak.zo_update_(shards, [8], [1.0], 1e-2, tids=[4] * len(shards), offsets=list(cuts[:-1]), backend="native",
                  **kwargs)
    assert torch.equal(whole.view(-1).cpu().float(), sharded.view(-1).cpu().float())


@requires_native_cuda
def test_cuda_device_seeds_and_scalars_equal_host_values_and_graph_replays_read_them():
    params = [p.cuda() for p in _random_params((4097, 70001), torch.bfloat16, seed=23)]
    host = [p.clone() for p in params]
    ak.zo_update_(host, [BIG_SEED], [0.5], 1e-2, restore=1e-3, rounding="stochastic", rounding_seed=2**63 + 1,
                  backend="native")
    seed = torch.tensor(rng.seed_as_int64(BIG_SEED), dtype=torch.int64, device="cuda")
    rounding_seed = torch.tensor(rng.seed_as_int64(2**63 + 1), dtype=torch.int64, device="cuda")
    on_device = [p.clone() for p in params]
    ak.zo_update_(on_device, [seed], [0.5], torch.tensor(1e-2, device="cuda"), restore=1e-3, rounding="stochastic",
                  rounding_seed=rounding_seed, backend="native")
    for a, b in zip(host, on_device):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    # Captured with one seed, replayed after the seed tensor changed: the replay uses the new one.
    captured = [p.clone() for p in params]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ak.perturb_(captured, seed, 1e-3, backend="native")  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ak.perturb_(captured, seed, 1e-3, backend="native")
    for p, q in zip(captured, params):
        p.copy_(q)
    seed.fill_(12345)
    graph.replay()
    eager = [p.clone() for p in params]
    ak.perturb_(eager, 12345, 1e-3, backend="native")
    torch.cuda.synchronize()
    for a, b in zip(captured, eager):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))


@requires_native_cuda
def test_cuda_unaligned_views_and_side_streams():
    base = torch.randn(3 * 4099, device="cuda").to(torch.bfloat16)
    views = [base[1:4098], base[4099 + 3: 2 * 4099], base[2 * 4099 + 8:]]  # misaligned and aligned
    expected = [v.clone() for v in views]
    ak.zo_update_(expected, [1, 2], [0.5, 0.25], 1e-2, restore=1e-3, offsets=[5, 2**31 + 1, 0],
                  rounding="stochastic", backend="reference")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # base was written on the default stream
    with torch.cuda.stream(stream):
        coeffs = [torch.tensor(0.5, device="cuda"), torch.tensor(0.25, device="cuda")]
        ak.zo_update_(views, [1, 2], coeffs, torch.tensor(1e-2, device="cuda"), restore=1e-3,
                      offsets=[5, 2**31 + 1, 0], rounding="stochastic", backend="native")
    stream.synchronize()
    assert_matches_reference(views, expected, 1e-2 * 0.75 + 1e-3)


def test_cuda_many_tensors_with_gradients_and_many_directions(cuda_kernels):
    """More tensors with gradients than one launch carries (several launches), and more
    directions than a launch carries by value (seeds and scalars moved to the device)."""
    extension = cuda_emulation.load() if cuda_kernels.type == "cpu" else native._C
    count = extension.cuda_param_directions + 3
    params = [p.to(cuda_kernels) for p in _random_params([1 + (7 * i) % 300 for i in range(1100)], torch.float32, seed=24)]
    grads = [p * 0.5 for p in params]
    (got,), (expected,) = on_backend_and_reference(ak.addax_update_, "native", [params], grads, 9, 0.5, 1e-2, 0.3,
                                                   noise="rademacher")
    assert_matches_reference(got, expected, 1e-2)
    (got,), (expected,) = on_backend_and_reference(ak.zo_update_, "native", [params[:50]], list(range(count)),
                                                   [0.01] * count, 1e-2, noise="rademacher")
    assert_matches_reference(got, expected, 1e-2 * 0.01 * count)


@requires_native_cuda
@pytest.mark.slow
def test_cuda_tensor_past_2_to_the_31_elements():
    numel = 2**31 + 4099
    tensor = torch.zeros(numel, dtype=torch.bfloat16, device="cuda")
    ak.perturb_(tensor, 77, 1.0, noise="rademacher", tids=[9], backend="native")
    for start in (0, 2**31 - 2048, numel - 3000):
        window = tensor[start: start + 3000].float().cpu()
        assert torch.equal(window, rng.noise(3000, 77, tid=9, offset=start, noise="rademacher")), start
    assert int(torch.count_nonzero(tensor.view(torch.int16))) == numel


# ----------------------------------------------------------------------------- SASS report rules


def _synthetic_listing() -> str:
    """An nvdisasm -g listing of one kernel: a chunk loop (line 10) around a steady-state loop
    (line 20) whose body skips a rare call block, and a masked loop (line 30); local-memory
    accesses in the prologue, the loop body and its cold block."""
    text = [".text._kernel:"]
    address = 0

    def emit(line, instruction, label=None):
        nonlocal address
        if label:
            text.append(f"{label}:")
        text.append(f'\t//## File "{SASS_SOURCE}", line {line}')
        text.append(f"        /*{address:04x}*/                   {instruction} ;")
        address += 16

    emit(1, "S2R R0, SR_TID.X")                                # prologue: 3
    emit(1, "MOV R1, RZ")
    emit(1, "STL [R1], R0")
    emit(10, "LDG.E R2, desc[UR4][R4.64]", ".L_x_1")          # chunk head: 3 into the loop
    emit(10, "IADD3 R3, R2, 0x1, RZ")
    emit(10, "@P0 BRA `(.L_x_4)")                              # (a chunk without a vector range)
    emit(20, "LDG.E.128 R8, desc[UR4][R6.64]", ".L_x_2")      # loop body: 6 counted
    emit(20, "@P6 LDL R9, [R1+0x4]")
    emit(20, "FFMA R8, R8, R9, R10")
    emit(20, "@!P1 BRA `(.L_x_3)")                             # skip the rare calls
    emit(20, "MOV R20, R8")                                    # cold: not counted
    emit(20, "LDL R21, [R1]")
    emit(20, "CALL.REL.NOINC `($slow)")
    emit(20, "STG.E.128 desc[UR4][R6.64], R8", ".L_x_3")
    emit(20, "NOP")
    emit(20, "@P2 BRA `(.L_x_2)")                              # back edge
    emit(10, "@P5 BRA `(.L_x_5)", ".L_x_4")                    # no masked work in a full chunk
    emit(30, "LDG.E.U16 R11, desc[UR4][R6.64]", ".L_x_6")     # masked loop: 3 counted
    emit(30, "STG.E.U16 desc[UR4][R6.64], R11")
    emit(30, "@P3 BRA `(.L_x_6)")
    emit(10, "IADD3 R5, R5, 0x1, RZ", ".L_x_5")                # back to the next chunk: 3 with the guard
    emit(10, "@P4 BRA `(.L_x_1)")
    emit(1, "EXIT")
    return "\n".join(text) + "\n"


SASS_SOURCE = "/src/csrc/cuda/fused_cuda.cu"


def test_sass_counting_rules_on_a_synthetic_listing(monkeypatch):
    from addax_kernels.sass import native_backend as sass_native

    monkeypatch.setattr(sass_native, "SOURCE", SASS_SOURCE)
    kernels = sass_native.parse_disassembly(_synthetic_listing())
    instructions, labels = kernels["_kernel"]
    facts = sass_native.SourceFacts(storage={}, noise={}, ops={}, chunk=65536, threads=256,
                                    loop_lines={10: "CHUNK", 20: "gaussian", 30: "MASKED"}, flags={}, states={})
    counts = sass_native.count_kernel(instructions, labels, facts)
    assert counts.loop == 6  # LDG, LDL, FFMA, BRA, STG, back-edge BRA: the NOP and the cold block are not counted
    assert counts.loop_kind == "gaussian"
    assert counts.prologue == 3
    assert counts.local_accesses == 3 and counts.loop_local_accesses == 1  # the cold block's LDL is not in the loop
    assert counts.chunk_overhead == 3 + 3  # into the loop, and from its exit (past the masked loop) back
    assert counts.masked == 3
    assert counts.access_bytes == 16


def test_sass_variants_map_to_kernels_of_the_source():
    from addax_kernels import sass
    from addax_kernels.sass import native_backend as sass_native

    facts = sass_native.source_facts()
    assert set(facts.loop_lines.values()) >= {"gaussian", "rademacher", "CHUNK", "MASKED"}
    keys = {sass_native.kernel_key(variant, facts) for variant in sass.VARIANTS}
    assert len(keys) == len(sass.VARIANTS)  # every row is its own kernel
    # The budget of the issue: ~31 instructions per element for a bf16 pass, ~62 for fp32.
    assert 31.0 < sass.budget_per_element(4) < 31.5 and 62.0 < sass.budget_per_element(8) < 62.6


def test_sass_general_configurations_pin_the_flags_run_group_sets():
    """Each general-kernel row compiles the general kernel with the flags run_group would pass
    for that job (csrc/cuda/fused_cuda.cu: shift 1, grad 2, update 4, bf16 state 8, gradient type
    << 4, StateKind << 6), its direction count and its sparsity."""
    from addax_kernels import sass
    from addax_kernels.sass import native_backend as sass_native

    facts = sass_native.source_facts()
    assert "general" in facts.loop_lines.values()
    general = facts.ops["kGeneral"]
    cases = {
        sass.Variant("perturb", "bf16", sparse=True): (1, 0, 1),
        sass.Variant("zo_update", "bf16", rounding="stochastic", directions=2): (1 | 4, 2, 0),
        sass.Variant("zo_update", "bf16", state="momentum", state_dtype="bf16"): (1 | 4 | 8 | 1 << 6, 1, 0),
        sass.Variant("zo_update", "fp32", state="adam", state_dtype="fp32"): (1 | 4 | 2 << 6, 1, 0),
    }
    for variant, (flags, directions, sparse) in cases.items():
        assert variant.is_general()
        assert dict(sass_native.general_defines(variant, facts)) == {
            "ADDAX_SASS_PIN_FLAGS": flags, "ADDAX_SASS_PIN_DIRECTIONS": directions, "ADDAX_SASS_PIN_SPARSE": sparse}
        assert sass_native.kernel_key(variant, facts)[3] == general
    # float32 parameters with state round that state: the stochastic kernel (run_group's rule).
    stochastic_state = sass.Variant("zo_update", "fp32", rounding="stochastic", state="adam", state_dtype="bf16")
    assert sass_native.kernel_key(stochastic_state, facts)[2] == 1
    assert sass_native.general_defines(sass.Variant("zo_update", "bf16"), facts) == ()
    # Bytes per element: parameter read + write, plus each state buffer's read + write.
    assert stochastic_state.bytes_per_element() == 8 + 2 * 2 * 2
    assert sass.Variant("zo_update", "bf16", state="momentum", state_dtype="fp32").bytes_per_element() == 4 + 8
    for bad in (dict(state="momentum"), dict(state="nesterov", state_dtype="fp32"), dict(directions=0),
                dict(state="adam", state_dtype="fp16")):
        with pytest.raises(ValueError):
            sass.Variant("zo_update", "bf16", **bad)
    with pytest.raises(ValueError, match="only zo_update"):
        sass.Variant("perturb", "bf16", directions=2)
    with pytest.raises(ValueError, match="only zo_update"):
        sass.Variant("addax_update", "bf16", "bf16", state="momentum", state_dtype="fp32")


def test_sass_rows_and_summary_name_their_compiler():
    """The counts depend on the compiler, so each row and the summary say which one made them."""
    from addax_kernels import sass
    from addax_kernels.sass import native_backend as sass_native

    variant = sass.Variant("perturb", "bf16")  # 4 bytes per element: a budget of 31.16 instructions
    rows = [sass.make_row("native", variant, 20.0, 40, 3, 1, 16, "nvcc V13.0.88"),
            sass.make_row("triton", variant, 2 * 31.16, 40, 0, 0, 16, "triton 3.6.0")]
    assert [tuple(row) for row in rows] == [sass.ROW_FIELDS] * 2
    summary = sass._format_summary(rows, [])
    assert "Compiled with: native: nvcc V13.0.88; triton: triton 3.6.0." in summary
    assert "| triton | perturb | bf16 | - | gaussian | nearest | - | 62.3 | 31.2 | 0.50 | >= 0.95 MISSED |" in summary
    assert "| 40 | 3 (1) | 16 |" in summary  # local loads/stores in the kernel (in the steady-state loop)
    # A general row names the built kernel's resources, which its pinned compile does not show.
    general = sass.make_row("native", sass.Variant("perturb", "bf16", sparse=True), 36.0, 54, 0, 0, 16, "nvcc V13.0.88",
                            built_registers=64, built_spill_store_bytes=16, built_loop_local_accesses=6)
    summary = sass._format_summary(rows + [general], [])
    assert "| native | perturb | bf16 | - | gaussian | nearest | sparse | 36.0 |" in summary
    assert "- native perturb bf16 gaussian nearest sparse: 64 registers, 16 B spill stores, 6 in the loop body" in summary
    try:
        version = sass_native.nvcc_version()
    except FileNotFoundError:
        pytest.skip("no nvcc here")
    assert re.fullmatch(r"nvcc V\d+\.\d+(\.\d+)*", version), version

"""The native extension addax_kernels._C (csrc/) against the SPEC §1/§2 reference.

Independent references: ``addax_kernels.rng`` (words, uniforms, z, rounding), the Random123
known-answer vectors, the float64 evaluation of the Box–Muller formula, and the pure-PyTorch
reference backend for every op.

Tolerances, and why:
* Philox words, uniforms, Rademacher z and the rounding rules are integer arithmetic: bit-exact.
* Gaussian z: SPEC bound (1e-3 max, 1e-6 mean abs vs float64); the kernels' own log/sincos are
  measured at ~7e-7 max and ~3e-8 mean, so the tests also pin a 5e-6 / 1e-7 bound that would
  catch a regression long before the SPEC bound.
* Updates: the kernels round every product and sum exactly as the reference does (no FMA
  contraction), so the only difference is z itself, |dz| <= ~2e-6: float32 results agree within
  |scale| * 4e-6 + 4 ulp.  Rounded to bf16/fp16 the same tiny difference can cross a rounding
  boundary: at most 1 ulp of the storage type, for a small fraction of elements (bounded below).
  With Rademacher noise z is exact and every backend must agree bit for bit.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

import addax_kernels as ak
from addax_kernels import rng
from addax_kernels.backends import native

from conftest import HAS_CUDA, requires_cuda

NATIVE_REASON = native.unavailable_reason(torch.device("cpu"))
requires_native = pytest.mark.skipif(NATIVE_REASON is not None, reason=f"native backend: {NATIVE_REASON}")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NOISES = ("gaussian", "rademacher")
ROUNDINGS = ("nearest", "stochastic")
ODD_SIZES = (1, 3, 4, 5, 127, 128, 129, 1023, 1025, 4097, 7919, 65537)
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

# Random123 kat_vectors for philox4x32_10: (counter, key, expected words).
RANDOM123_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@requires_native
def test_philox_known_answers():
    counters = np.array([c for c, _, _ in RANDOM123_KAT], dtype=np.uint32)
    keys = np.array([k for _, k, _ in RANDOM123_KAT], dtype=np.uint32)
    expected = np.array([w for _, _, w in RANDOM123_KAT], dtype=np.uint32)
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


# ----------------------------------------------------------------------------- ops vs reference


def _random_params(sizes, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, generator=generator) * 0.05).to(dtype) for size in sizes]


def _ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at |values| (in float32), at least the smallest subnormal."""
    info = torch.finfo(dtype)
    magnitude = values.abs().float().clamp(min=info.tiny)
    return torch.exp2(torch.floor(torch.log2(magnitude))) * info.eps


def _assert_matches_reference(got, expected, noise: str, scale: float):
    for index, (a, b) in enumerate(zip(got, expected)):
        assert a.dtype == b.dtype and a.shape == b.shape
        if noise == "rademacher":
            assert torch.equal(a.view(-1).float(), b.view(-1).float()), f"tensor {index} differs"
            continue
        a32, b32 = a.float(), b.float()
        if a.dtype == torch.float32:
            tolerance = abs(scale) * 4e-6 + 4 * _ulp(b32, torch.float32)
            assert ((a32 - b32).abs() <= tolerance).all(), f"tensor {index}: max diff {(a32 - b32).abs().max()}"
        else:
            differs = a32 != b32
            # z differs by ~1e-6 at most: a rounding boundary is crossed rarely, by one ulp.
            assert (((a32 - b32).abs() <= _ulp(b32, a.dtype) * 1.01) | ~differs).all(), f"tensor {index}"
            assert differs.float().mean().item() <= 0.01, f"tensor {index}: {differs.float().mean()}"


def _run_both(op, params, *args, **kwargs):
    got = [p.clone() for p in params]
    expected = [p.clone() for p in params]
    op(got, *args, backend="native", **kwargs)
    op(expected, *args, backend="reference", **kwargs)
    return got, expected


@requires_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_perturb_matches_reference(dtype, noise, rounding):
    params = _random_params(ODD_SIZES, dtype)
    got, expected = _run_both(ak.perturb_, params, BIG_SEED, 1e-2, noise=noise, rounding=rounding,
                              offsets=[7 * i for i in range(len(params))])
    _assert_matches_reference(got, expected, noise, 1e-2)


@requires_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_zo_update_with_restore_directions_and_decay_matches_reference(dtype, noise, rounding):
    params = _random_params((3, 4097, 129, 7919), dtype, seed=1)
    got, expected = _run_both(
        ak.zo_update_, params, [11, 2**40 + 3, BIG_SEED], [0.7, -1.3, 0.25], 1e-2,
        restore=1e-3, weight_decay=0.1, decay_mask=[True, False, True, True], noise=noise, rounding=rounding,
    )
    _assert_matches_reference(got, expected, noise, 1e-2 * 2.25)


@requires_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("restore", (None, 1e-3))
def test_single_direction_update_matches_reference_and_the_general_path(dtype, noise, restore):
    """One direction (MeZO's step) runs as a single fused pass over each tile; it must equal the
    reference and, bit for bit, the multi-direction path (a second direction with coefficient 0
    adds exactly +0 to the direction)."""
    params = _random_params((3, 4097, 129), dtype, seed=4)
    kwargs = dict(restore=restore, weight_decay=0.1, decay_mask=[True, False, True], noise=noise)
    got, expected = _run_both(ak.zo_update_, params, [BIG_SEED], [-0.9], 1e-2, **kwargs)
    _assert_matches_reference(got, expected, noise, 1e-2 * 0.9 + (restore or 0.0))
    general = [p.clone() for p in params]
    ak.zo_update_(general, [BIG_SEED, 5], [-0.9, 0.0], 1e-2, backend="native", **kwargs)
    for fused, multi in zip(got, general):
        assert torch.equal(fused.view(torch.int8), multi.view(torch.int8))


@requires_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grad_dtype", DTYPES)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_addax_update_matches_reference_for_every_grad_dtype(dtype, grad_dtype, rounding):
    params = _random_params((5, 4097, 1031), dtype, seed=2)
    grads = [g.to(grad_dtype) for g in _random_params((5, 4097, 1031), torch.float32, seed=3)]
    got, expected = _run_both(ak.addax_update_, params, grads, 99, 0.8, 1e-2, 0.3, weight_decay=0.01,
                              rounding=rounding)
    _assert_matches_reference(got, expected, "gaussian", 1e-2 * 0.8)


@requires_native
@pytest.mark.parametrize("noise", NOISES)
def test_many_tensors_of_odd_sizes_in_one_call(noise):
    sizes = [1, 3, 2, 4097, 13, 8191, 127, 31, 1, 65537] * 5
    params = _random_params(sizes, torch.bfloat16, seed=4)
    got, expected = _run_both(ak.perturb_, params, 5, 1e-3, noise=noise, rounding="stochastic",
                              tids=[(7919 * i) % 2**32 for i in range(len(sizes))])
    _assert_matches_reference(got, expected, noise, 1e-3)


@requires_native
def test_zero_dim_tensor_scalars_equal_python_floats():
    params = _random_params((4097, 33), torch.float32, seed=5)
    with_floats = [p.clone() for p in params]
    with_tensors = [p.clone() for p in params]
    ak.zo_update_(with_floats, [1, 2], [0.5, -0.25], 1e-2, restore=1e-3, backend="native")
    ak.zo_update_(with_tensors, [1, 2], [torch.tensor(0.5), torch.tensor(-0.25)], torch.tensor(1e-2),
                  restore=torch.tensor(1e-3), backend="native")
    for a, b in zip(with_floats, with_tensors):
        assert torch.equal(a, b)


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
@pytest.mark.parametrize("cuts", [(0, 1, 5, 130, 4096, 10001), (0, 3, 7, 2047, 2048, 10001)])
def test_shards_with_global_offsets_equal_the_whole_tensor(noise, cuts):
    whole = _random_params((10001,), torch.bfloat16, seed=7)[0]
    sharded = whole.clone()
    ak.zo_update_(whole, [8, 9], [1.0, 0.5], 1e-2, restore=1e-3, noise=noise, rounding="stochastic",
                  tids=[4], backend="native")
    shards = [sharded[a:b] for a, b in zip(cuts, cuts[1:])]
    ak.zo_update_(shards, [8, 9], [1.0, 0.5], 1e-2, restore=1e-3, noise=noise, rounding="stochastic",
                  tids=[4] * len(shards), offsets=list(cuts[:-1]), backend="native")
    assert torch.equal(whole.float(), sharded.float())


@requires_native
@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize(
    "offset",
    [2**31 - 5, 2**32 - 3, 2**34 - 6, 2**39 - 300, 2**62 + 1, 2**63 - 5000],
    ids=["2^31", "2^32", "block-2^32", "rademacher-block-2^32", "2^62", "2^63-end"],
)
def test_offsets_past_32_bits(noise, offset):
    """Global indices past 2^31/2^32, and Philox block indices whose high counter word carries."""
    params = _random_params((4001,), torch.float16, seed=8)
    got, expected = _run_both(ak.perturb_, params, BIG_SEED, 1e-2, noise=noise, rounding="stochastic",
                              offsets=[offset])
    _assert_matches_reference(got, expected, noise, 1e-2)


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


# ----------------------------------------------------------------------------- argument checks


@requires_native
def test_extension_rejects_inconsistent_arguments():
    with pytest.raises(ValueError, match="one entry per tensor"):
        native._C.fused_update_cpu(
            params=[0], grads=[], numels=[1, 2], offsets=[0], tids=[0], weight_decay=[0.0], param_type=0,
            grad_type=0, noise=0, rounding=0, seeds=[1], num_directions=0, has_shift=True, has_grad=False,
            needs_update=False, scalars=[1.0, 0.0, 0.0], num_threads=1,
        )
    with pytest.raises(ValueError, match="philox4x32"):
        native._C.philox4x32(np.zeros((3, 3), np.uint32), np.zeros((3, 2), np.uint32))


# ----------------------------------------------------------------------------- CUDA


requires_native_cuda = pytest.mark.skipif(
    not HAS_CUDA or native.unavailable_reason(torch.device("cuda")) is not None,
    reason=f"native CUDA: {native.unavailable_reason(torch.device('cuda')) if HAS_CUDA else 'no CUDA device'}",
)


@requires_cuda
@requires_native_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_cuda_ops_match_reference_and_cpu_kernels(dtype, noise, rounding):
    sizes = list(ODD_SIZES) * 4  # > 36 tensors: several launches
    params = [p.cuda() for p in _random_params(sizes, dtype, seed=10)]
    grads = [p.float() * 0.5 for p in params]
    offsets = [(2**32 - 2 + 3 * i) if i % 3 else 8 * i for i in range(len(params))]
    kwargs = dict(noise=noise, rounding=rounding, offsets=offsets, weight_decay=0.05)
    got, expected = _run_both(ak.addax_update_, params, grads, BIG_SEED, 0.6, 1e-2, 0.4, **kwargs)
    _assert_matches_reference([g.cpu() for g in got], [e.cpu() for e in expected], noise, 1e-2)
    on_cpu = [p.cpu() for p in params]
    ak.addax_update_(on_cpu, [g.cpu() for g in grads], BIG_SEED, 0.6, 1e-2, 0.4, backend="native", **kwargs)
    for a, b in zip(got, on_cpu):  # same header, same rounding sequence: bit-identical
        assert torch.equal(a.cpu().view(-1).float(), b.view(-1).float())


@requires_cuda
@requires_native_cuda
def test_cuda_unaligned_views_device_scalars_and_side_streams():
    base = torch.randn(3 * 4099, device="cuda").to(torch.bfloat16)
    views = [base[1:4098], base[4099 + 3 : 2 * 4099], base[2 * 4099 + 8 :]]  # misaligned and aligned
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
    _assert_matches_reference([v.cpu() for v in views], [e.cpu() for e in expected], "gaussian", 1e-2)


@requires_cuda
@requires_native_cuda
def test_cuda_refuses_more_directions_than_a_launch_carries():
    param = torch.zeros(16, device="cuda")
    count = native._C.max_cuda_directions + 1
    with pytest.raises(ValueError, match="directions"):
        ak.zo_update_(param, list(range(count)), [1.0] * count, 1e-3, backend="native")

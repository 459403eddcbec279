"""SPEC §1 and the rounding of SPEC §2, tested against known answers and independent code.

The independent references here are written with Python ints / numpy float64 straight from
the SPEC text, not with the helpers of addax_kernels.rng, so a shared mistake cannot pass.
"""

import math

import numpy as np
import pytest
import torch
from scipy import stats

import addax_kernels as ak
from addax_kernels import rng

from known_answers import PHILOX_KAT, python_philox, spec_gaussian_float64


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox_known_answers_numpy_and_torch(counter, key, expected):
    assert tuple(int(w) for w in ak.philox4x32(np.array(counter, np.uint32), np.array(key, np.uint32))) == expected
    out = ak.philox4x32(torch.tensor(counter), torch.tensor(key))
    assert out.dtype == torch.int64 and tuple(out.tolist()) == expected
    assert python_philox(counter, key) == expected


def test_philox_matches_python_ints_on_random_inputs_with_broadcasting():
    generator = np.random.default_rng(0)
    counters = generator.integers(0, 2**32, size=(3, 5, 4), dtype=np.uint64)
    key = generator.integers(0, 2**32, size=(2,), dtype=np.uint64)
    out = ak.philox4x32(counters, key)
    assert out.shape == (3, 5, 4) and out.dtype == np.uint32
    for index in np.ndindex(3, 5):
        expected = python_philox([int(v) for v in counters[index]], [int(v) for v in key])
        assert tuple(int(v) for v in out[index]) == expected


def test_philox_rejects_bad_input():
    with pytest.raises(ValueError):
        ak.philox4x32(np.zeros(3, np.uint32), np.zeros(2, np.uint32))
    with pytest.raises(ValueError):
        ak.philox4x32(np.array([0, 0, 0, 2**32]), np.zeros(2, np.int64))
    with pytest.raises(TypeError):
        ak.philox4x32(np.zeros(4, np.float32), np.zeros(2, np.uint32))


def test_uniforms_are_exact_and_strictly_inside_unit_interval():
    words = torch.tensor([0, 511, 512, 0x7FFFFFFF, 0xFFFFFFFF, 123456789], dtype=torch.int64)
    u = ak.uniforms(words)
    expected = [(2 * (int(w) >> 9) + 1) / 2**24 for w in words]
    assert u.dtype == torch.float32
    assert u.double().tolist() == expected  # exact: 24 significant bits
    assert float(u.min()) == 2.0**-24 and float(u.max()) == 1.0 - 2.0**-24


def test_uniforms_take_what_philox4x32_returns_and_refuse_what_is_not_a_word():
    counter = np.array([[1, 2, 3, 2**32 - 1]], dtype=np.uint32)
    key = np.array([[7, 2**31]], dtype=np.uint32)
    words = ak.philox4x32(counter, key)  # numpy uint32 for numpy input
    expected = (2 * (words.astype(np.int64) >> 9) + 1) * 2.0**-24
    from_numpy = ak.uniforms(words)
    assert isinstance(from_numpy, np.ndarray) and from_numpy.dtype == np.float32
    assert np.array_equal(from_numpy.astype(np.float64), expected)
    as_int64 = ak.philox4x32(torch.from_numpy(counter.astype(np.int64)), torch.from_numpy(key.astype(np.int64)))
    assert torch.equal(ak.uniforms(as_int64).double(), torch.from_numpy(expected))
    with pytest.raises(ValueError, match=r"uniforms: words values must be in \[0, 2\*\*32\)"):
        ak.uniforms(torch.from_numpy(words.view(np.int32)))  # words >= 2**31 read as negative
    with pytest.raises(TypeError, match="uniforms: words must hold integers"):
        ak.uniforms(torch.rand(4))


def test_counter_layout_against_known_answer():
    """seed 0, tid 0, purpose 0, e = 0..3 uses counter (0,0,0,0) and key (0,0): the first KAT."""
    words = PHILOX_KAT[0][2]
    expected = spec_gaussian_float64(words)
    z64 = ak.noise(4, seed=0, dtype=torch.float64)
    assert z64.tolist() == pytest.approx(expected, abs=1e-12)
    z32 = ak.noise(4, seed=0)
    assert torch.allclose(z32.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)


def test_counter_layout_for_large_block_seed_tid_and_purpose():
    seed, tid, element = 0xFEDCBA9876543210, 0xDEADBEEF, (5 << 32) * 4 + 6  # block j = 5 * 2**32 + 1
    j = element >> 2
    key = (seed & 0xFFFFFFFF, seed >> 32)
    words = python_philox((j & 0xFFFFFFFF, j >> 32, tid, 0), key)
    z = ak.noise(1, seed=seed, tid=tid, offset=element, dtype=torch.float64)
    assert float(z[0]) == pytest.approx(spec_gaussian_float64(words)[element & 3], abs=1e-12)
    rounding_words = python_philox((j & 0xFFFFFFFF, j >> 32, tid, 1), key)
    got = rng.rounding_words(seed, tid, element - 2, 4)
    assert got.tolist() == list(rounding_words)


def test_rademacher_bit_layout():
    seed, tid = 77, 3
    z = ak.noise(3 * 128, seed=seed, tid=tid, noise="rademacher")
    for element in [0, 1, 31, 32, 63, 64, 100, 127, 128, 200, 383]:
        block = element >> 7
        words = python_philox((block, 0, tid, 0), (seed, 0))
        bit = (words[(element >> 5) & 3] >> (element & 31)) & 1
        assert float(z[element]) == (1.0 if bit == 0 else -1.0)
    assert set(z.unique().tolist()) == {-1.0, 1.0}


def test_gaussian_float32_within_spec_bound_of_float64():
    z32 = ak.noise(1 << 20, seed=2024, tid=7, offset=3)
    z64 = ak.noise(1 << 20, seed=2024, tid=7, offset=3, dtype=torch.float64)
    error = (z32.double() - z64).abs()
    assert torch.isfinite(z32).all()
    assert float(error.max()) <= 1e-3
    assert float(error.mean()) <= 1e-6


def test_gaussian_float64_matches_independent_formula():
    seed, tid = 99, 1
    z = ak.noise(64, seed=seed, tid=tid, dtype=torch.float64)
    expected = []
    for j in range(16):
        expected += spec_gaussian_float64(python_philox((j, 0, tid, 0), (seed, 0)))
    assert z.tolist() == pytest.approx(expected, abs=1e-12)


def test_gaussian_statistics():
    n = 1 << 20
    z = ak.noise(n, seed=11).double().numpy()
    # Bounds at about 5 standard errors: deterministic inputs, so a pass is not luck-dependent.
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1.0) < 5 * math.sqrt(2.0 / n)
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert abs(stats.skew(z)) < 5 * math.sqrt(6.0 / n)
    assert abs(stats.kurtosis(z)) < 5 * math.sqrt(24.0 / n)


@pytest.mark.parametrize(
    "other",
    [dict(seed=11, tid=1), dict(seed=12, tid=0), dict(seed=11, tid=0, purpose=1)],
    ids=["tid", "seed", "purpose"],
)
def test_no_correlation_between_streams(other):
    n = 1 << 18
    base = ak.noise(n, seed=11, tid=0).double()
    if other.get("purpose") == 1:
        stream = ak.uniforms(rng.rounding_words(11, 0, 0, n)).double()
    else:
        stream = ak.noise(n, **other).double()
    correlation = float(torch.corrcoef(torch.stack([base, stream]))[0, 1])
    assert abs(correlation) < 5 / math.sqrt(n)
    assert not torch.equal(base, stream)


def test_rademacher_statistics():
    n = 1 << 20
    z = ak.noise(n, seed=5, noise="rademacher").double()
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    lagged = float((z[1:] * z[:-1]).mean())
    assert abs(lagged) < 5 / math.sqrt(n)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_noise_range_invariant_to_chunking_and_offset(kind):
    whole = rng.noise_range(3, 9, 0, 5000, noise=kind)
    generator = np.random.default_rng(1)
    for _ in range(30):
        start = int(generator.integers(0, 4900))
        count = int(generator.integers(0, 5000 - start))
        assert torch.equal(rng.noise_range(3, 9, start, count, noise=kind), whole[start : start + count])
    shards = [ak.noise((10, 50), 3, tid=9, offset=o, noise=kind) for o in (0, 500, 1000)]
    assert torch.equal(torch.cat([s.reshape(-1) for s in shards]), whole[:1500])


def test_noise_argument_validation():
    for bad_seed in (-1, 2**64, 1.5, True, None, "1"):
        with pytest.raises((TypeError, ValueError)):
            ak.noise(4, bad_seed)
    for bad_tid in (-1, 2**32, 0.5):
        with pytest.raises((TypeError, ValueError)):
            ak.noise(4, 0, tid=bad_tid)
    with pytest.raises(ValueError):
        ak.noise(4, 0, offset=-1)
    with pytest.raises(ValueError):
        ak.noise(4, 0, noise="uniform")
    with pytest.raises(ValueError):
        rng.noise(4, 0, purpose=2)
    assert ak.noise((2, 3), 2**64 - 1, tid=2**32 - 1).shape == (2, 3)


# ----------------------------------------------------------------------------- rounding


def independent_stochastic_bf16(x: float, word: int) -> float:
    bits = int(np.array(x, np.float32).view(np.uint32))
    if (bits & 0x7F800000) == 0x7F800000:
        return float(torch.tensor(x).to(torch.bfloat16))
    out = ((bits + (word >> 16)) >> 16) & 0xFFFF
    if (out & 0x7FFF) == 0x7F80:
        out = (out & 0x8000) | 0x7F7F
    return float(np.array(out << 16, np.uint32).view(np.float32))


def independent_stochastic_fp16(x: float, word: int) -> float:
    if not math.isfinite(x):
        return float(np.float16(x))
    magnitude = min(abs(np.float32(x)), np.float32(65504.0))
    low = np.float16(magnitude)
    if np.float32(low) > magnitude:
        low = np.nextafter(low, np.float16(0))
    with np.errstate(over="ignore"):  # above 65504 the next code is inf; the fraction is then 0
        high = np.nextafter(low, np.float16(np.inf))
    fraction = (magnitude - np.float32(low)) / (np.float32(high) - np.float32(low))
    threshold = np.float32((word >> 8) * 2.0**-24)
    result = float(high) if threshold < fraction else float(low)
    return math.copysign(result, x)


def special_values():
    return [0.0, -0.0, 1.0, -1.0, 1e-40, -3e-39, 65504.0, 65519.0, 65520.0, 1e5, -1e5, 3.3895314e38,
            -3.3895314e38, 3.4e38, float("inf"), float("-inf"), 5.96e-8, 6.1e-5, 1.0009765625, 0.3333333]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_matches_independent_bit_formula(dtype):
    generator = torch.Generator().manual_seed(0)
    x = torch.cat([
        torch.tensor(special_values(), dtype=torch.float32),
        torch.randn(2000, generator=generator) * torch.logspace(-6, 4, 2000),
    ])
    words = torch.randint(0, 2**32, x.shape, generator=generator, dtype=torch.int64)
    words[:4] = torch.tensor([0, 0xFFFFFFFF, 0x0000FFFF, 0xFFFF0000])
    got = rng.round_to_dtype(x, dtype, "stochastic", words).float()
    reference = independent_stochastic_bf16 if dtype == torch.bfloat16 else independent_stochastic_fp16
    expected = torch.tensor([reference(float(v), int(w)) for v, w in zip(x, words)])
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased_and_brackets_input(dtype):
    x = torch.full((1 << 16,), 0.1234567, dtype=torch.float32)
    words = rng.rounding_words(7, 0, 0, x.numel())
    rounded = rng.round_to_dtype(x, dtype, "stochastic", words).double()
    low, high = float(rounded.min()), float(rounded.max())
    assert low <= 0.1234567 <= high and len(rounded.unique()) == 2
    # The mean of a two-point distribution with n samples: standard error <= (high-low)/(2 sqrt n).
    assert abs(float(rounded.mean()) - float(x[0])) < 5 * (high - low) / (2 * math.sqrt(x.numel()))


def test_nan_passes_through_and_nearest_is_torch_cast():
    x = torch.tensor([float("nan"), 1.0 + 2**-9, 1.0 + 3 * 2**-9, 70000.0])
    words = torch.zeros(4, dtype=torch.int64)
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.isnan(rng.round_to_dtype(x, dtype, "stochastic", words)[0])
        nearest = rng.round_to_dtype(x, dtype, "nearest")
        assert torch.isnan(nearest[0]) and torch.equal(nearest[1:], x[1:].to(dtype))
    assert rng.round_to_dtype(x, torch.float32, "stochastic", words) is x
    with pytest.raises(ValueError):
        rng.round_to_dtype(x, torch.bfloat16, "stochastic")
    with pytest.raises(ValueError):
        rng.round_to_dtype(x, torch.bfloat16, "down")


# ----------------------------------------------------------------------------- v2: seeds, masks


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 2.0**-24, 1 - 2.0**-24, 0.1234567])
def test_sparsity_threshold_is_the_exact_form_of_u_at_least_p(sparsity):
    """odd >= ceil(p 2^24) ⇔ odd 2^-24 >= p, checked on every odd around the threshold."""
    threshold = rng.sparsity_threshold(sparsity)
    for odd in range(max(1, threshold - 5) | 1, threshold + 6, 2):
        assert (odd >= threshold) == (odd * 2.0**-24 >= sparsity)


def test_sparsity_threshold_rejects_bad_values():
    for bad, error in ((1.0, ValueError), (-0.1, ValueError), (float("nan"), ValueError), (True, TypeError),
                       ("0.5", TypeError)):
        with pytest.raises(error, match="sparsity"):
            rng.sparsity_threshold(bad)


def test_keep_mask_is_the_purpose_two_word_of_each_lane():
    seed, tid, start, count = 2**64 - 5, 17, 2**33 + 3, 301
    keep = rng.keep_mask_range(seed, tid, start, count, rng.sparsity_threshold(0.4))
    expected = []
    for e in range(start, start + count):
        word = python_philox(((e >> 2) & 0xFFFFFFFF, e >> 34, tid, 2), (seed & 0xFFFFFFFF, seed >> 32))[e & 3]
        expected.append((2 * (word >> 9) + 1) * 2.0**-24 >= 0.4)
    assert keep.tolist() == expected


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_sparse_noise_zeroes_exactly_the_dropped_elements(kind):
    dense = ak.noise(5000, 99, tid=3, offset=11, noise=kind)
    sparse = ak.noise(5000, 99, tid=3, offset=11, noise=kind, sparsity=0.25)
    keep = rng.keep_mask_range(99, 3, 11, 5000, rng.sparsity_threshold(0.25))
    assert torch.equal(sparse[keep], dense[keep])
    assert bool((sparse[~keep] == 0).all())


@pytest.mark.parametrize("seed", [0, 1, 2**63 - 1, 2**63, 2**64 - 1])
def test_seed_tensors_hold_the_same_64_bits(seed):
    as_int64 = torch.tensor(rng.seed_as_int64(seed), dtype=torch.int64)
    assert rng.seed_from_int64(int(as_int64)) == seed
    expected = rng.noise(333, seed, tid=5, offset=7)
    assert torch.equal(rng.noise(333, as_int64, tid=5, offset=7), expected)
    if hasattr(torch, "uint64"):
        assert torch.equal(rng.noise(333, as_int64.view(torch.uint64), tid=5, offset=7), expected)
    words = rng.rounding_words(as_int64, 5, 7, 40)
    assert torch.equal(words, rng.rounding_words(seed, 5, 7, 40))


def test_seed_tensor_checks():
    with pytest.raises(ValueError, match="0-dim"):
        rng.check_seed(torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="float32"):
        rng.check_seed(torch.tensor(1.0))
    with pytest.raises(ValueError, match="params' device"):
        rng.check_seed(torch.tensor(3), device=torch.device("meta"))


def test_state_rounding_seeds_differ_from_the_rounding_seed_and_each_other():
    for seed in (0, 1, 2, 2**64 - 1):
        keys = {seed, rng.state_rounding_seed(seed, 0), rng.state_rounding_seed(seed, 1)}
        assert len(keys) == 3
        tensor = torch.tensor(rng.seed_as_int64(seed))
        assert rng.seed_from_int64(int(rng.state_rounding_seed(tensor, 1))) == rng.state_rounding_seed(seed, 1)

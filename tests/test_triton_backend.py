"""Triton-specific tests of the Triton backend (the shared conformance suite is test_conformance.py).

Without CUDA the kernels run under Triton's interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1); with CUDA the compiled kernels run, and the ``requires_cuda`` tests add
large sizes, the MUFU transcendentals, CUDA graph capture and the no-sync check.  Here:
availability, the kernel's own Philox and Box–Muller helpers (against Random123's vectors,
``addax_kernels.rng`` and float64), the rounding of special values, alignment classes and the
metadata tables, what run() uploads, capture errors, and an offline sm_90/sm_80 compile.
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest
import torch

import addax_kernels as ak
from addax_kernels import rng
from conftest import HAS_CUDA, requires_cuda
from known_answers import PHILOX_KAT
from tolerance import assert_matches_reference, clones, misaligned, on_backend_and_reference

triton = pytest.importorskip("triton")
tl = triton.language

from addax_kernels.backends import FusedJob, Scalars, Seeds, TensorGroup  # noqa: E402
from addax_kernels.backends import triton as triton_backend  # noqa: E402
from addax_kernels.backends.triton import kernels as K  # noqa: E402
from addax_kernels.backends.triton import launch  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
# The MUFU approximations exist only in compiled kernels; the interpreter evaluates the same
# formulas with exact float32 log2/sin/cos.
FAST = HAS_CUDA
SPEC_Z_MAX_ABS = 1e-3
SPEC_Z_MEAN_ABS = 1e-6
HUGE_SEED = 2**64 - 12345  # >= 2**63: exercises the high key word and the signed encoding

# Tests that need CPU tensors at arbitrary addresses run under the interpreter only.
requires_cpu_interpreter = pytest.mark.skipif(HAS_CUDA, reason="builds misaligned CPU tensors for the interpreter")
# Tests of the fused pass itself (the helpers' own small kernels run wherever triton imports).
FUSED_PASS_REASON = triton_backend.unavailable_reason(DEVICE)
requires_fused_pass = pytest.mark.skipif(FUSED_PASS_REASON is not None, reason=f"triton: {FUSED_PASS_REASON}")

# The interpreter evaluates kernels with numpy, which warns about inf/NaN inputs that the
# rounding tests feed on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _randn(shape, dtype, generator, scale=0.02):
    return (torch.randn(shape, generator=generator) * scale).to(dtype).to(DEVICE)




# ----------------------------------------------------------------------------- availability


def test_availability_reasons(monkeypatch):
    if HAS_CUDA:
        assert triton_backend.unavailable_reason(torch.device("cuda")) is None
    else:
        assert triton_backend.unavailable_reason(torch.device("cpu")) == triton_backend._interpreter_conflict()
        assert "CPU tensors only" in triton_backend.unavailable_reason(torch.device("cuda"))
    assert "not on meta" in triton_backend.unavailable_reason(torch.device("meta"))
    # Triton 3.6's interpreter with NumPy >= 2.4 (triton 3.7 and NumPy 2.3 are each fine).
    for triton_version, numpy_version, refused in (("3.6.0", "2.4.1", True), ("3.7.0", "2.5.0", False),
                                                   ("3.6.0", "2.3.5", False)):
        monkeypatch.setattr(triton, "__version__", triton_version)
        monkeypatch.setattr(np, "__version__", numpy_version)
        reason = triton_backend._interpreter_conflict()
        assert (reason is not None) == refused, (triton_version, numpy_version, reason)
        if refused:
            assert "triton 3.6.0" in reason and "NumPy 2.4.1" in reason and "triton >= 3.7" in reason
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "triton", None)  # as if triton were not installed
    reason = triton_backend.unavailable_reason(DEVICE)
    assert reason is not None and "triton cannot be imported" in reason


# ----------------------------------------------------------------------------- z itself


@triton.jit
def _kat_kernel(out, c0, c1, c2, c3, key_lo, key_hi):
    k0, k1 = K._key_from_halves(key_lo, key_hi)
    w0, w1, w2, w3 = K._philox(c0.to(tl.uint32, bitcast=True), c1.to(tl.uint32, bitcast=True),
                               c2.to(tl.uint32, bitcast=True), c3.to(tl.uint32, bitcast=True), k0, k1)
    tl.store(out, w0.to(tl.int32, bitcast=True))
    tl.store(out + 1, w1.to(tl.int32, bitcast=True))
    tl.store(out + 2, w2.to(tl.int32, bitcast=True))
    tl.store(out + 3, w3.to(tl.int32, bitcast=True))


@pytest.mark.parametrize("counter, key, expected", PHILOX_KAT)
def test_philox_matches_random123_known_answers(counter, key, expected):
    out = torch.empty(4, dtype=torch.int32, device=DEVICE)
    _kat_kernel[(1,)](out, *(launch._signed_int32(c) for c in counter), *(launch._signed_int32(k) for k in key))
    assert [w & 0xFFFFFFFF for w in out.cpu().tolist()] == list(expected)


@triton.jit
def _words_kernel(out_words, out_uniforms, block_index_ptr, seed_lo, seed_hi, tid, COUNT: tl.constexpr):
    index = tl.arange(0, COUNT)
    blocks = tl.load(block_index_ptr + index)
    k0, k1 = K._key_from_halves(seed_lo, seed_hi)
    w0, w1, w2, w3 = K._philox(blocks.to(tl.uint32), (blocks >> 32).to(tl.uint32), tid.to(tl.uint32), 0, k0, k1)
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
    root = K._radius_root(tl.load(radius_ptr + index), FAST_MATH)
    angle = K._angle(tl.load(angle_ptr + index))
    radius = K._noise_scale(K.NOISE_GAUSSIAN) * root
    tl.store(out_even + index, radius * K._fast_cos(angle, FAST_MATH))
    tl.store(out_odd + index, radius * K._fast_sin(angle, FAST_MATH))


def _transform_errors_over_every_uniform(fast_math):
    """Max |z - z_float64| of _radius_root/_angle/_fast_cos/_fast_sin over every one of the 2**23
    possible uniforms as radius and as angle input, the larger of the mean errors of the cosine
    and the sine outputs, and whether every z is finite."""
    # The interpreter is fastest with few large programs; compiled code wants small tiles.
    count, block = 1 << 23, (1 << 10 if HAS_CUDA else 1 << 18)
    # The words whose uniform is the k-th one: the uniform depends on w >> 9 only.
    all_words = (torch.arange(count, dtype=torch.int64) << 9)
    radius_words = all_words.to(torch.int32)  # same bits; int32 holds them for the kernel's uint32 view
    angle_words = all_words.flip(0).to(torch.int32)
    even = torch.empty(count, device=DEVICE)
    odd = torch.empty(count, device=DEVICE)
    _box_muller_kernel[(count // block,)](even, odd, radius_words.to(DEVICE).view(torch.uint32),
                                          angle_words.to(DEVICE).view(torch.uint32), BLOCK=block,
                                          FAST_MATH=fast_math)
    radius_u = rng.uniforms(all_words).double()
    angle_u = rng.uniforms(all_words.flip(0)).double()
    radius = torch.sqrt(-2.0 * torch.log(radius_u))
    angle = 2.0 * math.pi * angle_u
    max_error, mean_error, finite = 0.0, 0.0, True
    for got, want in ((even, radius * torch.cos(angle)), (odd, radius * torch.sin(angle))):
        got = got.cpu().double()
        finite = finite and bool(torch.isfinite(got).all())
        error = (got - want).abs()
        max_error = max(max_error, error.max().item())
        mean_error = max(mean_error, error.mean().item())
    return max_error, mean_error, finite


def test_gaussian_transform_over_every_uniform():
    max_error, mean_error, finite = _transform_errors_over_every_uniform(FAST)
    assert finite and max_error <= SPEC_Z_MAX_ABS and mean_error <= SPEC_Z_MEAN_ABS


# Stand-ins for the special-function unit's approximations that err by the larger of their
# published bounds (CUDA C++ Programming Guide: __log2f 2^-22 absolute on [0.5, 2], 2 ulp
# (<= 2^-22 relative) elsewhere; PTX ISA: sin/cos.approx 2^-20.9 absolute on [-pi, pi]; the
# square root at 2^-22 relative, about twice its documented error).  MODE (passed where the kernels pass FAST): 1 all high,
# -1 all low, 2 a direction hashed from the input.
@triton.jit
def _at_bound(exact, bound, x, MODE: tl.constexpr):
    if MODE == 2:
        up = ((x.to(tl.uint32, bitcast=True) * 0x9E3779B1) >> 31) == 1
        return tl.where(up, exact + bound, exact - bound)
    else:
        return exact + MODE * bound


@triton.jit
def _log2_at_bound(x, MODE: tl.constexpr):
    exact = tl.log2(x)
    bound = tl.where((x >= 0.5) & (x <= 2.0), 2.384185791015625e-07, tl.abs(exact) * 2.384185791015625e-07)
    return _at_bound(exact, bound, x, MODE)


@triton.jit
def _sqrt_at_bound(x, MODE: tl.constexpr):
    exact = tl.sqrt(x)
    return _at_bound(exact, exact * 2.384185791015625e-07, x, MODE)


@triton.jit
def _sin_at_bound(x, MODE: tl.constexpr):
    return _at_bound(tl.sin(x), 5.1e-07, x, MODE)


@triton.jit
def _cos_at_bound(x, MODE: tl.constexpr):
    return _at_bound(tl.cos(x), 5.1e-07, x, MODE)


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the real special-function unit runs (the test above)")
@pytest.mark.parametrize("mode", (1, -1, 2), ids=("all-high", "all-low", "hashed-directions"))
def test_gaussian_transform_meets_spec_when_the_special_functions_err_by_their_bound(monkeypatch, mode):
    """The fast path's formula (|log2 u| under the root, the angle 2 pi u - pi) with every MUFU
    approximation off by its documented bound: SPEC §1 over every uniform, and within the
    4.6e-4 of _radius_root's docstring near u -> 1, where an upward lg2 error turns log2 u
    positive."""
    for name, stand_in in (("_fast_log2", _log2_at_bound), ("_fast_sqrt", _sqrt_at_bound),
                           ("_fast_sin", _sin_at_bound), ("_fast_cos", _cos_at_bound)):
        monkeypatch.setattr(K, name, stand_in)
    max_error, mean_error, finite = _transform_errors_over_every_uniform(mode)
    assert finite and max_error <= 4.6e-4 and mean_error <= SPEC_Z_MEAN_ABS, (max_error, mean_error)


@requires_fused_pass
@pytest.mark.parametrize("seed, tid, offset", [(0, 0, 0), (HUGE_SEED, 7, 3), (2**63, 2**32 - 1, 2**40 + 1)])
def test_gaussian_noise_matches_spec_bound(seed, tid, offset):
    count = 1 << 12 if not HAS_CUDA else 1 << 20
    z = ak.noise(count, seed, tid=tid, offset=offset, backend="triton", device=DEVICE).cpu().double()
    exact = rng.noise(count, seed, tid, offset, dtype=torch.float64)
    error = (z - exact).abs()
    assert torch.isfinite(z).all()
    assert error.max().item() <= SPEC_Z_MAX_ABS
    assert error.mean().item() <= SPEC_Z_MEAN_ABS


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


@requires_fused_pass
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


# ----------------------------------------------------------------------------- classes, tables, uploads


def _group(params, grads=None, states=(), offsets=None, tids=None, decay=None):
    count = len(params)
    return TensorGroup(
        indices=tuple(range(count)), device=params[0].device, param_dtype=params[0].dtype,
        grad_dtype=grads[0].dtype if grads else None, state_dtype=states[0][0].dtype if states else None,
        numels=tuple(p.numel() for p in params), tids=tuple(tids or range(count)),
        offsets=tuple(offsets or [0] * count), weight_decay=tuple(decay or [0.0] * count),
    )


@requires_fused_pass
@requires_cpu_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_misaligned_tensors_get_their_own_class(dtype, generator):
    """A tensor whose address is not a multiple of its element size (torch.frombuffer at an odd
    offset) is reached byte by byte in its own launch; the aligned tensors keep 16-byte accesses."""
    values = [_randn((n,), dtype, generator) for n in (600, 37, 1100)]
    size = values[0].element_size()
    params = [values[0].clone(), misaligned(values[1], 1), misaligned(values[2], size)]
    grads = [misaligned(_randn((n,), torch.float32, generator, scale=1.0), 2) for n in (600, 37, 1100)]
    prepared = launch.prepare(_group(params), params, [])
    modes = {launch_class.access: launch_class.members for launch_class in prepared.classes}
    assert modes == {K.ACCESS_VECTOR: (0,), K.ACCESS_ELEMENT: (2,), K.ACCESS_BYTES: (1,)}
    reference = clones(params)
    ak.addax_update_(params, grads, HUGE_SEED, 2.0, 0.01, 0.5, rounding="stochastic", backend="triton")
    ak.addax_update_(reference, grads, HUGE_SEED, 2.0, 0.01, 0.5, rounding="stochastic", backend="reference")
    assert_matches_reference(params, reference, 0.01)


def test_access_modes_and_tiles():
    """Classes follow the addresses of global element 0; tiles split into full runs and edges."""
    assert launch._access_mode(4096, 0, 4) == K.ACCESS_VECTOR
    assert launch._access_mode(4096 + 8, 2, 4) == K.ACCESS_VECTOR  # element 0 of the whole tensor is aligned
    assert launch._access_mode(4096 + 8, 0, 4) == K.ACCESS_ELEMENT
    assert launch._access_mode(4096 + 2, 0, 4) == K.ACCESS_BYTES
    assert launch._tiles(0, 1024, 512) == (0, 2, [])
    assert launch._tiles(100, 1000, 512) == (1, 1, [0, 2])
    assert launch._tiles(100, 10, 512) == (1, 0, [0])
    assert launch._tiles(2**63 - 512, 512, 512) == (2**54 - 1, 1, [])


def test_prepared_keeps_no_tensor():
    """A cached prepare() result must not keep a model alive (backends/__init__.py)."""
    import gc
    import weakref

    params = [torch.zeros(700, device=DEVICE), torch.zeros(9, device=DEVICE, dtype=torch.bfloat16)[1:]]
    states = [[torch.zeros_like(p) for p in params]]
    prepared = launch.prepare(_group(params[:1], states=[states[0][:1]]), params, states)
    watchers = [weakref.ref(t) for t in params + states[0]]
    del params, states
    gc.collect()
    assert all(watcher() is None for watcher in watchers) and prepared.classes


@requires_fused_pass
def test_steady_state_calls_upload_nothing(monkeypatch, generator):
    """run() with a prepared group: only seeds and scalars change, so nothing is uploaded; new
    gradient addresses upload their deltas once, repeated ones come from the cache."""
    params = [_randn((n,), torch.bfloat16, generator) for n in (1, 3, 4097, 131)]
    grads = [_randn(p.shape, torch.bfloat16, generator) for p in params]
    group = _group(params, grads)
    prepared = launch.prepare(group, params, [])
    uploads = []
    real_upload = launch._upload
    monkeypatch.setattr(launch, "_upload", lambda *args: uploads.append(args[-1]) or real_upload(*args))

    def job(seed, has_grad=False):
        return FusedJob(seeds=Seeds(values=(seed, seed + 1)), scalars=Scalars(values=(1e-3,) + (0.0,) * 8),
                        has_shift=not has_grad, num_directions=int(has_grad), has_grad=has_grad)

    for seed in range(3):
        launch.run(prepared, group, job(seed), params, None, [])
    assert uploads == []
    for seed in range(2):
        launch.run(prepared, group, job(seed, has_grad=True), params, grads, [])
    assert uploads == ["upload the gradients' addresses"]
    launch.run(prepared, group, job(5, has_grad=True), params, clones(grads), [])
    assert len(uploads) == 2


@requires_fused_pass
@pytest.mark.parametrize("decay", (0.0, 0.1))
def test_restore_direction_and_gradient_in_one_pass(decay, generator):
    """The restore shift, one direction and a gradient in one job (the backend protocol allows it;
    no op builds it) take the pass that uses z once: it matches the reference backend."""
    from addax_kernels.backends import SCALAR_FIRST_COEFF, SCALAR_GRAD_COEFF, SCALAR_LR, SCALAR_SHIFT, reference

    params = [_randn((n,), torch.bfloat16, generator) for n in (4097, 131)]
    grads = [_randn(p.shape, torch.float32, generator, scale=1.0) for p in params]
    group = _group(params, grads, decay=[decay, 0.0])
    scalars = [0.0] * (SCALAR_FIRST_COEFF + 1)
    scalars[SCALAR_SHIFT], scalars[SCALAR_LR], scalars[SCALAR_GRAD_COEFF], scalars[SCALAR_FIRST_COEFF] = \
        1e-3, 1e-2, 0.3, 0.7
    job = FusedJob(seeds=Seeds(values=(77, 78)), scalars=Scalars(values=tuple(scalars)), has_shift=True,
                   num_directions=1, has_grad=True, rounding="stochastic")
    got, expected = clones(params), clones(params)
    launch.run(launch.prepare(group, got, []), group, job, got, grads, [])
    reference.run(reference.prepare(group, expected, []), group, job, expected, grads, [])
    assert_matches_reference(got, expected, 1e-3 + 1e-2 * 0.7)


@requires_fused_pass
def test_a_call_that_fails_before_its_last_group_launches_changes_nothing(monkeypatch, generator):
    """A call over several dtype groups stages every group (uploads, compiles of new variants)
    before launching any: a failure while staging the second group leaves the first unchanged."""
    params = [_randn((300,), torch.float32, generator), _randn((200,), torch.bfloat16, generator)]
    ak.perturb_(params, 3, 1e-2, backend="triton")  # the plan and launches exist
    before = clones(params)
    stage, staged = launch._stage, []

    def failing_stage(prepared, group, *args):
        if staged:
            raise RuntimeError("simulated compile failure")
        staged.append(group)
        return stage(prepared, group, *args)

    monkeypatch.setattr(launch, "_stage", failing_stage)
    with pytest.raises(RuntimeError, match="simulated compile failure"):
        ak.perturb_(params, 5, 1e-2, backend="triton")
    assert len(staged) == 1
    assert all(torch.equal(a, b) for a, b in zip(params, before))


_GUARD_PAGE_SCRIPT = """
import ctypes, mmap, sys, torch
from addax_kernels.backends import FusedJob, Scalars, Seeds, TensorGroup, SCALAR_FIRST_COEFF, load

page = mmap.PAGESIZE
memory = mmap.mmap(-1, 2 * page, prot=mmap.PROT_READ | mmap.PROT_WRITE)
address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
assert ctypes.CDLL(None).mprotect(ctypes.c_void_p(address + page), page, 0) == 0
floats = torch.frombuffer(memory, dtype=torch.float32, count=page // 4)
scalars = floats[page // 4 - SCALAR_FIRST_COEFF:]  # a perturb_'s vector: no coefficient slot
scalars.zero_()
scalars[0] = 0.5
param = torch.zeros(1000)
group = TensorGroup(indices=(0,), device=param.device, param_dtype=torch.float32, grad_dtype=None,
                    state_dtype=None, numels=(1000,), tids=(0,), offsets=(0,), weight_decay=(0.0,))
job = FusedJob(seeds=Seeds(tensor=torch.tensor([123, 123])), scalars=Scalars(tensor=scalars), has_shift=True,
               num_directions=0, has_grad=False)
backend = load("triton")
backend.run(backend.prepare(group, [param], []), group, job, [param], None, [])
print("max", float(param.abs().max()))
"""


@requires_cpu_interpreter
@requires_fused_pass
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mprotect through libc")
def test_a_pass_without_directions_reads_no_coefficient_slot():
    """With device scalars, a perturb_ passes the scalar vector without its coefficient slot: the
    kernel must not read past it (here the next page is unreadable, so a read would crash)."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", _GUARD_PAGE_SCRIPT], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TRITON_INTERPRET="1"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert float(done.stdout.split()[-1]) > 0.0


def test_capture_errors_say_what_to_do(monkeypatch):
    """An upload under CUDA graph capture raises before anything is launched, and says how to
    make the call capturable."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="during CUDA graph capture.*int64 device tensors.*0-dim device tensors"):
        launch._upload([1, 2], torch.int64, torch.device("cuda"), "upload the seeds of several directions")


# ----------------------------------------------------------------------------- SASS counting

# A hand-written kernel in nvdisasm's format: an edge path, a prologue, a search loop with one
# table load, and an outer row loop around a straight-line tile loop that stores.
_SYNTHETIC_SASS = """
.text.k:
        /*0000*/                   S2R R0, SR_CTAID.X ;
        /*0010*/                   ISETP.GE.AND P0, PT, R0, 0x4, PT ;
        /*0020*/               @P0 BRA `(.L_x_0) ;
        /*0030*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0040*/                   STG.E.U16 desc[UR4][R4.64], R2 ;
        /*0050*/                   EXIT ;
.L_x_0:
        /*0060*/                   MOV R1, RZ ;
        /*0070*/                   MOV R3, RZ ;
.L_x_1:
        /*0080*/                   LDG.E.64 R6, desc[UR4][R4.64] ;
        /*0090*/                   SEL R1, R1, R6, P1 ;
        /*00a0*/               @P1 BRA `(.L_x_1) ;
.L_x_2:
        /*00b0*/                   LDG.E.64 R8, desc[UR4][R4.64] ;
        /*00c0*/                   IADD3 R3, R3, 0x1, RZ ;
.L_x_3:
        /*00d0*/                   LDG.E.128 R12, desc[UR4][R10.64] ;
        /*00e0*/                   FFMA R12, R12, R2, R12 ;
        /*00f0*/                   STG.E.128 desc[UR4][R10.64], R12 ;
        /*0100*/               @P2 BRA `(.L_x_3) ;
        /*0110*/               @P3 BRA `(.L_x_2) ;
        /*0120*/                   EXIT ;
.L_x_4:
        /*0130*/                   BRA `(.L_x_4);
"""


def test_sass_counting_rules_on_a_known_kernel():
    from addax_kernels import sass
    from addax_kernels.sass import triton_backend as sass_triton

    counts = sass_triton.analyze(sass_triton.Sass(_SYNTHETIC_SASS), register_count=32)
    assert counts.loop == 4  # the tile loop, from its head to its backward branch
    assert counts.search_step == 3.0  # three instructions per table load
    assert counts.visit == 3  # the row loop's body outside the tile loop (two instructions and its branch)
    assert counts.prologue == 6  # entry test (3), setup (2), exit (1); the padding loop is unreachable
    assert counts.edge == 3
    assert counts.access_bytes == 16 and counts.local_accesses == 0 and counts.loop_local_accesses == 0
    # The H200 budget: 3.35e13 instructions/s for 4.3e12 B/s of copy bandwidth.
    assert sass.budget_per_element(4) == pytest.approx(31.16, abs=0.01)
    assert sass.estimated_cap(4, 2 * 31.16) == pytest.approx(0.5, abs=1e-3)
    assert sass.estimated_cap(8, 1.0) == 1.0


def test_sass_report_lists_variants_it_cannot_count_and_keeps_the_others(monkeypatch):
    """A loop with an inner loop or branch cannot be counted exactly: that variant goes to the
    report's "Not reported" list with its configuration, the backend's other rows stay."""
    from addax_kernels import sass
    from addax_kernels.sass import triton_backend as sass_triton

    countable, branching = sass.Variant("perturb", "bf16"), sass.Variant("zo_update", "bf16", directions=2)

    def fake_row(variant):
        if variant == branching:
            raise sass_triton.NotCountable("inner loop")
        return sass.make_row("triton", variant, 20.0, 40, 0, 0, 16, "triton (fake)")

    monkeypatch.setattr(sass_triton, "variant_row", fake_row)
    rows, problems = sass_triton._rows_here((countable, branching))
    assert [sass.variant_of(row) for row in rows] == [countable]
    assert problems == ["zo_update bf16 gaussian nearest q=2: inner loop"]
    monkeypatch.setattr(sass_triton, "triton_rows", lambda: sass_triton._rows_here((countable, branching)))
    rows, problems = sass._collect("triton", "triton_backend", "triton_rows")
    assert len(rows) == 1 and problems == ["triton: zo_update bf16 gaussian nearest q=2: inner loop"]


# ----------------------------------------------------------------------------- compiled code, offline

# Compiles three variants for sm_90 (and one for sm_80) with Triton's bundled ptxas, in a
# process without TRITON_INTERPRET, and checks the steady state of each: 16-byte accesses,
# no spills, MUFU transcendentals for Gaussian noise only, within the instruction budget.
_OFFLINE_COMPILE = r"""
import json, sys
from addax_kernels import sass
from addax_kernels.sass import triton_backend as s
variants = (sass.Variant("perturb", "bf16"), sass.Variant("zo_update", "bf16", rounding="stochastic"),
            sass.Variant("addax_update", "bf16", "fp32", noise="rademacher", rounding="stochastic"))
report = {}
for name, variant, overrides in [(v.op, v, None) for v in variants] + [("zo_update+decay", variants[1], {"HAS_DECAY": True})]:
    compiled, warps = s._compile(variant, overrides=overrides)
    text = s.disassemble(compiled.asm["cubin"])
    counts = s.analyze(s.Sass(text), s.registers(compiled.asm["cubin"]))
    report[name] = dict(counts.__dict__, mufu="MUFU.LG2" in text and "MUFU.SIN" in text,
                        cap=sass.estimated_cap(variant.bytes_per_element(), s.per_element(counts, 4096, warps)))
sm80, _ = s._compile(sass.Variant("perturb", "fp16"), arch=80)
report["sm80_loads"] = sorted(set(line.split()[0] for line in sm80.asm["ptx"].splitlines()
                                  if line.strip().startswith("ld.global")))
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
    if result.returncode and ("ptxas" in result.stderr or "nvdisasm" in result.stderr) and "not found" in result.stderr:
        pytest.skip("this triton install has no ptxas/nvdisasm")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    for op in ("perturb", "zo_update", "addax_update", "zo_update+decay"):
        entry = report[op]
        assert entry["access_bytes"] == 16, (op, entry)
        assert entry["loop_local_accesses" if op == "zo_update+decay" else "local_accesses"] == 0, (op, entry)
        # zo_update+decay: MeZO's restore + step with weight decay (stochastic bf16, 2-3 more
        # instructions per element than without decay), which triton 3.6 once compiled at ~130
        # instructions per element (a cap of 0.23: its noise computed in a replicated layout).
        assert entry["cap"] >= (0.8 if op == "zo_update+decay" else 0.9), (op, entry)
    assert report["perturb"]["mufu"] and report["zo_update"]["mufu"]
    assert not report["addax_update"]["mufu"]  # Rademacher noise needs no transcendentals
    assert any(load.endswith(".v4.b32") for load in report["sm80_loads"]), report["sm80_loads"]


# ----------------------------------------------------------------------------- GPU only


@requires_cuda
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_gpu_large_tensors_match_reference(dtype, rounding):
    generator = torch.Generator().manual_seed(7)
    shapes = [(1 << 22,), (4093, 1021), (1,), (65537,)]
    params = [_randn(shape, dtype, generator) for shape in shapes]
    grads = [_randn(shape, torch.bfloat16, generator, scale=1.0) for shape in shapes]
    (mine,), (reference,) = on_backend_and_reference(ak.perturb_, "triton", [params], HUGE_SEED, 1e-3,
                                                     rounding=rounding)
    assert_matches_reference(mine, reference, 1e-3)
    (mine,), (reference,) = on_backend_and_reference(ak.zo_update_, "triton", [params], [1, 2], [0.5, 1.5], 0.01,
                                                     restore=1e-3, weight_decay=0.1, rounding=rounding)
    assert_matches_reference(mine, reference, 1e-3 + 0.02)
    (mine,), (reference,) = on_backend_and_reference(ak.addax_update_, "triton", [params], grads, 3, 2.0, 0.01, 0.5,
                                                     rounding=rounding)
    assert_matches_reference(mine, reference, 0.01)


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
    assert_matches_reference(params, [expected], 1e-2)


def _graph_step(params, seeds, scalars):
    """A MeZO-like step on device seeds and scalars: +εz, −2εz, restore + update, one direction."""
    ak.perturb_(params, seeds[0], scalars[0], rounding="stochastic", rounding_seed=seeds[1], backend="triton")
    ak.perturb_(params, seeds[0], -2 * scalars[0], rounding="stochastic", rounding_seed=seeds[2], backend="triton")
    ak.zo_update_(params, seeds[0], scalars[1], scalars[2], restore=scalars[0], rounding="stochastic",
                  rounding_seed=seeds[3], backend="triton")


@requires_cuda
def test_gpu_cuda_graph_replays_read_the_seeds_of_the_moment():
    """A captured step on device seeds and scalars uploads nothing; each replay reads the values
    the tensors hold then, and equals the same step run eagerly."""
    generator = torch.Generator().manual_seed(3)
    params = [_randn((n,), torch.bfloat16, generator) for n in (1 << 16, 4097, 3)]
    seeds = [torch.zeros((), dtype=torch.int64, device="cuda") for _ in range(4)]
    scalars = [torch.zeros((), device="cuda") for _ in range(3)]

    def set_step(step):
        for k, seed in enumerate(seeds):
            seed.fill_(rng.seed_as_int64((2**63 + 1000 * step + k) % 2**64))
        for scalar, value in zip(scalars, (1e-3, 0.5 + step, 1e-2)):
            scalar.fill_(value)

    set_step(0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up on these tensors: tables, kernels, occupancy
        _graph_step(params, seeds, scalars)
    torch.cuda.current_stream().wait_stream(stream)
    eager = clones(params)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _graph_step(params, seeds, scalars)
    for step in range(3):
        set_step(step)
        graph.replay()
        _graph_step(eager, seeds, scalars)
    torch.cuda.synchronize()
    for got, want in zip(params, eager):
        assert torch.equal(got, want)


@requires_cuda
def test_gpu_capture_of_a_call_that_uploads_raises_a_clear_error():
    params = [torch.randn(4097, device="cuda")]
    ak.zo_update_(params, [1, 2], [0.5, 0.5], 1e-2, backend="triton")  # compiled and prepared
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="int64 device tensors"):
        with torch.cuda.graph(graph):
            ak.zo_update_(params, [1, 2], [0.5, 0.5], 1e-2, backend="triton")  # host seeds of two directions

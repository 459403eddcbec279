"""The public ops of SPEC §2 on every backend that runs here, against independent references.

References: z materialized by the reference ``addax_kernels.noise`` in float64 (the judge of
SPEC §1) with the update formulas evaluated in float64; ``torch.optim.SGD``/``Adam`` applied
to the gradient the ops imply; the same call with other argument spellings.  The ops compute
in float32, so results agree to float32 rounding of each term: we allow a few float32 ulps
of the largest term plus one storage rounding.

Every test that runs a kernel is parametrized over the backends (``backend`` fixture); the
Triton backend runs under its interpreter on the CPU (conftest sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import gc
import inspect
import math
import re
import warnings
import weakref

import numpy as np
import pytest
import torch

import addax_kernels as ak
from tolerance import clones
from addax_kernels import backends, ops, rng
from addax_kernels.backends import reference
from addax_kernels.ops import _plan

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS32 = torch.finfo(torch.float32).eps
BACKENDS = ("reference", "native", "triton")
PUBLIC_OPS = (ak.perturb_, ak.zo_update_, ak.addax_update_, ak.zo_momentum_update_, ak.zo_adam_update_)


def _backend_skip_reason(name):
    state = ak.backend_report("cpu")[name]
    if state != "available":
        return state
    if not hasattr(backends.load(name), "prepare"):
        return f"the {name} backend does not implement the v2 contract (prepare/run) yet"
    return None


@pytest.fixture(params=[
    pytest.param(name, marks=pytest.mark.skipif(_backend_skip_reason(name) is not None,
                                                reason=f"{name}: {_backend_skip_reason(name)}"))
    for name in BACKENDS
])
def backend(request):
    return request.param


# A tensor past one 4096-element tile of the native kernels, odd sizes, a single element.
SHAPES = ((7, 13), (1,), (4097,), (3, 5, 2))
# The same structure, small: for the tests of equivalences (the Triton interpreter is slow).
SMALL_SHAPES = ((7, 13), (1,), (300,), (3, 5, 2))


def make_params(generator, shapes=SHAPES, dtype=torch.float32):
    return [(torch.randn(shape, generator=generator) * 0.5).to(dtype) for shape in shapes]


def z64(params, seed, tids=None, offsets=None, kind="gaussian"):
    tids = tids or list(range(len(params)))
    offsets = offsets or [0] * len(params)
    return [
        ak.noise(p.shape, seed, tid=t, offset=o, noise=kind, dtype=torch.float64)
        for p, t, o in zip(params, tids, offsets)
    ]


def assert_close_to_formula(got, expected64, scale):
    """|got - expected| within 8 float32 ulps of ``scale`` (the largest term), plus storage rounding."""
    storage_ulp = torch.finfo(got.dtype).eps
    tolerance = 8 * EPS32 * scale + storage_ulp * expected64.abs()
    error = (got.double() - expected64).abs()
    assert bool((error <= tolerance).all()), f"max error {float(error.max()):.3g}"


def all_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


# ----------------------------------------------------------------------------- formulas


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_perturb_matches_formula(generator, backend, dtype, kind):
    params = make_params(generator, dtype=dtype)
    before = [p.double() for p in params]
    scale = 1e-2
    ak.perturb_(params, 2**63 + 5, scale, noise=kind, backend=backend)
    for p, b, z in zip(params, before, z64(params, 2**63 + 5, kind=kind)):
        expected = b + scale * z
        assert_close_to_formula(p, expected, b.abs() + scale * z.abs())


@pytest.mark.parametrize("dtype", DTYPES)
def test_zo_update_matches_formula_with_restore_and_decay(generator, backend, dtype):
    params = make_params(generator, dtype=dtype)
    before = [p.double() for p in params]
    seeds, coeffs, lr, restore = [3, 4, 5], [0.7, -1.3, 0.25], 0.01, 1e-3
    decays = [0.1, 0.0, 0.2, 0.05]
    ak.zo_update_(params, seeds, coeffs, lr, restore=restore, weight_decay=decays, backend=backend)
    zs = [z64(params, s) for s in seeds]
    for i, (p, b) in enumerate(zip(params, before)):
        restored = b + restore * zs[0][i]
        direction = sum(c * z[i] for c, z in zip(coeffs, zs)) + decays[i] * restored
        expected = restored - lr * direction
        scale = restored.abs() + lr * (sum(abs(c) * z[i].abs() for c, z in zip(coeffs, zs)) + restored.abs())
        assert_close_to_formula(p, expected, scale)


@pytest.mark.parametrize("dtype", DTYPES)
def test_addax_update_matches_formula(generator, backend, dtype):
    params = make_params(generator, dtype=dtype)
    grads = [torch.randn(p.shape, generator=generator).to(torch.float32) for p in params]
    before = [p.double() for p in params]
    zo_grad, lr, alpha, decay = 2.5, 0.05, 0.3, 0.01
    ak.addax_update_(params, grads, 9, zo_grad, lr, alpha, weight_decay=decay, backend=backend)
    for p, b, g, z in zip(params, before, grads, z64(params, 9)):
        expected = b - lr * (alpha * zo_grad * z + (1 - alpha) * g.double() + decay * b)
        scale = b.abs() + lr * (alpha * zo_grad * z.abs() + g.double().abs() + b.abs())
        assert_close_to_formula(p, expected, scale)


def _implied_gradients(params, seeds, coeffs):
    """Σ_k coeffs[k]·z(seeds[k]) per tensor, in float32 from float64 z (the gradient torch.optim sees)."""
    zs = [z64(params, s) for s in seeds]
    return [sum(c * z[i] for c, z in zip(coeffs, zs)).float() for i in range(len(params))]


def test_zo_momentum_update_is_torch_sgd_on_the_implied_gradient(generator, backend):
    params = make_params(generator, SMALL_SHAPES)
    buffers = [torch.zeros_like(p) for p in params]
    torch_params = [torch.nn.Parameter(p.clone()) for p in params]
    sgd = torch.optim.SGD(torch_params, lr=0.05, momentum=0.9, weight_decay=0.01)
    for step, (seeds, coeffs) in enumerate([([3, 4], [0.5, -0.25]), ([5, 6], [1.5, 0.75])]):
        ak.zo_momentum_update_(params, buffers, seeds, coeffs, 0.05, 0.9, weight_decay=0.01, backend=backend)
        for tp, grad in zip(torch_params, _implied_gradients(params, seeds, coeffs)):
            tp.grad = grad
        sgd.step()
        for p, tp, buf in zip(params, torch_params, buffers):
            expected_buf = sgd.state[tp]["momentum_buffer"]
            assert torch.allclose(buf, expected_buf, rtol=0, atol=32 * EPS32 * float(expected_buf.abs().max() + 1))
            assert torch.allclose(p, tp.detach(), rtol=0, atol=32 * EPS32 * float(tp.detach().abs().max() + 1)), step


def test_zo_adam_update_is_torch_adam_on_the_implied_gradient(generator, backend):
    params = make_params(generator, SMALL_SHAPES)
    exp_avgs, exp_avg_sqs = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    torch_params = [torch.nn.Parameter(p.clone()) for p in params]
    adam = torch.optim.Adam(torch_params, lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.02)
    for step, (seeds, coeffs) in enumerate([([3], [0.5]), ([5, 6], [1.5, 0.75])], start=1):
        ak.zo_adam_update_(params, exp_avgs, exp_avg_sqs, seeds, coeffs, 0.01, step, betas=(0.8, 0.99), eps=1e-6,
                           weight_decay=0.02, backend=backend)
        for tp, grad in zip(torch_params, _implied_gradients(params, seeds, coeffs)):
            tp.grad = grad
        adam.step()
        for p, tp, m, v in zip(params, torch_params, exp_avgs, exp_avg_sqs):
            state = adam.state[tp]
            # float32 z against float64-derived z: differences of a few 1e-7 (a wrong bias
            # correction or weight decay would show as 1e-3).
            assert torch.allclose(m, state["exp_avg"], rtol=1e-5, atol=2e-6)
            assert torch.allclose(v, state["exp_avg_sq"], rtol=1e-5, atol=2e-6)
            assert torch.allclose(p, tp.detach(), rtol=0, atol=2e-6), step


def test_zo_adam_step_as_a_cpu_tensor_is_the_same_int(generator, backend):
    """A 0-dim CPU step tensor is read on the host, as CPU scalars are: bit-identical to the int."""
    params = make_params(generator, SMALL_SHAPES)
    results = []
    for step in (7, torch.tensor(7), torch.tensor(7, dtype=torch.int32)):
        updated, states = clones(params), [torch.full_like(p, 0.1) for p in params]
        ak.zo_adam_update_(updated, states, clones(states), 3, 0.5, 0.01, step, betas=(0.8, 0.99), backend=backend)
        results.append(updated + states)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_alpha_one_and_zero_reduce_to_zo_and_sgd(generator, backend):
    params = make_params(generator, SMALL_SHAPES)
    grads = [torch.randn(p.shape, generator=generator) for p in params]
    zo_only, sgd_only = clones(params), clones(params)
    ak.addax_update_(zo_only, grads, 4, 1.5, 0.1, 1.0, backend=backend)
    mezo = clones(params)
    ak.zo_update_(mezo, 4, 1.5, 0.1, backend=backend)
    for got, expected in zip(zo_only, mezo):  # the same terms; a backend may order or fuse them differently
        assert torch.allclose(got, expected, rtol=0, atol=4 * EPS32 * float(expected.abs().max() + 1))
    ak.addax_update_(sgd_only, grads, 4, 1.5, 0.1, 0.0, backend=backend)
    for p, g, got in zip(params, grads, sgd_only):
        assert torch.allclose(got, p - 0.1 * g, rtol=0, atol=4 * EPS32 * (p.abs() + 0.1 * g.abs()).max())


def test_perturb_round_trip_on_float32(generator, backend):
    params = make_params(generator)
    original = clones(params)
    for scale in (1e-3, 0.5):
        ak.perturb_(params, 42, scale, backend=backend)
        ak.perturb_(params, 42, -scale, backend=backend)
        for p, o, z in zip(params, original, z64(params, 42)):
            # x + a - a in float32 is off by at most one rounding of x + a.
            bound = EPS32 * (o.double().abs() + scale * z.abs())
            assert bool(((p.double() - o.double()).abs() <= bound).all())


def test_mezo_cycle_restores_float32_params_through_zo_update(backend):
    """+eps, -2eps, then zo_update_ with restore=+eps and lr=0 restores the params."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    params = list(model.parameters())
    original = [p.detach().clone() for p in params]
    ak.perturb_(params, 7, 1e-3, backend=backend)
    ak.perturb_(params, 7, -2e-3, backend=backend)
    ak.zo_update_(params, 7, 0.0, 0.0, restore=1e-3, backend=backend)
    for p, o in zip(params, original):
        assert torch.allclose(p.detach(), o, rtol=0, atol=4 * EPS32 * (o.abs().max() + 1e-2))


def test_device_tensor_scalars_equal_float_scalars(generator, backend):
    params = make_params(generator, SMALL_SHAPES)
    grads = [torch.randn(p.shape, generator=generator) for p in params]
    by_float, by_tensor = clones(params), clones(params)
    ak.addax_update_(by_float, grads, 1, 0.75, 0.125, 0.5, weight_decay=0.01, backend=backend)
    ak.addax_update_(by_tensor, grads, 1, torch.tensor(0.75), torch.tensor(0.125, dtype=torch.float64), 0.5,
                     weight_decay=0.01, backend=backend)
    assert all_equal(by_float, by_tensor)
    ak.zo_update_(by_float, [2, 3], [0.5, 1.5], 0.01, restore=1e-3, backend=backend)
    ak.zo_update_(by_tensor, [2, 3], [torch.tensor(0.5), 1.5], torch.tensor(0.01), restore=torch.tensor(1e-3),
                  backend=backend)
    assert all_equal(by_float, by_tensor)


def test_numpy_scalars_and_arrays_equal_python_floats(generator):
    params = make_params(generator)
    by_float, by_numpy = clones(params), clones(params)
    ak.zo_update_(by_float, [2, 3], [0.5, 1.5], 0.01, backend="reference")
    ak.zo_update_(by_numpy, np.array([2, 3]), np.array([0.5, 1.5]), np.float32(0.01), backend="reference")
    assert all_equal(by_float, by_numpy)
    ak.zo_update_(by_float, 4, 0.5, 0.01, backend="reference")
    ak.zo_update_(by_numpy, np.int64(4), np.array(0.5), 0.01, backend="reference")  # issue 14 item 8
    assert all_equal(by_float, by_numpy)


def test_weight_decay_mask_and_per_tensor_values(generator, backend):
    params = make_params(generator, SMALL_SHAPES)
    masked, explicit = clones(params), clones(params)
    mask = [True, False, True, False]
    ak.zo_update_(masked, 8, 0.3, 0.1, weight_decay=0.5, decay_mask=mask, backend=backend)
    ak.zo_update_(explicit, 8, 0.3, 0.1, weight_decay=[0.5, 0.0, 0.5, 0.0], backend=backend)
    assert all_equal(masked, explicit)
    undecayed = clones(params)
    ak.zo_update_(undecayed, 8, 0.3, 0.1, backend=backend)
    assert torch.equal(masked[1], undecayed[1]) and not torch.equal(masked[0], undecayed[0])


def test_stochastic_rounding_uses_purpose_one_words_of_the_rounding_seed(generator, backend):
    param = (torch.randn(1000, generator=generator) * 0.02).to(torch.bfloat16)
    for rounding_seed, key in ((None, 31), (77, 77)):
        work = param.clone()
        ak.perturb_(work, 31, 1e-3, tids=[5], offsets=[77], rounding="stochastic", rounding_seed=rounding_seed,
                    backend=backend)
        x = param.float() + torch.tensor(1e-3) * ak.noise(1000, 31, tid=5, offset=77)
        words = rng.rounding_words(key, 5, 77, 1000)
        expected = rng.round_to_dtype(x, torch.bfloat16, "stochastic", words)
        # A kernel's float32 z may differ from the reference's by an ulp, which can move x
        # across a rounding threshold; SPEC §4 allows that, rarely.
        assert (work != expected).float().mean() <= 0.01


def test_sparsity_zeroes_z_where_the_mask_drops_elements(generator, backend):
    param = torch.zeros(4096)
    ak.perturb_(param, 12, 1.0, sparsity=0.75, backend=backend)
    expected = ak.noise(4096, 12, sparsity=0.75, dtype=torch.float64)
    assert torch.equal(param == 0, expected == 0)
    assert 0.7 < float((param == 0).float().mean()) < 0.8
    assert torch.allclose(param.double(), expected, rtol=0, atol=1e-3)


# ----------------------------------------------------------------------------- seeds (issue 12 item 3)


SEED_VALUES = (7, 2**63, 2**64 - 12345)


def _seed_tensor(value, dtype):
    as_int64 = rng.seed_as_int64(value)
    if dtype == torch.int64:
        return torch.tensor(as_int64, dtype=torch.int64)
    return torch.tensor(as_int64, dtype=torch.int64).view(torch.uint64)


@pytest.mark.parametrize("seed_dtype", [torch.int64] + ([torch.uint64] if hasattr(torch, "uint64") else []))
def test_seed_tensors_equal_the_same_seeds_as_ints(generator, backend, seed_dtype):
    params = make_params(generator, SMALL_SHAPES, dtype=torch.bfloat16)
    grads = [torch.randn(p.shape, generator=generator) for p in params]
    for value in SEED_VALUES:
        seed = _seed_tensor(value, seed_dtype)
        by_int, by_tensor = clones(params), clones(params)
        ak.perturb_(by_int, value, 1e-2, rounding="stochastic", rounding_seed=value ^ 1, backend=backend)
        ak.perturb_(by_tensor, seed, 1e-2, rounding="stochastic", rounding_seed=_seed_tensor(value ^ 1, seed_dtype),
                    backend=backend)
        assert all_equal(by_int, by_tensor), value
        ak.zo_update_(by_int, [value, 3], [0.5, 0.25], 0.1, rounding="stochastic", backend=backend)
        ak.zo_update_(by_tensor, [seed, 3], [0.5, 0.25], 0.1, rounding="stochastic", backend=backend)
        assert all_equal(by_int, by_tensor), value
        ak.addax_update_(by_int, grads, value, 0.5, 0.1, 0.5, backend=backend)
        ak.addax_update_(by_tensor, grads, seed, 0.5, 0.1, 0.5, backend=backend)
        assert all_equal(by_int, by_tensor), value


def test_seed_tensor_changes_take_effect_between_calls_of_one_plan(generator, backend):
    params = make_params(generator, SMALL_SHAPES)
    seed = torch.tensor(5, dtype=torch.int64)
    by_tensor, by_int = clones(params), clones(params)
    for value in (5, 6, 2**64 - 3):
        seed.fill_(rng.seed_as_int64(value))
        ak.perturb_(by_tensor, seed, 0.1, backend=backend)
        ak.perturb_(by_int, value, 0.1, backend=backend)
        assert all_equal(by_tensor, by_int)


# ----------------------------------------------------------------------------- invariances


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_sharded_tensor_gets_unsharded_result(generator, backend, kind):
    whole = torch.randn(1000, generator=generator)
    grad = torch.randn(1000, generator=generator)
    shards = [whole[:300].clone(), whole[300:301].clone(), whole[301:].clone()]
    grad_shards = [grad[:300], grad[300:301], grad[301:]]
    ak.addax_update_(whole, grad, 5, 1.5, 0.1, 0.5, tids=[3], noise=kind, weight_decay=0.1, backend=backend)
    ak.addax_update_(shards, grad_shards, 5, 1.5, 0.1, 0.5, tids=[3, 3, 3], offsets=[0, 300, 301], noise=kind,
                     weight_decay=0.1, backend=backend)
    assert torch.equal(torch.cat(shards), whole)


def test_reference_backend_is_invariant_to_chunk_size(generator, monkeypatch):
    params = make_params(generator, dtype=torch.bfloat16)
    big_chunks = clones(params)
    ak.zo_update_(big_chunks, [1, 2], [0.5, 0.25], 0.1, restore=1e-3, rounding="stochastic", backend="reference")
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 256)
    small_chunks = clones(params)
    ak.zo_update_(small_chunks, [1, 2], [0.5, 0.25], 0.1, restore=1e-3, rounding="stochastic", backend="reference")
    assert all_equal(big_chunks, small_chunks)


def test_grouping_by_dtype_does_not_change_results(generator, backend):
    mixed = [torch.randn(100, generator=generator).to(dtype) for dtype in DTYPES]
    separate = clones(mixed)
    ak.perturb_(mixed, 6, 0.1, tids=[10, 11, 12], backend=backend)
    for tid, p in zip([10, 11, 12], separate):
        ak.perturb_(p, 6, 0.1, tids=[tid], backend=backend)
    assert all_equal(mixed, separate)


def test_empty_tensors_are_skipped(generator, backend):
    empty, full = torch.empty(0), torch.randn(5, generator=generator)
    expected = full.clone()
    ak.perturb_([empty, full], 1, 0.1, backend=backend)
    ak.perturb_(expected, 1, 0.1, tids=[1], backend=backend)
    assert torch.equal(full, expected)
    ak.perturb_([torch.empty(0, 3)], 1, 0.1, backend=backend)  # nothing to do: no error


def test_parameters_requiring_grad_are_updated_without_autograd_error(backend):
    layer = torch.nn.Linear(4, 3)
    before = layer.weight.detach().clone()
    ak.perturb_(list(layer.parameters()), 1, 0.1, backend=backend)
    assert not torch.equal(layer.weight.detach(), before) and layer.weight.requires_grad


def test_misaligned_float32_tensor_is_updated_like_an_aligned_one(generator, backend):
    """Issue 14 item 6: a tensor whose address is not a multiple of its element size."""
    values = torch.randn(33, generator=generator)
    storage = bytearray(2 + 4 * 33)
    misaligned = torch.frombuffer(storage, dtype=torch.float32, offset=2, count=33)
    misaligned.copy_(values)
    assert misaligned.data_ptr() % 4 != 0
    aligned = values.clone()
    lead = torch.randn(5, generator=generator).bfloat16()
    lead_copy = lead.clone()
    ak.perturb_([lead, misaligned], 3, 0.5, backend=backend)
    ak.perturb_([lead_copy, aligned], 3, 0.5, backend=backend)  # the formula tests judge the aligned result
    assert torch.equal(misaligned, aligned) and torch.equal(lead, lead_copy)


# ----------------------------------------------------------------------------- version counters (issue 14 item 3)


def _call_each_op(params, grads, states, backend):
    yield "perturb_", lambda: ak.perturb_(params, 1, 0.1, backend=backend)
    yield "zo_update_", lambda: ak.zo_update_(params, 1, 0.1, 0.1, backend=backend)
    yield "addax_update_", lambda: ak.addax_update_(params, grads, 1, 0.1, 0.1, 0.5, backend=backend)
    yield "zo_momentum_update_", lambda: ak.zo_momentum_update_(params, states[0], 1, 0.1, 0.1, 0.9, backend=backend)
    yield "zo_adam_update_", lambda: ak.zo_adam_update_(params, states[0], states[1], 1, 0.1, 0.1, 1, backend=backend)


def test_every_op_bumps_the_version_of_what_it_writes_only(generator, backend):
    params = make_params(generator, SMALL_SHAPES, dtype=torch.bfloat16)
    grads = [torch.randn(p.shape, generator=generator) for p in params]
    states = [[torch.zeros(p.shape) for p in params] for _ in range(2)]
    for name, call in _call_each_op(params, grads, states, backend):
        written_states = {"zo_momentum_update_": 1, "zo_adam_update_": 2}.get(name, 0)
        written = params + [t for buffers in states[:written_states] for t in buffers]
        read_only = grads + [t for buffers in states[written_states:] for t in buffers]
        before = ([t._version for t in written], [t._version for t in read_only])
        call()
        # At least once (the reference backend's own slice writes count too), never for what is read.
        assert all(t._version > v for t, v in zip(written, before[0])), name
        assert [t._version for t in read_only] == before[1], name


def test_autograd_refuses_a_backward_through_a_tensor_the_op_changed(backend):
    w = torch.nn.Parameter(torch.ones(4))
    x = torch.ones(4, requires_grad=True)
    loss = (w * x).sum()
    with torch.no_grad():
        ak.perturb_([w], 1, 0.5, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ----------------------------------------------------------------------------- inference tensors (issue 14 item 7)


def test_inference_tensors_are_refused_outside_inference_mode_before_any_group_runs(generator, backend):
    normal = torch.randn(9, generator=generator).bfloat16()
    with torch.inference_mode():
        inference = torch.randn(7, generator=generator)
    snapshot = (normal.clone(), inference.clone())
    for _ in range(2):  # the second call finds the plan in the cache: still refused
        with pytest.raises(RuntimeError, match=r"params\[1\].*inference tensor"):
            ak.perturb_([normal, inference], 1, 0.1, backend=backend)
        assert torch.equal(normal, snapshot[0]) and torch.equal(inference, snapshot[1])
    buffers = [torch.zeros(9, dtype=torch.bfloat16)]
    with torch.inference_mode():
        buffers.append(torch.zeros(7))
    with pytest.raises(RuntimeError, match=r"momentum_buffers\[1\].*inference tensor"):
        ak.zo_momentum_update_([normal, inference.clone()], buffers, 1, 0.1, 0.1, 0.9, backend=backend)
    assert torch.equal(normal, snapshot[0])


def test_inference_tensors_are_updated_inside_inference_mode_like_normal_ones(generator, backend):
    values = torch.randn(7, generator=generator)
    with torch.inference_mode():
        inference = values.clone()
        ak.perturb_([inference], 1, 0.1, backend=backend)
    normal = values.clone()
    ak.perturb_([normal], 1, 0.1, backend=backend)
    assert torch.equal(inference, normal)


# ------------------------------------------------------------- checks before any group runs (issue 14 item 6)


def test_offsets_past_2_to_the_63_are_rejected_before_any_group_runs(generator, backend):
    """Issue 14 item 6: the bound is checked before the first group runs; the last element
    index 2**63 - 1 itself is valid (offset + numel == 2**63)."""
    first = torch.randn(8, generator=generator).bfloat16()
    second = torch.randn(5, generator=generator)
    snapshot = clones([first, second])
    with pytest.raises(ValueError, match=r"offsets\[1\] \+ numel of params\[1\] = \d+ exceeds 2\*\*63"):
        ak.perturb_([first, second], 1, 0.1, offsets=[0, 2**63 - 4], backend=backend)
    assert all_equal([first, second], snapshot)
    ak.perturb_([first, second], 1, 0.1, offsets=[0, 2**63 - 5], backend=backend)
    expected = ak.noise(5, 1, tid=1, offset=2**63 - 5, dtype=torch.float64)
    before = snapshot[1].double()
    assert_close_to_formula(second, before + 0.1 * expected, before.abs() + 0.1 * expected.abs())


# ----------------------------------------------------------------------------- rejected input (issue 14 item 8)


class _StoragelessWrapper(torch.Tensor):
    """A wrapper tensor subclass (the kind DTensor is): dense and strided to look at, its data
    pointer 0, its elements held by the tensor it wraps."""

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype, device=inner.device)

    def __init__(self, inner):
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        unwrap = lambda t: t.inner if isinstance(t, _StoragelessWrapper) else t  # noqa: E731
        return func(*[unwrap(a) for a in args], **{k: unwrap(v) for k, v in (kwargs or {}).items()})


def _storageless_wrapper(inner: torch.Tensor) -> torch.Tensor:
    wrapper = _StoragelessWrapper(inner)
    assert wrapper.data_ptr() == 0 and wrapper.is_contiguous()
    return wrapper


def rejected_calls(params, grads):
    """``(label, expected exception, message pattern, call)``: every pattern names the argument."""
    good = dict(backend="reference")
    p = params
    yield "float64 param", TypeError, r"params\[4\].*dtype", lambda: ak.perturb_(
        p + [torch.zeros(3, dtype=torch.float64)], 1, 0.1, **good)
    yield "int param", TypeError, r"params\[4\].*dtype", lambda: ak.perturb_(
        p + [torch.zeros(3, dtype=torch.int32)], 1, 0.1, **good)
    yield "not a tensor", TypeError, r"params\[4\] must be a Tensor", lambda: ak.perturb_(p + [[1.0, 2.0]], 1, 0.1,
                                                                                         **good)
    yield "params not a list", TypeError, r"params must be", lambda: ak.perturb_(3, 1, 0.1, **good)
    yield "non-contiguous", ValueError, r"params\[4\].*contiguous", lambda: ak.perturb_(
        p + [torch.zeros(4, 4).t()], 1, 0.1, **good)
    yield "meta tensor", ValueError, r"params\[4\].*meta", lambda: ak.perturb_(
        p + [torch.zeros(3, device="meta")], 1, 0.1, **good)
    yield "two meta tensors", ValueError, r"params\[0\].*meta", lambda: ak.perturb_(
        [torch.zeros(3, device="meta"), torch.zeros(3, device="meta")], 1, 0.1, **good)
    yield "sparse tensor", ValueError, r"params\[4\].*strided", lambda: ak.perturb_(
        p + [torch.zeros(3).to_sparse()], 1, 0.1, **good)
    freed = torch.zeros(6)
    freed.untyped_storage().resize_(0)
    yield "freed storage", ValueError, r"params\[4\].*storage holds fewer bytes", lambda: ak.perturb_(
        p + [freed], 1, 0.1, **good)
    yield "overlap", ValueError, r"params\[4\] and params\[0\] overlap", lambda: ak.perturb_(
        p + [p[0].view(-1)[:5]], 1, 0.1, **good)
    yield "duplicate", ValueError, r"params\[0\] and params\[4\] overlap", lambda: ak.perturb_(p + [p[0]], 1, 0.1,
                                                                                              **good)
    yield "empty list", ValueError, r"params is empty", lambda: ak.perturb_([], 1, 0.1, **good)
    for seed in (-1, 2**64):
        yield f"seed {seed}", ValueError, r"seed must be in \[0, 2\*\*64\)", lambda seed=seed: ak.perturb_(
            p, seed, 0.1, **good)
    for seed in (1.0, True, None, "1"):
        yield f"seed {seed!r}", TypeError, r"^seed must be", lambda seed=seed: ak.perturb_(p, seed, 0.1, **good)
    yield "float seed tensor", TypeError, r"^seed must be.*float32", lambda: ak.perturb_(
        p, torch.tensor(3.0), 0.1, **good)
    yield "1-d seed tensor", ValueError, r"^seed must be.*shape", lambda: ak.perturb_(
        p, torch.tensor([3, 4]), 0.1, **good)
    yield "seed tensor elsewhere", ValueError, r"^seed is on meta", lambda: ak.perturb_(
        p, torch.zeros((), dtype=torch.int64, device="meta"), 0.1, **good)
    yield "bad rounding seed", ValueError, r"rounding_seed must be in", lambda: ak.perturb_(
        p, 1, 0.1, rounding_seed=-3, **good)
    for scale, error, pattern in ((float("nan"), ValueError, "finite"), (float("inf"), ValueError, "finite"),
                                  (1e39, ValueError, "overflows float32"), ("0.1", TypeError, "real number"),
                                  (torch.ones(2), ValueError, "0-dim"), (None, TypeError, "real number"),
                                  (True, TypeError, "real number")):
        yield f"scale {scale!r}", error, rf"^scale.*{pattern}", lambda scale=scale: ak.perturb_(p, 1, scale, **good)
    yield "nan lr", ValueError, r"^lr must be finite", lambda: ak.zo_update_(p, 1, 0.1, float("nan"), **good)
    yield "nan cpu-tensor scale", ValueError, r"^scale must be finite", lambda: ak.perturb_(
        p, 1, torch.tensor(float("nan")), **good)
    yield "inf cpu-tensor lr", ValueError, r"^lr must be finite", lambda: ak.zo_update_(
        p, 1, 0.1, torch.tensor(float("inf")), **good)
    yield "float32 overflow in a float64 tensor", ValueError, r"^zo_grad=1e\+39 overflows", lambda: ak.addax_update_(
        p, grads, 1, torch.tensor(1e39, dtype=torch.float64), 0.1, 0.5, **good)
    yield "nan coeff", ValueError, r"^coeffs\[1\] must be finite", lambda: ak.zo_update_(
        p, [1, 2], [0.1, float("nan")], 0.1, **good)
    yield "coeffs as a string", TypeError, r"^coeffs must be", lambda: ak.zo_update_(p, 1, "0.1", 0.1, **good)
    yield "nan restore", ValueError, r"^restore must be finite", lambda: ak.zo_update_(
        p, 1, 0.1, 0.1, restore=float("inf"), **good)
    yield "coeff count", ValueError, r"coeffs has 1 entries for 2 seeds", lambda: ak.zo_update_(
        p, [1, 2], [0.1], 0.1, **good)
    yield "no seeds", ValueError, r"seeds is empty", lambda: ak.zo_update_(p, [], [], 0.1, **good)
    yield "bad seed in list", ValueError, r"^seeds\[1\] must be in", lambda: ak.zo_update_(
        p, [1, -2], [0.1, 0.1], 0.1, **good)
    yield "decay count", ValueError, r"weight_decay has 1 entries", lambda: ak.zo_update_(
        p, 1, 0.1, 0.1, weight_decay=[0.1], **good)
    yield "nan decay", ValueError, r"^weight_decay must be finite", lambda: ak.zo_update_(
        p, 1, 0.1, 0.1, weight_decay=float("nan"), **good)
    yield "nan decay in list", ValueError, r"^weight_decay\[2\] must be finite", lambda: ak.zo_update_(
        p, 1, 0.1, 0.1, weight_decay=[0.1, 0.1, float("nan"), 0.1], **good)
    for decay in (torch.tensor(0.1), True, None, "0.1"):
        yield f"weight_decay {decay!r}", TypeError, r"^weight_decay must be a float", lambda decay=decay: ak.zo_update_(
            p, 1, 0.1, 0.1, weight_decay=decay, **good)
    yield "mask True", TypeError, r"^decay_mask must be a sequence of bools", lambda: ak.zo_update_(
        p, 1, 0.1, 0.1, decay_mask=True, **good)
    yield "mask item type", TypeError, r"^decay_mask\[0\] must be a bool", lambda: ak.zo_update_(
        p, 1, 0.1, 0.1, decay_mask=[1] * len(p), **good)
    yield "mask count", ValueError, r"^decay_mask has 1 entries", lambda: ak.zo_update_(
        p, 1, 0.1, 0.1, decay_mask=[True], **good)
    yield "tids count", ValueError, r"^tids has 1 entries", lambda: ak.perturb_(p, 1, 0.1, tids=[0], **good)
    yield "tid range", ValueError, r"^tids\[0\] must be in \[0, 2\*\*32\)", lambda: ak.perturb_(
        p, 1, 0.1, tids=[2**32] * len(p), **good)
    yield "tid type", TypeError, r"^tids\[1\] must be an int", lambda: ak.perturb_(
        p, 1, 0.1, tids=[0, 1.0, 2, 3], **good)
    yield "offset sign", ValueError, r"^offsets\[0\] must be non-negative", lambda: ak.perturb_(
        p, 1, 0.1, offsets=[-1] * len(p), **good)
    yield "offset overflow", ValueError, r"^offsets\[0\] \+ numel .* exceeds 2\*\*63", lambda: ak.perturb_(
        p, 1, 0.1, offsets=[2**63] * len(p), **good)
    yield "noise kind", ValueError, r"^noise must be one of", lambda: ak.perturb_(p, 1, 0.1, noise="uniform", **good)
    yield "rounding mode", ValueError, r"^rounding must be one of", lambda: ak.perturb_(
        p, 1, 0.1, rounding="down", **good)
    yield "sparsity", ValueError, r"^sparsity must be in \[0, 1\)", lambda: ak.perturb_(p, 1, 0.1, sparsity=1.0,
                                                                                         **good)
    yield "backend name", ValueError, r"^backend must be one of", lambda: ak.perturb_(p, 1, 0.1, backend="cuda")
    yield "backend type", TypeError, r"^backend must be a string", lambda: ak.perturb_(p, 1, 0.1, backend=None)
    yield "grads None", TypeError, r"^grads must be a Tensor", lambda: ak.addax_update_(p, None, 1, 0.1, 0.1, 0.5, **good)
    yield "grads count", ValueError, r"^grads has 3 tensors for 4 params", lambda: ak.addax_update_(
        p, grads[:-1], 1, 0.1, 0.1, 0.5, **good)
    yield "grads shape", ValueError, r"^grads\[3\].*shape differs", lambda: ak.addax_update_(
        p, grads[:-1] + [torch.zeros(2)], 1, 0.1, 0.1, 0.5, **good)
    yield "grads dtype", TypeError, r"^grads\[3\].*dtype", lambda: ak.addax_update_(
        p, grads[:-1] + [grads[-1].double()], 1, 0.1, 0.1, 0.5, **good)
    yield "grad not a tensor", TypeError, r"^grads\[3\] must be a Tensor", lambda: ak.addax_update_(
        p, grads[:-1] + [0.5], 1, 0.1, 0.1, 0.5, **good)
    yield "grad non-contiguous", ValueError, r"^grads\[0\].*contiguous", lambda: ak.addax_update_(
        p, [torch.zeros(13, 7).t()] + grads[1:], 1, 0.1, 0.1, 0.5, **good)
    yield "grad aliases param", ValueError, r"^grads\[3\] overlaps params\[0\]", lambda: ak.addax_update_(
        p, grads[:-1] + [p[0].view(-1)[: grads[-1].numel()].view(grads[-1].shape)], 1, 0.1, 0.1, 0.5, **good)
    yield "alpha range", ValueError, r"^alpha must be in \[0, 1\]", lambda: ak.addax_update_(
        p, grads, 1, 0.1, 0.1, 1.5, **good)
    yield "alpha nan", ValueError, r"^alpha must be finite", lambda: ak.addax_update_(
        p, grads, 1, 0.1, 0.1, float("nan"), **good)
    yield "zo_grad 1-d", ValueError, r"^zo_grad must be a 0-dim tensor", lambda: ak.addax_update_(
        p, grads, 1, torch.ones(1), 0.1, 0.5, **good)
    buffers = [torch.zeros(t.shape) for t in p]
    yield "momentum range", ValueError, r"^momentum must be in", lambda: ak.zo_momentum_update_(
        p, buffers, 1, 0.1, 0.1, 1.5, **good)
    yield "momentum buffer dtype", TypeError, r"^momentum_buffers\[0\].*dtype", lambda: ak.zo_momentum_update_(
        p, [buffers[0].half()] + buffers[1:], 1, 0.1, 0.1, 0.9, **good)
    yield "momentum buffer overlaps param", ValueError, r"overlap", lambda: ak.zo_momentum_update_(
        p, [p[0]] + buffers[1:], 1, 0.1, 0.1, 0.9, **good)
    yield "adam state dtypes differ", TypeError, r"^exp_avg_sqs\[0\] is torch.bfloat16", lambda: ak.zo_adam_update_(
        p, buffers, [buffers[0].bfloat16()] + [b.clone() for b in buffers[1:]], 1, 0.1, 0.1, 1, **good)
    yield "adam step", ValueError, r"^step must be an int >= 1", lambda: ak.zo_adam_update_(
        p, buffers, [b.clone() for b in buffers], 1, 0.1, 0.1, 0, **good)
    yield "adam betas", ValueError, r"^betas\[1\] must be in \[0, 1\)", lambda: ak.zo_adam_update_(
        p, buffers, [b.clone() for b in buffers], 1, 0.1, 0.1, 1, betas=(0.9, 1.0), **good)
    for step in (torch.tensor(0), torch.tensor(-3)):
        yield f"adam step tensor {step!r}", ValueError, r"^step must be an int >= 1", lambda step=step: (
            ak.zo_adam_update_(p, buffers, [b.clone() for b in buffers], 1, 0.1, 0.1, step, **good))
    for step in (torch.tensor(1.5), torch.tensor(True)):
        yield f"adam step tensor {step!r}", TypeError, r"^step must be an integer tensor", lambda step=step: (
            ak.zo_adam_update_(p, buffers, [b.clone() for b in buffers], 1, 0.1, 0.1, step, **good))
    # Ranges hold for the value given, not for its float32 rounding (1.00000001 rounds to 1).
    yield "momentum just above 1", ValueError, r"^momentum must be in \[0, 1\]", lambda: ak.zo_momentum_update_(
        p, buffers, 1, 0.1, 0.1, 1.00000001, **good)
    yield "an int beyond float64", ValueError, r"^lr overflows float32", lambda: ak.zo_update_(
        p, 1, 0.1, 10**400, **good)
    wrapper = _storageless_wrapper(torch.zeros(5))
    yield "wrapper subclass param", ValueError, r"params\[4\].*has no memory of its own", lambda: ak.perturb_(
        p + [wrapper], 1, 0.1, **good)
    yield "wrapper subclass grad", ValueError, r"^grads\[3\].*has no memory of its own", lambda: ak.addax_update_(
        p, grads[:-1] + [_storageless_wrapper(grads[-1])], 1, 0.1, 0.1, 0.5, **good)


def test_every_bad_input_is_rejected_naming_it_with_nothing_changed(generator):
    params = make_params(generator)
    grads = [torch.randn(p.shape, generator=generator) for p in params]
    ak.addax_update_(params, grads, 1, 0.1, 0.1, 0.5, backend="reference")  # the good call's plan is cached
    snapshot = clones(params)
    versions = [p._version for p in params]
    for label, error, pattern, call in rejected_calls(params, grads):
        with pytest.raises(error, match=pattern):
            call()
        assert all_equal(params, snapshot), f"{label} modified params"
        assert [p._version for p in params] == versions, f"{label} bumped a version counter"


def test_a_good_call_after_a_cached_one_still_sees_every_bad_change(generator, backend):
    """The plan cache recognises the same tensors and arguments; anything else is checked again."""
    params = make_params(generator, SMALL_SHAPES)
    grads = [torch.randn(p.shape, generator=generator) for p in params]
    tids = [0, 1, 2, 3]
    ak.addax_update_(params, grads, 1, 0.1, 0.1, 0.5, tids=tids, backend=backend)
    snapshot = clones(params)
    params_list = list(params)
    params_list[2] = torch.zeros(300, 2)[:, 0]  # same list object later, a non-contiguous tensor in it
    with pytest.raises(ValueError, match=r"params\[2\].*contiguous"):
        ak.perturb_(params_list, 1, 0.1, tids=tids, backend=backend)
    tids[3] = 2**32  # the caller's list mutated in place
    with pytest.raises(ValueError, match=r"tids\[3\]"):
        ak.perturb_(params, 1, 0.1, tids=tids, backend=backend)
    with pytest.raises(TypeError, match=r"tids\[0\] must be an int"):
        ak.perturb_(params, 1, 0.1, tids=[0.0, 1, 2, 3], backend=backend)
    with pytest.raises(ValueError, match=r"grads\[1\].*shape"):
        ak.addax_update_(params, [grads[0], torch.zeros(2)] + grads[2:], 1, 0.1, 0.1, 0.5, backend=backend)
    with pytest.raises(ValueError, match=r"grads\[2\] overlaps params\[2\]"):
        ak.addax_update_(params, grads[:2] + [params[2]] + grads[3:], 1, 0.1, 0.1, 0.5, backend=backend)
    assert all_equal(params, snapshot)


def test_changed_arguments_between_calls_change_the_result(generator, backend):
    """A cached plan never serves a call whose per-tensor arguments differ."""
    params = make_params(generator, SMALL_SHAPES)
    tids = [0, 1, 2, 3]
    a, b, c = clones(params), clones(params), clones(params)
    ak.zo_update_(a, 1, 0.5, 0.1, tids=tids, weight_decay=0.1, backend=backend)
    tids[1] = 9
    ak.zo_update_(a, 1, 0.5, 0.1, tids=tids, weight_decay=0.2, backend=backend)
    ak.zo_update_(b, 1, 0.5, 0.1, tids=[0, 1, 2, 3], weight_decay=0.1, backend=backend)
    ak.zo_update_(b, 1, 0.5, 0.1, tids=[0, 9, 2, 3], weight_decay=0.2, backend=backend)
    assert all_equal(a, b)
    ak.zo_update_(c, 1, 0.5, 0.1, tids=[0, 1, 2, 3], weight_decay=0.1, backend=backend)
    ak.zo_update_(c, 1, 0.5, 0.1, tids=[0, 1, 2, 3], weight_decay=0.1, backend=backend)
    assert not torch.equal(c[1], b[1])


def test_a_plan_used_during_graph_capture_outlives_the_cache(generator, monkeypatch):
    """A captured graph reads its plan's device tables at every replay: such a plan must survive
    the cache's eviction (other parameter lists used after capture)."""
    params = make_params(generator)
    ak.perturb_(params, 1, 0.1, backend="reference")
    plan = _plan.plan_for(params, [], (), None, None, 0.0, None)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    _plan.keep_if_captured(plan)  # a CPU plan: no graph can replay it
    assert id(plan) not in _plan._CAPTURED
    monkeypatch.setattr(plan, "device", torch.device("cuda"), raising=False)
    try:
        _plan.keep_if_captured(plan)
        _plan.CACHE.clear()
        assert _plan._CAPTURED[id(plan)] is plan
    finally:
        _plan._CAPTURED.pop(id(plan), None)


def test_a_cached_plan_keeps_no_tensor_alive(generator):
    model = torch.nn.Linear(16, 16)
    ak.perturb_(list(model.parameters()), 1, 0.1, backend="reference")
    ak.zo_momentum_update_(list(model.parameters()), [torch.zeros_like(p) for p in model.parameters()], 1, 0.1,
                           0.1, 0.9, backend="reference")
    alive = weakref.ref(model.weight)
    del model
    gc.collect()
    assert alive() is None


def test_without_the_host_extension_results_are_equal_and_one_warning_says_why(generator, monkeypatch):
    params = make_params(generator, dtype=torch.bfloat16)
    grads = [torch.randn(p.shape, generator=generator) for p in params]
    with_host, without_host = clones(params), clones(params)
    ak.addax_update_(with_host, grads, 3, 0.5, 0.1, 0.5, weight_decay=0.1, backend="reference")
    monkeypatch.setattr(_plan, "_host", None)
    monkeypatch.setattr(_plan, "_HOST_IMPORT_ERROR", ImportError("simulated"))
    monkeypatch.setattr(_plan, "_HOST_WARNED", [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ak.addax_update_(without_host, grads, 3, 0.5, 0.1, 0.5, weight_decay=0.1, backend="reference")
        ak.perturb_(without_host, 4, 0.1, backend="reference")
    ak.perturb_(with_host, 4, 0.1, backend="reference")
    assert all_equal(with_host, without_host)
    messages = [str(w.message) for w in caught if "addax_kernels._host" in str(w.message)]
    assert len(messages) == 1 and "simulated" in messages[0] and "build" in messages[0]
    assert ops.host_info()["built"] is False and "simulated" in ops.host_info()["reason"]
    with pytest.raises(ValueError, match=r"params\[0\] and params\[1\] overlap"):
        ak.perturb_([params[0], params[0]], 1, 0.1, backend="reference")


def test_host_extension_is_built_unless_skipped_on_purpose():
    """A broken build must fail CI, not silently fall back to the slow path."""
    import os

    if os.environ.get("ADDAX_KERNELS_NO_NATIVE", "").strip().lower() in ("1", "true", "yes", "on"):
        pytest.skip("ADDAX_KERNELS_NO_NATIVE is set")
    assert ops.host_info() == {"built": True}


def test_unavailable_backend_is_reported_clearly(generator):
    report = ak.backend_report("cpu")
    assert report["reference"] == "available"
    for name, state in report.items():
        if state != "available":
            with pytest.raises(RuntimeError, match=name):
                ak.perturb_(make_params(generator), 1, 0.1, backend=name)


def test_no_backend_is_available_on_a_device_torch_does_not_have():
    if torch.cuda.is_available():
        assert "reference" in ak.available_backends("cuda")
        missing = f"cuda:{torch.cuda.device_count()}"
    else:
        missing = "cuda"
    assert ak.available_backends(missing) == []
    assert "not available" in ak.backend_report(missing)["reference"] or "does not exist" in ak.backend_report(
        missing)["reference"]


def test_environment_override_of_auto_backend(monkeypatch):
    monkeypatch.setenv(ak.BACKEND_ENV_VAR, "reference")
    assert ak.resolve_backend("auto", torch.device("cpu")) == "reference"
    monkeypatch.setenv(ak.BACKEND_ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=ak.BACKEND_ENV_VAR):
        ak.resolve_backend("auto", torch.device("cpu"))
    with pytest.raises(ValueError, match=ak.BACKEND_ENV_VAR):
        ak.perturb_(torch.zeros(3), 1, 0.1)
    monkeypatch.delenv(ak.BACKEND_ENV_VAR)
    assert ak.resolve_backend("auto", torch.device("cpu")) in ak.available_backends("cpu")


def test_number_helpers_refuse_bool():
    assert ops.is_real_number(1) and ops.is_real_number(0.5) and ops.is_real_number(np.float32(2))
    assert not ops.is_real_number(True) and not ops.is_real_number(np.bool_(True)) and not ops.is_real_number("1")
    assert ops.is_integer(3) and ops.is_integer(np.int64(3))
    assert not ops.is_integer(True) and not ops.is_integer(3.0)


# ------------------------------------------------------------- torch.library, torch.compile (issue 14 items 4, 5)


def test_custom_op_passes_opcheck(generator):
    params = make_params(generator, shapes=((5, 3), (7,)))
    grads = [torch.randn(p.shape, generator=generator) for p in params]
    host_int = torch.ones((), dtype=torch.int64) * 3
    host_float = torch.ones((), dtype=torch.float64) * 1e-3
    cases = [
        ([t.clone() for t in params], [], [], [], "perturb_", [host_int, host_float], [0, 2], [-1, -1, -2], None,
         None, [0.0, 0.0]),
        ([t.clone() for t in params], grads, [], [], "addax_update_",
         [host_int, torch.tensor(0.5), host_float, torch.ones((), dtype=torch.float64) * 0.5],
         [0, 3, 2, 2], [-1, -1, -1, -1, -2], [3, 4], [0, 5], [0.1, 0.0]),
        ([t.clone() for t in params], [], [torch.zeros_like(t) for t in params], [], "zo_momentum_update_",
         [host_int, host_float, host_float, torch.ones((), dtype=torch.float64) * 0.9],
         [0, 2, 2, 2], [1, 1, -1, -1, -2, -2], None, None, [0.0, 0.0]),
    ]
    for case in cases:
        torch.library.opcheck(ops._fused_update_op, tuple(case) + ("gaussian", "nearest", 0.0, "reference"))


def test_ops_trace_under_torch_compile_and_equal_eager(generator, backend):
    params = make_params(generator, shapes=((33,), (4, 4)))
    grads = [torch.randn(p.shape, generator=generator) for p in params]
    states = [[torch.zeros_like(p) for p in params] for _ in range(3)]
    eager, compiled = clones(params), clones(params)
    eager_states, compiled_states = [clones(s) for s in states], [clones(s) for s in states]

    def step(ps, st, zo_grad, seed):
        ak.perturb_(ps, seed, 1e-3, backend=backend)
        ak.zo_update_(ps, [seed, 12], [zo_grad, 0.25], 0.01, restore=-1e-3, weight_decay=0.1, decay_mask=[True, False],
                      backend=backend)
        ak.addax_update_(ps, grads, seed, zo_grad, 0.01, 0.5, backend=backend)
        ak.zo_momentum_update_(ps, st[0], seed, 0.5, 0.01, 0.9, backend=backend)
        ak.zo_adam_update_(ps, st[1], st[2], seed, zo_grad, 0.01, 2, betas=[0.8, 0.9], backend=backend)

    torch._dynamo.reset()
    step(eager, eager_states, torch.tensor(0.5), 11)
    torch.compile(step, fullgraph=True)(compiled, compiled_states, torch.tensor(0.5), 11)
    assert all_equal(eager, compiled)
    assert all(all_equal(a, b) for a, b in zip(eager_states, compiled_states))


def test_compiled_ops_update_the_callers_tensors_without_copies(generator, monkeypatch):
    """Under torch.compile's default backend the recorded op runs on the caller's parameters and
    state buffers themselves: functionalization must not turn the in-place pass into copies
    (a copy of every parameter would undo the package's memory claim)."""
    from addax_kernels.ops import _compiled

    params = make_params(generator)
    buffers = [torch.zeros_like(p) for p in params]
    seen = []
    original = _compiled._EAGER["zo_momentum_update_"]

    def spy(params_, grads, states, *rest):
        seen.append(([p.data_ptr() for p in params_], [b.data_ptr() for b in states[0]]))
        return original(params_, grads, states, *rest)

    monkeypatch.setitem(_compiled._EAGER, "zo_momentum_update_", spy)
    torch._dynamo.reset()
    torch.compile(lambda ps, bs: ak.zo_momentum_update_(ps, bs, 3, 0.5, 0.01, 0.9, backend="reference"),
                  fullgraph=True)(params, buffers)
    assert seen == [([p.data_ptr() for p in params], [b.data_ptr() for b in buffers])]


def test_changing_python_floats_and_seeds_under_compile_neither_fail_nor_recompile_per_value(generator, backend):
    """Issue 14 item 4: an lr schedule with Python floats under torch.compile(fullgraph=True)."""
    from torch._dynamo.utils import counters

    params = make_params(generator, shapes=((33,), (4, 4)))
    eager, compiled = clones(params), clones(params)

    def step(ps, lr, seed):
        ak.perturb_(ps, seed, 1e-3, backend=backend)
        ak.zo_update_(ps, seed, 0.5, lr, restore=-1e-3, backend=backend)

    torch._dynamo.reset()
    counters.clear()
    compiled_step = torch.compile(step, fullgraph=True)
    for k in range(5):
        lr, seed = 0.01 * (k + 1), 100 + k
        step(eager, lr, seed)
        compiled_step(compiled, lr, seed)
        assert all_equal(eager, compiled), k
    # The first call specializes; the second makes lr and seed dynamic; no compile after that.
    assert counters["stats"]["unique_graphs"] <= 2
    # A NaN lr is caught at run time, by the update it was given to, as in eager mode.
    for run in (step, compiled_step):
        with pytest.raises(ValueError, match=r"^lr must be finite"):
            run(eager if run is step else compiled, float("nan"), 7)
    assert all_equal(eager, compiled)


def test_aliasing_and_inference_are_rejected_under_compile_with_the_eager_errors(generator, backend):
    """Issue 14 item 5: the checks run at run time, inside the custom op, with real tensors."""
    a, b = torch.randn(9, generator=generator), torch.randn(9, generator=generator)
    grads = [torch.randn(9, generator=generator), torch.randn(9, generator=generator)]

    def perturb_pair(x, y):
        ak.perturb_([x, y], 1, 0.1, backend=backend)

    def addax(x, y, gx, gy):
        ak.addax_update_([x, y], [gx, gy], 1, 0.5, 0.1, 0.5, backend=backend)

    torch._dynamo.reset()  # the code objects above are compiled once per backend: start each test afresh
    snapshot = a.clone()
    with pytest.raises(ValueError, match=r"params\[0\] and params\[1\] overlap in memory"):
        torch.compile(perturb_pair, fullgraph=True)(a, a)
    with pytest.raises(ValueError, match=r"overlap in memory"):
        torch.compile(perturb_pair, fullgraph=True)(a, a[3:])
    with pytest.raises(ValueError, match=r"grads\[1\] overlaps params\[0\]"):
        torch.compile(addax, fullgraph=True)(a, b, grads[0], a)
    with torch.inference_mode():
        inference = torch.randn(9)
    with pytest.raises(RuntimeError, match=r"params\[1\].*inference tensor"):
        torch.compile(perturb_pair, fullgraph=True)(a, inference)
    assert torch.equal(a, snapshot)


# ----------------------------------------------------------------------------- noise and docs


def test_public_noise_of_every_backend_is_within_the_spec_bound_of_float64():
    """ak.noise(backend=b) runs b's kernel (θ = 0 + 1·z); the judge is SPEC §1 in float64."""
    expected = ak.noise((64, 33), 5, tid=2, offset=2**40 + 9, dtype=torch.float64)
    for name in BACKENDS:
        if _backend_skip_reason(name) is not None:
            continue
        got = ak.noise((64, 33), 5, tid=2, offset=2**40 + 9, backend=name)
        assert got.dtype == torch.float32 and got.shape == (64, 33)
        assert float((got.double() - expected).abs().max()) <= 1e-3, name
        rademacher = ak.noise(300, 5, tid=2, noise="rademacher", backend=name)
        assert torch.equal(rademacher.double(), ak.noise(300, 5, tid=2, noise="rademacher", dtype=torch.float64))
        # Every backend checks the layout arguments alike and names them as ak.noise does.
        for kwargs, error, pattern in ((dict(dtype=torch.int32), TypeError, "^noise dtype must be a floating"),
                                       (dict(dtype=np.float32), TypeError, "^noise dtype must be a floating"),
                                       (dict(shape=(2, -1)), ValueError, "^shape must be"),
                                       (dict(shape="3"), ValueError, "^shape must be"),
                                       (dict(tid=-1), ValueError, r"^tid must be in \[0, 2\*\*32\)"),
                                       (dict(offset=2**63 - 2), ValueError, "^offset must be")):
            kwargs = dict(dict(shape=3), **kwargs)
            with pytest.raises(error, match=pattern):
                ak.noise(kwargs.pop("shape"), 5, backend=name, **kwargs)
    with pytest.raises(ValueError, match="reference backend only"):
        ak.noise(3, 5, dtype=torch.float64, backend="native")


@pytest.mark.parametrize("op", PUBLIC_OPS, ids=lambda op: op.__name__)
def test_public_ops_document_every_argument_and_the_errors(op):
    doc = op.__doc__
    for name in inspect.signature(op).parameters:
        assert re.search(rf"^    (\w+, )*{name}(, \w+)*:", doc, re.MULTILINE), f"{op.__name__} does not document {name}"
    for topic in ("Raises:", "TypeError", "RuntimeError", "inference", "shape", "dtype", "device"):
        assert topic in doc, f"{op.__name__}: {topic}"


def test_readme_style_model_round_trip(backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    params = [p for p in model.parameters() if p.requires_grad]
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    loss_fn = torch.nn.CrossEntropyLoss()
    eps, lr = 1e-3, 1e-2
    steps = 150 if backend != "triton" else 30
    with torch.no_grad():
        start_loss = float(loss_fn(model(x), y))
        for step in range(steps):
            seed = 1000 + step
            ak.perturb_(params, seed, eps, backend=backend)
            loss_plus = loss_fn(model(x), y)
            ak.perturb_(params, seed, -2 * eps, backend=backend)
            loss_minus = loss_fn(model(x), y)
            projected = (loss_plus - loss_minus) / (2 * eps)
            ak.zo_update_(params, seed, projected, lr, restore=eps, backend=backend)
        end_loss = float(loss_fn(model(x), y))
    assert math.isfinite(end_loss) and end_loss < start_loss

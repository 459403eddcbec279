"""The public ops of SPEC §2 through the reference backend, against plain formulas.

The formulas below use z materialized by ``addax_kernels.noise`` in float64 (the judge of
SPEC §1) and evaluate the update in float64.  The ops compute in float32, so results agree
to float32 rounding of each term: we allow a few float32 ulps of the largest term.
"""

import math

import pytest
import torch

import addax_kernels as ak
from addax_kernels import ops, rng
from addax_kernels.backends import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS32 = torch.finfo(torch.float32).eps


def make_params(generator, shapes=((7, 13), (1,), (4097,), (3, 5, 2)), dtype=torch.float32):
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


# ----------------------------------------------------------------------------- formulas


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_perturb_matches_formula(generator, dtype, kind):
    params = make_params(generator, dtype=dtype)
    before = [p.double() for p in params]
    scale = 1e-2
    ak.perturb_(params, 2**63 + 5, scale, noise=kind, backend="reference")
    for p, b, z in zip(params, before, z64(params, 2**63 + 5, kind=kind)):
        expected = b + scale * z
        assert_close_to_formula(p, expected, b.abs() + scale * z.abs())


@pytest.mark.parametrize("dtype", DTYPES)
def test_zo_update_matches_formula_with_restore_and_decay(generator, dtype):
    params = make_params(generator, dtype=dtype)
    before = [p.double() for p in params]
    seeds, coeffs, lr, restore = [3, 4, 5], [0.7, -1.3, 0.25], 0.01, 1e-3
    decays = [0.1, 0.0, 0.2, 0.05]
    ak.zo_update_(params, seeds, coeffs, lr, restore=restore, weight_decay=decays, backend="reference")
    zs = [z64(params, s) for s in seeds]
    for i, (p, b) in enumerate(zip(params, before)):
        restored = b + restore * zs[0][i]
        direction = sum(c * z[i] for c, z in zip(coeffs, zs)) + decays[i] * restored
        expected = restored - lr * direction
        scale = restored.abs() + lr * (sum(abs(c) * z[i].abs() for c, z in zip(coeffs, zs)) + restored.abs())
        assert_close_to_formula(p, expected, scale)


@pytest.mark.parametrize("dtype", DTYPES)
def test_addax_update_matches_formula(generator, dtype):
    params = make_params(generator, dtype=dtype)
    grads = [torch.randn(p.shape, generator=generator).to(torch.float32) for p in params]
    before = [p.double() for p in params]
    zo_grad, lr, alpha, decay = 2.5, 0.05, 0.3, 0.01
    ak.addax_update_(params, grads, 9, zo_grad, lr, alpha, weight_decay=decay, backend="reference")
    for p, b, g, z in zip(params, before, grads, z64(params, 9)):
        expected = b - lr * (alpha * zo_grad * z + (1 - alpha) * g.double() + decay * b)
        scale = b.abs() + lr * (alpha * zo_grad * z.abs() + g.double().abs() + b.abs())
        assert_close_to_formula(p, expected, scale)


def test_alpha_one_and_zero_reduce_to_zo_and_sgd(generator):
    params = make_params(generator)
    grads = [torch.randn(p.shape, generator=generator) for p in params]
    zo_only, sgd_only = [p.clone() for p in params], [p.clone() for p in params]
    ak.addax_update_(zo_only, grads, 4, 1.5, 0.1, 1.0, backend="reference")
    mezo = [p.clone() for p in params]
    ak.zo_update_(mezo, 4, 1.5, 0.1, backend="reference")
    assert all(torch.equal(a, b) for a, b in zip(zo_only, mezo))
    ak.addax_update_(sgd_only, grads, 4, 1.5, 0.1, 0.0, backend="reference")
    for p, g, got in zip(params, grads, sgd_only):
        assert torch.allclose(got, p - 0.1 * g, rtol=0, atol=4 * EPS32 * (p.abs() + 0.1 * g.abs()).max())


def test_perturb_round_trip_on_float32(generator):
    params = make_params(generator)
    original = [p.clone() for p in params]
    for scale in (1e-3, 0.5):
        ak.perturb_(params, 42, scale, backend="reference")
        ak.perturb_(params, 42, -scale, backend="reference")
        for p, o, z in zip(params, original, z64(params, 42)):
            # x + a - a in float32 is off by at most one rounding of x + a.
            bound = EPS32 * (o.double().abs() + scale * z.abs())
            assert bool(((p.double() - o.double()).abs() <= bound).all())


def test_mezo_cycle_restores_float32_params_through_zo_update(generator):
    """+eps, -2eps, then zo_update_ with restore=+eps and lr=0 restores the params."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    params = list(model.parameters())
    original = [p.detach().clone() for p in params]
    ak.perturb_(params, 7, 1e-3)
    ak.perturb_(params, 7, -2e-3)
    ak.zo_update_(params, 7, 0.0, 0.0, restore=1e-3)
    for p, o in zip(params, original):
        assert torch.allclose(p.detach(), o, rtol=0, atol=4 * EPS32 * (o.abs().max() + 1e-2))


def test_device_tensor_scalars_equal_float_scalars(generator):
    params = make_params(generator)
    grads = [torch.randn(p.shape, generator=generator) for p in params]
    by_float, by_tensor = [p.clone() for p in params], [p.clone() for p in params]
    ak.addax_update_(by_float, grads, 1, 0.75, 0.125, 0.5, weight_decay=0.01)
    ak.addax_update_(by_tensor, grads, 1, torch.tensor(0.75), torch.tensor(0.125, dtype=torch.float64), 0.5,
                     weight_decay=0.01)
    assert all(torch.equal(a, b) for a, b in zip(by_float, by_tensor))
    ak.zo_update_(by_float, [2, 3], [0.5, 1.5], 0.01, restore=1e-3)
    ak.zo_update_(by_tensor, [2, 3], [torch.tensor(0.5), 1.5], torch.tensor(0.01), restore=torch.tensor(1e-3))
    assert all(torch.equal(a, b) for a, b in zip(by_float, by_tensor))


def test_weight_decay_mask_and_per_tensor_values(generator):
    params = make_params(generator)
    masked, explicit = [p.clone() for p in params], [p.clone() for p in params]
    mask = [True, False, True, False]
    ak.zo_update_(masked, 8, 0.3, 0.1, weight_decay=0.5, decay_mask=mask)
    ak.zo_update_(explicit, 8, 0.3, 0.1, weight_decay=[0.5, 0.0, 0.5, 0.0])
    assert all(torch.equal(a, b) for a, b in zip(masked, explicit))
    undecayed = [p.clone() for p in params]
    ak.zo_update_(undecayed, 8, 0.3, 0.1)
    assert torch.equal(masked[1], undecayed[1]) and not torch.equal(masked[0], undecayed[0])


def test_stochastic_rounding_uses_purpose_one_words_of_first_seed(generator):
    param = (torch.randn(1000, generator=generator) * 0.02).to(torch.bfloat16)
    work = param.clone()
    ak.perturb_(work, 31, 1e-3, tids=[5], offsets=[77], rounding="stochastic", backend="reference")
    x = param.float() + torch.tensor(1e-3) * ak.noise(1000, 31, tid=5, offset=77)
    words = rng.rounding_words(31, 5, 77, 1000)
    assert torch.equal(work, rng.round_to_dtype(x, torch.bfloat16, "stochastic", words))


# ----------------------------------------------------------------------------- invariances


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_sharded_tensor_gets_unsharded_result(generator, kind):
    whole = torch.randn(1000, generator=generator)
    grad = torch.randn(1000, generator=generator)
    shards = [whole[:300].clone(), whole[300:301].clone(), whole[301:].clone()]
    grad_shards = [grad[:300], grad[300:301], grad[301:]]
    ak.addax_update_(whole, grad, 5, 1.5, 0.1, 0.5, tids=[3], noise=kind, weight_decay=0.1)
    ak.addax_update_(shards, grad_shards, 5, 1.5, 0.1, 0.5, tids=[3, 3, 3], offsets=[0, 300, 301], noise=kind,
                     weight_decay=0.1)
    assert torch.equal(torch.cat(shards), whole)


def test_reference_backend_is_invariant_to_chunk_size(generator, monkeypatch):
    params = make_params(generator, dtype=torch.bfloat16)
    big_chunks = [p.clone() for p in params]
    ak.zo_update_(big_chunks, [1, 2], [0.5, 0.25], 0.1, restore=1e-3, rounding="stochastic")
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 256)
    small_chunks = [p.clone() for p in params]
    ak.zo_update_(small_chunks, [1, 2], [0.5, 0.25], 0.1, restore=1e-3, rounding="stochastic")
    assert all(torch.equal(a, b) for a, b in zip(big_chunks, small_chunks))


def test_grouping_by_dtype_does_not_change_results(generator):
    mixed = [torch.randn(100, generator=generator).to(dtype) for dtype in DTYPES]
    separate = [p.clone() for p in mixed]
    ak.perturb_(mixed, 6, 0.1, tids=[10, 11, 12])
    for tid, p in zip([10, 11, 12], separate):
        ak.perturb_(p, 6, 0.1, tids=[tid])
    assert all(torch.equal(a, b) for a, b in zip(mixed, separate))


def test_empty_tensors_are_skipped(generator):
    empty, full = torch.empty(0), torch.randn(5, generator=generator)
    expected = full.clone()
    ak.perturb_([empty, full], 1, 0.1)
    ak.perturb_(expected, 1, 0.1, tids=[1])
    assert torch.equal(full, expected)


def test_parameters_requiring_grad_are_updated_without_autograd_error():
    layer = torch.nn.Linear(4, 3)
    before = layer.weight.detach().clone()
    ak.perturb_(list(layer.parameters()), 1, 0.1)
    assert not torch.equal(layer.weight.detach(), before) and layer.weight.requires_grad


# ----------------------------------------------------------------------------- rejected input


def rejected_calls(params, grads):
    good = dict(backend="reference")
    yield "float64 param", lambda: ak.perturb_(params + [torch.zeros(3, dtype=torch.float64)], 1, 0.1, **good)
    yield "int param", lambda: ak.perturb_(params + [torch.zeros(3, dtype=torch.int32)], 1, 0.1, **good)
    yield "not a tensor", lambda: ak.perturb_(params + [[1.0, 2.0]], 1, 0.1, **good)
    yield "non-contiguous", lambda: ak.perturb_(params + [torch.zeros(4, 4).t()], 1, 0.1, **good)
    yield "mixed devices", lambda: ak.perturb_(params + [torch.zeros(3, device="meta")], 1, 0.1, **good)
    yield "overlap", lambda: ak.perturb_(params + [params[0].view(-1)[:5]], 1, 0.1, **good)
    yield "duplicate", lambda: ak.perturb_(params + [params[0]], 1, 0.1, **good)
    yield "empty list", lambda: ak.perturb_([], 1, 0.1, **good)
    for seed in (-1, 2**64, 1.0, True, None, torch.tensor(3)):
        yield f"seed {seed!r}", lambda seed=seed: ak.perturb_(params, seed, 0.1, **good)
    for scale in (float("nan"), float("inf"), 1e39, "0.1", torch.ones(2), None):
        yield f"scale {scale!r}", lambda scale=scale: ak.perturb_(params, 1, scale, **good)
    yield "nan lr", lambda: ak.zo_update_(params, 1, 0.1, float("nan"), **good)
    yield "nan cpu-tensor scale", lambda: ak.perturb_(params, 1, torch.tensor(float("nan")), **good)
    yield "inf cpu-tensor lr", lambda: ak.zo_update_(params, 1, 0.1, torch.tensor(float("inf")), **good)
    yield "float32 overflow in a float64 tensor", lambda: ak.addax_update_(
        params, grads, 1, torch.tensor(1e39, dtype=torch.float64), 0.1, 0.5, **good)
    yield "nan coeff", lambda: ak.zo_update_(params, [1, 2], [0.1, float("nan")], 0.1, **good)
    yield "nan restore", lambda: ak.zo_update_(params, 1, 0.1, 0.1, restore=float("inf"), **good)
    yield "coeff count", lambda: ak.zo_update_(params, [1, 2], [0.1], 0.1, **good)
    yield "no seeds", lambda: ak.zo_update_(params, [], [], 0.1, **good)
    yield "bad seed in list", lambda: ak.zo_update_(params, [1, -2], [0.1, 0.1], 0.1, **good)
    yield "decay count", lambda: ak.zo_update_(params, 1, 0.1, 0.1, weight_decay=[0.1], **good)
    yield "nan decay", lambda: ak.zo_update_(params, 1, 0.1, 0.1, weight_decay=float("nan"), **good)
    yield "mask type", lambda: ak.zo_update_(params, 1, 0.1, 0.1, decay_mask=[1] * len(params), **good)
    yield "tids count", lambda: ak.perturb_(params, 1, 0.1, tids=[0], **good)
    yield "tid range", lambda: ak.perturb_(params, 1, 0.1, tids=[2**32] * len(params), **good)
    yield "offset sign", lambda: ak.perturb_(params, 1, 0.1, offsets=[-1] * len(params), **good)
    yield "offset overflow", lambda: ak.perturb_(params, 1, 0.1, offsets=[2**63] * len(params), **good)
    yield "noise kind", lambda: ak.perturb_(params, 1, 0.1, noise="uniform", **good)
    yield "rounding mode", lambda: ak.perturb_(params, 1, 0.1, rounding="down", **good)
    yield "backend name", lambda: ak.perturb_(params, 1, 0.1, backend="cuda")
    yield "grads count", lambda: ak.addax_update_(params, grads[:-1], 1, 0.1, 0.1, 0.5, **good)
    yield "grads shape", lambda: ak.addax_update_(params, grads[:-1] + [torch.zeros(2)], 1, 0.1, 0.1, 0.5, **good)
    yield "grads dtype", lambda: ak.addax_update_(params, grads[:-1] + [grads[-1].double()], 1, 0.1, 0.1, 0.5,
                                                  **good)
    yield "grad aliases param", lambda: ak.addax_update_(params, grads[:-1] + [params[0].view(-1)[: grads[-1].numel()]
                                                                 .view(grads[-1].shape)], 1, 0.1, 0.1, 0.5, **good)
    yield "alpha range", lambda: ak.addax_update_(params, grads, 1, 0.1, 0.1, 1.5, **good)
    yield "alpha nan", lambda: ak.addax_update_(params, grads, 1, 0.1, 0.1, float("nan"), **good)
    yield "zo_grad 1-d", lambda: ak.addax_update_(params, grads, 1, torch.ones(1), 0.1, 0.5, **good)


def test_every_bad_input_is_rejected_with_nothing_changed(generator):
    params = make_params(generator)
    grads = [torch.randn(p.shape, generator=generator) for p in params]
    snapshot = [p.clone() for p in params]
    for label, call in rejected_calls(params, grads):
        with pytest.raises((TypeError, ValueError, RuntimeError)) as info:
            call()
        assert str(info.value), label
        assert all(torch.equal(p, s) for p, s in zip(params, snapshot)), f"{label} modified params"


def test_errors_name_the_offending_tensor(generator):
    params = make_params(generator)
    with pytest.raises(ValueError, match=r"params\[4\].*contiguous"):
        ak.perturb_(params + [torch.zeros(4, 4).t()], 1, 0.1)
    with pytest.raises(TypeError, match=r"params\[4\].*dtype"):
        ak.perturb_(params + [torch.zeros(3, dtype=torch.float64)], 1, 0.1)
    with pytest.raises(ValueError, match=r"grads\[0\].*shape"):
        ak.addax_update_(params, [torch.zeros(2)] + params[1:], 1, 0.1, 0.1, 0.5)


def test_unavailable_backend_is_reported_clearly(generator):
    report = ak.backend_report("cpu")
    assert report["reference"] == "available"
    for name, state in report.items():
        if state != "available":
            with pytest.raises(RuntimeError, match=name):
                ak.perturb_(make_params(generator), 1, 0.1, backend=name)


def test_environment_override_of_auto_backend(monkeypatch):
    monkeypatch.setenv(ak.BACKEND_ENV_VAR, "reference")
    assert ak.resolve_backend("auto", torch.device("cpu")) == "reference"
    monkeypatch.setenv(ak.BACKEND_ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=ak.BACKEND_ENV_VAR):
        ak.resolve_backend("auto", torch.device("cpu"))
    monkeypatch.delenv(ak.BACKEND_ENV_VAR)
    assert ak.resolve_backend("auto", torch.device("cpu")) in ak.available_backends("cpu")


# ----------------------------------------------------------------------------- torch.library / compile


def test_custom_op_passes_opcheck(generator):
    params = make_params(generator, shapes=((5, 3), (7,)))
    grads = [torch.randn(p.shape, generator=generator) for p in params]
    scalar_tensor = torch.tensor([0.0, 0.1, 0.5, 0.3], dtype=torch.float32)
    cases = [
        (params, [], [1], [0, 1], [0, 0], [0.0, 0.0], [1e-3, 0.0, 0.0], None, True, 0, False),
        (params, grads, [2**63 - 1], [0, 1], [0, 5], [0.1, 0.0], [], scalar_tensor, False, 1, True),
    ]
    for case in cases:
        args = tuple(x if not isinstance(x, list) or not x or not isinstance(x[0], torch.Tensor)
                     else [t.clone() for t in x] for x in case)
        torch.library.opcheck(ops._fused_update_op, args + ("gaussian", "nearest", "reference"))


def test_ops_trace_under_torch_compile(generator):
    params = make_params(generator, shapes=((33,), (4, 4)))
    eager, compiled = [p.clone() for p in params], [p.clone() for p in params]

    def step(ps, zo_grad):
        ak.perturb_(ps, 11, 1e-3)
        ak.zo_update_(ps, 11, zo_grad, 0.01, restore=-1e-3)

    step(eager, torch.tensor(0.5))
    torch.compile(step, fullgraph=True)(compiled, torch.tensor(0.5))
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))


def test_public_noise_of_reference_backend_matches_rng():
    assert torch.equal(ak.noise((3, 7), 5, tid=2, offset=9), rng.noise((3, 7), 5, 2, 9))
    through_kernel = ak.noise((3, 7), 5, tid=2, offset=9, backend="reference")
    assert torch.equal(through_kernel, rng.noise((3, 7), 5, 2, 9))
    for backend in ak.available_backends("cpu"):
        with pytest.raises(TypeError, match="floating"):
            ak.noise(3, 5, dtype=torch.int32, backend=backend)
    with pytest.raises(ValueError):
        ak.noise(3, 5, dtype=torch.float64, backend="native")


def test_readme_style_model_round_trip():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    params = [p for p in model.parameters() if p.requires_grad]
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    loss_fn = torch.nn.CrossEntropyLoss()
    eps, lr = 1e-3, 1e-2
    with torch.no_grad():
        start_loss = float(loss_fn(model(x), y))
        for step in range(150):
            seed = 1000 + step
            ak.perturb_(params, seed, eps)
            loss_plus = loss_fn(model(x), y)
            ak.perturb_(params, seed, -2 * eps)
            loss_minus = loss_fn(model(x), y)
            projected = (loss_plus - loss_minus) / (2 * eps)
            ak.zo_update_(params, seed, projected, lr, restore=eps)
        end_loss = float(loss_fn(model(x), y))
    assert math.isfinite(end_loss) and end_loss < start_loss

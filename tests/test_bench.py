"""The benchmark CLI: byte accounting, the MeZO-style baselines, argument validation, outputs.

Nothing here asserts on timings (the CI machine is shared); the end-to-end runs only check
that a tiny benchmark completes and writes well-formed results.
"""

import json
import math
import random

import pytest
import torch

from addax_kernels.__main__ import main as package_main
from addax_kernels.bench import cli, kernels, report, steps, timing
from addax_kernels.bench.kernels import bytes_moved, mezo_addax_update_, mezo_perturb_, mezo_zo_update_

DTYPE_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


# ----------------------------------------------------------------------------- bytes moved


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("numel", [1, 1000, 1 << 26])
def test_bytes_moved_counts_each_tensor_read_and_written(dtype, numel):
    size = DTYPE_BYTES[dtype]
    # perturb_ and zo_update_ (restore fused): read θ, write θ.  addax_update_: also read grad.
    assert bytes_moved("perturb", dtype, numel) == 2 * numel * size
    assert bytes_moved("zo_update", dtype, numel) == 2 * numel * size
    assert bytes_moved("addax_update", dtype, numel) == 3 * numel * size


def test_bytes_moved_rejects_bad_input():
    with pytest.raises(ValueError, match="op must be one of"):
        bytes_moved("sgd", torch.float32, 10)
    with pytest.raises(TypeError, match="dtype"):
        bytes_moved("perturb", torch.float64, 10)
    with pytest.raises(ValueError, match="non-negative"):
        bytes_moved("perturb", torch.float32, -1)


def test_rounding_modes_follow_the_optimizer_default():
    assert kernels.update_rounding("auto", torch.float32) == "nearest"
    assert kernels.update_rounding("auto", torch.bfloat16) == "stochastic"
    assert kernels.update_rounding("nearest", torch.float16) == "nearest"
    assert kernels.perturb_rounding("auto") == "nearest"


# ----------------------------------------------------------------------------- MeZO-style baselines


def _seeded_normals(seed, params):
    """MeZO's z, drawn independently of the code under test: one torch.normal per param."""
    torch.manual_seed(seed)
    return [torch.normal(mean=0, std=1, size=p.shape, dtype=p.dtype) for p in params]


def _params(generator, dtype=torch.float32):
    return [(torch.randn(shape, generator=generator) * 0.02).to(dtype) for shape in ((33, 7), (5,), (128,))]


# float32 results of a + b·c: each operation rounds once, so against the float64 value the
# error is a few ulps of the largest term; 1e-6 absolute covers it for |θ| ≲ 0.1, |z| < 6.
FP32_ATOL = 1e-6


def test_mezo_perturb_is_mezos_formula(generator):
    params = _params(generator)
    originals = [p.clone() for p in params]
    seed, eps, scaling = 42, 1e-3, -2.0
    mezo_perturb_(params, seed, eps, scaling_factor=scaling)
    for param, original, z in zip(params, originals, _seeded_normals(seed, originals)):
        # The exact expression of MeZO's zo_perturb_parameters, bit for bit ...
        assert torch.equal(param, original + scaling * z * eps)
        # ... and the intended real-number result.
        expected = original.double() + scaling * eps * z.double()
        torch.testing.assert_close(param.double(), expected, rtol=0, atol=FP32_ATOL)


def test_mezo_perturb_low_precision_stays_in_dtype(generator):
    params = _params(generator, torch.bfloat16)
    originals = [p.clone() for p in params]
    mezo_perturb_(params, 7, 1e-3)
    for param, original, z in zip(params, originals, _seeded_normals(7, originals)):
        assert param.dtype == torch.bfloat16
        assert torch.equal(param, original + 1.0 * z * 1e-3)


def test_mezo_zo_update_restores_then_applies_mezos_update(generator):
    theta = _params(generator)
    seed, eps, grad, lr, decay = 3, 1e-3, 0.7, 1e-2, 0.1
    zs = _seeded_normals(seed, theta)
    # The state at the end of a MeZO step's second forward pass: θ − ε·z.
    params = [t - eps * z for t, z in zip(theta, zs)]
    mezo_zo_update_(params, seed, grad, lr, eps, decay)
    for param, t, z in zip(params, theta, zs):
        expected = t.double() - lr * (grad * z.double() + decay * t.double())
        torch.testing.assert_close(param.double(), expected, rtol=0, atol=FP32_ATOL)


def test_mezo_addax_update_is_the_addax_formula(generator):
    params = _params(generator)
    grads = [torch.randn(p.shape, generator=generator) for p in params]
    originals = [p.clone() for p in params]
    seed, grad0, lr, alpha, decay = 11, -0.4, 1e-2, 0.3, 0.05
    mezo_addax_update_(params, grads, seed, grad0, lr, alpha, decay)
    for param, original, g, z in zip(params, originals, grads, _seeded_normals(seed, originals)):
        o = original.double()
        expected = o - lr * (alpha * grad0 * z.double() + (1 - alpha) * g.double() + decay * o)
        torch.testing.assert_close(param.double(), expected, rtol=0, atol=FP32_ATOL)


def test_reference_mezo_step_matches_a_float64_mezo_step():
    """The step-level reference is MeZO's algorithm: ±ε losses, g, restore, decayed update."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    x, y = torch.randn(10, 6), torch.randn(10, 3)
    theta = {name: p.detach().clone().double() for name, p in model.named_parameters()}
    settings = steps.StepSettings(device=torch.device("cpu"), model_size="tiny", dtype=torch.float32, batch_size=1,
                                  seq_len=2, warmup=0, repeats=1, lr=1e-2, eps=1e-3, weight_decay=0.1, seed=5)
    reference = steps.MeZOReference(model, settings)
    reference.mezo_step(lambda: ((model(x) - y) ** 2).mean())

    seed = random.Random(settings.seed).randrange(1_000_000_000)  # the reference's first step seed
    zs = dict(zip(theta, (z.double() for z in _seeded_normals(seed, list(model.parameters())))))

    def loss(shift):
        weight = theta["weight"] + shift * zs["weight"]
        bias = theta["bias"] + shift * zs["bias"]
        return ((x.double() @ weight.T + bias - y.double()) ** 2).mean()

    grad = (loss(settings.eps) - loss(-settings.eps)) / (2 * settings.eps)
    for name, param in model.named_parameters():
        decay = 0.0 if "bias" in name else settings.weight_decay  # MeZO skips decay on biases
        expected = theta[name] - settings.lr * (grad * zs[name] + decay * theta[name])
        # g carries the float32 loss rounding divided by 2ε (~1e-4 relative), times lr·|z|.
        torch.testing.assert_close(param.detach().double(), expected, rtol=0, atol=2e-5)


# ----------------------------------------------------------------------------- timing helpers


def test_measure_cycles_through_every_buffer_in_order():
    visited = []
    result = timing.measure(visited.append, device=torch.device("cpu"), num_buffers=5, warmup=2, repeats=4,
                            time_budget_s=10.0)
    assert visited == [i % 5 for i in range(len(visited))]  # one uninterrupted cycle
    assert len(result.samples) == 4
    assert result.min_s <= result.median_s
    assert all(sample >= 0 for sample in result.samples)
    with pytest.raises(ValueError):
        timing.measure(visited.append, device=torch.device("cpu"), num_buffers=0, warmup=1, repeats=1,
                       time_budget_s=1.0)


def test_buffer_sets_cover_twice_the_cache():
    device = torch.device("cpu")
    cache = timing.cache_bytes(device)
    assert cache > 0
    assert timing.buffer_sets_needed(4 * cache, device) == 1
    sets = timing.buffer_sets_needed(cache // 8, device)
    assert sets == min(timing.MAX_BUFFER_SETS, 16)
    with pytest.raises(ValueError):
        timing.buffer_sets_needed(0, device)


def test_cpu_peak_memory_meter_sees_a_large_temporary():
    meter = timing.PeakMemoryMeter(torch.device("cpu"))
    if not meter.available:
        pytest.skip(meter.reason_unavailable)
    size = 32 << 20
    peak = meter.measure(lambda: torch.ones(size // 4).sum())
    if peak is None:
        pytest.skip(meter.reason_unavailable)
    # The 32 MiB tensor must show; the slack covers interpreter and allocator noise.
    assert size <= peak < size + (16 << 20)


# ----------------------------------------------------------------------------- arguments


def test_parse_sizes_forms():
    assert cli.parse_sizes("2^10, 1k,4096,2**12") == [1024, 4096]
    assert cli.parse_sizes("2^4..2^8:2") == [16, 64, 256]
    assert cli.parse_sizes("2^3..2^5") == [8, 16, 32]
    assert cli.parse_sizes("1m") == [1 << 20]
    for bad in ("", "abc", "2^8..2^4", "0", "2^50", "1.5"):
        with pytest.raises(cli.BenchArgumentError):
            cli.parse_sizes(bad)


def test_parse_choices_accepts_aliases_and_names_the_bad_one():
    assert cli.parse_choices("perturb_,zo_update_,perturb", cli.OP_NAMES, "op") == ["perturb", "zo_update"]
    assert cli.parse_choices("float32,BF16,half", ("fp32", "fp16", "bf16"), "dtype", cli.DTYPE_ALIASES) == [
        "fp32", "bf16", "fp16"]
    with pytest.raises(cli.BenchArgumentError, match="'adam'"):
        cli.parse_choices("perturb,adam", cli.OP_NAMES, "op")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--device", "mps"], "cpu or cuda"),
        (["--device", "nonsense"], "not a device"),
        (["--ops", "sgd"], "unknown op"),
        (["--dtypes", "fp64"], "unknown dtype"),
        (["--sizes", "2^x"], "cannot read size"),
        (["--backends", "cuda_graphs"], "unknown backend"),
        (["--no-kernels", "--no-steps"], "nothing to measure"),
        (["--no-kernels", "--seq-len", "4096"], "positions"),
        (["--no-kernels", "--step-dtype", "fp32,bf16"], "one dtype"),
        (["--no-kernels", "--steps", "sgd"], "unknown step algorithm"),
        (["--no-kernels", "--step-backend", "cudnn"], "--step-backend"),
        (["--repeats", "0"], "positive"),
        (["--model-size", "70b"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--device", "cpu"] + argv if argv[0] != "--device" else argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cuda_device_without_cuda_is_refused():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(cli.BenchArgumentError, match="no CUDA device"):
        cli.parse_device("cuda")


def test_default_backends_leave_out_the_triton_interpreter_on_cpu():
    chosen = cli.resolve_backends(None, torch.device("cpu"))
    assert "reference" in chosen and "triton" not in chosen


def test_package_main_lists_commands(capsys):
    assert package_main([]) == 2
    assert "bench" in capsys.readouterr().out
    assert package_main(["frobnicate"]) == 2


# ----------------------------------------------------------------------------- report pieces


def test_device_slugs():
    assert report.slugify("NVIDIA H200") == "nvidia-h200"
    assert report.slugify("Intel(R) Xeon(R) CPU @ 2.20GHz") == "intel-xeon"
    assert report.slugify("AMD EPYC 7B13 64-Core Processor") == "amd-epyc-7b13-64-core"
    assert report.device_slug(torch.device("cpu")).startswith("cpu-")


def _record(backend, op, dtype, numel, copy_fraction, speedup):
    return {"backend": backend, "op": op, "dtype": dtype, "numel": numel, "copy_fraction": copy_fraction,
            "speedup_vs_mezo": speedup}


def test_targets_judge_the_worst_covered_case():
    records = [
        _record("native", "perturb", "fp32", 1 << 22, 0.8, 30.0),
        _record("native", "zo_update", "fp32", 1 << 22, 0.4, 12.0),  # worst copy fraction
        _record("native", "perturb", "fp32", 1 << 10, 0.01, 0.5),    # below the size floor: ignored
        _record("native", "perturb", "bf16", 1 << 22, 0.01, 0.5),    # not fp32: ignored
    ]
    verdicts = {v["target"]: v for v in report.evaluate_targets(records, torch.device("cpu"))}
    speed = next(v for name, v in verdicts.items() if "10x" in name)
    copy = next(v for name, v in verdicts.items() if "50%" in name)
    assert speed["status"] == "PASS" and speed["value"] == 12.0
    assert copy["status"] == "MISS" and copy["worst_case"] == {"op": "zo_update", "dtype": "fp32", "numel": 1 << 22}
    assert all(v["status"] == "NOT MEASURED" for v in report.evaluate_targets([], torch.device("cpu")))
    lines = report.format_targets(list(verdicts.values()))
    assert any(line.startswith("MISS") and "40% of copy" in line for line in lines)


def test_formatting_helpers():
    assert report.format_numel(1 << 20) == "2^20"
    assert report.format_numel(1000) == "1000"
    assert report.format_bytes(3 << 20) == "3 MiB"
    assert report.format_bytes(None) == "-"
    assert report.format_seconds(2.5e-6) == "2.5 us"


# ----------------------------------------------------------------------------- end to end


def _check_kernel_records(results, backends, ops, dtypes, sizes):
    kernel_records = results["kernels"]
    assert len(kernel_records) == len(backends) * len(ops) * len(dtypes) * len(sizes)
    assert len(results["mezo"]) == len(ops) * len(dtypes) * len(sizes)
    dtype_of = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    for record in kernel_records:
        assert record["bytes_moved"] == bytes_moved(record["op"], dtype_of[record["dtype"]], record["numel"])
        assert record["median_s"] > 0 and record["repeats"] >= 1
        assert math.isclose(record["gbps"], record["bytes_moved"] / record["median_s"] / 1e9, rel_tol=1e-9)
        assert math.isclose(record["copy_fraction"], record["gbps"] / record["copy_gbps"], rel_tol=1e-9)
        assert math.isclose(record["speedup_vs_mezo"], record["mezo_median_s"] / record["median_s"], rel_tol=1e-9)
    for copy in results["copy"]:
        assert copy["bytes"] == 2 * copy["numel"] * DTYPE_BYTES[dtype_of[copy["dtype"]]]


@pytest.fixture
def restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_cli_end_to_end_writes_json_png_and_summary(tmp_path, capsys, restore_torch_threads):
    out = tmp_path / "results"
    code = package_main([
        "bench", "--device", "cpu", "--quick", "--backends", "reference", "--sizes", "2^10,2^12",
        "--dtypes", "fp32,bf16", "--repeats", "2", "--time-budget", "0.05", "--no-progress", "--threads", "1",
        "--model-size", "tiny", "--batch-size", "1", "--seq-len", "8", "--step-repeats", "1",
        "--step-warmup", "0", "--out", str(out),
    ])
    assert code == 0
    assert torch.get_num_threads() == 1
    stdout = capsys.readouterr().out
    assert "mezo-style" in stdout and "Steps:" in stdout and "wrote" in stdout

    with open(out / "results.json") as handle:
        results = json.load(handle)
    assert results["schema"] == report.SCHEMA
    env = results["environment"]
    for key in ("device_name", "cpu_model", "python", "versions", "backends"):
        assert key in env
    assert env["versions"]["torch"] == torch.__version__
    assert results["config"]["sizes"] == [1 << 10, 1 << 12]
    _check_kernel_records(results, ["reference"], cli.OP_NAMES, ["fp32", "bf16"], [1 << 10, 1 << 12])

    step_records = results["steps"]["results"]
    assert {(r["algorithm"], r["implementation"]) for r in step_records} == {
        (a, i) for a in ("mezo", "addax") for i in ("addax_kernels", "mezo-reference")}
    for record in step_records:
        assert "error" not in record, record.get("error")
        assert record["median_step_s"] >= record["median_forward_s"] > 0
    assert results["steps"]["model"]["num_params"] > 0

    assert (out / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.md").read_text()
    assert "| op | dtype | backend |" in summary and "reference" in summary


def test_cli_kernels_only_without_plot(tmp_path):
    out = tmp_path / "k"
    cli.main(["--device", "cpu", "--backends", "reference", "--ops", "perturb", "--dtypes", "fp16",
              "--sizes", "4096", "--repeats", "1", "--warmup", "0", "--time-budget", "0.01", "--no-steps",
              "--no-plot", "--no-progress", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    _check_kernel_records(results, ["reference"], ["perturb"], ["fp16"], [4096])
    assert results["steps"] is None
    assert not (out / "throughput.png").exists()

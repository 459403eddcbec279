"""The benchmark's own logic: byte accounting, the baselines against the formulas they restate,
derived ratios, targets, the measuring helpers, the CLI end to end on tiny sizes, gpu_check.sh.

Nothing here asserts on timings (the machines are shared); the end-to-end runs check that a
tiny benchmark completes and writes consistent results.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from addax_kernels.__main__ import main as package_main
from addax_kernels.bench import baselines, cli, host, kernels, report, steps, timing
from addax_kernels.bench.kernels import bytes_moved

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# float32 results of a + b·c round each operation once: against float64, a few ulps of the
# largest term; 1e-6 absolute covers |θ| ≲ 0.1, |z| < 6.
FP32_ATOL = 1e-6


# ----------------------------------------------------------------------------- bytes moved


@pytest.mark.parametrize("dtype, size", [(torch.float32, 4), (torch.float16, 2), (torch.bfloat16, 2)])
@pytest.mark.parametrize("numel", [1, 1000, 1 << 26])
def test_bytes_moved_counts_each_tensor_read_and_written(dtype, size, numel):
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


def test_opt_param_shapes_are_the_models_parameters():
    model = steps.build_model("tiny", torch.float32, torch.device("cpu"))
    assert steps.opt_param_shapes("tiny") == [tuple(p.shape) for p in model.parameters()]
    assert 380 <= len(steps.opt_param_shapes("1.3b")) <= 400  # the ~390-tensor list of issue 18
    assert 1.2e9 < sum(math.prod(s) for s in steps.opt_param_shapes("1.3b")) < 1.4e9


def test_llm_shaped_list_is_four_in_five_bf16():
    params = host.llm_shaped_params(torch.device("cpu"))
    assert len(params) == host.NUM_TENSORS == 400
    assert sum(p.dtype == torch.bfloat16 for p in params) == 320
    assert sum(p.dtype == torch.float32 for p in params) == 80


# ----------------------------------------------------------------------------- baselines


def _seeded_normals(seed, params):
    """MeZO's z, drawn independently of the code under test: one torch.normal per param."""
    torch.manual_seed(seed)
    return [torch.normal(mean=0, std=1, size=p.shape, dtype=p.dtype) for p in params]


def _params(generator, dtype=torch.float32):
    return [(torch.randn(shape, generator=generator) * 0.02).to(dtype) for shape in ((33, 7), (5,), (128,))]


def test_mezo_perturb_is_mezos_formula(generator):
    params = _params(generator)
    originals = [p.clone() for p in params]
    baselines.mezo_perturb_(params, 42, 1e-3, scaling_factor=-2.0)
    for param, original, z in zip(params, originals, _seeded_normals(42, originals)):
        assert torch.equal(param, original + -2.0 * z * 1e-3)  # MeZO's expression, bit for bit
        expected = original.double() - 2e-3 * z.double()
        torch.testing.assert_close(param.double(), expected, rtol=0, atol=FP32_ATOL)


def test_sparse_perturbation_leaves_about_p_of_the_elements():
    param = torch.zeros(100_000)
    baselines.mezo_perturb_([param], 3, 1.0, sparsity=0.75)
    untouched = (param == 0).double().mean().item()
    assert abs(untouched - 0.75) < 0.01  # binomial sd 0.0014
    again = torch.zeros(100_000)
    baselines.mezo_perturb_([again], 3, -1.0, sparsity=0.75)
    assert torch.equal(again, -param)  # the same mask and z from the same seed: restorable


def test_mezo_zo_update_restores_then_applies_mezos_update(generator):
    theta = _params(generator)
    seed, eps, grad, lr, decays = 3, 1e-3, 0.7, 1e-2, [0.1, 0.0, 0.1]
    zs = _seeded_normals(seed, theta)
    params = [t - eps * z for t, z in zip(theta, zs)]  # a MeZO step after its second forward: θ − εz
    baselines.mezo_zo_update_(params, seed, grad, lr, eps, decays)
    for param, t, z, decay in zip(params, theta, zs, decays):
        expected = t.double() - lr * (grad * z.double() + decay * t.double())
        torch.testing.assert_close(param.double(), expected, rtol=0, atol=FP32_ATOL)


def test_mezo_addax_update_is_the_addax_formula(generator):
    params = _params(generator)
    grads = [torch.randn(p.shape, generator=generator) for p in params]
    originals = [p.clone() for p in params]
    seed, grad0, lr, alpha, decay = 11, -0.4, 1e-2, 0.3, 0.05
    baselines.mezo_addax_update_(params, grads, seed, grad0, lr, alpha, [decay] * 3)
    for param, original, g, z in zip(params, originals, grads, _seeded_normals(seed, originals)):
        o = original.double()
        expected = o - lr * (alpha * grad0 * z.double() + (1 - alpha) * g.double() + decay * o)
        torch.testing.assert_close(param.double(), expected, rtol=0, atol=FP32_ATOL)


@pytest.mark.parametrize("sign", [False, True])
def test_zo_bench_update_restores_then_steps_sgd_on_g_times_z(generator, sign):
    theta = _params(generator)
    seed, eps, grad, lr = 5, 1e-3, -0.7, 1e-2
    zs = _seeded_normals(seed, theta)
    params = [t - eps * z for t, z in zip(theta, zs)]
    optimizer = torch.optim.SGD(params, lr=lr)
    baselines.zo_bench_update_(params, optimizer, seed, grad, eps, sign=sign)
    coeff = -1.0 if sign else grad
    for param, t, z in zip(params, theta, zs):
        torch.testing.assert_close(param.double(), t.double() - lr * coeff * z.double(), rtol=0, atol=FP32_ATOL)
        assert param.grad is None


def test_zo_bench_adam_is_torch_adam_on_g_times_z(generator):
    theta = _params(generator)
    seed, eps, grad, lr = 9, 1e-3, 0.3, 1e-2
    zs = _seeded_normals(seed, theta)
    expected = [t.clone().requires_grad_() for t in theta]
    reference = torch.optim.Adam(expected, lr=lr)
    for param, z in zip(expected, zs):
        param.grad = grad * z
    reference.step()
    params = [t - eps * z for t, z in zip(theta, zs)]
    baselines.zo_bench_update_(params, torch.optim.Adam(params, lr=lr), seed, grad, eps)
    for param, want in zip(params, expected):
        torch.testing.assert_close(param, want.detach(), rtol=0, atol=FP32_ATOL)


def test_reference_mezo_step_matches_a_float64_mezo_step():
    """MeZOReference is MeZO's algorithm: ±ε losses, g, restore, decayed update (seed = its first)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    x, y = torch.randn(10, 6), torch.randn(10, 3)
    theta = {name: p.detach().clone().double() for name, p in model.named_parameters()}
    groups = [{"params": [model.weight], "weight_decay": 0.1}, {"params": [model.bias], "weight_decay": 0.0}]
    lr, eps, seed = 1e-2, 1e-3, 5
    baselines.MeZOReference(groups, lr, eps, seed=seed).mezo_step(lambda: ((model(x) - y) ** 2).mean())
    zs = dict(zip(theta, (z.double() for z in _seeded_normals(seed, list(model.parameters())))))

    def loss(shift):
        weight, bias = theta["weight"] + shift * zs["weight"], theta["bias"] + shift * zs["bias"]
        return ((x.double() @ weight.T + bias - y.double()) ** 2).mean()

    grad = (loss(eps) - loss(-eps)) / (2 * eps)
    for name, param in model.named_parameters():
        decay = 0.1 if name == "weight" else 0.0
        expected = theta[name] - lr * (grad * zs[name] + decay * theta[name])
        # g carries the float32 loss rounding divided by 2ε (~1e-4 relative), times lr·|z|.
        torch.testing.assert_close(param.detach().double(), expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize("update", kernels.ZO_BENCH_UPDATES)
def test_zo_bench_rows_run_both_sides(generator, update):
    params = _params(generator, torch.bfloat16)
    before = [p.clone() for p in params]
    makers = kernels._zo_bench_makers(update, params, ["reference"], "auto")
    assert set(makers) == {"reference", "zo-bench-style"}
    for make in makers.values():
        make()()
    assert any(not torch.equal(p, b) for p, b in zip(params, before))


# ----------------------------------------------------------------------------- measuring helpers


def test_cpu_peak_memory_sees_a_large_temporary():
    size = 32 << 20
    peak = timing.peak_extra_bytes(lambda: torch.ones(size // 4).sum(), torch.device("cpu"))
    assert size <= peak < size + (1 << 20)  # the tensor, and a few small ones


def test_peak_memory_ignores_what_was_allocated_before():
    kept = torch.ones(1 << 20)
    assert timing.peak_extra_bytes(lambda: kept.add_(1), torch.device("cpu")) < 4096


def test_timers_return_positive_seconds():
    cpu = torch.device("cpu")
    calls = []
    assert timing.seconds_per_call(lambda: calls.append(1), cpu, 0.001) > 0
    assert timing.host_seconds_per_call(lambda: calls.append(1), cpu, calls=3, blocks=2) > 0
    assert len(calls) >= 1 + 1 + 1 + 6


def test_buffer_sets_cover_twice_the_cache():
    cpu = torch.device("cpu")
    assert timing.buffer_sets(1 << 40, cpu) == 1
    assert timing.buffer_sets(1, cpu) == timing.MAX_BUFFER_SETS
    assert timing.buffer_sets(1 << 10, torch.device("cuda")) == 1  # do_bench flushes the L2 instead


def test_host_measurements_run_on_a_few_tensors():
    cpu = torch.device("cpu")
    for op in host.HOST_OPS:
        assert host.measure_op_host_us(op, "reference", cpu, count=5, calls=1, blocks=1) > 0
    assert host.measure_step_host_us("mezo", "reference", cpu, count=5, calls=1, blocks=1) > 0
    assert math.isfinite(host.measure_step_host_us("addax-hooks", "reference", cpu, count=5, calls=1, blocks=1))
    with pytest.raises(ValueError, match="op must be one of"):
        host.op_call("sgd_", host.llm_shaped_params(cpu, 5), "reference")


# ----------------------------------------------------------------------------- derived ratios, targets


def _kernel(impl, seconds, op="perturb", dtype="fp32", numel=1 << 26, case="tensor"):
    return {"case": case, "op": op, "dtype": dtype, "numel": numel, "tensors": 1, "impl": impl,
            "bytes": bytes_moved(op, kernels.DTYPES[dtype], numel), "seconds": seconds, "peak_extra_bytes": 0}


def _results(kernel_records=(), host_records=(), step_records=()):
    return {"copy": [{"dtype": "fp32", "numel": 1 << 26, "bytes": 1 << 29, "seconds": 0.1, "gbps": 5.0}],
            "kernels": list(kernel_records), "zo_bench": [], "host": {"records": list(host_records)},
            "steps": {"results": list(step_records)}}


def test_derive_divides_by_the_same_runs_baselines():
    fused, mezo, compiled = _kernel("native", 0.25), _kernel("mezo-style", 1.0), _kernel("torch.compile", 0.5)
    failed = dict(_kernel("triton", 1.0), error="RuntimeError: no")
    results = _results([fused, mezo, compiled, failed])
    results["zo_bench"] = [{"update": "zo-adam", "impl": "native", "seconds": 0.2},
                           {"update": "zo-adam", "impl": "zo-bench-style", "seconds": 1.0}]
    report.derive(results)
    assert fused["gbps"] == pytest.approx((1 << 29) / 0.25 / 1e9)
    assert fused["copy_fraction"] == pytest.approx(fused["gbps"] / 5.0)
    assert fused["vs_mezo"] == pytest.approx(4.0) and fused["vs_compile"] == pytest.approx(2.0)
    assert mezo["vs_mezo"] == pytest.approx(1.0)
    assert "gbps" not in failed
    assert results["zo_bench"][0]["vs_zo_bench"] == pytest.approx(5.0)


def test_targets_judge_the_worst_covered_case():
    records = [dict(_kernel("native", 1.0), copy_fraction=0.95, vs_mezo=8.0, vs_compile=2.0),
               dict(_kernel("native", 1.0, dtype="bf16", numel=1 << 28), copy_fraction=0.85, vs_mezo=9.0,
                    vs_compile=1.0),
               dict(_kernel("native", 1.0, numel=1 << 20), copy_fraction=0.1, vs_mezo=0.1, vs_compile=0.1),  # small
               dict(_kernel("native", 1.0, op="zo_update"), copy_fraction=0.1, vs_mezo=0.1, vs_compile=0.1)]
    hosts = [{"op": "perturb_", "impl": "native", "us": 120.0}, {"op": "addax_update_", "impl": "native", "us": 170.0},
             {"op": "MeZO.step", "impl": "native", "us": 900.0}]
    mezo_step = {"algorithm": "mezo", "impl": "addax_kernels", "model": "1.3b", "passes_fraction": 0.08}
    verdicts = {v["target"]: v for v in report.evaluate_targets(_results(records, hosts, [mezo_step]), "cuda",
                                                                ["native"])}
    assert all(v["impl"] in ("native", "addax_kernels") for v in verdicts.values())  # triton was not measured
    copy = verdicts["perturb_ >= 90% of copy bandwidth, fp32/bf16, >= 2^26 elements"]
    assert copy["status"] == "MISS" and copy["value"] == 0.85 and copy["worst_case"]["dtype"] == "bf16"
    assert verdicts["perturb_ >= 5x MeZO-style, fp32/bf16, >= 2^26 elements"]["status"] == "PASS"
    assert verdicts["perturb_ >= 1.5x torch.compile, fp32/bf16, >= 2^26 elements"]["value"] == 1.0
    host_ops = next(v for name, v in verdicts.items() if name.startswith("perturb_/zo_update_"))
    assert host_ops["status"] == "MISS" and host_ops["value"] == 170.0  # at most: the largest is the worst
    assert next(v for n, v in verdicts.items() if n.startswith("MeZO.step"))["status"] == "PASS"
    assert next(v for n, v in verdicts.items() if n.startswith("Addax"))["status"] == "NOT MEASURED"
    assert next(v for n, v in verdicts.items() if n.startswith("MeZO step"))["status"] == "PASS"
    cpu = {v["target"]: v for v in report.evaluate_targets(_results(records), "cpu", ["native"])}
    assert not any(name.startswith("perturb_ >=") for name in cpu)  # GPU-only targets
    assert cpu["native CPU fp32 >= 10x MeZO-style, >= 2^20 elements"]["value"] == 0.1  # zo_update's


def test_formatting_helpers():
    assert report.format_numel(1 << 20) == "2^20" and report.format_numel(1000) == "1,000"
    assert report.format_bytes(3 << 20) == "3 MiB" and report.format_bytes(1023 << 10) == "1023 KiB"
    assert report.format_bytes(None) == "-"
    assert report.format_seconds(2.5e-6) == "2.5 us"
    assert report.slugify("NVIDIA H200") == "nvidia-h200"
    assert report.slugify("Intel(R) Xeon(R) CPU @ 2.20GHz") == "intel-xeon"


# ----------------------------------------------------------------------------- end to end


@pytest.fixture
def restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


TINY = ["--device", "cpu", "--backends", "reference", "--step-backend", "reference", "--log2-sizes", "10",
        "--dtypes", "fp32", "bf16", "--budget-ms", "1", "--threads", "1", "--no-progress", "--model-size", "tiny",
        "--batch-size", "1", "--seq-len", "8", "--list-model", "none"]


def test_cli_end_to_end_writes_json_png_and_summary(tmp_path, capsys, restore_torch_threads):
    out = tmp_path / "results"
    assert package_main(["bench", *TINY, "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "mezo-style" in stdout and "Steps:" in stdout and "wrote" in stdout
    results = json.loads((out / "results.json").read_text())
    assert results["schema"] == report.SCHEMA and not results["errors"]
    assert results["environment"]["versions"]["torch"] == torch.__version__
    records = results["kernels"]
    assert {(r["op"], r["dtype"], r["impl"]) for r in records} == {
        (op, dtype, impl) for op in kernels.OPS for dtype in ("fp32", "bf16") for impl in ("reference", "mezo-style")}
    for record in records:
        assert record["bytes"] == bytes_moved(record["op"], kernels.DTYPES[record["dtype"]], record["numel"])
        assert math.isclose(record["gbps"], record["bytes"] / record["seconds"] / 1e9)
        assert record["peak_extra_bytes"] is not None
    assert {r["bytes"] for r in results["copy"]} == {r["bytes"] for r in records}
    step_records = results["steps"]["results"]
    assert [(r["algorithm"], r["impl"]) for r in step_records] == [
        (a, i) for a in ("mezo", "addax") for i in ("mezo-reference", "addax_kernels")]
    for record in step_records:
        assert record["step_s"] > 0 and record["model_s"] > 0
    assert step_records[1]["vs_reference"] == pytest.approx(step_records[0]["step_s"] / step_records[1]["step_s"])
    assert results["host"]["records"] == []  # the reference backend is left out of host timing
    assert (out / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| op | dtype | size | impl |" in (out / "summary.md").read_text()


def test_cli_keeps_the_profilers_lines_off_stderr(tmp_path):
    """Kineto prints a start and a stop line per CPU memory measurement unless its log level is 6
    when it first starts (once per process, so this runs the CLI in a fresh one)."""
    env = {key: value for key, value in os.environ.items() if key != "KINETO_LOG_LEVEL"}
    done = subprocess.run([sys.executable, "-m", "addax_kernels", "bench", *TINY, "--sections", "kernels",
                           "--ops", "perturb", "--no-plot", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads((tmp_path / "results.json").read_text())["kernels"]  # memory was measured
    assert "USDT:" not in done.stderr


def test_time_limit_skips_and_still_writes(tmp_path, restore_torch_threads):
    out = tmp_path / "limited"
    code = cli.main([*TINY, "--sections", "kernels", "--time-limit", "0", "--no-plot", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    # Skipped on request is not a failure (a time-boxed run such as scripts/gpu_check.sh passes).
    assert code == 0 and results["kernels"] == []
    assert all(e["error"] == cli.SKIPPED_BY_TIME_LIMIT for e in results["errors"]) and results["errors"]
    assert cli.failures(results) == 0 and cli.skipped(results) == len(results["errors"])
    results["errors"].append({"task": "x", "error": "RuntimeError: broken"})
    assert cli.failures(results) == 1


@pytest.mark.parametrize("argv, message", [
    (["--device", "mps"], "cpu or cuda"),
    (["--device", "nonsense"], "--device nonsense"),
    (["--ops", "sgd"], "invalid choice"),
    (["--log2-sizes", "x"], "invalid int"),
    (["--seq-len", "4096"], "--seq-len"),
    (["--log2-sizes", "-1"], "--log2-sizes must be in [0, 36]"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--budget-ms", "0"], "--budget-ms must be > 0"),
    (["--time-limit", "-1"], "--time-limit must be >= 0"),
    (["--update-readme", "no/such/README.md"], "--update-readme: "),
    (["--sections", "zo-bench", "--list-model", "none"], "nothing to measure"),
])
def test_bad_arguments_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_update_readme_replaces_only_the_generated_block(tmp_path):
    results = _results([dict(_kernel("native", 0.25), gbps=1.0, copy_fraction=0.5, vs_mezo=2.0, vs_compile=None)])
    results.update(created_utc="now", config={"list_model": None}, targets=[], errors=[], host=None, steps=None,
                   environment={"device_name": "Test GPU", "device": "cuda", "torch_threads": 1,
                                "versions": {"addax_kernels": "0", "torch": "t", "triton": "x"}})
    for slug in ("test-gpu", "cpu-test"):
        (tmp_path / "bench" / "results" / slug).mkdir(parents=True)
        summary = report.format_results(results, markdown=True, all_sizes=False)
        (tmp_path / "bench" / "results" / slug / "summary.md").write_text(summary)
        (tmp_path / "bench" / "results" / slug / "results.json").write_text(json.dumps({"schema": report.SCHEMA}))
    # A folder of another tool (the offline SASS report): a summary but no results.json; and an
    # older benchmark's folder (another schema).
    (tmp_path / "bench" / "results" / "sass-sm90").mkdir()
    (tmp_path / "bench" / "results" / "sass-sm90" / "summary.md").write_text("# SASS report\n")
    (tmp_path / "bench" / "results" / "cpu-old").mkdir()
    (tmp_path / "bench" / "results" / "cpu-old" / "summary.md").write_text("# old\n")
    (tmp_path / "bench" / "results" / "cpu-old" / "results.json").write_text(json.dumps({"schema": "old/1"}))
    readme = tmp_path / "README.md"
    original = f"# title\n{report.README_BEGIN}\nold\n{report.README_END}\ntail\n"
    readme.write_text(original)
    # Nothing qualifies (another root): an error, and the README is not touched.
    with pytest.raises(ValueError, match="no benchmark results"):
        report.update_readme(str(readme), str(tmp_path / "elsewhere"))
    assert readme.read_text() == original
    used = report.update_readme(str(readme), str(tmp_path / "bench" / "results"))
    assert used == ["bench/results/test-gpu", "bench/results/cpu-test"]  # GPUs first, benchmark folders only
    text = readme.read_text()
    assert text.startswith("# title\n") and text.endswith(f"{report.README_END}\ntail\n") and "old" not in text
    assert "### Test GPU ([bench/results/test-gpu/](bench/results/test-gpu/))" in text
    assert "| perturb | fp32 | 2^26 | native |" in text
    (tmp_path / "bench" / "results" / "cpu-test" / "summary.md").unlink()
    with pytest.raises(ValueError, match="cpu-test/ has a results.json but no summary.md"):
        report.update_readme(str(readme), str(tmp_path / "bench" / "results"))
    assert readme.read_text() == text


def test_check_script_records_each_phase(tmp_path):
    env = dict(os.environ, GPU_CHECK_PHASES="env", PYTHON=sys.executable)
    done = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [(p["name"], p["status"]) for p in summary["phases"]] == [("env", "passed")] + [
        (name, "not_selected") for name in ("build", "gpu-tests", "bench", "suite")]
    assert summary["all_passed"] is True and summary["cuda"] == torch.cuda.is_available()
    assert "==== env" in (tmp_path / "gpu_check.log").read_text()

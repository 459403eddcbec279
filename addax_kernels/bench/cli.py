"""``python -m addax_kernels bench``: arguments, defaults per device, and the run itself."""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import List, Optional, Sequence

import torch

OP_NAMES = ("perturb", "zo_update", "addax_update")
DTYPE_ALIASES = {
    "fp32": "fp32", "float32": "fp32", "float": "fp32",
    "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "bf16": "bf16", "bfloat16": "bf16",
}
ROUNDING_CHOICES = ("auto", "nearest", "stochastic")
STEP_ALGORITHMS = ("mezo", "addax")

# Defaults per device type; --quick swaps in the "quick" entries.
DEFAULTS = {
    "cpu": dict(sizes=[1 << k for k in (16, 18, 20, 22)], repeats=10, warmup=1, time_budget=1.0,
                model_size="small", step_dtype="fp32", batch_size=4, seq_len=128, step_repeats=3, step_warmup=1),
    "cuda": dict(sizes=[1 << k for k in range(16, 29, 2)], repeats=50, warmup=5, time_budget=1.0,
                 model_size="125m", step_dtype="bf16", batch_size=16, seq_len=256, step_repeats=10, step_warmup=2),
}
QUICK = {
    "cpu": dict(sizes=[1 << 14, 1 << 16], repeats=3, warmup=1, time_budget=0.5,
                model_size="tiny", batch_size=2, seq_len=32, step_repeats=2, step_warmup=1),
    "cuda": dict(sizes=[1 << 20, 1 << 24], repeats=10, warmup=2, time_budget=0.5,
                 model_size="125m", batch_size=4, seq_len=128, step_repeats=3, step_warmup=1),
}


class BenchArgumentError(ValueError):
    """A command-line value is invalid; the message says which and why."""


def _split(text: str) -> List[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _parse_count(token: str) -> int:
    token = token.strip().lower()
    match = re.fullmatch(r"2\s*(?:\^|\*\*)\s*(\d+)", token)
    if match:
        return 1 << int(match.group(1))
    match = re.fullmatch(r"(\d+)\s*([kmg]?)", token)
    if match:
        return int(match.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[match.group(2)]
    raise BenchArgumentError(f"cannot read size {token!r}: use an integer, 2^K, or a suffix k/m/g (powers of 1024)")


def parse_sizes(text: str) -> List[int]:
    """Sizes in elements: ``65536,2^20,4m`` or a range ``2^16..2^24[:step]`` of powers of two.

    The range's optional step is in powers of two (``2^16..2^24:2`` = 2^16, 2^18, ..., 2^24).
    """
    sizes: List[int] = []
    for item in _split(text):
        match = re.fullmatch(r"2\^(\d+)\.\.2\^(\d+)(?::(\d+))?", item.replace(" ", ""))
        if match:
            low, high, step = int(match.group(1)), int(match.group(2)), int(match.group(3) or 1)
            if low > high or step < 1:
                raise BenchArgumentError(f"size range {item!r} must go upward with a positive step")
            sizes += [1 << k for k in range(low, high + 1, step)]
        else:
            sizes.append(_parse_count(item))
    if not sizes:
        raise BenchArgumentError("--sizes is empty")
    for size in sizes:
        if size < 1 or size >= 1 << 40:
            raise BenchArgumentError(f"size {size} is outside [1, 2^40)")
    return sorted(set(sizes))


def parse_choices(text: str, choices: Sequence[str], what: str, aliases: Optional[dict] = None) -> List[str]:
    result = []
    for item in _split(text):
        name = item.lower().rstrip("_") if what == "op" else item.lower()
        name = (aliases or {}).get(name, name)
        if name not in choices:
            raise BenchArgumentError(f"unknown {what} {item!r}: choose from {', '.join(choices)}")
        if name not in result:
            result.append(name)
    if not result:
        raise BenchArgumentError(f"no {what} given")
    return result


def parse_device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise BenchArgumentError(f"--device {text!r} is not a device: {error}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BenchArgumentError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise BenchArgumentError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise BenchArgumentError(f"--device {text!r}: the benchmark runs on cpu or cuda devices")
    return device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    def positive_int(text):
        value = int(text)
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
        return value

    def non_negative_int(text):
        value = int(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value

    def positive_float(text):
        value = float(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    from .steps import MODEL_PRESETS

    what = parser.add_argument_group("what to measure")
    what.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    what.add_argument("--backends", default=None,
                      help="comma list of reference,triton,native, or 'all' (default: every available backend "
                           "except, on CPU, Triton's interpreter, which runs only when named and TRITON_INTERPRET=1 "
                           "is set before the command starts)")
    what.add_argument("--ops", default=",".join(OP_NAMES), help=f"comma list of {', '.join(OP_NAMES)}")
    what.add_argument("--dtypes", default="fp32,fp16,bf16", help="comma list of fp32, fp16, bf16")
    what.add_argument("--sizes", default=None,
                      help="elements per tensor: '65536,2^20,4m' or '2^16..2^24:2' (default: 2^16..2^22 on CPU, "
                           "2^16..2^28 on GPU, capped by free memory)")
    what.add_argument("--rounding", default="auto", choices=ROUNDING_CHOICES,
                      help="storage rounding of the fused ops; auto = the optimizers' default: nearest for "
                           "perturbations, stochastic for fp16/bf16 updates")
    what.add_argument("--no-kernels", action="store_true", help="skip the kernel-level benchmark")
    what.add_argument("--no-steps", action="store_true", help="skip the step-level benchmark")
    what.add_argument("--quick", action="store_true", help="small sizes, few repeats, tiny model: a smoke run")

    timing = parser.add_argument_group("timing")
    timing.add_argument("--repeats", type=positive_int, default=None, help="timed repeats per case (maximum)")
    timing.add_argument("--warmup", type=non_negative_int, default=None, help="untimed warm-up calls per case")
    timing.add_argument("--time-budget", type=positive_float, default=None,
                        help="seconds of timed repeats per case: slow cases get fewer repeats, never below min(3, --repeats)")
    timing.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads for CPU runs")

    steps = parser.add_argument_group("step level")
    steps.add_argument("--model-size", default=None, choices=sorted(MODEL_PRESETS),
                       help="OPT shape (default: small on CPU, 125m on GPU)")
    steps.add_argument("--step-dtype", default=None, help="model dtype: fp32, fp16 or bf16 (default: fp32 on CPU, "
                                                          "bf16 on GPU)")
    steps.add_argument("--steps", default=",".join(STEP_ALGORITHMS), help="comma list of mezo, addax")
    steps.add_argument("--batch-size", type=positive_int, default=None)
    steps.add_argument("--seq-len", type=positive_int, default=None,
                       help="ZO batch sequence length; the Addax FO batch uses half of it")
    steps.add_argument("--step-repeats", type=positive_int, default=None, help="timed steps per variant")
    steps.add_argument("--step-warmup", type=non_negative_int, default=None, help="untimed steps per variant")
    steps.add_argument("--step-backend", default="auto", help="backend the optimizers use (default: auto)")

    output = parser.add_argument_group("output")
    output.add_argument("--out", default=None, help="output folder (default: bench/results/<device-slug>/)")
    output.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    output.add_argument("--no-progress", action="store_true", help="no progress bar")


def _available_memory_bytes(device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as handle:
            match = re.search(r"^MemAvailable:\s+(\d+) kB", handle.read(), re.MULTILINE)
        return int(match.group(1)) << 10 if match else None
    except OSError:
        return None


def resolve_backends(spec: Optional[str], device: torch.device) -> List[str]:
    import addax_kernels as ak
    from addax_kernels.backends import BACKEND_NAMES

    report = ak.backend_report(device)
    available = [name for name, state in report.items() if state == "available"]
    if spec is None:
        chosen = [name for name in available if not (device.type == "cpu" and name == "triton")]
    elif spec.strip().lower() == "all":
        chosen = available
    else:
        chosen = parse_choices(spec, BACKEND_NAMES, "backend")
        for name in chosen:
            if report[name] != "available":
                hint = ""
                if name == "triton" and device.type == "cpu":
                    # torch imports triton before this code runs, so the variable cannot be set from here.
                    hint = " (in the environment: TRITON_INTERPRET=1 python -m addax_kernels bench ...)"
                raise BenchArgumentError(f"backend {name!r} cannot run on {device}: {report[name]}{hint}")
    if not chosen:
        raise BenchArgumentError(f"no backend can run on {device}: {report}")
    return chosen


def build_config(args: argparse.Namespace) -> dict:
    """Validate the arguments and fill in the device's defaults; raises BenchArgumentError."""
    from .kernels import DTYPES, max_numel_for_memory
    from .steps import MAX_POSITIONS

    device = parse_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    defaults = dict(DEFAULTS[device.type])
    if args.quick:
        defaults.update(QUICK[device.type])

    config = {
        "device": device,
        "run_kernels": not args.no_kernels,
        "run_steps": not args.no_steps,
        "quick": args.quick,
        "rounding": args.rounding,
        "repeats": args.repeats or defaults["repeats"],
        "warmup": defaults["warmup"] if args.warmup is None else args.warmup,
        "time_budget_s": args.time_budget or defaults["time_budget"],
        "skipped_sizes": [],
        "threads": args.threads,
    }
    if not config["run_kernels"] and not config["run_steps"]:
        raise BenchArgumentError("--no-kernels and --no-steps together leave nothing to measure")

    if config["run_kernels"]:
        config["backends"] = resolve_backends(args.backends, device)
        config["ops"] = parse_choices(args.ops, OP_NAMES, "op")
        config["dtypes"] = parse_choices(args.dtypes, tuple(DTYPES), "dtype", DTYPE_ALIASES)
        sizes = parse_sizes(args.sizes) if args.sizes else list(defaults["sizes"])
        available = _available_memory_bytes(device)
        if available is not None:
            limit = min(max_numel_for_memory(DTYPES[d], config["ops"], available) for d in config["dtypes"])
            config["skipped_sizes"] = [s for s in sizes if s > limit]
            sizes = [s for s in sizes if s <= limit]
            if not sizes:
                raise BenchArgumentError(
                    f"no size fits in the {available / 2**30:.1f} GiB free on {device} (largest that fits: {limit})"
                )
        config["sizes"] = sizes

    if config["run_steps"]:
        step_dtype = args.step_dtype or defaults["step_dtype"]
        config["step_dtype"] = parse_choices(step_dtype, tuple(DTYPES), "step dtype", DTYPE_ALIASES)[0]
        if len(_split(step_dtype)) != 1:
            raise BenchArgumentError("--step-dtype takes one dtype")
        config["steps"] = parse_choices(args.steps, STEP_ALGORITHMS, "step algorithm")
        config["model_size"] = args.model_size or defaults["model_size"]
        config["batch_size"] = args.batch_size or defaults["batch_size"]
        config["seq_len"] = args.seq_len or defaults["seq_len"]
        if config["seq_len"] > MAX_POSITIONS:
            raise BenchArgumentError(f"--seq-len {config['seq_len']} exceeds OPT's {MAX_POSITIONS} positions")
        if config["seq_len"] < 2:
            raise BenchArgumentError("--seq-len must be at least 2 (the causal LM loss needs a next token)")
        config["step_repeats"] = args.step_repeats or defaults["step_repeats"]
        config["step_warmup"] = defaults["step_warmup"] if args.step_warmup is None else args.step_warmup
        config["step_backend"] = args.step_backend
        if args.step_backend != "auto":
            import addax_kernels as ak

            report = ak.backend_report(device)
            if args.step_backend not in report:
                raise BenchArgumentError(f"--step-backend must be auto or one of {', '.join(report)}")
            if report[args.step_backend] != "available":
                raise BenchArgumentError(f"--step-backend {args.step_backend}: {report[args.step_backend]}")

    from .report import device_slug

    config["out"] = args.out or os.path.join("bench", "results", device_slug(device))
    config["plot"] = not args.no_plot
    config["progress"] = not args.no_progress
    return config


class _NoProgress:
    """Stands in for a tqdm bar when it is switched off or tqdm is not installed."""

    def update(self, count: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, enabled: bool):
    """A tqdm bar on stderr (tqdm shows it on terminals only)."""
    if not enabled:
        return _NoProgress()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoProgress()
    return tqdm(total=total, desc="bench", unit="case", file=sys.stderr, disable=None, dynamic_ncols=True)


def run(config: dict) -> dict:
    """Run the benchmark described by ``config`` (from :func:`build_config`); write outputs."""
    from . import report
    from .kernels import DTYPES, KernelSettings, count_cases, run_kernel_benchmarks
    from .steps import StepSettings, count_steps, run_step_benchmarks
    from .timing import PeakMemoryMeter

    device = config["device"]
    if config.get("threads") is not None:
        torch.set_num_threads(config["threads"])
    os.makedirs(config["out"], exist_ok=True)
    memory = PeakMemoryMeter(device)
    results = {
        "schema": report.SCHEMA,
        "created_utc": report.utc_now(),
        "command": " ".join(["python -m addax_kernels bench", *config.get("argv", [])]),
        "environment": report.environment(device),
        "config": {k: (str(v) if isinstance(v, torch.device) else v) for k, v in config.items()},
        "memory_method": None,
        "copy": [], "mezo": [], "kernels": [], "steps": None, "targets": [],
    }
    for size in config["skipped_sizes"]:
        print(f"note: size {size} skipped: it does not fit in free memory on {device}", file=sys.stderr)

    kernel_settings = step_settings = None
    total = 0
    if config["run_kernels"]:
        kernel_settings = KernelSettings(
            device=device, backends=tuple(config["backends"]), ops=tuple(config["ops"]),
            dtypes=tuple(DTYPES[d] for d in config["dtypes"]), sizes=tuple(config["sizes"]),
            warmup=config["warmup"], repeats=config["repeats"], time_budget_s=config["time_budget_s"],
            rounding=config["rounding"],
        )
        total += count_cases(kernel_settings)
    if config["run_steps"]:
        step_settings = StepSettings(
            device=device, model_size=config["model_size"], dtype=DTYPES[config["step_dtype"]],
            batch_size=config["batch_size"], seq_len=config["seq_len"], warmup=config["step_warmup"],
            repeats=config["step_repeats"], backend=config["step_backend"], rounding=config["rounding"],
        )
        total += count_steps(config["steps"])

    bar = _progress_bar(total, config["progress"])

    def progress(label: str) -> None:
        bar.set_postfix_str(label)
        bar.update(1)

    try:
        if kernel_settings is not None:
            results.update(run_kernel_benchmarks(kernel_settings, progress, memory))
            results["targets"] = report.evaluate_targets(results["kernels"], device)
        if step_settings is not None:
            results["steps"] = run_step_benchmarks(step_settings, tuple(config["steps"]), progress, memory)
    finally:
        bar.close()
    memory.finish()
    results["memory_method"] = memory.method if memory.available else f"not measured ({memory.reason_unavailable})"

    json_path = os.path.join(config["out"], "results.json")
    summary_path = os.path.join(config["out"], "summary.md")
    report.write_json(results, json_path)
    with open(summary_path, "w") as handle:
        handle.write(report.format_summary(results))
    written = [json_path, summary_path]
    if config["plot"] and results["kernels"]:
        try:
            from .plot import plot_throughput
        except ImportError as error:
            print(f"note: no plot ({error}); install matplotlib", file=sys.stderr)
        else:
            plot_path = os.path.join(config["out"], "throughput.png")
            plot_throughput(results, plot_path)
            written.append(plot_path)
    print(report.format_report(results))
    print("\nwrote " + ", ".join(written))
    return results


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m addax_kernels bench") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Measure the fused ZO kernels against the copy roofline and MeZO-style PyTorch, "
                    "and full MeZO/Addax steps against the MeZO-reference implementation.",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        config = build_config(args)
    except BenchArgumentError as error:
        parser.error(str(error))
    config["argv"] = list(sys.argv[1:] if argv is None else argv)
    run(config)
    return 0

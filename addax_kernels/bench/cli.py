"""``python -m addax_kernels bench``: arguments, defaults per device, the run, the outputs."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from types import SimpleNamespace
from typing import Optional, Sequence

import torch

from addax_kernels.ops import BACKEND_CHOICES, BACKEND_NAMES
from addax_kernels.optim.rounding import DEFAULT_ROUNDING, ROUNDING_CHOICES

from . import report
from .host import host_tasks
from .kernels import DTYPES, OPS, kernel_tasks, zo_bench_tasks
from .plot import plot_throughput
from .steps import MAX_POSITIONS, MODEL_PRESETS, step_tasks

SECTIONS = ("kernels", "zo-bench", "host", "steps")
MAX_LOG2_SIZE = 36  # 2^36 float32 elements are 256 GiB: beyond any one device
DEFAULTS = {
    "cpu": dict(log2_sizes=[16, 18, 20, 22], dtypes=["fp32", "fp16", "bf16"], list_model="small", budget_ms=300,
                compile=False, model_size="small", step_dtype="fp32", batch_size=4, seq_len=128),
    "cuda": dict(log2_sizes=[24, 25, 26, 27, 28], dtypes=["fp32", "bf16"], list_model="1.3b", budget_ms=100,
                 compile=True, model_size="1.3b", step_dtype="bf16", batch_size=16, seq_len=256),
}
QUICK = {  # --quick: a smoke run (one CPU thread: spinning OpenMP threads on a busy machine slow it 10-50x)
    "cpu": dict(log2_sizes=[14, 16], list_model="tiny", budget_ms=30, model_size="tiny", batch_size=2, seq_len=32,
                threads=1),
    "cuda": dict(log2_sizes=[20, 24], list_model="125m", budget_ms=50, model_size="125m", batch_size=4, seq_len=128),
}


def build_parser(prog: str = "python -m addax_kernels bench") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=(
        "Fused ZO kernels against the copy roofline, MeZO-style PyTorch and torch.compile; ZO-Bench-family "
        "updates against ZO-Bench's code; host time per op and step; full MeZO/Addax steps on an OPT model."))
    presets = sorted(MODEL_PRESETS)
    add = parser.add_argument
    add("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    add("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="what to measure (default: all)")
    add("--backends", nargs="+", choices=BACKEND_NAMES, default=None,
        help="default: every available one except reference on CUDA and Triton's interpreter on the CPU")
    add("--ops", nargs="+", choices=OPS, default=list(OPS))
    add("--dtypes", nargs="+", choices=sorted(DTYPES), default=None, help="default: all on CPU, fp32 bf16 on CUDA")
    add("--log2-sizes", nargs="+", type=int, default=None, metavar="K",
        help="tensor sizes 2^K elements (default: 16 18 20 22 on CPU, 24 25 26 27 28 on CUDA)")
    add("--list-model", choices=presets + ["none"], default=None,
        help="the OPT parameter list measured as a list case and for the ZO-Bench rows (default: small on CPU, "
             "1.3b on CUDA)")
    add("--list-dtype", choices=sorted(DTYPES), default="bf16")
    add("--rounding", choices=ROUNDING_CHOICES, default=DEFAULT_ROUNDING, help="the optimizers' rounding policy")
    add("--compile", action=argparse.BooleanOptionalAction, default=None,
        help="torch.compile baseline for perturb (default: on CUDA only; on the CPU it compiles C++)")
    add("--budget-ms", type=float, default=None, help="timed milliseconds per measurement")
    add("--threads", type=int, default=None, help="torch.set_num_threads")
    add("--model-size", choices=presets, default=None, help="OPT shape of the step benchmark")
    add("--step-dtype", choices=sorted(DTYPES), default=None, help="default: fp32 on CPU, bf16 on CUDA")
    add("--steps", nargs="+", choices=("mezo", "addax"), default=["mezo", "addax"])
    add("--batch-size", type=int, default=None)
    add("--seq-len", type=int, default=None, help="ZO batch sequence length; the FO batch uses half")
    add("--step-backend", choices=BACKEND_CHOICES, default="auto")
    add("--quick", action="store_true", help="small sizes and model, short measurements")
    add("--time-limit", type=float, default=None, metavar="SECONDS",
        help="start no measurement after this many seconds (the rest is reported as skipped)")
    add("--out", default=None, help="output folder (default: bench/results/<device-slug>/)")
    add("--no-plot", action="store_true")
    add("--no-progress", action="store_true")
    add("--update-readme", nargs="?", const="README.md", default=None, metavar="README",
        help="only rewrite the README's results block from the summary.md of every folder of "
             "bench/results/ (beside the README) that holds this version's results.json")
    return parser


def build_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> SimpleNamespace:
    """The arguments with the device's defaults filled in; invalid combinations exit via parser.error."""
    import addax_kernels as ak

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        parser.error(f"--device {args.device}: {error}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device}: the benchmark runs on cpu or cuda devices")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    cfg = SimpleNamespace(**vars(args))
    defaults = dict(DEFAULTS[device.type], **(QUICK[device.type] if args.quick else {}))
    for key, value in defaults.items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    availability = ak.backend_report(device)
    if cfg.backends is None:
        skip = "reference" if device.type == "cuda" else "triton"
        cfg.backends = [name for name, state in availability.items() if state == "available" and name != skip]
    for name in cfg.backends:
        if availability[name] != "available":
            parser.error(f"--backends {name}: {availability[name]}")
    if not 2 <= cfg.seq_len <= MAX_POSITIONS:
        parser.error(f"--seq-len must be in [2, {MAX_POSITIONS}], got {cfg.seq_len}")
    bounded = (("--log2-sizes", cfg.log2_sizes, 0, MAX_LOG2_SIZE), ("--threads", [cfg.threads], 1, None),
               ("--batch-size", [cfg.batch_size], 1, None))
    for flag, values, low, high in bounded:
        for value in values:
            if value is not None and (value < low or (high is not None and value > high)):
                parser.error(f"{flag} must be {f'in [{low}, {high}]' if high is not None else f'>= {low}'}, "
                             f"got {value}")
    if not cfg.budget_ms > 0:
        parser.error(f"--budget-ms must be > 0, got {cfg.budget_ms}")
    if cfg.time_limit is not None and not cfg.time_limit >= 0:
        parser.error(f"--time-limit must be >= 0, got {cfg.time_limit}")
    cfg.device, cfg.budget_s = device, cfg.budget_ms / 1e3
    cfg.step_dtype = DTYPES[cfg.step_dtype]
    cfg.list_model = None if cfg.list_model == "none" else cfg.list_model
    cfg.out = cfg.out or os.path.join("bench", "results", report.device_slug(device))
    return cfg


class NothingToMeasure(ValueError):
    """The arguments select no measurement."""


def run(cfg: SimpleNamespace) -> dict:
    """Measure what ``cfg`` selects, write results.json, summary.md and throughput.png."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    results = {"schema": report.SCHEMA, "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "command": " ".join(["python -m addax_kernels bench"] + getattr(cfg, "argv", [])),
               "environment": report.environment(cfg.device),
               "config": {k: (str(v) if isinstance(v, (torch.device, torch.dtype)) else v) for k, v in vars(cfg).items()},
               "copy": [], "kernels": [], "zo_bench": [], "host": None, "steps": None, "targets": [], "errors": []}
    # Most wanted first, so that a run cut short by --time-limit keeps the kernels and the steps.
    steps, last = step_tasks(cfg, results) if "steps" in cfg.sections else ([], [])
    tasks = kernel_tasks(cfg, results) if "kernels" in cfg.sections else []
    tasks += steps + (host_tasks(cfg, results) if "host" in cfg.sections else [])
    tasks += (zo_bench_tasks(cfg, results) if "zo-bench" in cfg.sections and cfg.list_model else []) + last
    if not tasks:
        raise NothingToMeasure(
            f"nothing to measure: --sections {' '.join(cfg.sections)} with --backends {' '.join(cfg.backends)} "
            f"and --list-model {cfg.list_model or 'none'} selects no measurement (the zo-bench section needs a "
            "list model; the host section skips the reference backend)")
    bar = _progress(tasks, enabled=not cfg.no_progress)
    start = time.monotonic()
    for label, task in bar:
        if bar is not tasks:
            bar.set_postfix_str(label)
        if cfg.time_limit is not None and time.monotonic() - start > cfg.time_limit:
            results["errors"].append({"task": label, "error": SKIPPED_BY_TIME_LIMIT})
            continue
        try:
            task()
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: keep what was measured
            results["errors"].append({"task": label, "error": "interrupted"})
            break
        except Exception as error:  # one failing part (a missing dependency, a broken backend) is reported
            results["errors"].append({"task": label, "error": f"{type(error).__name__}: {error}"})
    report.derive(results)
    results["targets"] = report.evaluate_targets(results, cfg.device.type, cfg.backends)

    os.makedirs(cfg.out, exist_ok=True)
    written = [os.path.join(cfg.out, "results.json"), os.path.join(cfg.out, "summary.md")]
    report.write_json(results, written[0])
    with open(written[1], "w") as handle:
        handle.write(report.format_results(results, markdown=True, all_sizes=False))
    if not cfg.no_plot and any(r["case"] == "tensor" and "error" not in r for r in results["kernels"]):
        try:
            plot_throughput(results, os.path.join(cfg.out, "throughput.png"))
            written.append(os.path.join(cfg.out, "throughput.png"))
        except ImportError as error:
            print(f"note: no plot ({error}); install matplotlib", file=sys.stderr)
    print(report.format_results(results))
    print("wrote " + ", ".join(written))
    return results


def _progress(tasks, enabled: bool):
    """A tqdm bar over the tasks on stderr (shown on terminals only), or the tasks themselves."""
    try:
        from tqdm import tqdm
    except ImportError:
        return tasks
    return tqdm(tasks, desc="bench", unit="task", file=sys.stderr, disable=None if enabled else True)


SKIPPED_BY_TIME_LIMIT = "skipped: --time-limit reached"


def failures(results: dict) -> int:
    """Failed tasks and measurements (graph rows excluded: an optimizer may not offer capture;
    tasks --time-limit skipped are not failures: the caller asked for a shorter run)."""
    records = results["kernels"] + results["zo_bench"] + ((results["host"] or {}).get("records") or [])
    return sum(e["error"] != SKIPPED_BY_TIME_LIMIT for e in results["errors"]) + sum("error" in r for r in records)


def skipped(results: dict) -> int:
    return sum(e["error"] == SKIPPED_BY_TIME_LIMIT for e in results["errors"])


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m addax_kernels bench") -> int:
    parser = build_parser(prog)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.update_readme:
        try:
            used = report.update_readme(args.update_readme, os.path.join(
                os.path.dirname(args.update_readme) or ".", "bench", "results"))
        except (OSError, ValueError) as error:
            parser.error(f"--update-readme: {error}")
        print(f"{args.update_readme}: results block from {', '.join(used)}")
        return 0
    cfg = build_config(args, parser)
    cfg.argv = argv
    signal.signal(signal.SIGTERM, _interrupt)  # a time-boxed run (timeout) still writes its results
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # read at Kineto's first start: no line per CPU memory meter
    try:
        results = run(cfg)
    except NothingToMeasure as error:
        parser.error(str(error))
    failed, not_started = failures(results), skipped(results)
    if not_started:
        print(f"{not_started} task(s) not started: --time-limit {cfg.time_limit:g} s reached", file=sys.stderr)
    if failed:
        print(f"{failed} measurement(s) failed: see the errors above and in results.json", file=sys.stderr)
    return 1 if failed else 0

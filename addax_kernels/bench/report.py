"""What the benchmark writes: environment record, stdout tables, targets, JSON and summary.md."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

import addax_kernels as ak

SCHEMA = "addax_kernels.bench/1"


# ----------------------------------------------------------------------------- environment


def cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo, else the platform module)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def slugify(text: str) -> str:
    text = re.sub(r"\((r|tm)\)", "", text, flags=re.IGNORECASE)
    text = re.sub(r"@.*$", "", text)  # clock speeds vary between otherwise identical machines
    text = re.sub(r"\b(cpu|processor)\b", "", text, flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def device_slug(device: torch.device) -> str:
    """``nvidia-h200`` for GPUs, ``cpu-<model>`` for CPUs: the default results folder name."""
    if device.type == "cuda":
        return slugify(device_name(device))
    return "cpu-" + slugify(cpu_model())


def _version(module_name: str) -> Optional[str]:
    try:
        module = __import__(module_name)
    except Exception:  # an optional dependency may be absent or broken; record that
        return None
    return getattr(module, "__version__", "unknown")


def environment(device: torch.device) -> dict:
    info = {
        "device": str(device),
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": {
            "addax_kernels": ak.__version__,
            "torch": torch.__version__,
            "triton": _version("triton"),
            "transformers": _version("transformers"),
            "numpy": _version("numpy"),
        },
        "backends": ak.backend_report(device),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_bytes": props.total_memory,
            "multiprocessors": props.multi_processor_count,
            "l2_cache_bytes": getattr(props, "L2_cache_size", None),
            "cuda": torch.version.cuda,
            "driver_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }
    return info


# ----------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """A performance goal, judged on the worst measured case it covers (never asserted)."""

    name: str
    device_type: str
    backends: Tuple[str, ...]
    ops: Tuple[str, ...]
    dtypes: Tuple[str, ...]
    min_numel: int
    metric: str  # "copy_fraction" or "speedup_vs_mezo"
    threshold: float


TARGETS = (
    Target("perturb_ >= 90% of copy bandwidth, >= 2^26 elements (H100)", "cuda", ("triton", "native"),
           ("perturb",), ("fp32", "fp16", "bf16"), 1 << 26, "copy_fraction", 0.90),
    Target(">= 5x MeZO-style PyTorch, >= 2^26 elements", "cuda", ("triton", "native"),
           ("perturb", "zo_update", "addax_update"), ("fp32", "fp16", "bf16"), 1 << 26, "speedup_vs_mezo", 5.0),
    Target("native CPU fp32 >= 10x MeZO-style PyTorch, >= 2^20 elements", "cpu", ("native",),
           ("perturb", "zo_update", "addax_update"), ("fp32",), 1 << 20, "speedup_vs_mezo", 10.0),
    Target("native CPU fp32 >= 50% of copy bandwidth, >= 2^20 elements", "cpu", ("native",),
           ("perturb", "zo_update", "addax_update"), ("fp32",), 1 << 20, "copy_fraction", 0.50),
)


def _format_metric(metric: str, value: float) -> str:
    return f"{100 * value:.0f}% of copy" if metric == "copy_fraction" else f"{value:.1f}x"


def evaluate_targets(kernel_records: Sequence[dict], device: torch.device) -> List[dict]:
    """One verdict per (target, backend): PASS, MISS or NOT MEASURED (informational)."""
    verdicts = []
    for target in TARGETS:
        if target.device_type != device.type:
            continue
        for backend in target.backends:
            covered = [
                r for r in kernel_records
                if r["backend"] == backend and r["op"] in target.ops and r["dtype"] in target.dtypes
                and r["numel"] >= target.min_numel and not math.isnan(r[target.metric])
            ]
            verdict = {"target": target.name, "backend": backend, "metric": target.metric,
                       "threshold": target.threshold}
            if not covered:
                verdict.update(status="NOT MEASURED", value=None, worst_case=None)
            else:
                worst = min(covered, key=lambda r: r[target.metric])
                verdict.update(
                    status="PASS" if worst[target.metric] >= target.threshold else "MISS",
                    value=worst[target.metric],
                    worst_case={key: worst[key] for key in ("op", "dtype", "numel")},
                )
            verdicts.append(verdict)
    return verdicts


def format_targets(verdicts: Sequence[dict]) -> List[str]:
    lines = []
    for verdict in verdicts:
        line = f"{verdict['status']:<12} {verdict['backend']:<9} {verdict['target']}"
        if verdict["value"] is not None:
            case = verdict["worst_case"]
            line += (f": worst {_format_metric(verdict['metric'], verdict['value'])}"
                     f" ({case['op']} {case['dtype']} {format_numel(case['numel'])})")
        lines.append(line)
    return lines


# ----------------------------------------------------------------------------- formatting


def format_numel(numel: int) -> str:
    if numel > 0 and numel & (numel - 1) == 0:
        return f"2^{numel.bit_length() - 1}"
    return str(numel)


def format_seconds(seconds: Optional[float]) -> str:
    if seconds is None or math.isnan(seconds):
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def format_bytes(nbytes: Optional[int]) -> str:
    if nbytes is None:
        return "-"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            value = nbytes / scale
            return f"{value:.3g} {unit}" if value < 1000 else f"{value:.0f} {unit}"
    return f"{nbytes} B"


def format_table(headers: Sequence[str], rows: Iterable[Sequence[str]], markdown: bool = False) -> str:
    rows = [list(map(str, row)) for row in rows]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


_OP_ORDER = {"perturb": 0, "zo_update": 1, "addax_update": 2}
_DTYPE_ORDER = {"fp32": 0, "fp16": 1, "bf16": 2}
_KERNEL_HEADERS = ("op", "dtype", "size", "backend", "time", "GB/s", "% copy", "x MeZO-style", "peak extra")


def kernel_rows(results: dict) -> List[List[str]]:
    """Fused kernels and the MeZO-style code side by side, grouped by (op, dtype, size)."""
    mezo = {(r["op"], r["dtype"], r["numel"]): r for r in results["mezo"]}
    rows = []
    keys = sorted(mezo, key=lambda k: (_OP_ORDER.get(k[0], 99), _DTYPE_ORDER.get(k[1], 99), k[2]))
    for key in keys:
        op, dtype, numel = key
        baseline = mezo[key]
        for record in [r for r in results["kernels"] if (r["op"], r["dtype"], r["numel"]) == key]:
            rows.append([op, dtype, format_numel(numel), record["backend"], format_seconds(record["median_s"]),
                         f"{record['gbps']:.3g}", f"{100 * record['copy_fraction']:.0f}%",
                         f"{record['speedup_vs_mezo']:.3g}", format_bytes(record["peak_extra_bytes"])])
        rows.append([op, dtype, format_numel(numel), "mezo-style", format_seconds(baseline["median_s"]),
                     f"{baseline['gbps']:.3g}", f"{100 * baseline['copy_fraction']:.0f}%", "1.00",
                     format_bytes(baseline["peak_extra_bytes"])])
    return rows


_STEP_HEADERS = ("algorithm", "implementation", "step", "forward", "other", "x reference", "other x reference",
                 "peak extra")


def step_rows(steps: dict) -> List[List[str]]:
    rows = []
    for record in steps["results"]:
        if "error" in record:
            rows.append([record["algorithm"], record["implementation"], "skipped"] + ["-"] * 5)
            continue
        speedups = [record.get("speedup_vs_reference"), record.get("other_speedup_vs_reference")]
        rows.append([
            record["algorithm"], record["implementation"], format_seconds(record["median_step_s"]),
            format_seconds(record["median_forward_s"]), format_seconds(record["median_other_s"]),
            *(f"{value:.2f}" if value is not None else "-" for value in speedups),
            format_bytes(record["peak_extra_bytes"]),
        ])
    return rows


def _step_caption(steps: dict) -> str:
    model = steps["model"]
    return (f"OPT-{model['preset']} ({model['num_params'] / 1e6:.1f}M params, {steps['dtype']}), batch "
            f"{steps['batch_size']}, ZO seq {steps['zo_seq_len']}, FO seq {steps['fo_seq_len']}. "
            "'other' = parameter passes (MeZO) or backward + parameter passes (Addax).")


def format_report(results: dict) -> str:
    env, config = results["environment"], results["config"]
    parts = [
        f"addax_kernels {env['versions']['addax_kernels']} benchmark on {env['device_name']} ({env['device']}), "
        f"torch {env['versions']['torch']}, triton {env['versions']['triton']}, {env['torch_threads']} torch threads",
    ]
    if results.get("kernels"):
        parts += [
            "",
            f"Kernels: median of up to {config['repeats']} repeats; GB/s = bytes moved / time; "
            f"% copy = vs y.copy_(x) on the same bytes; rounding {config['rounding']}; peak extra: "
            f"{results['memory_method']}",
            format_table(_KERNEL_HEADERS, kernel_rows(results)),
        ]
    if results.get("steps"):
        parts += ["", "Steps: " + _step_caption(results["steps"]),
                  format_table(_STEP_HEADERS, step_rows(results["steps"]))]
        errors = {r["error"] for r in results["steps"]["results"] if "error" in r}
        parts += sorted(errors)
    if results.get("targets"):
        parts += ["", "Targets (informational):", *format_targets(results["targets"])]
    return "\n".join(parts)


def format_summary(results: dict) -> str:
    """A short Markdown table of the largest size measured per (op, dtype, backend)."""
    env = results["environment"]
    lines = [f"### {env['device_name']}", "",
             f"addax_kernels {env['versions']['addax_kernels']}, torch {env['versions']['torch']}, "
             f"triton {env['versions']['triton']}, {env['torch_threads']} torch threads; "
             f"{results['created_utc']}.", ""]
    if results.get("kernels"):
        largest: Dict[Tuple[str, str, str], dict] = {}
        for record in results["kernels"]:
            key = (record["op"], record["dtype"], record["backend"])
            if key not in largest or record["numel"] > largest[key]["numel"]:
                largest[key] = record
        rows = [[op, dtype, backend, format_numel(r["numel"]), f"{r['gbps']:.3g}",
                 f"{100 * r['copy_fraction']:.0f}%", f"{r['speedup_vs_mezo']:.3g}x"]
                for (op, dtype, backend), r in largest.items()]
        lines += [format_table(("op", "dtype", "backend", "size", "GB/s", "% copy", "vs MeZO-style"), rows,
                               markdown=True), ""]
    if results.get("steps"):
        lines += [_step_caption(results["steps"]), "",
                  format_table(_STEP_HEADERS, step_rows(results["steps"]), markdown=True), ""]
    if results.get("targets"):
        lines += ["Targets: " + "; ".join(f"{v['status']} {v['backend']}: {v['target']}" for v in results["targets"]),
                  ""]
    return "\n".join(lines)


def _json_default(value):
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    raise TypeError(f"cannot serialize {type(value).__name__}")


def _finite_or_none(value):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def write_json(results: dict, path: str) -> None:
    with open(path, "w") as handle:
        json.dump(_finite_or_none(results), handle, indent=1, default=_json_default, allow_nan=False)
        handle.write("\n")


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

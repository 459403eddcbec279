"""Wall-clock timing and peak-memory measurement on CPU and CUDA devices.

Calls cycle through ``num_buffers`` independent buffer sets.  A pass over a buffer that fits
in the last-level cache would otherwise be served from cache on every repeat after the first
and report cache bandwidth, not memory bandwidth; cycling through sets whose total is at
least twice the cache evicts each set before it is touched again.  Every timed function (fused kernel, MeZO-style code, copy) gets the same
treatment, so their ratios are fair.

CUDA samples are bracketed by CUDA events on the current stream and read after one
synchronize, so the host never waits between samples; CPU samples use ``time.perf_counter``.
"""

from __future__ import annotations

import ctypes
import math
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

_FALLBACK_CACHE_BYTES = 32 << 20
# Rotation never allocates more than this many buffer sets, whatever the size.
MAX_BUFFER_SETS = 64


@dataclass
class Timing:
    """Seconds per call: the median and minimum over ``samples`` (one entry per repeat)."""

    median_s: float
    min_s: float
    samples: List[float] = field(default_factory=list)
    calls_per_sample: int = 1

    def to_json(self) -> dict:
        return {
            "median_s": self.median_s,
            "min_s": self.min_s,
            "repeats": len(self.samples),
            "calls_per_sample": self.calls_per_sample,
            "samples_s": self.samples,
        }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _parse_cache_size(text: str) -> Optional[int]:
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)\s*", text)
    if not match:
        return None
    return int(match.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[match.group(2)]


def cache_bytes(device: torch.device) -> int:
    """The device's last-level cache size (CUDA L2, or the largest CPU cache level)."""
    if device.type == "cuda":
        size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        return int(size) or _FALLBACK_CACHE_BYTES
    sizes = []
    root = "/sys/devices/system/cpu/cpu0/cache"
    if os.path.isdir(root):
        for entry in os.listdir(root):
            try:
                with open(os.path.join(root, entry, "size")) as handle:
                    parsed = _parse_cache_size(handle.read())
            except OSError:
                continue
            if parsed:
                sizes.append(parsed)
    return max(sizes) if sizes else _FALLBACK_CACHE_BYTES


def buffer_sets_needed(footprint_bytes: int, device: torch.device) -> int:
    """How many independent buffer sets one cycle needs to touch twice the cache."""
    if footprint_bytes <= 0:
        raise ValueError(f"footprint_bytes must be positive, got {footprint_bytes}")
    return max(1, min(MAX_BUFFER_SETS, math.ceil(2 * cache_bytes(device) / footprint_bytes)))


def measure(
    call: Callable[[int], None],
    *,
    device: torch.device,
    num_buffers: int,
    warmup: int,
    repeats: int,
    time_budget_s: float,
    min_repeats: int = 3,
    min_sample_s: float = 1e-3,
) -> Timing:
    """Median seconds per ``call(i)``, cycling ``i`` through ``0 .. num_buffers - 1``.

    The cycle never restarts, so between two calls on one buffer set all the others are
    touched, whatever the sample boundaries.  ``warmup`` untimed calls (at least one: Triton
    JIT, autotuning, allocator warm-up) come first, then a few calls estimate the cost of a
    call.  A sample is then enough consecutive calls to last ``min_sample_s`` (at most one
    cycle), and the number of samples is ``repeats``, lowered to fit ``time_budget_s`` but
    never below ``min(repeats, min_repeats)``.
    """
    if num_buffers < 1 or repeats < 1 or warmup < 0:
        raise ValueError("num_buffers and repeats must be >= 1 and warmup >= 0")
    position = 0

    def run_calls(count: int) -> None:
        nonlocal position
        for _ in range(count):
            call(position)
            position = (position + 1) % num_buffers

    def seconds_per_call(count: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        run_calls(count)
        synchronize(device)
        return max((time.perf_counter() - start) / count, 1e-9)

    run_calls(max(1, warmup))
    per_call = seconds_per_call(1)
    if per_call < min_sample_s:  # one synchronized call overstates short ones: refine
        per_call = seconds_per_call(min(num_buffers, math.ceil(min_sample_s / per_call)))
    calls_per_sample = max(1, min(num_buffers, math.ceil(min_sample_s / per_call)))
    affordable = int(time_budget_s / (per_call * calls_per_sample))
    repeats = max(min(repeats, min_repeats), min(repeats, affordable))

    if device.type == "cuda":
        events = []
        for _ in range(repeats):
            start_event = torch.cuda.Event(enable_timing=True)
            end_event = torch.cuda.Event(enable_timing=True)
            start_event.record()
            run_calls(calls_per_sample)
            end_event.record()
            events.append((start_event, end_event))
        synchronize(device)
        samples = [a.elapsed_time(b) * 1e-3 / calls_per_sample for a, b in events]
    else:
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            run_calls(calls_per_sample)
            samples.append((time.perf_counter() - start) / calls_per_sample)
    return Timing(statistics.median(samples), min(samples), samples, calls_per_sample)


class SectionClock:
    """Accumulates the time spent in marked sections of a longer run (e.g. forward passes).

    On CUDA each section is a pair of events read at :meth:`total_s`, so marking a section
    adds no host synchronization to the step being measured.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._cuda_events = []
        self._cpu_seconds = 0.0

    def section(self, fn: Callable[[], object]) -> object:
        if self.device.type == "cuda":
            start_event = torch.cuda.Event(enable_timing=True)
            end_event = torch.cuda.Event(enable_timing=True)
            start_event.record()
            result = fn()
            end_event.record()
            self._cuda_events.append((start_event, end_event))
            return result
        start = time.perf_counter()
        result = fn()
        self._cpu_seconds += time.perf_counter() - start
        return result

    def total_s(self) -> float:
        if self.device.type == "cuda":
            synchronize(self.device)
            return sum(a.elapsed_time(b) for a, b in self._cuda_events) * 1e-3
        return self._cpu_seconds


class PeakMemoryMeter:
    """Peak memory a function allocates beyond what was live when it started.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.

    CPU (Linux with glibc): growth of the process's peak resident set (``VmHWM``, reset by
    writing 5 to ``/proc/self/clear_refs``) over the resident set at the start.  glibc
    would otherwise serve large allocations from memory a previous call freed but kept
    resident, hiding them, so during a measurement the meter fixes glibc's mmap threshold at
    128 KiB (every larger block is mapped on allocation and unmapped on free), after
    ``malloc_trim(0)`` (freed heap pages are returned, so reusing them shows).  Fixing a
    threshold ends glibc's dynamic tuning for the process, which changes allocation cost,
    so all timing must be finished before the first CPU measurement
    (:attr:`must_follow_timing`, :meth:`schedule`, :meth:`finish`); the meter is enabled
    lazily by :meth:`measure` for that reason.  Page granularity is 4 KiB.
    """

    _MMAP_THRESHOLD_BYTES = 128 << 10
    # Restored after each measurement: the largest values glibc's own dynamic tuning reaches
    # on 64-bit systems, so code that runs later (other tests) allocates about as before.
    _RESTORED_MMAP_THRESHOLD_BYTES = 32 << 20
    _RESTORED_TRIM_THRESHOLD_BYTES = 64 << 20
    _M_TRIM_THRESHOLD = -1
    _M_MMAP_THRESHOLD = -3

    def __init__(self, device: torch.device):
        self.device = device
        self.reason_unavailable: Optional[str] = None
        self._cpu_ready = False
        self._libc = None
        self._pending: List[tuple] = []
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated beyond the memory allocated at the start"
        elif device.type == "cpu":
            self.method = (
                "growth of the process peak resident set (VmHWM after clear_refs) with glibc's "
                f"mmap threshold fixed at {self._MMAP_THRESHOLD_BYTES >> 10} KiB"
            )
            if not sys.platform.startswith("linux") or not os.access("/proc/self/clear_refs", os.W_OK):
                self.reason_unavailable = "needs Linux /proc/self/clear_refs"
        else:
            self.method = "none"
            self.reason_unavailable = f"no peak-memory meter for {device.type} devices"

    @property
    def available(self) -> bool:
        return self.reason_unavailable is None

    @property
    def must_follow_timing(self) -> bool:
        """True where measuring changes allocation cost: measure only after all timing."""
        return self.device.type == "cpu"

    def schedule(self, record: dict, make_call: Callable[[], Callable[[], object]]) -> None:
        """Set ``record["peak_extra_bytes"]`` from one run of ``make_call()()``: right away, or
        in :meth:`finish` where :attr:`must_follow_timing`.  ``make_call`` allocates whatever
        the call needs (outside the measurement)."""
        if not self.available:
            return
        if self.must_follow_timing:
            self._pending.append((record, make_call))
        else:
            record["peak_extra_bytes"] = self.measure(make_call())

    def finish(self) -> None:
        """Run the measurements :meth:`schedule` deferred; call once all timing is done."""
        pending, self._pending = self._pending, []
        for record, make_call in pending:
            record["peak_extra_bytes"] = self.measure(make_call())

    def _enable_cpu(self) -> bool:
        if not self._cpu_ready and self.reason_unavailable is None:
            try:
                self._libc = ctypes.CDLL(None)
                ok = hasattr(self._libc, "mallopt") and hasattr(self._libc, "malloc_trim")
            except OSError:
                ok = False
            if ok:
                self._cpu_ready = True
            else:
                self.reason_unavailable = "glibc mallopt/malloc_trim are not available"
        return self._cpu_ready

    @staticmethod
    def _proc_status_bytes(key: str) -> int:
        with open("/proc/self/status") as handle:
            match = re.search(rf"^{key}:\s+(\d+) kB", handle.read(), re.MULTILINE)
        if match is None:
            raise OSError(f"{key} missing from /proc/self/status")
        return int(match.group(1)) << 10

    def measure(self, fn: Callable[[], object]) -> Optional[int]:
        """Bytes of peak extra memory while ``fn()`` runs, or None where not measurable."""
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            start = torch.cuda.memory_allocated(self.device)
            fn()
            synchronize(self.device)
            return max(0, torch.cuda.max_memory_allocated(self.device) - start)
        if not self._enable_cpu():
            fn()
            return None
        libc = self._libc
        if libc.mallopt(self._M_MMAP_THRESHOLD, self._MMAP_THRESHOLD_BYTES) != 1:
            self.reason_unavailable = "glibc mallopt(M_MMAP_THRESHOLD) failed"
            fn()
            return None
        try:
            # Freed heap memory stays resident and would serve fn's allocations unseen.
            libc.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            start = self._proc_status_bytes("VmRSS")
            fn()
            return max(0, self._proc_status_bytes("VmHWM") - start)
        except OSError as error:
            self.reason_unavailable = f"reading /proc/self failed: {error}"
            return None
        finally:
            libc.mallopt(self._M_MMAP_THRESHOLD, self._RESTORED_MMAP_THRESHOLD_BYTES)
            libc.mallopt(self._M_TRIM_THRESHOLD, self._RESTORED_TRIM_THRESHOLD_BYTES)

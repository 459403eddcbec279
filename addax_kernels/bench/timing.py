"""How the benchmark measures: device time per call, host time per call, peak extra memory.

* Device time: ``triton.testing.do_bench`` on CUDA (CUDA events around each call, the L2 cache
  flushed before each call, median); ``torch.utils.benchmark.Timer.blocked_autorange`` on the
  CPU (or on CUDA without Triton; it synchronizes the device), median of blocks.
* Host time: ``torch.utils.benchmark.Timer`` with ``time.perf_counter`` (no device sync) over
  short blocks of calls, the device synchronized between blocks so its queue never fills.
* Memory: peak allocation during a call minus the allocation at its start:
  ``torch.cuda.max_memory_allocated`` on CUDA, the allocation events of the PyTorch profiler
  (``profile_memory=True``) on the CPU; both see tensors only, not other process memory.
"""

from __future__ import annotations

import glob
import math
import statistics
import time
from typing import Callable, Optional

import torch
from torch.utils import benchmark

# Buffer sets a CPU measurement cycles through never exceed this many (see :func:`buffer_sets`).
MAX_BUFFER_SETS = 64


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timer(fn: Callable[[], object], **kwargs) -> benchmark.Timer:
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads(), **kwargs)


def seconds_per_call(fn: Callable[[], object], device: torch.device, budget_s: float) -> float:
    """Median device seconds of one ``fn()``, measured for about ``budget_s`` after a warm-up."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            budget_ms = 1e3 * budget_s
            return do_bench(fn, warmup=budget_ms / 4, rep=budget_ms, return_mode="median") * 1e-3
    fn()  # warm-up: first-call costs (JIT, allocator growth) are not the steady state
    return _timer(fn).blocked_autorange(min_run_time=budget_s).median


def host_seconds_per_call(fn: Callable[[], object], device: torch.device, calls: int = 20, blocks: int = 7) -> float:
    """Median host seconds of one ``fn()``: Python, checks and launches, without waiting for the
    device.  Meant for calls whose device work is shorter than their host work (tiny tensors),
    or for few enough calls that the launch queue does not fill."""
    return host_seconds_added(fn, None, device, calls, blocks)


def host_seconds_added(fn: Callable[[], object], baseline: Optional[Callable[[], object]], device: torch.device,
                       calls: int = 20, blocks: int = 7) -> float:
    """Median over blocks of (host seconds of one ``fn()`` − one ``baseline()``), the two timed in
    alternating blocks so that drifts of a noisy machine fall on both; ``baseline=None`` times
    ``fn`` alone (:func:`host_seconds_per_call`)."""
    timers = [_timer(f, timer=time.perf_counter) for f in (fn, baseline) if f is not None]
    for timer in timers:
        timer.timeit(1)
    synchronize(device)
    samples = []
    for _ in range(blocks):
        times = []
        for timer in timers:
            times.append(timer.timeit(calls).mean)
            synchronize(device)
        samples.append(times[0] - (times[1] if len(times) > 1 else 0.0))
    return statistics.median(samples)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak tensor memory allocated while ``fn()`` runs beyond what was allocated when it began."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - start)
    if device.type != "cpu":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (event.start_ns(), event.nbytes()) for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    )
    running = peak = 0
    for _, nbytes in events:  # frees of older tensors come out negative
        running += nbytes
        peak = max(peak, running)
    return peak


def _last_level_cache_bytes() -> int:
    """The largest cache level Linux lists for CPU 0 (32 MiB where none is listed)."""
    sizes = [32 << 20]
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        with open(path) as handle:
            text = handle.read().strip().upper()
        if text[:-1].isdigit() and text[-1] in "KM":
            sizes.append(int(text[:-1]) << (10 if text[-1] == "K" else 20))
    return max(sizes) if len(sizes) == 1 else max(sizes[1:])


def buffer_sets(footprint_bytes: int, device: torch.device) -> int:
    """How many independent buffer sets a CPU measurement cycles through so that each call reads
    memory rather than a cache warmed by the previous call (twice the last-level cache in all).
    On CUDA, do_bench flushes the L2 before every call instead: one set."""
    if device.type == "cuda":
        return 1
    return max(1, min(MAX_BUFFER_SETS, math.ceil(2 * _last_level_cache_bytes() / max(1, footprint_bytes))))

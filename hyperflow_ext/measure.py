"""Measuring wall time and peak extra memory of a call (counted from tensor allocations)."""
from __future__ import annotations

import contextlib
import itertools
import os
import sys
import time
import statistics
from typing import Any, Callable, List, Sequence, Tuple

import torch

__all__ = ["peak_memory", "wall_time", "interleaved_medians"]


@contextlib.contextmanager
def _native_stderr_silenced():
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no real stderr (e.g. captured): nothing to silence
        yield
        return
    saved = os.dup(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        sys.stderr.flush()
        os.dup2(devnull, fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


def peak_memory(fn: Callable[[], Any]) -> Tuple[Any, int]:
    """Run ``fn()`` and return ``(result, peak bytes)`` of tensor memory allocated during the call.

    On CUDA this is ``torch.cuda.max_memory_allocated`` above the starting level. On CPU the call
    runs under ``torch.profiler`` with ``profile_memory=True``; every allocation and free is
    replayed in time order and the peak of the running sum is reported (allocations attributed
    to an op are its self memory, so nothing is counted twice).
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        return out, max(0, torch.cuda.max_memory_allocated() - start)
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _native_stderr_silenced():  # the profiler's C++ side logs every start/stop on fd 2
        prof.__enter__()
    try:
        out = fn()
    finally:
        with _native_stderr_silenced():
            prof.__exit__(None, None, None)
    events = []
    for e in prof.events():
        amount = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        if amount:
            events.append((e.time_range.start, amount))
    events.sort()
    running = itertools.accumulate(a for _, a in events)
    return out, max(0, max(running, default=0))


def wall_time(fn: Callable[[], Any], repeat: int = 1) -> Tuple[Any, float]:
    """``(result of the last call, median seconds per call)`` over ``repeat`` calls."""
    times, out = [], None
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return out, times[len(times) // 2]


def interleaved_medians(fns: Sequence[Callable[[], Any]], rounds: int = 7, warmup: int = 1) -> List[float]:
    """Median seconds of each callable, timed round-robin so that all see the same machine load.

    This is how benchmarks report a ratio against a baseline from the same run on a noisy,
    shared machine.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: List[List[float]] = [[] for _ in fns]
    for _ in range(max(1, rounds)):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]

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

__all__ = ["peak_memory", "wall_time", "interleaved_times", "interleaved_medians"]


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


def interleaved_times(fns: Sequence[Callable[[], Any]], budget_s: float = 1.0, min_rounds: int = 5,
                      max_rounds: int = 200) -> Tuple[List[List[float]], int]:
    """Per-round seconds of each callable, run round-robin after one warm-up call each.

    Timing the callables in turn means all of them see the same machine load, which is how the
    benchmarks report a ratio against a baseline from the same run on a noisy, shared machine.
    Each round starts one callable later than the last, so every callable follows each of the others
    equally often (what ran just before, e.g. a large model that evicted the caches or left the
    thread pool idle, changes a small call's time). The number of rounds fills ``budget_s`` (within
    ``[min_rounds, max_rounds]``).

    Returns:
        ``(times, rounds)``: ``times[i]`` lists the seconds of ``fns[i]`` per round.
    """
    for fn in fns:
        fn()
    t0 = time.perf_counter()
    for fn in fns:
        fn()
    per_round = max(time.perf_counter() - t0, 1e-6)
    rounds = int(min(max_rounds, max(min_rounds, budget_s / per_round)))
    times: List[List[float]] = [[] for _ in fns]
    order = list(range(len(fns)))
    for r in range(rounds):
        for i in order[r % len(fns):] + order[:r % len(fns)]:
            t = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - t)
    return times, rounds


def interleaved_medians(fns: Sequence[Callable[[], Any]], rounds: int = 7) -> List[float]:
    """Median seconds of each callable over exactly ``rounds`` interleaved rounds."""
    times, _ = interleaved_times(fns, budget_s=0.0, min_rounds=rounds, max_rounds=rounds)
    return [statistics.median(ts) for ts in times]

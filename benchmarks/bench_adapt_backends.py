"""``drift_integrate`` back-ends at adaptation sizes: the torch reference vs the native C++ path.

Sizes: ``P = 300`` adapted parameters (about the bias count of a small conv net) and a
``P = 20000`` case, ``H = 256`` hidden units, 50 forward-Euler steps, 1 and 16 tasks.

Each test times its back-end with pytest-benchmark and, in the same test, the torch baseline and
the back-end alternately with ``time.perf_counter`` (so both see the same machine load); the
medians and their ratio go to ``benchmark.extra_info`` (``speedup_vs_torch``). Run with::

    python -m pytest benchmarks/bench_adapt_backends.py --benchmark-enable -q
"""
import math
import pytest
import torch

from hyperflow_ext import native
from hyperflow_ext.flow.drift import PackedDrift
from hyperflow_ext.flow.integrate import drift_integrate
from hyperflow_ext.measure import interleaved_medians

HIDDEN, STEPS, DT = 256, 50, 0.02
CASES = {  # name: (tasks, P, alternating timing rounds)
    "P300-tasks1": (1, 300, 21),
    "P300-tasks16": (16, 300, 11),
    "P20000-tasks1": (1, 20000, 5),
}


def problem(tasks, p, h=HIDDEN, steps=STEPS):
    g = torch.Generator().manual_seed(0)

    def rand(*shape, fan_in=1):
        return torch.randn(*shape, generator=g) * (0.5 / math.sqrt(fan_in))

    w = PackedDrift(w_in=rand(h, p, fan_in=p), w_mid=rand(h, h, fan_in=h), b_mid=rand(h),
                    w_out=rand(p, h, fan_in=h), b_out=rand(p))
    return w, rand(tasks, p), rand(tasks, h), rand(steps, 1, h)


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("case", list(CASES))
def test_drift_integrate(benchmark, case, backend):
    if backend == "native" and not native.available():
        pytest.skip("native extension not built")
    tasks, p, rounds = CASES[case]
    w, d, tb, tt = problem(tasks, p)

    def run(b):
        return lambda: drift_integrate(w, d, tb, tt, DT, "euler", backend=b)

    fn = run(backend)
    y, done = benchmark.pedantic(fn, rounds=max(3, rounds // 2), warmup_rounds=1)
    assert done.tolist() == [STEPS] * tasks and bool(torch.isfinite(y).all())
    benchmark.extra_info.update(tasks=tasks, params=p, hidden=HIDDEN, steps=STEPS, solver="euler",
                                torch_threads=torch.get_num_threads(),
                                native_threads=native.diagnostics().get("openmp_threads"))
    if getattr(benchmark, "disabled", False):
        return  # --benchmark-disable: a smoke run, no timing
    if backend == "torch":
        benchmark.extra_info["speedup_vs_torch"] = 1.0
        return
    t_torch, t_backend = interleaved_medians([run("torch"), fn], rounds)
    benchmark.extra_info.update(torch_median_s=t_torch, backend_median_s=t_backend,
                                speedup_vs_torch=t_torch / t_backend)

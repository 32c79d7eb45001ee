"""The fused drift integration: native (C++/CUDA) and Triton back-ends against the torch reference."""
import math
import os
import subprocess
import tempfile
import sys

import pytest
import torch

from hyperflow_ext import native
from hyperflow_ext.flow.drift import PackedDrift
from hyperflow_ext.flow.integrate import drift_integrate, drift_integrate_reference
from hyperflow_ext.flow.solvers import TABLEAUS

SOLVERS = ("euler", "heun", "rk4")
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}
TRITON_TOL = dict(rtol=1e-4, atol=1e-4)


def make_problem(tasks, p, h, steps, solver, dtype=torch.float32, device="cpu", scale=0.5):
    """A random, well-scaled drift network and inputs (the state stays O(1) over a few steps)."""
    g = torch.Generator().manual_seed(1234 + 7 * tasks + p + 3 * h + steps)

    def rand(*shape, fan_in=1):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale / math.sqrt(fan_in)).to(dtype).to(device)

    w = PackedDrift(w_in=rand(h, p, fan_in=p), w_mid=rand(h, h, fan_in=h), b_mid=rand(h),
                    w_out=rand(p, h, fan_in=h), b_out=rand(p))
    stages = TABLEAUS[solver].stages
    return w, rand(tasks, p), rand(tasks, h), rand(steps, stages, h)


def explosive(p, gain, dtype=torch.float32):
    """A drift ≈ gain * δ (an unstable linear flow through the silu MLP): y grows ~ (1 + gain dt)^n."""
    eye = torch.eye(p, dtype=dtype)
    h = 2 * p
    return PackedDrift(w_in=torch.cat([eye, -eye]).contiguous(), w_mid=torch.eye(h, dtype=dtype),
                       b_mid=torch.zeros(h, dtype=dtype), w_out=(gain * torch.cat([eye, -eye], 1)).contiguous(),
                       b_out=torch.zeros(p, dtype=dtype))


def scaled_rows(tasks, p, scales, dtype=torch.float32):
    d = torch.randn(tasks, p, dtype=torch.float64)
    d = d / d.abs().amax(1, keepdim=True) * torch.tensor(scales, dtype=torch.float64)[:, None]
    return d.to(dtype)


def check_against_reference(w, delta0, tb, tt, dt, solver, backend, tol, max_increment=math.inf):
    got, done = drift_integrate(w, delta0, tb, tt, dt, solver, max_increment, backend=backend)
    want, want_done, _ = drift_integrate_reference(w, delta0, tb, tt, dt, solver, max_increment)
    assert done.dtype == torch.int64 and done.shape == (delta0.shape[0],)
    assert done.tolist() == want_done.tolist()
    torch.testing.assert_close(got, want, **tol)
    assert not got.requires_grad
    return done


# ---- native -----------------------------------------------------------------------------------

@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tasks", [1, 3])
@pytest.mark.parametrize("p", [1, 37, 300])
@pytest.mark.parametrize("h", [16, 96])
@pytest.mark.parametrize("steps", [1, 7])
def test_native_matches_reference(solver, dtype, tasks, p, h, steps):
    w, d, tb, tt = make_problem(tasks, p, h, steps, solver, dtype)
    done = check_against_reference(w, d, tb, tt, 0.1, solver, "native", TOL[dtype])
    assert done.tolist() == [steps] * tasks


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_many_tasks_long_reduction(solver, dtype):
    # 19 tasks: task blocks of several tasks (outer-product tiles of 8/4/2/1 tasks, ragged
    # strips at H=40); P=1100 > the 1024-long reduction blocks.
    w, d, tb, tt = make_problem(19, 1100, 40, 3, solver, dtype)
    check_against_reference(w, d, tb, tt, 0.05, solver, "native", TOL[dtype])


_THREADS_SCRIPT = """
import sys
import torch
torch.set_num_threads({threads})  # torch and the extension share one OpenMP runtime
sys.path.insert(0, {tests!r})
from test_drift_kernels import make_problem, check_against_reference, explosive, scaled_rows, TOL
from hyperflow_ext import native
assert native.diagnostics()["openmp_threads"] == {threads}
for solver in ("euler", "rk4"):
    for tasks, p, h in ((1, 300, 256), (3, 1100, 40), (6, 37, 16)):
        w, d, tb, tt = make_problem(tasks, p, h, 4, solver)
        check_against_reference(w, d, tb, tt, 0.1, solver, "native", TOL[torch.float32])
torch.manual_seed(0)
w, d = explosive(37, 90.0), scaled_rows(4, 37, [1e-2, 1.0, 0.3, 1e-3])
done = check_against_reference(w, d, torch.zeros(4, 74), torch.zeros(7, 1, 74), 0.1, "euler", "native",
                               TOL[torch.float32], max_increment=500.0)
assert len(set(done.tolist())) >= 3
print("ok")
"""


@pytest.mark.parametrize("threads", [1, 4])
def test_native_other_thread_counts(threads):
    # 4 threads put 1 and 3 tasks in team mode (3: several tasks sharing the row split, sizes
    # large enough to use the team); 1 thread runs every task in one block. A subprocess, so the
    # thread count of this one stays as it is.
    code = _THREADS_SCRIPT.format(tests=os.path.dirname(__file__), threads=threads)
    # cwd outside the checkout: `python -c` puts the cwd first on sys.path, and the source tree has no build
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=tempfile.gettempdir())
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_native_delta0_untouched_and_repeatable():
    w, d, tb, tt = make_problem(3, 37, 16, 7, "heun")
    d0 = d.clone()
    a, na = drift_integrate(w, d, tb, tt, 0.1, "heun", backend="native")
    b, nb = drift_integrate(w, d, tb, tt, 0.1, "heun", backend="native")
    assert torch.equal(d, d0)
    assert torch.equal(a, b) and torch.equal(na, nb)


# ---- Triton (interpreter on CPU) --------------------------------------------------------------

TRITON_SHAPES = [(1, 37, 64, 7), (3, 300, 96, 3), (3, 1, 16, 7)]


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("tasks,p,h,steps", TRITON_SHAPES)
def test_triton_matches_reference(solver, tasks, p, h, steps):
    pytest.importorskip("triton")
    w, d, tb, tt = make_problem(tasks, p, h, steps, solver)
    check_against_reference(w, d, tb, tt, 0.1, solver, "triton", TRITON_TOL)


# ---- the divergence guard ----------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_guard_threshold_stops_tasks_at_different_steps(backend, solver):
    # Increments grow ~10x per step from different scales, so the threshold of 500 is crossed at
    # a different step per task, far from any rounding ambiguity.
    w = explosive(37, {"euler": 90.0, "heun": 34.0, "rk4": 21.0}[solver])
    d = scaled_rows(4, 37, [1e-2, 1.0, 0.3, 1e-3])
    tb, tt = torch.zeros(4, 74), torch.zeros(7, TABLEAUS[solver].stages, 74)
    done = check_against_reference(w, d, tb, tt, 0.1, solver, backend,
                                   TRITON_TOL if backend == "triton" else TOL[torch.float32], max_increment=500.0)
    assert len(set(done.tolist())) >= 3 and min(done.tolist()) >= 1  # stopped at different steps


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_guard_overflow_to_inf_stops_without_threshold(backend):
    # ~1e4x per step: float32 overflows after a few steps; the task keeps its last finite state.
    w = explosive(5, 1e5)
    d = scaled_rows(3, 5, [1.0, 1e-5, 1e-10])
    tb, tt = torch.zeros(3, 10), torch.zeros(12, 1, 10)
    done = check_against_reference(w, d, tb, tt, 0.1, "euler", backend, TOL[torch.float32])
    got, _ = drift_integrate(w, d, tb, tt, 0.1, "euler", backend=backend)
    assert bool(torch.isfinite(got).all())
    assert done.tolist()[:2] == [9, 10] and done[2] == 12


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_guard_nan_increments(backend, solver):
    # Task 1 sees NaN from its first evaluation (task bias -inf: silu(-inf) = NaN); every task sees
    # NaN at step 3 (a NaN in the time table).
    w, d, tb, tt = make_problem(3, 37, 16, 6, solver)
    tb[1, 4] = -math.inf
    tt[3, -1, 2] = math.nan
    done = check_against_reference(w, d, tb, tt, 0.1, solver, backend,
                                   TRITON_TOL if backend == "triton" else TOL[torch.float32])
    assert done.tolist() == [3, 0, 3]
    got, _ = drift_integrate(w, d, tb, tt, 0.1, solver, backend=backend)
    assert torch.equal(got[1], d[1])  # never moved


def test_guard_float64_native():
    w = explosive(37, 100.0, torch.float64)
    d = scaled_rows(4, 37, [1e-2, 1.0, 0.3, 1e-3], torch.float64)
    tb, tt = torch.zeros(4, 74, dtype=torch.float64), torch.zeros(7, 4, 74, dtype=torch.float64)
    check_against_reference(w, d, tb, tt, 0.1, "rk4", "native", TOL[torch.float64], max_increment=500.0)


# ---- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["native", "triton"])
def test_bad_input_raises_value_error_naming_the_argument(backend):
    w, d, tb, tt = make_problem(2, 10, 16, 3, "heun")
    call = lambda **kw: drift_integrate(**{**dict(w=w, delta0=d, task_bias=tb, time_table=tt, dt=0.1,  # noqa: E731
                                                  solver="heun", backend=backend), **kw})
    with pytest.raises(ValueError, match="w_in must have shape"):
        call(w=w._replace(w_in=torch.randn(16, 11)))
    with pytest.raises(ValueError, match="w_out must have shape"):
        call(w=w._replace(w_out=torch.randn(10, 15)))
    with pytest.raises(ValueError, match="task_bias must have shape"):
        call(task_bias=torch.randn(3, 16))
    with pytest.raises(ValueError, match="time_table must have shape"):
        call(time_table=torch.randn(3, 1, 16))  # heun has two stages
    with pytest.raises(ValueError, match="task_bias must have dtype"):
        call(task_bias=tb.double())
    with pytest.raises(ValueError, match="delta0 must be contiguous"):
        call(delta0=torch.randn(10, 2).T)
    with pytest.raises(ValueError, match="w_mid must be contiguous"):
        call(w=w._replace(w_mid=w.w_mid.T.contiguous().T))
    with pytest.raises(ValueError, match="delta0 must have dtype"):
        call(delta0=d.half())
    with pytest.raises(ValueError, match="solver must be one of"):
        call(solver="midpoint")
    with pytest.raises(ValueError, match="dt must be finite"):
        call(dt=math.nan)
    with pytest.raises(ValueError, match="max_increment must be > 0"):
        call(max_increment=0.0)


def test_native_module_validates_its_own_arguments():
    mod = native.cpu_module()
    w, d, tb, tt = make_problem(1, 4, 16, 2, "euler")
    state, done = d.clone(), torch.zeros(1, dtype=torch.int64)
    args = dict(w_in=w.w_in.data_ptr(), w_mid=w.w_mid.data_ptr(), b_mid=w.b_mid.data_ptr(),
                w_out=w.w_out.data_ptr(), b_out=w.b_out.data_ptr(), task_bias=tb.data_ptr(),
                time_table=tt.data_ptr(), state=state.data_ptr(), steps_done=done.data_ptr(), tasks=1, params=4,
                hidden=16, steps=2, stages=1, a=[0.0], b=[1.0], dt=0.1, max_increment=math.inf, dtype=0)
    mod.drift_integrate(**args)
    assert done.tolist() == [2]
    with pytest.raises(ValueError, match="a must hold"):
        mod.drift_integrate(**{**args, "a": [0.0, 0.0]})
    with pytest.raises(ValueError, match="b must hold"):
        mod.drift_integrate(**{**args, "b": []})
    with pytest.raises(ValueError, match="null pointer"):
        mod.drift_integrate(**{**args, "w_in": 0})
    with pytest.raises(ValueError, match="must be positive"):
        mod.drift_integrate(**{**args, "hidden": 0})
    with pytest.raises(ValueError, match="unsupported dtype"):
        mod.drift_integrate(**{**args, "dtype": 7})


# ---- CUDA --------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_reference(backend, solver, dtype):
    for tasks, p, h, steps in [(1, 37, 64, 7), (5, 300, 96, 5), (16, 1000, 256, 3)]:
        w, d, tb, tt = make_problem(tasks, p, h, steps, solver, dtype, device="cuda")
        tol = TOL[dtype] if dtype == torch.float64 else TRITON_TOL
        check_against_reference(w, d, tb, tt, 0.1, solver, backend, tol)
    w = explosive(37, 100.0, dtype)
    w = type(w)(*(t.cuda() for t in w))
    d = scaled_rows(4, 37, [1e-2, 1.0, 0.3, 1e-3], dtype).cuda()
    tb = torch.zeros(4, 74, dtype=dtype, device="cuda")
    tt = torch.zeros(7, TABLEAUS[solver].stages, 74, dtype=dtype, device="cuda")
    check_against_reference(w, d, tb, tt, 0.1, solver, backend, TRITON_TOL, max_increment=500.0)

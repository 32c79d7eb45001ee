"""Native kernels and exported sparse models under concurrent calls, and the GIL during long native calls.

Every concurrency test runs its calls serially first, then from THREADS threads released together
by a barrier, and requires each threaded result to equal its serial counterpart bit for bit (a
kernel's arithmetic does not depend on how many callers there are). fused_adapt and Pruner.export()
have their own tests in test_concurrency.py.

The GIL tests need no clock: a pure-Python thread, woken just before a long native call, proves that
it ran *during* the call by seeing the flag the calling thread clears right after the call returns.
"""
import sys
import threading

import pytest
import torch
from torch import nn

import hyperflow_ext as hf
from hyperflow_ext import native
from hyperflow_ext.flow.drift import PackedDrift
from hyperflow_ext.flow.integrate import drift_integrate
from hyperflow_ext.flow.update import euler_update
from hyperflow_ext.prune.flow_ops import flow_step
from hyperflow_ext.prune.masked_ops import masked_matmul
from hyperflow_ext.sparse import CSRMatrix, SparseConv2d, csr_conv2d, csr_linear, csr_spmm

from _threads import run_threaded  # tests/ is on sys.path under pytest

pytestmark = pytest.mark.skipif(not native.available(), reason="native extension not built")

THREADS = 8


def _assert_serial_equals_threaded(fn, args_list):
    serial = [fn(*a) for a in args_list]
    _, threaded = run_threaded(fn, args_list, THREADS)
    for i, got in enumerate(threaded):
        want = serial[i % len(args_list)]
        for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            assert torch.equal(g, w), f"job {i}: threaded result differs from the serial one"


def _sparse(*shape, density=0.2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * (torch.rand(*shape, generator=g) < density)).to(dtype)


def _inputs(n, *shape, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g).to(dtype),) for _ in range(n)]


# ---- native kernels from several threads ------------------------------------------------------

@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_csr_linear_and_spmm_from_threads(index_dtype):
    W = CSRMatrix.from_dense(_sparse(300, 200), index_dtype=index_dtype)  # one matrix shared by all
    _assert_serial_equals_threaded(lambda x: csr_linear(x, W), _inputs(4, 37, 200))
    _assert_serial_equals_threaded(lambda b: csr_spmm(W, b), _inputs(4, 200, 45))


def test_sparse_conv_from_threads_shared_module_and_plans():
    w = _sparse(16, 8, 3, 3, density=0.3)
    conv = SparseConv2d.from_dense(w, padding=1, relu=True)  # its prepared-call cache is filled concurrently
    W = CSRMatrix.from_dense(w.reshape(16, -1))
    plans = {}
    xs = _inputs(4, 3, 8, 11, 11)
    with torch.inference_mode():
        _assert_serial_equals_threaded(lambda x: conv(x), xs)
        _assert_serial_equals_threaded(lambda x: csr_conv2d(x, W, 3, stride=2, padding=1, plans=plans), xs)
    assert plans


def test_masked_matmul_euler_and_drift_from_threads():
    w = torch.randn(64, 48)
    mask = torch.rand(64, 48) < 0.3
    _assert_serial_equals_threaded(lambda x: masked_matmul(x, w, mask, backend="native"), _inputs(4, 33, 48))
    drift = torch.randn(5000)
    _assert_serial_equals_threaded(lambda t: euler_update(t, drift, 0.1, backend="native"), _inputs(4, 5000))
    g = torch.Generator().manual_seed(3)
    p, h = 37, 24
    pw = PackedDrift(w_in=torch.randn(h, p, generator=g) * 0.2, w_mid=torch.randn(h, h, generator=g) * 0.2,
                     b_mid=torch.randn(h, generator=g), w_out=torch.randn(p, h, generator=g) * 0.2,
                     b_out=torch.randn(p, generator=g))
    tt = torch.randn(6, 4, h, generator=g)
    problems = [(torch.randn(3, p, generator=g), torch.randn(3, h, generator=g)) for _ in range(4)]
    _assert_serial_equals_threaded(lambda d, tb: drift_integrate(pw, d, tb, tt, 0.1, "rk4", backend="native"),
                                   problems)


def test_flow_accumulation_from_threads():
    """Each thread steps its own layer state; the shared weight is only read."""
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(40, 30, generator=g)
    grads = [torch.randn(40, 30, generator=g) for _ in range(3)]
    starts = [torch.randn(40, 30, generator=g) * 0.01 for _ in range(4)]

    def run(scores0):
        state = [scores0.clone(), torch.zeros_like(scores0), torch.zeros_like(scores0), torch.zeros_like(scores0)]
        for step, grad in enumerate(grads, 1):
            gw, mask = flow_step(weight, grad, *state, step=step, pressure=1e-3, backend="native")
        return (gw, mask, *state)

    _assert_serial_equals_threaded(run, [(s,) for s in starts])


def _cnn():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                        nn.Flatten(), nn.Linear(8 * 10 * 10, 10))
    with torch.no_grad():
        for m in net:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(torch.rand_like(m.weight) < 0.2)  # pruned weights exactly zero
    return net.eval()


def test_sparsified_model_from_threads():
    model = _cnn()
    sparse_model, report = hf.sparse.sparsify(model, dense_above=None)
    assert any(r["kind"].startswith("sparse") for r in report)
    xs = _inputs(4, 3, 1, 12, 12)
    with torch.inference_mode():
        _assert_serial_equals_threaded(lambda x: sparse_model(x), xs)
        for (x,) in xs:  # and the serial results are the dense model's
            torch.testing.assert_close(sparse_model(x), model(x), atol=1e-4, rtol=1e-4)


# ---- long native calls release the GIL --------------------------------------------------------

class _Recorder:
    """Stands in for the native module: records the kwargs of one call and makes it."""

    def __init__(self, module):
        self.module, self.calls = module, []

    def __getattr__(self, name):
        fn = getattr(self.module, name)

        def record(**kwargs):
            self.calls.append((name, kwargs))
            return fn(**kwargs)
        return record


def _native_call_of(monkeypatch, wrapper, *args, **kwargs):
    """The raw native function and keyword arguments that ``wrapper(*args)`` hands to the extension.

    The result is returned too: it owns the output buffers the recorded pointers point into.
    """
    rec = _Recorder(native.cpu_module())
    monkeypatch.setattr(native, "cpu_module", lambda: rec)
    result = wrapper(*args, **kwargs)
    monkeypatch.undo()
    assert len(rec.calls) == 1, [c[0] for c in rec.calls]
    name, kw = rec.calls[0]
    return getattr(native.cpu_module(), name), kw, result


def _python_progress_during(fn, kwargs) -> int:
    """Run ``fn(**kwargs)`` here while another thread counts; how far it counted *during* the call.

    The counter thread sleeps on an event until just before the call; it then needs the GIL to take
    a single step. Between ``go.set()`` and the call only plain bytecodes run here (no torch op, which
    could release the GIL itself), and the switch interval is raised far above the call's length so
    this thread is not asked to give the GIL up before the call. So the counter moves while
    ``in_call`` is set only if the native call released the GIL.
    """
    state = {"in_call": False, "progress": 0}
    go, finished = threading.Event(), threading.Event()

    def count():
        go.wait()
        while state["in_call"] and state["progress"] < 100_000:
            state["progress"] += 1
        finished.set()

    counter = threading.Thread(target=count, daemon=True)
    counter.start()
    old = sys.getswitchinterval()
    sys.setswitchinterval(30.0)
    try:
        state["in_call"] = True
        go.set()
        fn(**kwargs)
        state["in_call"] = False
    finally:
        sys.setswitchinterval(old)
    assert finished.wait(timeout=120)
    counter.join(timeout=60)
    return state["progress"]


def _long_calls(monkeypatch):
    g = torch.Generator().manual_seed(5)
    W = CSRMatrix.from_dense(_sparse(3000, 3000, density=0.1, seed=5))
    x = torch.randn(256, 3000, generator=g)
    b = torch.randn(3000, 256, generator=g)
    out = torch.empty(3000, 256)
    p, h = 2048, 256
    pw = PackedDrift(w_in=torch.randn(h, p, generator=g) * 0.02, w_mid=torch.randn(h, h, generator=g) * 0.05,
                     b_mid=torch.randn(h, generator=g), w_out=torch.randn(p, h, generator=g) * 0.05,
                     b_out=torch.randn(p, generator=g))
    d, tb, tt = torch.randn(16, p, generator=g), torch.randn(16, h, generator=g), torch.randn(20, 1, h, generator=g)
    wm, mask = torch.randn(2048, 2048, generator=g), torch.rand(2048, 2048, generator=g) < 0.5
    xm = torch.randn(256, 2048, generator=g)
    return {
        "csr_spmm": (csr_spmm, (W, b), {"out": out}),
        "csr_linear": (csr_linear, (x, W), {}),
        "drift_integrate": (drift_integrate, (pw, d, tb, tt, 0.1, "euler"), {"backend": "native"}),
        "masked_matmul": (masked_matmul, (xm, wm, mask), {"backend": "native"}),
    }


@pytest.mark.parametrize("op", ["csr_spmm", "csr_linear", "drift_integrate", "masked_matmul"])
def test_long_native_calls_release_the_gil(monkeypatch, op):
    wrapper, args, kwargs = _long_calls(monkeypatch)[op]
    fn, native_kwargs, keep_alive = _native_call_of(monkeypatch, wrapper, *args, **kwargs)
    progress = _python_progress_during(fn, native_kwargs)
    assert progress > 0, f"{op}: a Python thread made no progress during the native call (GIL held)"
    del keep_alive


def test_the_probe_sees_a_call_that_holds_the_gil():
    """Control: a long call that holds the GIL (pure-Python work) leaves the counter at 0."""
    def busy(n):
        total = 0
        for i in range(n):
            total += i
        return total

    assert _python_progress_during(busy, {"n": 3_000_000}) == 0

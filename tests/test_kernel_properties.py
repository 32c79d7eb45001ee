"""Property tests (hypothesis): every native and Triton kernel against its pure-torch reference.

Random shapes including 0 and 1, sparsities from 0 to 1 with empty rows, duplicate-free random CSR
with int32 and int64 indices, strided operands, float32 and float64. Kernels whose properties live
elsewhere (each property is tested once): csr_conv2d (test_sparse_conv.py), flow_step's arithmetic
(test_flow_ops.py), masked_matmul, its input gradient and csr_linear (test_sparse_kernels.py).

Budget: the hypothesis profile of tests/conftest.py (``ci``: a fixed small number of examples per
property); ``HYPERFLOW_HYPOTHESIS_PROFILE=slow`` or ``pytest -m slow`` (which reruns this file with
that profile in a child process) gets a larger one.
"""
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hyperflow_ext import native
from hyperflow_ext.flow.drift import PackedDrift
from hyperflow_ext.flow.integrate import drift_integrate, drift_integrate_reference
from hyperflow_ext.flow.solvers import TABLEAUS
from hyperflow_ext.flow.update import euler_update, euler_update_reference
from hyperflow_ext.models.norm import group_norm_, group_norm_reference
from hyperflow_ext.prune.flow_ops import flow_step, flow_step_reference
from hyperflow_ext.prune.masked_ops import score_mask
from hyperflow_ext.sparse import csr_spmm

from _helpers import random_csr, tol

pytestmark = pytest.mark.skipif(not native.available(), reason="native extension not built")

DTYPES = st.sampled_from([torch.float32, torch.float64])
INDEX_DTYPES = st.sampled_from([torch.int32, torch.int64])
SIZES = st.sampled_from([0, 1, 2, 3, 7, 16, 33])  # 0 and 1 drawn often, plus SIMD-ragged sizes
DENSITY = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0))
SEEDS = st.integers(0, 2**31 - 1)
LAYOUTS = st.sampled_from(["contiguous", "transposed", "sliced"])


def close(got, want, dtype):
    """``got`` against a float64 reference, at ``dtype``'s tolerance."""
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.double(), want.double(), **tol(dtype))


def laid_out(t, layout):
    """The same values as ``t`` (2-D) in another memory layout."""
    if layout == "transposed":
        return t.t().contiguous().t()
    if layout == "sliced":
        wide = torch.zeros(t.shape[0], 2 * t.shape[1] + 1, dtype=t.dtype)
        wide[:, 1::2] = t
        return wide[:, 1::2]
    return t


@st.composite
def csr_cases(draw, max_rows=None):
    rows, cols = draw(SIZES), draw(SIZES)
    dtype, index_dtype = draw(DTYPES), draw(INDEX_DTYPES)
    gen = torch.Generator().manual_seed(draw(SEEDS))
    dense, a = random_csr(rows, cols, draw(DENSITY), dtype, index_dtype, generator=gen, empty_rows=draw(st.booleans()))
    return dense, a, gen


# ---- CSR (exported models) --------------------------------------------------------------------

@given(case=csr_cases(), n=SIZES, layout=LAYOUTS, strided_out=st.booleans(),
       backend=st.sampled_from(["native", "torch"]))
def test_csr_spmm_property(case, n, layout, strided_out, backend):
    dense, a, gen = case
    rows, k = dense.shape
    b = laid_out(torch.randn(k, n, dtype=torch.float64, generator=gen).to(dense.dtype), layout)
    out = torch.full((rows, n + 3), float("nan"), dtype=dense.dtype)[:, :n] if strided_out else None
    got = csr_spmm(a, b, out=out, backend=backend)
    if out is not None:
        assert got.data_ptr() == out.data_ptr()
    close(got, dense.double() @ b.double(), dense.dtype)
    torch.testing.assert_close(a.to_dense(), dense, rtol=0, atol=0)  # inputs untouched


# ---- score mask (training) --------------------------------------------------------------------

@given(shape=st.sampled_from([(0,), (1,), (5,), (3, 0), (17, 33), (70000,)]), dtype=DTYPES, seed=SEEDS,
       specials=st.booleans(), transposed=st.booleans())
def test_score_mask_property(shape, dtype, seed, specials, transposed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(*shape, dtype=torch.float64, generator=gen).to(dtype)
    if specials and scores.numel():
        flat = scores.view(-1)
        idx = torch.randint(0, flat.numel(), (4,), generator=gen)
        flat[idx] = torch.tensor([0.0, -0.0, float("nan"), float("-inf")], dtype=dtype)
    if transposed and scores.dim() == 2:
        scores = scores.t()
    mask, count = score_mask(scores, backend="native")
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert torch.equal(mask, scores >= 0) and count == int((scores >= 0).sum())


# ---- flow accumulation (the fused pruning step), every shape ----------------------------------

@given(shape=st.sampled_from([(0,), (1,), (2, 3), (33, 17), (4, 3, 3, 3)]), dtype=DTYPES, seed=SEEDS,
       steps=st.integers(1, 3), pressure=st.floats(0.0, 1.0))
def test_flow_step_property_shapes(shape, dtype, seed, steps, pressure):
    gen = torch.Generator().manual_seed(seed)

    def rand(scale=1.0):
        return (torch.randn(*shape, dtype=torch.float64, generator=gen) * scale).to(dtype)

    weight, scores = rand(), rand(0.01)
    states = {name: [scores.clone(), torch.zeros_like(scores), torch.zeros_like(scores), torch.zeros_like(scores)]
              for name in ("native", "torch")}
    for step in range(1, steps + 1):
        grad = rand()
        results = {}
        for name, fn in (("native", lambda *s, **k: flow_step(*s, **k, backend="native")),
                         ("torch", flow_step_reference)):
            s, f, m, v = states[name]
            results[name] = fn(weight, grad, s, f, m, v, step=step, pressure=pressure)
        (gw, mask), (gw_ref, mask_ref) = results["native"], results["torch"]
        close(gw, gw_ref, dtype)
        for got, want in zip(states["native"], states["torch"]):
            close(got, want, dtype)
        new_scores, ref_scores = states["native"][0], states["torch"][0]
        decided = ref_scores.abs() > 1e-6  # an ulp-close score at 0 may fall either way
        assert mask.dtype == torch.bool and torch.equal(mask, new_scores >= 0)
        assert torch.equal(mask[decided], mask_ref[decided])


# ---- Euler update, drift integration (adaptation), group norm (backbones) ---------------------

@given(n=st.sampled_from([0, 1, 2, 15, 1023, 1025, 5000]), dtype=DTYPES, seed=SEEDS,
       dt=st.floats(-2.0, 2.0, allow_nan=False), in_place=st.sampled_from([None, "theta", "drift"]),
       backend=st.sampled_from(["native", "triton", "torch"]))
def test_euler_update_property(n, dtype, seed, dt, in_place, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(n, dtype=torch.float64, generator=gen).to(dtype)
    drift = torch.randn(n, dtype=torch.float64, generator=gen).to(dtype)
    want = euler_update_reference(theta.double(), drift.double(), dt)
    out = {"theta": theta, "drift": drift, None: None}[in_place]
    got = euler_update(theta, drift, dt, out=out, backend=backend)
    if out is not None:
        assert got.data_ptr() == out.data_ptr()
    close(got, want, dtype)


@st.composite
def drift_problems(draw, dtypes=DTYPES):
    tasks, p, h, steps = draw(st.integers(1, 4)), draw(st.sampled_from([1, 2, 7, 37])), \
        draw(st.sampled_from([1, 3, 16, 24])), draw(st.integers(1, 4))
    solver, dtype = draw(st.sampled_from(sorted(TABLEAUS))), draw(dtypes)
    gen = torch.Generator().manual_seed(draw(SEEDS))

    def rand(*shape, fan_in=1):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * 0.5 / math.sqrt(fan_in)).to(dtype)

    w = PackedDrift(w_in=rand(h, p, fan_in=p), w_mid=rand(h, h, fan_in=h), b_mid=rand(h),
                    w_out=rand(p, h, fan_in=h), b_out=rand(p))
    stages = TABLEAUS[solver].stages
    dt = draw(st.sampled_from([0.05, 0.1, -0.1]))
    guard = draw(st.sampled_from([math.inf, 1e3]))
    return w, rand(tasks, p), rand(tasks, h), rand(steps, stages, h), dt, solver, guard


def _check_drift(problem, backend, **tolerance):
    w, d, tb, tt, dt, solver, guard = problem
    d0 = d.clone()
    got, done = drift_integrate(w, d, tb, tt, dt, solver, guard, backend=backend)
    want, want_done, _ = drift_integrate_reference(w, d, tb, tt, dt, solver, guard)
    assert torch.equal(d, d0)  # delta0 is an input, never overwritten
    assert done.tolist() == want_done.tolist()
    torch.testing.assert_close(got, want, **(tolerance or tol(d.dtype)))


@given(problem=drift_problems())
def test_drift_integrate_native_property(problem):
    _check_drift(problem, "native")


@given(problem=drift_problems(dtypes=st.just(torch.float32)))
def test_drift_integrate_triton_property(problem):
    pytest.importorskip("triton")
    _check_drift(problem, "triton", rtol=1e-4, atol=1e-4)


@given(n=st.sampled_from([0, 1, 3]), groups=st.sampled_from([1, 2, 3]), per_group=st.sampled_from([1, 2, 5]),
       hw=st.tuples(st.integers(1, 5), st.integers(1, 5)), affine=st.booleans(), relu=st.booleans(),
       dtype=DTYPES, seed=SEEDS, constant=st.booleans())
def test_group_norm_property(n, groups, per_group, hw, affine, relu, dtype, seed, constant):
    gen = torch.Generator().manual_seed(seed)
    c = groups * per_group
    x = torch.randn(n, c, *hw, dtype=torch.float64, generator=gen).to(dtype) * 3 + 1
    if constant:
        x = torch.full_like(x, 2.5)  # zero variance: eps keeps it finite
    x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c, dtype=dtype, generator=gen) if affine else None
    bias = torch.randn(c, dtype=dtype, generator=gen) if affine else None
    w64, b64 = (None, None) if weight is None else (weight.double(), bias.double())
    if n * hw[0] * hw[1] > 1:
        want = group_norm_reference(x.double(), groups, w64, b64, 1e-5, relu)
    else:  # F.group_norm refuses one value per channel (N*H*W == 1): the same formula by hand
        grouped = x.double().reshape(n, groups, per_group * hw[0] * hw[1])
        mean = grouped.mean(2, keepdim=True)
        var = (grouped - mean).pow(2).mean(2, keepdim=True)
        want = ((grouped - mean) / (var + 1e-5).sqrt()).reshape(x.shape)
        if affine:
            want = want * w64[:, None, None] + b64[:, None, None]
        want = want.relu() if relu else want
    # float32: x - mean is exact to a few ulps of |x|, then scaled by 1/sqrt(var + eps), so a group of one
    # value (or of nearly equal values) amplifies that rounding up to ~316x
    grouped = x.double().reshape(n, groups, per_group * hw[0] * hw[1])
    amplify = float(((grouped - grouped.mean(2, keepdim=True)).pow(2).mean(2) + 1e-5).rsqrt().max()) if n else 1.0
    scale = 1.0 if weight is None else max(1.0, float(weight.abs().max()))
    atol = 1e-4 + 8 * 2.0 ** -23 * float(x.abs().max() if n else 0) * amplify * scale
    got = group_norm_(x, groups, weight, bias, 1e-5, relu, backend="native")  # in place
    assert got is x
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=atol)
    else:
        close(got, want, dtype)


# ---- the larger budget ------------------------------------------------------------------------

@pytest.mark.slow
def test_properties_with_the_slow_budget(tmp_path):
    """``pytest -m slow``: this file's properties again, with the ``slow`` hypothesis profile."""
    env = dict(os.environ, HYPERFLOW_HYPOTHESIS_PROFILE="slow")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
                          os.path.abspath(__file__)], capture_output=True, text=True, env=env, timeout=3600,
                         cwd=tmp_path)  # outside the checkout: the installed package is imported
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert " passed" in res.stdout

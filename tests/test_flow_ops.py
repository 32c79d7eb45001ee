"""Pruning by flow: the fused flow step against its eager reference and torch.optim.Adam, and the
straight-through masked layers against a pure-torch STE (gradcheck in float64)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hyperflow_ext.prune import functional
from hyperflow_ext.prune.flow_ops import flow_step, flow_step_reference
from hyperflow_ext.prune.functional import masked_conv2d, masked_linear

DTYPES = [torch.float32, torch.float64]


def make_state(shape, dtype, gen=None):
    scores = (torch.rand(shape, dtype=dtype, generator=gen) - 0.5) * 0.01  # near 0: masks flip
    return [scores, torch.randn(shape, dtype=dtype, generator=gen) * 0.1,
            torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)]


def close(dtype):
    return dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-15)


def run_both(shape, dtype, steps, gen=None, **kw):
    w = torch.randn(shape, dtype=dtype, generator=gen)
    fused = make_state(shape, dtype, gen)
    eager = [t.clone() for t in fused]
    for step in range(1, steps + 1):
        g = torch.randn(shape, dtype=dtype, generator=gen)
        gw_f, m_f = flow_step(w, g, *fused, step=step, backend="native", **kw)
        gw_e, m_e = flow_step_reference(w, g, *eager, step=step, **kw)
        for a, b in zip(fused, eager):
            torch.testing.assert_close(a, b, **close(dtype))
        torch.testing.assert_close(gw_f, gw_e, **close(dtype))
        # the new mask is scores >= 0 of the (ulp-close) updated scores
        decided = eager[0].abs() > 1e-6
        assert torch.equal(m_f[decided], m_e[decided]) and torch.equal(m_f, fused[0] >= 0)
        assert m_f.dtype == torch.bool


@pytest.mark.parametrize("shape", [(1,), (15,), (17,), (3, 5, 7), (257, 129)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_flow_step_matches_eager_over_steps(shape, dtype):
    run_both(shape, dtype, steps=6, pressure=1e-3)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 300), steps=st.integers(1, 4), double=st.booleans(), seed=st.integers(0, 2**16),
       pressure=st.floats(0, 1e-2), decay=st.floats(0, 1), ste=st.floats(0, 1), lr=st.floats(1e-4, 1e-1))
def test_flow_step_property(n, steps, double, seed, pressure, decay, ste, lr):
    gen = torch.Generator().manual_seed(seed)
    run_both((n,), torch.float64 if double else torch.float32, steps, gen, pressure=pressure, flow_decay=decay,
             ste_scale=ste, lr=lr)


def test_flow_step_semantics():
    w, g = torch.tensor([1.0, 2.0, -3.0, 0.5]), torch.tensor([0.5, -1.0, 2.0, 4.0])
    scores = torch.tensor([0.3, -0.2, 0.0, -1.0])
    flow, m, v = torch.tensor([7.0, 1.0, 7.0, 2.0]), torch.zeros(4), torch.zeros(4)
    gw, mask = flow_step(w, g, scores, flow, m, v, step=1, pressure=0.01, flow_decay=0.5)
    torch.testing.assert_close(gw, torch.tensor([0.5, 0.0, 2.0, 0.0]))  # G ⊙ m, m before the step
    # flow: active entries unchanged, pruned ones EMA of W⊙G
    torch.testing.assert_close(flow, torch.tensor([7.0, 0.5 * 1.0 + 0.5 * -2.0, 7.0, 0.5 * 2.0 + 0.5 * 2.0]))
    # score gradient = 0.25·W⊙G + pressure, also for pruned weights; first Adam step moves by ~lr·sign
    expected_step = -1e-3 * torch.sign(0.25 * w * g + 0.01)
    torch.testing.assert_close(scores - torch.tensor([0.3, -0.2, 0.0, -1.0]), expected_step, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(mask, scores >= 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_flow_step_adam_matches_torch_optim(dtype):
    torch.manual_seed(1)
    w = torch.randn(50, 20, dtype=dtype)
    scores = torch.nn.Parameter(torch.rand(50, 20, dtype=dtype) - 0.5)
    opt = torch.optim.Adam([scores], lr=1e-2, betas=(0.8, 0.99), eps=1e-6)
    mine = [scores.detach().clone(), torch.zeros_like(w), torch.zeros_like(w), torch.zeros_like(w)]
    for step in range(1, 5):
        g = torch.randn_like(w)
        scores.grad = 0.25 * w * g + 3e-3
        opt.step()
        flow_step(w, g, *mine, step=step, pressure=3e-3, lr=1e-2, betas=(0.8, 0.99), eps=1e-6)
        torch.testing.assert_close(mine[0], scores.detach(), **close(dtype))
        torch.testing.assert_close(mine[2], opt.state[scores]["exp_avg"], **close(dtype))
        torch.testing.assert_close(mine[3], opt.state[scores]["exp_avg_sq"], **close(dtype))


def test_flow_step_out_arguments_and_torch_backend():
    w, g = torch.randn(30), torch.randn(30)
    state = make_state((30,), torch.float32)
    ref = [t.clone() for t in state]
    gw_out, mask_out = torch.empty(30), torch.empty(30, dtype=torch.bool)
    gw, mask = flow_step(w, g, *state, step=2, pressure=1e-3, grad_weight_out=gw_out, mask_out=mask_out)
    assert gw is gw_out and mask is mask_out
    gw2, mask2 = flow_step(w, g, *ref, step=2, pressure=1e-3, backend="torch")
    torch.testing.assert_close(gw, gw2)
    torch.testing.assert_close(state[0], ref[0])


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("bad", ["weight", "grad_eff"])
def test_flow_step_rejects_nan_before_changing_state(backend, bad):
    w, g = torch.randn(100), torch.randn(100)
    {"weight": w, "grad_eff": g}[bad][57] = float("nan")
    state = make_state((100,), torch.float32)
    before = [t.clone() for t in state]
    with pytest.raises(ValueError, match=f"{bad} contains NaN or Inf"):
        flow_step(w, g, *state, step=1, pressure=0.0, backend=backend)
    for a, b in zip(state, before):
        assert torch.equal(a, b)
    w[57] = float("inf") if bad == "weight" else w[57]
    flow_step(torch.randn(100), torch.randn(100), *state, step=1, pressure=0.0, check_finite=False)


def test_flow_step_validation():
    w, g = torch.randn(4, 5), torch.randn(4, 5)
    s = make_state((4, 5), torch.float32)
    with pytest.raises(ValueError, match=r"grad_eff must have shape \(4, 5\)"):
        flow_step(w, torch.randn(5, 4), *s, step=1, pressure=0.0)
    with pytest.raises(ValueError, match="scores must have dtype"):
        flow_step(w, g, s[0].double(), *s[1:], step=1, pressure=0.0)
    with pytest.raises(ValueError, match="exp_avg must be contiguous"):
        flow_step(w, g, s[0], s[1], torch.zeros(5, 4).t(), s[3], step=1, pressure=0.0)
    with pytest.raises(ValueError, match="flow and exp_avg share memory"):
        flow_step(w, g, s[0], s[1], s[1], s[3], step=1, pressure=0.0)
    with pytest.raises(ValueError, match="scores and weight share memory"):
        flow_step(w, g, w, *s[1:], step=1, pressure=0.0)
    with pytest.raises(ValueError, match="step must be >= 1"):
        flow_step(w, g, *s, step=0, pressure=0.0)
    with pytest.raises(TypeError, match="step must be an int"):
        flow_step(w, g, *s, step=1.5, pressure=0.0)
    with pytest.raises(ValueError, match="pressure must be finite"):
        flow_step(w, g, *s, step=1, pressure=float("nan"))
    with pytest.raises(ValueError, match="betas must lie in"):
        flow_step(w, g, *s, step=1, pressure=0.0, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="flow_decay must lie in"):
        flow_step(w, g, *s, step=1, pressure=0.0, flow_decay=1.5)
    with pytest.raises(ValueError, match="grad_eff is on meta"):
        flow_step(w, g.to("meta"), *s, step=1, pressure=0.0)
    with pytest.raises(ValueError, match="weight must have dtype"):
        flow_step(w.half(), g, *s, step=1, pressure=0.0)
    with pytest.raises(ValueError, match="mask_out must have dtype"):
        flow_step(w, g, *s, step=1, pressure=0.0, mask_out=torch.empty(4, 5))


# ---- straight-through masked layers -------------------------------------------------------------

def ste_mask(scores):
    """Pure-torch STE: forward (scores >= 0), backward 0.25 · upstream."""
    hard = (scores >= 0).to(scores.dtype)
    return hard + 0.25 * (scores - scores.detach())


def linear_ste_reference(x, w, s, b):
    return torch.nn.functional.linear(x, w * ste_mask(s), b)


@pytest.mark.parametrize("sparse_path", [True, False])
@pytest.mark.parametrize("sparsity", [0.0, 0.6, 0.97, 1.0])
def test_masked_linear_gradients(monkeypatch, sparse_path, sparsity):
    monkeypatch.setattr(functional, "SPARSE_MAX_DENSITY", 1.0 if sparse_path else -1.0)
    d = torch.float64
    x = torch.randn(2, 3, 9, dtype=d, requires_grad=True)
    w = torch.randn(6, 9, dtype=d, requires_grad=True)
    s = (torch.rand(6, 9, dtype=d) - sparsity).requires_grad_()
    b = torch.randn(6, dtype=d, requires_grad=True)
    sink = torch.zeros(6, 9, dtype=d)
    y = masked_linear(x, w, s, b, grad_eff_sink=sink)
    y_ref = linear_ste_reference(x, w, s, b)
    torch.testing.assert_close(y, y_ref)
    go = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w, s, b), go)
    want = torch.autograd.grad(y_ref, (x, w, s, b), go)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)
    # the sink received G = ∂L/∂(W⊙m) = go^T x, dense (pruned entries included)
    torch.testing.assert_close(sink, go.reshape(-1, 6).T @ x.detach().reshape(-1, 9))
    # scores get flow even where pruned: 0.25 · W ⊙ G, not masked
    torch.testing.assert_close(got[2], 0.25 * w.detach() * sink)
    # scores are piecewise constant (numerically zero gradient): gradcheck x, weight and bias
    assert torch.autograd.gradcheck(lambda x, w, b: masked_linear(x, w, s.detach(), b), (x, w, b))


def test_masked_linear_batch_one_and_float32():
    x = torch.randn(9, requires_grad=True)  # 1-D input: a single row
    w = torch.randn(4, 9, requires_grad=True)
    s = (torch.rand(4, 9) - 0.5).requires_grad_()
    y = masked_linear(x, w, s)
    assert y.shape == (4,)
    y.sum().backward()
    x2, w2, s2 = (t.detach().clone().requires_grad_() for t in (x, w, s))
    linear_ste_reference(x2, w2, s2, None).sum().backward()
    for a, e in ((x, x2), (w, w2), (s, s2)):
        torch.testing.assert_close(a.grad, e.grad)


def test_masked_linear_validation():
    w = torch.randn(4, 9)
    with pytest.raises(ValueError, match=r"scores must have the weight's shape \(4, 9\)"):
        masked_linear(torch.randn(2, 9), w, torch.randn(9, 4))
    with pytest.raises(ValueError, match="grad_eff_sink must match"):
        masked_linear(torch.randn(2, 9), w, torch.randn(4, 9), grad_eff_sink=torch.zeros(4, 9, dtype=torch.float64))
    with pytest.raises(ValueError, match="x must have 9 columns"):
        masked_linear(torch.randn(2, 8), w, torch.randn(4, 9))


@pytest.mark.parametrize("stride,padding,dilation,groups", [(1, 0, 1, 1), (2, 1, 1, 1), (1, 2, 2, 2)])
def test_masked_conv2d_gradients(stride, padding, dilation, groups):
    d = torch.float64
    x = torch.randn(1, 2, 5, 5, dtype=d, requires_grad=True)
    w = torch.randn(4, 2 // groups, 3, 3, dtype=d, requires_grad=True)
    s = (torch.rand(4, 2 // groups, 3, 3, dtype=d) - 0.7).requires_grad_()
    b = torch.randn(4, dtype=d, requires_grad=True)
    sink = torch.zeros_like(w)
    y = masked_conv2d(x, w, s, b, stride, padding, dilation, groups, grad_eff_sink=sink)
    y_ref = torch.nn.functional.conv2d(x, w * ste_mask(s), b, stride, padding, dilation, groups)
    torch.testing.assert_close(y, y_ref)
    go = torch.randn_like(y)
    for a, e in zip(torch.autograd.grad(y, (x, w, s, b), go), torch.autograd.grad(y_ref, (x, w, s, b), go)):
        torch.testing.assert_close(a, e)
    assert torch.autograd.gradcheck(
        lambda x, w, b: masked_conv2d(x, w, s.detach(), b, stride, padding, dilation, groups), (x, w, b))
    with pytest.raises(NotImplementedError, match="string padding"):
        masked_conv2d(x, w, s, b, padding="same")


def test_sink_feeds_flow_step():
    torch.manual_seed(3)
    w = torch.randn(8, 12, requires_grad=True)
    state = make_state((8, 12), torch.float32)
    sink = torch.zeros(8, 12)
    x = torch.randn(5, 12)
    scores_before = state[0].clone()
    masked_linear(x, w, scores_before, grad_eff_sink=sink).pow(2).sum().backward()
    assert sink.abs().sum() > 0
    gw, mask = flow_step(w.detach(), sink, *state, step=1, pressure=1e-3)
    torch.testing.assert_close(gw, sink * (scores_before >= 0))
    torch.testing.assert_close(w.grad, gw)
    torch.testing.assert_close(mask, state[0] >= 0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_flow_step_matches_reference(dtype):
    w, g = torch.randn(1000, 37, dtype=dtype), torch.randn(1000, 37, dtype=dtype)
    cpu_state = make_state((1000, 37), dtype)
    gpu_state = [t.cuda() for t in cpu_state]
    for step in (1, 2, 3):
        gw_c, m_c = flow_step_reference(w, g, *cpu_state, step=step, pressure=1e-3)
        gw_g, m_g = flow_step(w.cuda(), g.cuda(), *gpu_state, step=step, pressure=1e-3, backend="native")
        torch.testing.assert_close(gw_g.cpu(), gw_c, **close(dtype))
        for a, b in zip(gpu_state, cpu_state):
            torch.testing.assert_close(a.cpu(), b, **close(dtype))
    bad = w.clone().cuda()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weight contains NaN"):
        flow_step(bad, g.cuda(), *gpu_state, step=4, pressure=0.0)

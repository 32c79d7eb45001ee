"""Sparse kernels: masked matmul (+ input gradient), CSR linear / conv, score mask — every
native path against its pure-torch reference, edge shapes, layouts, and bad input."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from hyperflow_ext.prune.masked_ops import (masked_matmul, masked_matmul_grad_input, masked_matmul_grad_input_reference,
                                           masked_matmul_reference, score_mask)
from hyperflow_ext.sparse import (CSRMatrix, SparseConv2d, SparseLinear, csr_conv2d, csr_conv2d_reference,
                                  csr_linear, csr_linear_reference)

from _helpers import random_csr, tol

DTYPES = [torch.float32, torch.float64]


def rand_mask(rows, cols, sparsity, empty_rows=False):
    mask = torch.rand(rows, cols) >= sparsity
    if empty_rows and rows > 1:
        mask[::2] = False
    return mask


def layouts(t):
    """The tensor as contiguous, as a transposed view of a column-major copy, and as a strided slice."""
    yield t
    yield t.t().contiguous().t()
    wide = torch.zeros(t.shape[0], 2 * t.shape[1] + 1, dtype=t.dtype)
    wide[:, 1::2] = t
    yield wide[:, 1::2]


# ---- masked matmul ------------------------------------------------------------------------

SHAPES = [(1, 1, 1), (1, 5, 3), (4, 1, 7), (4, 7, 1), (2, 17, 9), (33, 130, 70), (70, 64, 48)]


@pytest.mark.parametrize("batch,in_f,out_f", SHAPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95, 1.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_matmul_matches_reference(batch, in_f, out_f, sparsity, dtype):
    w = torch.randn(out_f, in_f, dtype=dtype)
    mask = rand_mask(out_f, in_f, sparsity, empty_rows=True)
    bias = torch.randn(out_f, dtype=dtype)
    for x in layouts(torch.randn(batch, in_f, dtype=dtype)):
        for b in (None, bias):
            got = masked_matmul(x, w, mask, b, backend="native")
            assert got.shape == (batch, out_f) and got.is_contiguous()
            torch.testing.assert_close(got, masked_matmul_reference(x, w, mask, b), **tol(dtype))
    for g in layouts(torch.randn(batch, out_f, dtype=dtype)):
        got = masked_matmul_grad_input(g, w, mask, backend="native")
        assert got.shape == (batch, in_f)
        torch.testing.assert_close(got, masked_matmul_grad_input_reference(g, w, mask), **tol(dtype))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 40), in_f=st.integers(1, 90), out_f=st.integers(1, 90),
       sparsity=st.sampled_from([0.0, 0.3, 0.9, 0.99, 1.0]), double=st.booleans(), seed=st.integers(0, 2**16))
def test_masked_matmul_property(batch, in_f, out_f, sparsity, double, seed):
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if double else torch.float32
    x = torch.randn(batch, in_f, dtype=dtype, generator=gen)
    w = torch.randn(out_f, in_f, dtype=dtype, generator=gen)
    mask = torch.rand(out_f, in_f, generator=gen) >= sparsity
    g = torch.randn(batch, out_f, dtype=dtype, generator=gen)
    torch.testing.assert_close(masked_matmul(x, w, mask, backend="native"), masked_matmul_reference(x, w, mask),
                               **tol(dtype))
    torch.testing.assert_close(masked_matmul_grad_input(g, w, mask, backend="native"),
                               masked_matmul_grad_input_reference(g, w, mask), **tol(dtype))


def test_masked_matmul_layer_sized():
    x, w = torch.randn(64, 784), torch.randn(512, 784)
    mask = rand_mask(512, 784, 0.95)
    torch.testing.assert_close(masked_matmul(x, w, mask), masked_matmul_reference(x, w, mask), **tol(torch.float32))
    g = torch.randn(64, 512)
    torch.testing.assert_close(masked_matmul_grad_input(g, w, mask), masked_matmul_grad_input_reference(g, w, mask),
                               **tol(torch.float32))


def test_masked_entries_are_skipped_not_multiplied():
    # A masked weight contributes exactly zero, even when it is NaN: W⊙m is never formed.
    x, w = torch.randn(3, 4), torch.randn(2, 4)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]], dtype=torch.bool)
    w[0, 3] = float("nan")
    got = masked_matmul(x, w, mask, backend="native")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, masked_matmul_reference(x, w, mask))
    torch.testing.assert_close(masked_matmul_grad_input(torch.randn(3, 2), w, mask).isfinite().all(), torch.tensor(True))


def test_masked_matmul_uint8_mask_and_empty_batch():
    x, w = torch.randn(5, 6), torch.randn(4, 6)
    mask = (torch.rand(4, 6) > 0.5).to(torch.uint8) * 3  # any nonzero byte is active
    torch.testing.assert_close(masked_matmul(x, w, mask), masked_matmul_reference(x, w, mask))
    assert masked_matmul(torch.randn(0, 6), w, mask).shape == (0, 4)
    assert masked_matmul_grad_input(torch.randn(0, 4), w, mask).shape == (0, 6)
    torch.testing.assert_close(masked_matmul(x, w, mask, backend="torch"), masked_matmul_reference(x, w, mask))


def test_masked_matmul_validation():
    x, w, m = torch.randn(3, 4), torch.randn(5, 4), torch.ones(5, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="x must have 4 columns"):
        masked_matmul(torch.randn(3, 5), w, m)
    with pytest.raises(ValueError, match=r"mask must have shape \(5, 4\)"):
        masked_matmul(x, w, torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must have dtype"):
        masked_matmul(x, w, torch.ones(5, 4))
    with pytest.raises(ValueError, match="operands must share one dtype"):
        masked_matmul(x, w.double(), m)
    with pytest.raises(ValueError, match="x must have dtype"):
        masked_matmul(x.half(), w, m)
    with pytest.raises(ValueError, match="weight is on meta"):
        masked_matmul(x, w.to("meta"), m)
    with pytest.raises(ValueError, match=r"bias must have shape \(5\)"):
        masked_matmul(x, w, m, torch.randn(4))
    with pytest.raises(ValueError, match="x must be 2-D"):
        masked_matmul(torch.randn(3), w, m)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        masked_matmul(x, w.tolist(), m)
    with pytest.raises(ValueError, match="grad_out must have 5 columns"):
        masked_matmul_grad_input(torch.randn(3, 4), w, m)
    with pytest.raises(ValueError, match="backend must be one of"):
        masked_matmul(x, w, m, backend="gpu")


def test_score_mask():
    s = torch.randn(37, 11, dtype=torch.float64)
    s[0, 0] = 0.0
    s[1, 1] = float("nan")
    for backend in ("native", "torch"):
        mask, count = score_mask(s, backend=backend)
        torch.testing.assert_close(mask, s >= 0)
        assert count == int((s >= 0).sum())
    assert score_mask(torch.empty(0))[1] == 0
    with pytest.raises(ValueError, match="scores must have dtype"):
        score_mask(torch.ones(3, dtype=torch.int32))


# ---- CSR linear -----------------------------------------------------------------------------

@pytest.mark.parametrize("out_f,in_f", [(1, 1), (1, 40), (40, 1), (64, 100), (130, 257)])
@pytest.mark.parametrize("batch", [1, 2, 16, 33, 100])
@pytest.mark.parametrize("density", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_csr_linear_matches_reference(out_f, in_f, batch, density, dtype):
    dense, w = random_csr(out_f, in_f, density, dtype, empty_rows=True)
    bias = torch.randn(out_f, dtype=dtype)
    for x in layouts(torch.randn(batch, in_f, dtype=dtype)):
        for b in (None, bias):
            got = csr_linear(x, w, b, backend="native")
            want = x @ dense.T + (0 if b is None else b)
            torch.testing.assert_close(got, want, **tol(dtype))


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 70), in_f=st.integers(1, 80), out_f=st.integers(1, 80),
       density=st.sampled_from([0.0, 0.01, 0.05, 0.3, 1.0]), int64=st.booleans(), seed=st.integers(0, 2**16))
def test_csr_linear_property(batch, in_f, out_f, density, int64, seed):
    torch.manual_seed(seed)
    dense, w = random_csr(out_f, in_f, density, index_dtype=torch.int64 if int64 else torch.int32, seed=seed)
    x = torch.randn(batch, in_f)
    torch.testing.assert_close(csr_linear(x, w, backend="native"), csr_linear_reference(x, w), **tol(torch.float32))


def test_csr_linear_leading_dims_and_layer_size():
    dense, w = random_csr(300, 200, 0.05)
    x = torch.randn(2, 3, 200)
    got = csr_linear(x, w)
    assert got.shape == (2, 3, 300)
    torch.testing.assert_close(got, x @ dense.T)
    dense, w = random_csr(1024, 1024, 0.02)
    x = torch.randn(256, 1024)
    torch.testing.assert_close(csr_linear(x, w), x @ dense.T, **tol(torch.float32))


def test_csr_linear_validation():
    _, w = random_csr(5, 4, 0.5)
    with pytest.raises(TypeError, match="weight must be a CSRMatrix"):
        csr_linear(torch.randn(2, 4), torch.randn(5, 4))
    with pytest.raises(ValueError, match="x must have 4 features"):
        csr_linear(torch.randn(2, 5), w)
    with pytest.raises(ValueError, match="x must have dtype"):
        csr_linear(torch.randn(2, 4, dtype=torch.float64), w)
    with pytest.raises(ValueError, match="x is on meta"):
        csr_linear(torch.randn(2, 4, device="meta"), w)
    with pytest.raises(ValueError, match=r"bias must have shape \(5\)"):
        csr_linear(torch.randn(2, 4), w, torch.randn(4))
    with pytest.raises(NotImplementedError, match="inference-only"):
        csr_linear(torch.randn(2, 4, requires_grad=True), w)
    with torch.no_grad():
        csr_linear(torch.randn(2, 4, requires_grad=True), w)


def test_mismatched_csr_arrays_are_rejected():
    with pytest.raises(ValueError, match=r"col_indices must lie in \[0, 4\)"):
        CSRMatrix(torch.tensor([0, 1, 2]), torch.tensor([0, 4]), torch.ones(2), (2, 4))
    with pytest.raises(ValueError, match="col_indices must lie in"):
        CSRMatrix(torch.tensor([0, 1, 2]), torch.tensor([-1, 0]), torch.ones(2), (2, 4))
    with pytest.raises(ValueError, match="values must have shape"):
        CSRMatrix(torch.tensor([0, 1, 2]), torch.tensor([0, 1]), torch.ones(3), (2, 4))
    with pytest.raises(ValueError, match=r"crow_indices must have shape \(3\)"):
        CSRMatrix(torch.tensor([0, 2]), torch.tensor([0, 1]), torch.ones(2), (2, 4))
    with pytest.raises(ValueError, match="share a dtype"):
        CSRMatrix(torch.tensor([0, 1, 2]), torch.tensor([0, 1], dtype=torch.int32), torch.ones(2), (2, 4))


def test_sparse_linear_module():
    lin = nn.Linear(40, 30)
    mask = torch.rand(30, 40) > 0.9
    sp = SparseLinear.from_linear(lin, mask)
    assert sp.crow_indices.dtype == torch.int32 and "density" in repr(sp)
    x = torch.randn(7, 40)
    with torch.inference_mode():
        torch.testing.assert_close(sp(x), nn.functional.linear(x, lin.weight * mask, lin.bias))
    # state_dict round trip and dtype conversion revalidate the cached CSR
    sp2 = SparseLinear.from_dense(torch.zeros(30, 40))
    sp2.load_state_dict(sp.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(sp2(x), sp(x))
        torch.testing.assert_close(sp.double()(x.double()), nn.functional.linear(x.double(), (lin.weight * mask).double(),
                                                                                lin.bias.double()))
    with pytest.raises(TypeError, match="expected nn.Linear"):
        SparseLinear.from_linear(nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="mask must have shape"):
        SparseLinear.from_linear(lin, torch.ones(40, 30, dtype=torch.bool))


def test_sparse_linear_detects_corrupted_buffers():
    sp = SparseLinear.from_dense(torch.randn(6, 5) * (torch.rand(6, 5) > 0.5) + torch.eye(6, 5))
    with torch.no_grad():
        sp.col_indices[0] = 99  # in-place edit after construction: revalidated before the next call
        with pytest.raises(ValueError, match="col_indices must lie in"):
            sp(torch.randn(2, 5))


@pytest.mark.parametrize("stride,padding,dilation", [(1, 0, 1), (2, 1, 1), (1, 2, 2), ((2, 1), (0, 1), (1, 2))])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_conv2d_matches_conv(stride, padding, dilation, dtype):
    conv = nn.Conv2d(3, 8, (3, 2), stride=stride, padding=padding, dilation=dilation).to(dtype)
    mask = torch.rand_like(conv.weight) > 0.7
    mask[0] = False  # an empty output channel
    sp = SparseConv2d.from_conv2d(conv, mask)
    x = torch.randn(3, 3, 11, 9, dtype=dtype)
    with torch.no_grad():
        want = nn.functional.conv2d(x, conv.weight * mask, conv.bias, stride, padding, dilation)
        torch.testing.assert_close(sp(x), want, **tol(dtype))
        torch.testing.assert_close(sp(x[0]), want[0], **tol(dtype))  # unbatched
        torch.testing.assert_close(csr_conv2d(x, sp.csr(), (3, 2), None, stride, padding, dilation, backend="torch"),
                                   csr_conv2d_reference(x, sp.csr(), (3, 2), None, stride, padding, dilation))


def test_sparse_conv2d_unsupported_and_bad_input():
    with pytest.raises(NotImplementedError, match="groups=2"):
        SparseConv2d.from_conv2d(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(NotImplementedError, match="padding_mode"):
        SparseConv2d.from_conv2d(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    sp = SparseConv2d.from_conv2d(nn.Conv2d(4, 5, 3))
    with torch.no_grad():
        with pytest.raises(ValueError, match="x has 3 channels"):
            sp(torch.randn(1, 3, 8, 8))
        with pytest.raises(ValueError, match="too small"):
            sp(torch.randn(1, 4, 2, 2))
        with pytest.raises(ValueError, match="x must be"):
            sp(torch.randn(4, 8, 8, 1, 1))


# ---- CUDA twins -------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_sparse_kernels_match_reference(dtype):
    x, w = torch.randn(37, 70, dtype=dtype), torch.randn(45, 70, dtype=dtype)
    mask, g, b = rand_mask(45, 70, 0.9, empty_rows=True), torch.randn(37, 45, dtype=dtype), torch.randn(45, dtype=dtype)
    xc, wc, mc, gc, bc = (t.cuda() for t in (x, w, mask, g, b))
    torch.testing.assert_close(masked_matmul(xc, wc, mc, bc, backend="native").cpu(),
                               masked_matmul_reference(x, w, mask, b), **tol(dtype))
    torch.testing.assert_close(masked_matmul_grad_input(gc, wc, mc, backend="native").cpu(),
                               masked_matmul_grad_input_reference(g, w, mask), **tol(dtype))
    dense, csr = random_csr(45, 70, 0.1, dtype, empty_rows=True)
    torch.testing.assert_close(csr_linear(xc, csr.to("cuda"), bc, backend="native").cpu(), x @ dense.T + b,
                               **tol(dtype))
    mask_c, count = score_mask(wc, backend="native")
    assert count == int((w >= 0).sum()) and torch.equal(mask_c.cpu(), w >= 0)
    conv = nn.Conv2d(3, 6, 3, padding=1).to(dtype)
    sp = SparseConv2d.from_conv2d(conv, torch.rand_like(conv.weight) > 0.5).cuda()
    xi = torch.randn(2, 3, 9, 9, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(sp(xi.cuda()).cpu(), sp.cpu()(xi), **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_csr_linear_empty_batch_and_all_zero_matrix(dtype):
    """The zero-size cases the property tests (sizes from 1) do not draw."""
    dense, w = random_csr(9, 7, 0.3, dtype)
    for batch in (0, 3):
        x = torch.randn(batch, 7, dtype=dtype)
        y = csr_linear(x, w)
        assert y.shape == (batch, 9) and y.dtype == dtype
        torch.testing.assert_close(y, x @ dense.T)
    zero = CSRMatrix.from_dense(torch.zeros(9, 7, dtype=dtype))
    assert zero.nnz == 0
    assert torch.equal(csr_linear(torch.randn(4, 7, dtype=dtype), zero), torch.zeros(4, 9, dtype=dtype))

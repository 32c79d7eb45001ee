"""Checked once, trusted after: CSR structures notice in-place edits, out= refuses aliasing."""
import pytest
import torch
import torch.nn.functional as F

from hyperflow_ext.flow.update import euler_update
from hyperflow_ext.sparse import CSRMatrix, SparseConv2d, SparseLinear, csr_conv2d, csr_linear, csr_spmm

from _helpers import random_sparse


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_col_indices_edited_out_of_range_raises(index_dtype):
    W = CSRMatrix.from_dense(random_sparse(16, 8), index_dtype=index_dtype)
    W.col_indices[:] = 10**6
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"csr_linear: col_indices must lie in \[0, 8\).*modified after"):
        csr_linear(x, W)
    with pytest.raises(ValueError, match="csr_spmm: col_indices"):
        csr_spmm(W, torch.randn(8, 3))
    with pytest.raises(ValueError, match="col_indices"):
        W.to_dense()  # the torch path must not read out of bounds either


def test_crow_indices_edited_raises():
    W = CSRMatrix.from_dense(random_sparse(16, 8))
    W.crow_indices[3] = W.crow_indices[-1] + 5
    with pytest.raises(ValueError, match="csr_linear: crow_indices"):
        csr_linear(torch.randn(2, 8), W)


def test_replaced_or_resized_arrays_raise():
    W = CSRMatrix.from_dense(random_sparse(16, 8))
    W.col_indices = torch.full_like(W.col_indices, -1)
    with pytest.raises(ValueError, match="col_indices must lie"):
        csr_spmm(W, torch.randn(8, 2))
    W = CSRMatrix.from_dense(random_sparse(16, 8))
    W.values.resize_(1)
    with pytest.raises(ValueError, match="csr_linear: values must have shape"):
        csr_linear(torch.randn(2, 8), W)


def test_inference_mode_indices_are_tracked():
    with torch.inference_mode():
        W = CSRMatrix.from_dense(random_sparse(16, 8))
    with torch.inference_mode():
        W.col_indices[:] = 10**6
        with pytest.raises(ValueError, match="col_indices"):
            csr_linear(torch.randn(2, 8), W)


def test_legal_value_edit_gives_new_product():
    w = random_sparse(32, 24)
    W = CSRMatrix.from_dense(w)
    x, b = torch.randn(5, 24), torch.randn(24, 7)
    torch.testing.assert_close(csr_linear(x, W), x @ w.T)
    W.values.mul_(-3.0).add_(1.0)
    ref = W.to_dense()
    torch.testing.assert_close(ref, torch.where(w != 0, w * -3.0 + 1.0, torch.zeros(())))
    torch.testing.assert_close(csr_linear(x, W), x @ ref.T)
    torch.testing.assert_close(csr_spmm(W, b), ref @ b)
    # a legal in-range edit of the column indices is re-validated and used
    W.col_indices.copy_((W.col_indices + 1) % 24)
    dense = W.to_dense()
    torch.testing.assert_close(csr_spmm(W, b), dense @ b)


def test_csr_conv2d_after_edit():
    w = random_sparse(6, 4, 3, 3)
    W = CSRMatrix.from_dense(w.reshape(6, -1))
    x = torch.randn(2, 4, 7, 7)
    plans = {}
    torch.testing.assert_close(csr_conv2d(x, W, 3, padding=1, plans=plans), F.conv2d(x, w, padding=1))
    assert plans
    W.values.mul_(2.0)
    torch.testing.assert_close(csr_conv2d(x, W, 3, padding=1), F.conv2d(x, 2 * w, padding=1))
    W.col_indices[:] = 10**6
    with pytest.raises(ValueError, match="csr_conv2d: col_indices"):
        csr_conv2d(x, W, 3, padding=1, plans=plans)


@pytest.mark.parametrize("inference", [False, True])
def test_sparse_conv2d_module_notices_edits(inference):
    conv = torch.nn.Conv2d(4, 6, 3, padding=1)
    mask = torch.rand_like(conv.weight) < 0.4
    ctx = torch.inference_mode() if inference else torch.no_grad()
    with ctx:
        sp = SparseConv2d.from_conv2d(conv, mask=mask)
        x = torch.randn(2, 4, 8, 8)
        w = conv.weight * mask
        torch.testing.assert_close(sp(x), F.conv2d(x, w, conv.bias, padding=1))
        torch.testing.assert_close(sp(x), F.conv2d(x, w, conv.bias, padding=1))  # prepared call
        sp.values.mul_(0.5)
        torch.testing.assert_close(sp(x), F.conv2d(x, 0.5 * w, conv.bias, padding=1))
        sp.col_indices[:] = 10**6
        with pytest.raises(ValueError, match="col_indices"):
            sp(x)


def test_sparse_linear_module_notices_edits():
    with torch.inference_mode():
        sp = SparseLinear.from_dense(random_sparse(12, 10), torch.randn(12))
        x = torch.randn(3, 10)
        sp(x)
        sp.col_indices[:] = 10**6
        with pytest.raises(ValueError, match="col_indices"):
            sp(x)


# ----------------------------------------------------------------------------------------- out= aliasing
def test_csr_spmm_out_is_b_raises():
    W = CSRMatrix.from_dense(random_sparse(16, 16))
    b = torch.randn(16, 16)
    with pytest.raises(ValueError, match="csr_spmm: out overlaps the memory of b"):
        csr_spmm(W, b, out=b)


def test_csr_spmm_out_partial_overlap_raises():
    W = CSRMatrix.from_dense(random_sparse(8, 8))
    buf = torch.randn(12, 8)
    with pytest.raises(ValueError, match="out overlaps the memory of b"):
        csr_spmm(W, buf[:8], out=buf[4:])
    vals = torch.zeros(W.nnz + 64, dtype=W.dtype)
    vals[:W.nnz] = W.values
    W2 = CSRMatrix(W.crow_indices, W.col_indices, vals[:W.nnz], W.shape)
    with pytest.raises(ValueError, match="out overlaps the memory of values"):
        csr_spmm(W2, torch.randn(8, 1), out=vals[:8].view(8, 1))


def test_csr_spmm_separate_out_works():
    w = random_sparse(16, 12)
    W = CSRMatrix.from_dense(w)
    buf = torch.full((30, 5), float("nan"))
    b = torch.randn(12, 5)
    out = buf[10:26]  # a view of a larger buffer that b does not share
    res = csr_spmm(W, b, out=out)
    assert res.data_ptr() == out.data_ptr()
    torch.testing.assert_close(res, w @ b)
    assert torch.isnan(buf[:10]).all() and torch.isnan(buf[26:]).all()
    # rows of one buffer that do not touch each other are fine too
    big = torch.randn(12 + 16, 5)
    big[:12] = b
    torch.testing.assert_close(csr_spmm(W, big[:12], out=big[12:]), w @ b)


def test_euler_update_out_aliasing():
    theta, drift = torch.randn(64), torch.randn(64)
    ref = theta + 0.1 * drift
    torch.testing.assert_close(euler_update(theta.clone(), drift, 0.1, out=torch.empty(64)), ref)
    t = theta.clone()
    torch.testing.assert_close(euler_update(t, drift, 0.1, out=t), ref)  # exactly theta: in-place step
    buf = torch.cat([theta, torch.zeros(1)])
    with pytest.raises(ValueError, match="euler_update: out overlaps the memory of theta"):
        euler_update(buf[:64], drift, 0.1, out=buf[1:65])
    dbuf = torch.cat([drift, torch.zeros(1)])
    with pytest.raises(ValueError, match="out overlaps the memory of drift"):
        euler_update(theta, dbuf[1:], 0.1, out=dbuf[:64])

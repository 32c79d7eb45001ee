"""Direct sparse convolution (csr_conv2d / SparseConv2d) against F.conv2d with the masked weight."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from hyperflow_ext import native
from hyperflow_ext.sparse import CSRMatrix, SparseConv2d, csr_conv2d, csr_conv2d_reference
from hyperflow_ext.sparse.conv import conv_out_size

from _helpers import TOL, random_sparse

pytestmark = pytest.mark.skipif(not native.available(), reason="native extension not built")



@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.sampled_from([0, 1, 2, 3, 17]), in_c=st.integers(1, 6), out_c=st.integers(1, 7),
       h=st.integers(1, 9), w=st.integers(1, 9), kh=st.integers(1, 4), kw=st.integers(1, 4),
       stride=st.tuples(st.integers(1, 3), st.integers(1, 3)), padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
       dilation=st.tuples(st.integers(1, 3), st.integers(1, 3)), density=st.sampled_from([0.0, 0.3, 1.0]),
       double=st.booleans(), relu=st.booleans(), use_bias=st.booleans(), batch_block=st.sampled_from([0, 1, 2, 16]),
       algo=st.sampled_from(["packed", "direct"]), channels_last=st.booleans(),
       out_format=st.sampled_from([None, True, False]), residual=st.sampled_from([None, "nchw", "nhwc"]),
       seed=st.integers(0, 2**16))
def test_csr_conv2d_matches_conv2d(n, in_c, out_c, h, w, kh, kw, stride, padding, dilation, density, double, relu,
                                   use_bias, batch_block, algo, channels_last, out_format, residual, seed):
    ho, wo = (conv_out_size(s, k, st_, p, d) for s, k, st_, p, d in
              zip((h, w), (kh, kw), stride, padding, dilation))
    assume(ho >= 1 and wo >= 1)
    dtype = torch.float64 if double else torch.float32
    gen = torch.Generator().manual_seed(seed)
    weight = random_sparse(out_c, in_c, kh, kw, density=density, dtype=dtype, generator=gen)
    bias = torch.randn(out_c, dtype=dtype, generator=gen) if use_bias else None
    x = torch.randn(n, in_c, h, w, dtype=dtype, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    csr = CSRMatrix.from_dense(weight.reshape(out_c, -1), index_dtype=torch.int32 if seed % 2 else torch.int64)
    res = None
    if residual is not None:
        res = torch.randn(n, out_c, ho, wo, dtype=dtype, generator=gen)
        if residual == "nhwc":
            res = res.contiguous(memory_format=torch.channels_last)
    y = csr_conv2d(x, csr, (kh, kw), bias, stride, padding, dilation, relu, batch_block=batch_block, algo=algo,
                   channels_last=out_format, residual=res)
    want = F.conv2d(x, weight, bias, stride, padding, dilation)
    if res is not None:
        want = want + res
    if relu:
        want = want.relu()
    assert y.shape == want.shape == (n, out_c, ho, wo)
    # None follows the input (a tensor contiguous in both formats counts as NCHW)
    cl = (x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()) if out_format is None \
        else out_format
    assert y.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    torch.testing.assert_close(y, want, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("density", [0.0, 0.02, 0.1, 1.0])
@pytest.mark.parametrize("n,hw,stride", [(1, 16, 1), (32, 4, 1), (5, 8, 2), (19, 2, 1)])
@pytest.mark.parametrize("layout", ["nchw", "nhwc_in", "nhwc_out", "nhwc"])
def test_layer_sized_convolutions(dtype, density, n, hw, stride, layout):
    """VGG/ResNet-sized layers: many channels, the sample interleaving of small maps, ReLU epilogue."""
    gen = torch.Generator().manual_seed(0)
    weight = random_sparse(48, 40, 3, 3, density=density, dtype=dtype, generator=gen)
    bias, x = torch.randn(48, dtype=dtype, generator=gen), torch.randn(n, 40, hw, hw, dtype=dtype, generator=gen)
    if layout in ("nhwc_in", "nhwc"):
        x = x.contiguous(memory_format=torch.channels_last)
    sp = SparseConv2d.from_dense(weight, stride=stride, padding=1, bias=bias, relu=True,
                                 channels_last=True if layout in ("nhwc_out", "nhwc") else None)
    with torch.inference_mode():
        y = sp(x)
        y_again = sp(x)  # second call: the prepared call
        res = torch.randn(y.shape, dtype=dtype, generator=gen)
        y_res = sp(x, res)
        y_res_again = sp(x, res)
    want = F.conv2d(x, weight, bias, stride, 1)
    torch.testing.assert_close(y, want.relu(), **TOL[dtype])
    torch.testing.assert_close(y_again, want.relu(), **TOL[dtype])
    torch.testing.assert_close(y_res, (want + res).relu(), **TOL[dtype])
    torch.testing.assert_close(y_res_again, (want + res).relu(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("w,k,padding,dilation", [
    (w, k, p, d) for w in (1, 5, 16, 17, 32, 33, 40, 70)
    for k, p, d in ((3, 1, 1), (1, 0, 1), (5, 3, 1), (3, 2, 2), (2, 0, 1)) if conv_out_size(w, k, 2, p, d) > 0])
def test_stride_two_rows_of_every_width_at_batch_one(dtype, w, k, padding, dilation):
    """One sample at stride 2 packs its input two registers of a padded row at a time: widths below,
    at and across register multiples, paddings wider than a kernel's reach."""
    gen = torch.Generator().manual_seed(w)
    h = 9
    weight = random_sparse(6, 5, k, k, density=0.5, dtype=dtype, generator=gen)
    x = torch.randn(1, 5, h, w, dtype=dtype, generator=gen)
    sp = SparseConv2d.from_dense(weight, stride=2, padding=padding, dilation=dilation)
    with torch.inference_mode():
        y = sp(x)
    torch.testing.assert_close(y, F.conv2d(x, weight, None, 2, padding, dilation), **TOL[dtype])


def test_empty_output_channels_give_bias_and_relu():
    weight = torch.randn(6, 3, 3, 3)
    weight[[1, 4]] = 0.0  # output channels with no nonzero at all
    bias = torch.tensor([0.5, -2.0, 1.0, 0.0, 3.0, -1.0])
    x = torch.randn(2, 3, 7, 7)
    for relu in (False, True):
        y = csr_conv2d(x, CSRMatrix.from_dense(weight.reshape(6, -1)), 3, bias, padding=1, relu=relu)
        want = F.conv2d(x, weight, bias, padding=1)
        torch.testing.assert_close(y, want.relu() if relu else want, **TOL[torch.float32])
        assert bool((y[:, 1] == (0.0 if relu else -2.0)).all()) and bool((y[:, 4] == 3.0).all())


def test_one_by_one_convolutions_use_the_spmm_path_and_match():
    gen = torch.Generator().manual_seed(1)
    weight = random_sparse(16, 12, 1, 1, density=0.2, dtype=torch.float32, generator=gen)
    bias = torch.randn(16, generator=gen)
    for x in (torch.randn(3, 12, 5, 6, generator=gen),
              torch.randn(3, 12, 5, 6, generator=gen).contiguous(memory_format=torch.channels_last),
              torch.randn(3, 12, 10, 6, generator=gen)[:, :, ::2], torch.randn(0, 12, 5, 6)):
        for stride, relu, cl in ((1, False, None), (1, True, None), (2, True, None), (1, True, True), (1, False, False)):
            # stride 2 goes through the direct kernel; channels-last 1x1 through the CSR linear kernel
            y = csr_conv2d(x, CSRMatrix.from_dense(weight.reshape(16, -1)), 1, bias, stride, relu=relu,
                           channels_last=cl)
            want = F.conv2d(x, weight, bias, stride)
            torch.testing.assert_close(y, want.relu() if relu else want, **TOL[torch.float32])
            res = torch.randn(want.shape, generator=gen)
            y = csr_conv2d(x, CSRMatrix.from_dense(weight.reshape(16, -1)), 1, bias, stride, relu=relu,
                           channels_last=cl, residual=res)
            torch.testing.assert_close(y, (want + res).relu() if relu else want + res, **TOL[torch.float32])


def test_unbatched_input_and_torch_backend_agree():
    conv = nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))
    sp = SparseConv2d.from_conv2d(conv, torch.rand_like(conv.weight) > 0.5)
    x = torch.randn(3, 9, 8)
    with torch.inference_mode():
        y = sp(x)
        ref = csr_conv2d_reference(x.unsqueeze(0), sp.csr(), (3, 2), sp.bias, (2, 1), (1, 0), (1, 2)).squeeze(0)
        torch_path = csr_conv2d(x, sp.csr(), (3, 2), sp.bias, (2, 1), (1, 0), (1, 2), backend="torch")
    assert y.shape == ref.shape == (5, 5, 6)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch_path, ref)


def test_module_offsets_follow_new_weights_and_shapes():
    gen = torch.Generator().manual_seed(2)
    w1, w2 = (random_sparse(8, 4, 3, 3, density=d, dtype=torch.float32, generator=gen) for d in (0.3, 0.6))
    sp = SparseConv2d.from_dense(w1, padding=1)
    other = SparseConv2d.from_dense(w2, padding=1)
    with torch.inference_mode():
        for shape in ((2, 4, 6, 6), (1, 4, 9, 5), (2, 4, 6, 6)):
            x = torch.randn(*shape, generator=gen)
            torch.testing.assert_close(sp(x), F.conv2d(x, w1, None, 1, 1), **TOL[torch.float32])
        sp.load_state_dict(other.state_dict())  # another nnz: the cached tap offsets must not be reused
        x = torch.randn(2, 4, 6, 6, generator=gen)
        torch.testing.assert_close(sp(x), F.conv2d(x, w2, None, 1, 1), **TOL[torch.float32])
    assert "relu=False" in repr(sp)


def test_bad_input_is_rejected_with_clear_errors():
    sp = SparseConv2d.from_conv2d(nn.Conv2d(4, 5, 3))
    csr = sp.csr()
    with torch.inference_mode():
        with pytest.raises(ValueError, match="csr_conv2d: x must have dtype"):
            sp(torch.randn(1, 4, 6, 6, dtype=torch.float64))
        with pytest.raises(ValueError, match="csr_conv2d: x has 3 channels"):
            sp(torch.randn(1, 3, 6, 6))
        with pytest.raises(ValueError, match="csr_conv2d: x must be"):
            sp(torch.randn(4, 6))
        with pytest.raises(ValueError, match="too small"):
            sp(torch.randn(1, 4, 2, 6))
        with pytest.raises(ValueError, match="csr_conv2d: stride"):
            csr_conv2d(torch.randn(1, 4, 6, 6), csr, 3, stride=0)
        with pytest.raises(ValueError, match="csr_conv2d: padding"):
            csr_conv2d(torch.randn(1, 4, 6, 6), csr, 3, padding=-1)
        with pytest.raises(ValueError, match="csr_conv2d: bias must have shape"):
            csr_conv2d(torch.randn(1, 4, 6, 6), csr, 3, torch.zeros(4))
        with pytest.raises(ValueError, match="csr_conv2d: residual must have shape"):
            csr_conv2d(torch.randn(1, 4, 6, 6), csr, 3, residual=torch.zeros(1, 5, 6, 6))
        with pytest.raises(ValueError, match="csr_conv2d: relu must be a bool"):
            csr_conv2d(torch.randn(1, 4, 6, 6), csr, 3, relu=1)
        with pytest.raises(ValueError, match="csr_conv2d: algo"):
            csr_conv2d(torch.randn(1, 4, 6, 6), csr, 3, algo="im2col")
        with pytest.raises(TypeError, match="csr_conv2d: weight must be a CSRMatrix"):
            csr_conv2d(torch.randn(1, 4, 6, 6), torch.randn(5, 36), 3)
        with pytest.raises(TypeError, match="csr_conv2d: x must be a torch.Tensor"):
            csr_conv2d([[1.0]], csr, 3)
    with pytest.raises(NotImplementedError, match="inference-only"):
        sp(torch.randn(1, 4, 6, 6, requires_grad=True))
    with pytest.raises(NotImplementedError, match="groups=2"):
        SparseConv2d.from_conv2d(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(NotImplementedError, match="padding_mode"):
        SparseConv2d.from_conv2d(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="SparseConv2d: weight must have in_channels"):
        SparseConv2d(csr, 3, 3)


def test_native_entry_rejects_inconsistent_sizes():
    """The C++ side re-checks cheap invariants (std::invalid_argument -> ValueError)."""
    mod = native.cpu_module()
    args = dict(rowptr=1, col=1, val=1, x=1, bias=0, y=1, n=1, in_c=1, h=4, w=4, out_c=1, ho=3, wo=4, kh=3, kw=3, sh=1,
                sw=1, ph=1, pw=1, dh=1, dw=1, nnz=1, xs_n=16, xs_c=16, xs_h=4, xs_w=1, ys_n=16, ys_c=16, ys_h=4,
                ys_w=1, res=0, rs_n=0, rs_c=0, rs_h=0, rs_w=0, batch_block=0, off=0, algo=0, relu=False, dtype=0, itype=0, stream=0)
    with pytest.raises(ValueError, match="output size"):
        mod.sparse_conv2d(**args)
    with pytest.raises(ValueError, match="batch_block"):
        mod.sparse_conv2d(**{**args, "ho": 4, "off": 8})


@pytest.mark.skipif(not native.cuda_available(), reason="needs a CUDA device and the CUDA build")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_twin_matches_conv2d(dtype):
    gen = torch.Generator().manual_seed(5)
    weight = random_sparse(12, 7, 3, 3, density=0.3, dtype=dtype, generator=gen)
    bias = torch.randn(12, dtype=dtype, generator=gen)
    x = torch.randn(3, 7, 9, 8, dtype=dtype, generator=gen)
    for stride, padding, dilation in ((1, 1, 1), (2, 0, 1), (1, 2, 2)):
        want = F.conv2d(x, weight, bias, stride, padding, dilation).relu()
        csr = CSRMatrix.from_dense(weight.reshape(12, -1)).to("cuda")
        y = csr_conv2d(x.cuda(), csr, 3, bias.cuda(), stride, padding, dilation, relu=True)
        torch.testing.assert_close(y.cpu(), want, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hw,stride,layout", [(16, 1, "nchw"), (7, 1, "nchw"), (9, 2, "nchw"), (4, 1, "nhwc")])
def test_relu_epilogue_keeps_nan_and_adds_residual_per_row(dtype, hw, stride, layout):
    """The fused store (NCHW, one sample per group) and the tile path: a NaN of the residual stays NaN
    after the ReLU, as torch.relu; rows shorter than a register (7x7 maps split one register over
    several output rows) land in the right places. (A NaN input is not compared: the sparse kernel
    never multiplies it by a pruned zero, F.conv2d on the masked weight does.)"""
    gen = torch.Generator().manual_seed(1)
    weight = random_sparse(20, 6, 3, 3, density=0.3, dtype=dtype, generator=gen)
    bias = torch.randn(20, dtype=dtype, generator=gen)
    x = torch.randn(2, 6, hw, hw, dtype=dtype, generator=gen)
    sp = SparseConv2d.from_dense(weight, stride=stride, padding=1, bias=bias, relu=True,
                                 channels_last=layout == "nhwc")
    want = F.conv2d(x, weight, bias, stride, 1)
    res = torch.randn(want.shape, dtype=dtype, generator=gen)
    res[1, 3, 0, -1] = res[0, 0, -1, 0] = float("nan")
    with torch.inference_mode():
        y = sp(x, res)
    want = (want + res).relu()
    assert torch.equal(torch.isnan(y), torch.isnan(want)) and torch.isnan(y).any()
    torch.testing.assert_close(torch.nan_to_num(y), torch.nan_to_num(want), **TOL[dtype])

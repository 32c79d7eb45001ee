"""The in-place GroupNorm kernel and the backbones' memory-lean inference forward."""
import pytest
import torch
from torch import nn

from hyperflow_ext.measure import peak_memory
from hyperflow_ext.models import build_backbone
from hyperflow_ext.models.norm import group_norm_, group_norm_reference


def nhwc(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,groups", [((3, 32, 28, 28), 8), ((1, 6, 1, 1), 3), ((2, 64, 3, 5), 64),
                                          ((4, 16, 7, 7), 1)])
@pytest.mark.parametrize("affine,relu", [(True, True), (True, False), (False, True)])
def test_group_norm_matches_reference(backend, dtype, shape, groups, affine, relu):
    x = nhwc(*shape, dtype=dtype) * 3 + 5       # an offset mean: the variance must be centred
    w = torch.rand(shape[1], dtype=dtype) + 0.5 if affine else None
    b = torch.randn(shape[1], dtype=dtype) if affine else None
    want = group_norm_reference(x, groups, w, b, 1e-5, relu)
    storage = x.data_ptr()
    got = group_norm_(x, groups, w, b, 1e-5, relu, backend=backend)
    assert got is x and x.data_ptr() == storage      # in place
    assert x.is_contiguous(memory_format=torch.channels_last)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_group_norm_keeps_nan_and_handles_constant_groups():
    x = nhwc(2, 4, 3, 3)
    x[0, 0, 1, 1] = float("nan")
    x[1] = 2.0                                      # zero variance: eps keeps it finite
    group_norm_(x, 2, relu=True)
    assert torch.isnan(x[0, :2]).any() and torch.isfinite(x[0, 2:]).all()
    assert torch.equal(x[1], torch.zeros_like(x[1]))


def test_group_norm_bad_input():
    x = nhwc(2, 8, 4, 4)
    with pytest.raises(ValueError, match="channels-last"):
        group_norm_(torch.randn(2, 8, 4, 4), 2)
    with pytest.raises(ValueError, match="num_groups must be a positive int dividing the 8 channels"):
        group_norm_(x, 3)
    with pytest.raises(ValueError, match="x must be 4-D"):
        group_norm_(torch.randn(8, 4), 2)
    with pytest.raises(ValueError, match="x must have dtype"):
        group_norm_(x.half(), 2)
    with pytest.raises(ValueError, match="weight must have dtype"):
        group_norm_(x, 2, torch.ones(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"bias must have shape \(8\)"):
        group_norm_(x, 2, torch.ones(8), torch.zeros(4))
    with pytest.raises(ValueError, match="weight and bias together"):
        group_norm_(x, 2, torch.ones(8))
    with pytest.raises(ValueError, match="eps must be finite"):
        group_norm_(x, 2, eps=-1.0)
    with pytest.raises(ValueError, match="autograd-free"):
        group_norm_(x, 2, nn.Parameter(torch.ones(8)), nn.Parameter(torch.zeros(8)))
    with pytest.raises(ValueError, match="backend must be one of"):
        group_norm_(x, 2, backend="cuda")


@pytest.mark.parametrize("arch", ["conv4", "resnet8"])
def test_inference_forward_matches_autograd_forward(arch):
    """With autograd off the backbones normalise in place; the features must not change."""
    net = build_backbone(arch)
    with torch.no_grad():
        for m in net.modules():       # non-trivial affine norms and biases
            if isinstance(m, (nn.GroupNorm, nn.Conv2d)):
                m.bias.normal_()
            if isinstance(m, nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
    x = torch.rand(5, 1, 28, 28)
    want = net(x)
    assert want.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(net(x), want, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(net(x), want, rtol=1e-5, atol=1e-5)


def test_inference_forward_uses_less_memory():
    net = build_backbone("conv4")
    x = torch.rand(8, 1, 28, 28)
    plain = nn.Sequential(*net.features).eval()     # the modules' own forward: GroupNorm out of place
    with torch.no_grad():
        _, lean = peak_memory(lambda: net(x))
        _, usual = peak_memory(lambda: plain(x))
    one_map = 8 * 32 * 28 * 28 * 4
    assert lean < usual - one_map // 2, (lean, usual)


@pytest.mark.gpu
def test_group_norm_cuda_matches_reference():
    x = nhwc(3, 32, 14, 14, device="cuda")
    w, b = torch.rand(32, device="cuda") + 0.5, torch.randn(32, device="cuda")
    want = group_norm_reference(x, 8, w, b, 1e-5, True)
    torch.testing.assert_close(group_norm_(x, 8, w, b, 1e-5, True, backend="native"), want, rtol=1e-5, atol=1e-5)

"""Convolutional backbones for CPU-sized few-shot experiments: :class:`Conv4` and :class:`ResNet8`.

Normalisation choice. HyperFlow adapts a backbone's *biases*, so every convolution here has
``bias=True`` and the normalisation layers are affine (they carry a ``bias`` too). We use
:class:`~torch.nn.GroupNorm` rather than BatchNorm: it has no running statistics, so a model
behaves identically in ``train()`` and ``eval()`` mode, a one-image batch is as valid as a large
one, and nothing changes behind the adaptation method's back when it runs forward passes.
GroupNorm subtracts each group's mean, which cancels only the *within-group mean* of the
preceding convolution's bias: per-channel differences survive, so the convolution biases still
steer the features (and the norm's own ``bias`` acts on the normalised output). ``norm="none"``
gives plain conv + bias + ReLU blocks where every convolution bias acts directly. ``norm="batch"``
(BatchNorm) is offered for measuring adaptation on BatchNorm backbones: it is used in ``eval()``
mode after pretraining, with the source data's running statistics.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _torch_module  # global hooks: the fused path must not skip them

from .. import native
from .._checks import FLOAT_CODES, check_int
from ._checks import check_image_batch
from .norm import launch_group_norm_

__all__ = ["Conv4", "ResNet8", "NORMS"]

NORMS = ("group", "batch", "none")


def _norm(fn: str, norm: str, channels: int, groups: int) -> nn.Module:
    if norm == "group":
        g = math.gcd(channels, groups)
        return nn.GroupNorm(g, channels, affine=True)
    if norm == "batch":  # eval-mode BatchNorm after pretraining: running statistics of the source data
        return nn.BatchNorm2d(channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"{fn}: norm must be one of {NORMS}, got {norm!r}")


def _init_conv_net(module: nn.Module) -> None:
    """He-normal (fan-out) convolutions, zero biases, unit/zero affine norms, default linears."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    # NHWC weights make the CPU convolution emit NHWC maps, for which PyTorch's max-pool and
    # GroupNorm kernels are several times faster than for NCHW (Conv4 on 4 images: 6.4 -> 4.0 ms).
    # Same values either way; state dicts and checkpoints are unaffected.
    module.to(memory_format=torch.channels_last)


def _norm_relu(x: torch.Tensor, norm: nn.Module, relu: bool = True) -> torch.Tensor:
    """``relu(norm(x))`` (or ``norm(x)``) for a freshly computed map ``x`` the caller owns.

    With autograd off (the task encoder, support and query forwards) the map is normalised in
    place where :func:`_norm_in_place` can (:func:`_fits_in_place`): no second full-size map, half
    the block's peak memory. A norm module with a forward pre-hook not marked ``reads_only`` or a
    forward hook not marked ``reads_output`` runs as a module (the kernel would skip it). Pre-hooks
    marked so run before the kernel, as the module call would run them; forward hooks marked so
    (they read the output only: the input is overwritten) run after it, before the ReLU.
    """
    hooks = norm._forward_hooks
    if (torch.is_grad_enabled() or x.dim() != 4
            or not all(getattr(h, "reads_output", False) and k not in norm._forward_hooks_with_kwargs
                       for k, h in hooks.items())
            or _torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks
            or not all(getattr(h, "reads_only", False) for h in norm._forward_pre_hooks.values())
            or not _fits_in_place(norm, x)):
        y = norm(x)
        return F.relu(y, inplace=True) if relu else y
    for hook in norm._forward_pre_hooks.values():  # read-only probes: what the module call would run first
        hook(norm, (x,))
    y = _norm_in_place(norm, x, relu and not hooks)
    for hook in list(hooks.values()):  # output readers see the norm's output, as after the module call
        hook(norm, (y,), y)
    return y.relu_() if relu and hooks else y


def _fits_in_place(norm: nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`_norm_in_place` computes exactly what ``norm(x)`` would.

    * GroupNorm: the native kernel behind :func:`~.norm.group_norm_`, on channels-last CPU maps.
      This runs once per block on small batches, so the checks the kernel relies on are made
      here, directly, instead of through the public wrapper's full validation.
    * BatchNorm in eval mode with running statistics, any layout.
    """
    if isinstance(norm, nn.GroupNorm):
        return (x.dtype in FLOAT_CODES and x.device.type == "cpu" and native.available()
                and x.shape[1] == norm.num_channels and x.is_contiguous(memory_format=torch.channels_last)
                and (not norm.affine or all(p.dtype == x.dtype and p.device == x.device and p.is_contiguous()
                                            and p.shape == (norm.num_channels,) for p in (norm.weight, norm.bias))))
    if isinstance(norm, nn.BatchNorm2d):
        if norm.training or norm.running_mean is None or norm.running_var is None or not x.is_floating_point():
            return False
        tensors = (norm.running_mean, norm.running_var) + ((norm.weight, norm.bias) if norm.affine else ())
        return x.shape[1] == norm.num_features and all(t.device == x.device and t.dtype == x.dtype for t in tensors)
    return False


def _norm_in_place(norm: nn.Module, x: torch.Tensor, relu: bool) -> torch.Tensor:
    """``norm(x)`` (then the ReLU when ``relu``) written over ``x``, for a norm and map that
    :func:`_fits_in_place`. BatchNorm reads its statistics now, after any pre-hook that set them, and
    applies the per-channel affine map they define, the arithmetic of PyTorch's eval-mode kernel."""
    if isinstance(norm, nn.GroupNorm):
        return launch_group_norm_(x, norm.num_groups, norm.weight if norm.affine else None,
                                  norm.bias if norm.affine else None, norm.eps, relu)
    scale = torch.rsqrt(norm.running_var + norm.eps)
    shift = -norm.running_mean * scale
    if norm.affine:
        scale, shift = scale * norm.weight, shift * norm.weight + norm.bias
    y = x.mul_(scale.view(1, -1, 1, 1)).add_(shift.view(1, -1, 1, 1))
    return y.relu_() if relu else y


class Conv4(nn.Module):
    """The classic four-block few-shot backbone: ``[conv3x3 → norm → ReLU → maxpool2] x 4``.

    The last feature map is global-average-pooled, so ``feature_dim == hidden`` whatever the
    image size (for 28x28 input the map is already 1x1).

    Args:
        in_channels: image channels.
        hidden: channels of every block.
        norm: ``"group"`` (GroupNorm, affine, default), ``"batch"`` or ``"none"``. See the module docstring.
        groups: GroupNorm groups (reduced to ``gcd(hidden, groups)``).

    Shape:
        - Input: ``(batch, in_channels, height, width)``, height and width >= 16.
        - Output: ``(batch, feature_dim)``.

    Example:
        >>> net = Conv4()
        >>> net(torch.rand(5, 1, 28, 28)).shape
        torch.Size([5, 32])
    """

    def __init__(self, in_channels: int = 1, hidden: int = 32, norm: str = "group",
                 groups: int = 8) -> None:
        super().__init__()
        self.in_channels = check_int("Conv4", "in_channels", in_channels)
        self.hidden = check_int("Conv4", "hidden", hidden)
        self.groups = check_int("Conv4", "groups", groups)
        self.norm = norm
        blocks = []
        for i in range(4):
            c_in = in_channels if i == 0 else hidden
            blocks += [nn.Conv2d(c_in, hidden, 3, padding=1, bias=True),
                       _norm("Conv4", norm, hidden, groups), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
        self.features = nn.Sequential(*blocks)
        self.feature_dim = hidden
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_conv_net(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch("Conv4.forward", x, self.in_channels)
        layers = list(self.features)
        for conv, norm, _, pool in zip(*[iter(layers)] * 4):  # conv → norm → ReLU → pool blocks
            x = pool(_norm_relu(conv(x), norm))
        return x.mean(dim=(2, 3))

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, hidden={self.hidden}, norm={self.norm!r}, "
                f"groups={self.groups}, feature_dim={self.feature_dim}")


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (1x1 projection when the shape changes).

    Shape:
        - Input: ``(batch, in_channels, height, width)``.
        - Output: ``(batch, out_channels, ceil(height / stride), ceil(width / stride))``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 norm: str = "group", groups: int = 8) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=True)
        self.norm1 = _norm("BasicBlock", norm, out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=True)
        self.norm2 = _norm("BasicBlock", norm, out_channels, groups)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=True),
                _norm("BasicBlock", norm, out_channels, groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _norm_relu(self.conv1(x), self.norm1)
        out = _norm_relu(self.conv2(out), self.norm2, relu=False)
        skip = self.shortcut(x) if isinstance(self.shortcut, nn.Identity) else \
            _norm_relu(self.shortcut[0](x), self.shortcut[1], relu=False)
        return F.relu(out.add_(skip), inplace=True)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class ResNet8(nn.Module):
    """A small residual network: a 3x3 stem, three one-block stages, global average pooling.

    Eight weight layers deep counting the (discarded) pretraining classifier: the stem plus two
    convolutions in each of three :class:`BasicBlock` stages.

    Args:
        in_channels: image channels.
        widths: channels of the three stages (the stem uses ``widths[0]``).
        strides: strides of the three stages.
        norm: ``"group"`` (default), ``"batch"`` or ``"none"``, as in :class:`Conv4`.
        groups: GroupNorm groups (reduced to ``gcd(channels, groups)``).

    Shape:
        - Input: ``(batch, in_channels, height, width)``.
        - Output: ``(batch, feature_dim)`` with ``feature_dim == widths[-1]``.

    Example:
        >>> ResNet8()(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 64])
    """

    def __init__(self, in_channels: int = 1, widths: Sequence[int] = (16, 32, 64),
                 strides: Sequence[int] = (1, 2, 2), norm: str = "group", groups: int = 8) -> None:
        super().__init__()
        self.in_channels = check_int("ResNet8", "in_channels", in_channels)
        self.widths: Tuple[int, ...] = tuple(widths)
        self.strides: Tuple[int, ...] = tuple(strides)
        if len(self.widths) != 3 or len(self.strides) != 3:
            raise ValueError(f"ResNet8: widths and strides must have 3 entries each, got "
                             f"{len(self.widths)} and {len(self.strides)}")
        for w in self.widths:
            check_int("ResNet8", "widths[i]", w)
        for s in self.strides:
            check_int("ResNet8", "strides[i]", s)
        self.norm, self.groups = norm, check_int("ResNet8", "groups", groups)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, self.widths[0], 3, 1, 1, bias=True),
            _norm("ResNet8", norm, self.widths[0], groups), nn.ReLU(inplace=True))
        chans = (self.widths[0],) + self.widths
        self.stages = nn.Sequential(*[
            BasicBlock(chans[i], chans[i + 1], self.strides[i], norm, groups) for i in range(3)])
        self.feature_dim = self.widths[-1]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_conv_net(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch("ResNet8.forward", x, self.in_channels)
        x = _norm_relu(self.stem[0](x), self.stem[1])
        return self.stages(x).mean(dim=(2, 3))

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, widths={self.widths}, strides={self.strides}, "
                f"norm={self.norm!r}, groups={self.groups}, feature_dim={self.feature_dim}")

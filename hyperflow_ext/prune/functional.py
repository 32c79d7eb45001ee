"""Differentiable masked layers for pruning by flow (straight-through estimator scaled by 0.25).

Each weight ``W`` has a score tensor ``t`` of the same shape; the forward uses ``W ⊙ m`` with
``m = (t >= 0)``. With ``G = ∂L/∂(W⊙m)`` the backward returns

* ``∂L/∂W = G ⊙ m``
* ``∂L/∂t = ste_scale · W ⊙ G`` (``ste_scale = 0.25``; *not* masked, so pruned weights still
  receive their flow)
* ``∂L/∂x`` through the masked kernel, ``∂L/∂bias`` as usual.

``masked_linear`` runs the sparse kernels (masked entries skipped, ``W⊙m`` never built) when
the mask is sparse enough for them to win — density at most :data:`SPARSE_MAX_DENSITY`, or a
batch of one row — and otherwise the dense BLAS product on a materialised ``W⊙m`` (early in
pruning nearly every weight is active, and a dense GEMM is then the faster way). The density
comes for free from the fused ``scores >= 0`` pass.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .._checks import FLOAT_CODES, check_tensor
from .masked_ops import masked_matmul, masked_matmul_grad_input, masked_weight, score_mask

__all__ = ["masked_linear", "masked_conv2d", "STE_SCALE", "SPARSE_MAX_DENSITY"]

STE_SCALE = 0.25
#: Above this fraction of active weights ``masked_linear`` uses the dense product on ``W⊙m``.
SPARSE_MAX_DENSITY = 0.25

_Pair = Union[int, Tuple[int, int]]


def _check_scores(op: str, weight: torch.Tensor, scores: torch.Tensor) -> None:
    check_tensor(op, "weight", weight, dtypes=FLOAT_CODES)
    check_tensor(op, "scores", scores, dtypes=FLOAT_CODES)
    if scores.shape != weight.shape:
        raise ValueError(f"{op}: scores must have the weight's shape {tuple(weight.shape)}, got {tuple(scores.shape)}")
    if scores.device != weight.device:
        raise ValueError(f"{op}: scores is on {scores.device}, expected {weight.device}")


def _sink(op: str, grad_eff_sink: Optional[torch.Tensor], weight: torch.Tensor) -> None:
    if grad_eff_sink is None:
        return
    if not isinstance(grad_eff_sink, torch.Tensor):
        raise TypeError(f"{op}: grad_eff_sink must be a torch.Tensor, got {type(grad_eff_sink).__name__}")
    if (grad_eff_sink.shape != weight.shape or grad_eff_sink.dtype != weight.dtype
            or grad_eff_sink.device != weight.device):
        raise ValueError(f"{op}: grad_eff_sink must match the weight ({tuple(weight.shape)}, {weight.dtype}, "
                         f"{weight.device}), got ({tuple(grad_eff_sink.shape)}, {grad_eff_sink.dtype}, "
                         f"{grad_eff_sink.device})")


def _weight_side_grads(ctx, G: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor):
    """grad_weight = G⊙m, grad_scores = ste_scale·W⊙G; G also accumulated into the sink."""
    if ctx.sink is not None:
        ctx.sink.add_(G)
    gw = G * mask if ctx.needs_input_grad[1] else None
    gs = (weight * G).mul_(STE_SCALE) if ctx.needs_input_grad[2] else None
    return gw, gs


class _MaskedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, scores, bias, sink):
        mask, active = score_mask(scores)
        x2 = x.reshape(-1, x.shape[-1])
        sparse = x2.shape[0] == 1 or active <= SPARSE_MAX_DENSITY * mask.numel()
        if sparse:
            y = masked_matmul(x2, weight, mask, bias)
            ctx.save_for_backward(x2, weight, mask, None)
        else:
            w_eff = masked_weight(weight, mask)
            y = F.linear(x2, w_eff, bias)
            ctx.save_for_backward(x2, weight, mask, w_eff)
        ctx.sink = sink
        ctx.x_shape = x.shape
        out_shape = (*x.shape[:-1], weight.shape[0])
        # A view of y as the output would forbid in-place ops after the layer (nn.ReLU(inplace=True)).
        return y if tuple(y.shape) == out_shape else y.reshape(out_shape).clone()

    @staticmethod
    def backward(ctx, grad_out):
        x2, weight, mask, w_eff = ctx.saved_tensors
        go = grad_out.reshape(-1, weight.shape[0])
        grad_x = grad_w = grad_s = grad_b = None
        if ctx.needs_input_grad[0]:
            gx = masked_matmul_grad_input(go, weight, mask) if w_eff is None else go @ w_eff
            grad_x = gx.reshape(ctx.x_shape)
        if ctx.sink is not None or ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            G = go.T @ x2  # (out_features, in_features): dense, flow needs every entry
            grad_w, grad_s = _weight_side_grads(ctx, G, weight, mask)
        if ctx.needs_input_grad[3]:
            grad_b = go.sum(0)
        return grad_x, grad_w, grad_s, grad_b, None


def masked_linear(x: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor,
                  bias: Optional[torch.Tensor] = None, *,
                  grad_eff_sink: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Linear layer with a score-gated weight: ``y = x @ (W⊙m)ᵀ + bias``, ``m = (scores >= 0)``.

    Forward and input gradient run the masked kernels (masked entries skipped, ``W⊙m`` never
    materialised). Gradients follow the module docstring (STE scaled by 0.25).

    Args:
        x: ``(*, in_features)``.
        weight: ``(out_features, in_features)``, float32/float64.
        scores: same shape as ``weight``; a weight is active iff its score is ``>= 0``.
        bias: optional ``(out_features,)``.
        grad_eff_sink: optional ``(out_features, in_features)`` tensor; the backward adds the
            dense ``G = ∂L/∂(W⊙m)`` into it (what :func:`hyperflow_ext.prune.flow_ops.flow_step`
            consumes as ``grad_eff``).

    Shape:
        ``(*, in_features) -> (*, out_features)``.

    Example:
        >>> y = masked_linear(torch.randn(8, 20), torch.randn(5, 20), torch.randn(5, 20))
    """
    _check_scores("masked_linear", weight, scores)
    _sink("masked_linear", grad_eff_sink, weight)
    op = "masked_linear"
    check_tensor(op, "x", x, dtypes=(weight.dtype,), device=weight.device)
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{op}: x must have {weight.shape[1]} columns (= in_features) in its last dimension, "
                         f"got shape {tuple(x.shape)}")
    if bias is not None:
        check_tensor(op, "bias", bias, dtypes=(weight.dtype,), shape=(weight.shape[0],), device=weight.device)
    return _MaskedLinear.apply(x, weight, scores, bias, grad_eff_sink)


class _MaskedConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, scores, bias, stride, padding, dilation, groups, sink):
        mask, _ = score_mask(scores)
        w_eff = masked_weight(weight, mask)
        ctx.save_for_backward(x, weight, mask, w_eff)
        ctx.conf = (stride, padding, dilation, groups)
        ctx.sink = sink
        return F.conv2d(x, w_eff, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mask, w_eff = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        grad_x = grad_w = grad_s = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(x.shape, w_eff, grad_out, stride, padding, dilation, groups)
        if ctx.sink is not None or ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            G = torch.nn.grad.conv2d_weight(x, weight.shape, grad_out, stride, padding, dilation, groups)
            grad_w, grad_s = _weight_side_grads(ctx, G, weight, mask)
        if ctx.needs_input_grad[3]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_s, grad_b, None, None, None, None, None


def masked_conv2d(x: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor,
                  bias: Optional[torch.Tensor] = None, stride: _Pair = 1, padding: Union[_Pair, str] = 0,
                  dilation: _Pair = 1, groups: int = 1, *,
                  grad_eff_sink: Optional[torch.Tensor] = None) -> torch.Tensor:
    """2-D convolution with a score-gated weight ``W⊙m``, ``m = (scores >= 0)``.

    Same STE gradients as :func:`masked_linear`; the forward uses ``F.conv2d`` on ``W⊙m``.

    Args:
        x: ``(batch, in_channels, height, width)``.
        weight: ``(out_channels, in_channels / groups, kh, kw)``.
        scores: same shape as ``weight``.
        bias, stride, padding, dilation, groups: as :func:`torch.nn.functional.conv2d`
            (string padding ``"same"``/``"valid"`` is not supported).
        grad_eff_sink: optional weight-shaped tensor that accumulates ``G = ∂L/∂(W⊙m)``.
    """
    _check_scores("masked_conv2d", weight, scores)
    _sink("masked_conv2d", grad_eff_sink, weight)
    if isinstance(padding, str):
        raise NotImplementedError("masked_conv2d: string padding is not supported; pass integers")
    pair = torch.nn.modules.utils._pair
    return _MaskedConv2d.apply(x, weight, scores, bias, pair(stride), pair(padding), pair(dilation), int(groups),
                               grad_eff_sink)

"""Score-gated layers for pruning by flow: :class:`MaskedLinear` and :class:`MaskedConv2d`.

Each layer holds its ``weight`` (and ``bias``) like ``nn.Linear`` / ``nn.Conv2d``, a ``scores``
parameter of the weight's shape (initialised ``U(0.2, 0.5)``; a weight is active iff its score
is ``>= 0``) and a ``flow`` buffer (the EMA of ``w ⊙ g`` over pruned weights, kept up to date by
:class:`~hyperflow_ext.prune.pruner.Pruner`). The forward calls the differentiable functional ops
(straight-through estimator scaled by 0.25), so the layers also train with a plain optimiser.

While :meth:`track_grad_eff` is on, every backward adds ``G = ∂L/∂(W⊙m)`` into the non-persistent
``grad_eff`` buffer — what the fused :func:`~hyperflow_ext.prune.flow_ops.flow_step` consumes.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import nn

from .functional import masked_conv2d, masked_linear

__all__ = ["MaskedLinear", "MaskedConv2d", "MaskedLayer", "SCORE_INIT"]

#: The paper's score initialisation: ``U(0.2, 0.5)`` (every weight starts active).
SCORE_INIT: Tuple[float, float] = (0.2, 0.5)

_Pair = Union[int, Tuple[int, int]]


def _check_score_init(op: str, score_init) -> Tuple[float, float]:
    try:
        low, high = (float(v) for v in score_init)
    except (TypeError, ValueError):
        raise TypeError(f"{op}: score_init must be a pair of floats (low, high), got {score_init!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise ValueError(f"{op}: score_init must be finite with low <= high, got {(low, high)}")
    return low, high


class _ScoredWeight(nn.Module):
    """What both masked layers share: scores, flow buffer, grad-eff sink, mask queries."""

    weight: torch.Tensor
    scores: torch.Tensor
    flow: torch.Tensor

    def _init_scored(self, score_init) -> None:
        self.score_init = _check_score_init(type(self).__name__, score_init)
        w = self.weight
        self.scores = nn.Parameter(torch.empty(w.shape, device=w.device, dtype=w.dtype))
        self.register_buffer("flow", torch.zeros(w.shape, device=w.device, dtype=w.dtype))
        self.register_buffer("grad_eff", None, persistent=False)

    def reset_scores(self) -> None:
        """Draw the scores from ``U(score_init)`` (all weights active) and clear the flow."""
        with torch.no_grad():
            self.scores.uniform_(*self.score_init)
            self.flow.zero_()

    def mask(self) -> torch.Tensor:
        """The current mask ``scores >= 0`` (bool, weight-shaped)."""
        return self.scores.detach() >= 0

    def masked_weight(self) -> torch.Tensor:
        """``W ⊙ m`` (detached)."""
        w = self.weight.detach()
        return torch.where(self.mask(), w, torch.zeros((), dtype=w.dtype, device=w.device))

    def density(self) -> float:
        """Fraction of active weights, in ``[0, 1]``."""
        n = self.scores.numel()
        return float(self.mask().sum()) / n if n else 0.0

    def track_grad_eff(self, enabled: bool = True) -> None:
        """Turn on/off accumulation of ``G = ∂L/∂(W⊙m)`` into the ``grad_eff`` buffer."""
        if enabled:
            if self.grad_eff is None or self.grad_eff.shape != self.weight.shape:
                self.grad_eff = torch.zeros_like(self.weight, memory_format=torch.contiguous_format)
        else:
            self.grad_eff = None

    def _sink(self) -> Optional[torch.Tensor]:
        sink = self.grad_eff
        if sink is not None and (sink.device != self.weight.device or sink.dtype != self.weight.dtype):
            sink = self.grad_eff = torch.zeros_like(self.weight, memory_format=torch.contiguous_format)
        return sink


class MaskedLinear(_ScoredWeight):
    """``nn.Linear`` with a per-weight score: ``y = x (W⊙m)ᵀ + b``, ``m = (scores >= 0)``.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        score_init: ``(low, high)`` of the uniform score initialisation (default ``(0.2, 0.5)``).

    Shape:
        ``(*, in_features) -> (*, out_features)``.

    Example:
        >>> layer = MaskedLinear(20, 5)
        >>> layer(torch.randn(8, 20)).shape
        torch.Size([8, 5])
        >>> layer.density()
        1.0
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 score_init: Tuple[float, float] = SCORE_INIT, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = nn.Parameter(torch.empty((self.out_features, self.in_features), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self._init_scored(score_init)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation for weight and bias, then :meth:`reset_scores`."""
        nn.Linear.reset_parameters(self)  # type: ignore[arg-type]  (uses weight, bias only)
        self.reset_scores()

    @classmethod
    def from_linear(cls, linear: nn.Linear, score_init: Tuple[float, float] = SCORE_INIT) -> "MaskedLinear":
        """Wrap ``linear``: the new layer *shares* its ``weight`` and ``bias`` parameters.

        Raises:
            TypeError: ``linear`` is not an ``nn.Linear``.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"MaskedLinear.from_linear: expected nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, score_init=score_init,
                    device="meta", dtype=linear.weight.dtype)
        layer.weight, layer.bias = linear.weight, linear.bias
        layer._init_scored(score_init)
        layer.reset_scores()
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return masked_linear(x, self.weight, self.scores, self.bias, grad_eff_sink=self._sink())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"density={self.density():.4f}")


class MaskedConv2d(_ScoredWeight):
    """``nn.Conv2d`` with a per-weight score (zero padding, integer padding only).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, device,
            dtype: as ``nn.Conv2d``.
        score_init: ``(low, high)`` of the uniform score initialisation (default ``(0.2, 0.5)``).

    Shape:
        ``(N, in_channels, H, W) -> (N, out_channels, H_out, W_out)``.

    Raises:
        NotImplementedError: string padding (``"same"``/``"valid"``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: _Pair, stride: _Pair = 1,
                 padding: _Pair = 0, dilation: _Pair = 1, groups: int = 1, bias: bool = True,
                 score_init: Tuple[float, float] = SCORE_INIT, device=None, dtype=None) -> None:
        super().__init__()
        if isinstance(padding, str):
            raise NotImplementedError("MaskedConv2d: string padding is not supported; pass integers")
        pair = nn.modules.utils._pair
        self.in_channels, self.out_channels, self.groups = int(in_channels), int(out_channels), int(groups)
        if self.groups < 1 or self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"MaskedConv2d: in_channels ({in_channels}) and out_channels ({out_channels}) must be "
                             f"divisible by groups ({groups})")
        self.kernel_size, self.stride = pair(kernel_size), pair(stride)
        self.padding, self.dilation = pair(padding), pair(dilation)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty((self.out_channels, self.in_channels // self.groups,
                                                *self.kernel_size), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self._init_scored(score_init)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Conv2d``'s initialisation for weight and bias, then :meth:`reset_scores`."""
        nn.Conv2d.reset_parameters(self)  # type: ignore[arg-type]  (uses weight, bias only)
        self.reset_scores()

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, score_init: Tuple[float, float] = SCORE_INIT) -> "MaskedConv2d":
        """Wrap ``conv``: the new layer *shares* its ``weight`` and ``bias`` parameters.

        Raises:
            TypeError: ``conv`` is not an ``nn.Conv2d``.
            NotImplementedError: string padding or a ``padding_mode`` other than ``"zeros"``.
        """
        op = "MaskedConv2d.from_conv2d"
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"{op}: expected nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise NotImplementedError(f"{op}: padding_mode={conv.padding_mode!r} is not supported (only 'zeros')")
        if isinstance(conv.padding, str):
            raise NotImplementedError(f"{op}: string padding {conv.padding!r} is not supported; use integers")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, bias=conv.bias is not None, score_init=score_init, device="meta",
                    dtype=conv.weight.dtype)
        layer.weight, layer.bias = conv.weight, conv.bias
        layer._init_scored(score_init)
        layer.reset_scores()
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return masked_conv2d(x, self.weight, self.scores, self.bias, self.stride, self.padding, self.dilation,
                             self.groups, grad_eff_sink=self._sink())

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        return s + f", bias={self.bias is not None}, density={self.density():.4f}"


MaskedLayer = Union[MaskedLinear, MaskedConv2d]

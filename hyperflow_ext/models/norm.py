"""In-place GroupNorm (+ ReLU) for inference: the backbones' memory-lean forward.

``GroupNorm`` allocates a second full-size map next to its input; during a forward pass with
autograd off nothing needs the input afterwards, so :func:`group_norm_` normalises it in its
own storage instead. That halves the peak activation memory of a conv block, which is what
bounds how many support images the task encoder may push through the backbone at once.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import native
from .._checks import FLOAT_CODES, check_tensor, stream_handle

__all__ = ["group_norm_", "group_norm_reference"]


def group_norm_reference(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
                         bias: Optional[torch.Tensor] = None, eps: float = 1e-5, relu: bool = False) -> torch.Tensor:
    """Pure-torch reference: ``relu(F.group_norm(x, ...))`` (or without the ReLU), out of place."""
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.relu(y) if relu else y


def group_norm_(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None, eps: float = 1e-5, relu: bool = False,
                backend: Optional[str] = None) -> torch.Tensor:
    """GroupNorm of ``x`` in place, optionally followed by a ReLU. Autograd-free.

    Args:
        x: ``(N, C, H, W)`` float32/float64 map, channels-last contiguous; overwritten.
        num_groups: groups ``G``; ``C`` must be divisible by ``G``.
        weight, bias: affine parameters of shape ``(C,)`` (both or neither), same dtype and
            device as ``x``.
        eps: added to the variance (>= 0).
        relu: clamp the result at zero (NaN stays NaN, as in ``torch.relu``).
        backend: ``"auto" | "native" | "torch"``.

    Returns:
        ``x``.

    Raises:
        ValueError: wrong shape, dtype, device or layout, bad ``num_groups`` or ``eps``, or a
            call that autograd would have to differentiate.
    """
    op = "group_norm_"
    check_tensor(op, "x", x, dtypes=FLOAT_CODES, ndim=4)
    c = x.shape[1]
    if not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"{op}: x must be channels-last contiguous (x.contiguous(memory_format=torch.channels_last))")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1 or c % num_groups:
        raise ValueError(f"{op}: num_groups must be a positive int dividing the {c} channels, got {num_groups!r}")
    if (weight is None) != (bias is None):
        raise ValueError(f"{op}: pass weight and bias together, or neither")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_tensor(op, name, t, dtypes=(x.dtype,), shape=(c,), device=x.device, contiguous=True)
    if not (eps >= 0 and eps != float("inf")):
        raise ValueError(f"{op}: eps must be finite and >= 0, got {eps}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        raise ValueError(f"{op}: in-place normalisation is autograd-free; call it under torch.no_grad() "
                         f"or torch.inference_mode()")
    chosen = native.resolve_backend(backend, x.device, op, triton_ok=False)
    with torch.no_grad():
        if chosen == "torch" or x.numel() == 0:
            return x.copy_(group_norm_reference(x, num_groups, weight, bias, eps, relu))
        return launch_group_norm_(x, num_groups, weight, bias, eps, relu)


def launch_group_norm_(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor],
                       bias: Optional[torch.Tensor], eps: float, relu: bool) -> torch.Tensor:
    """The native call behind :func:`group_norm_`, without its validation.

    Only for callers that have already established everything :func:`group_norm_` checks
    (the backbones' per-block fast path); anything else must call :func:`group_norm_`.
    """
    n, c, h, w = x.shape
    mod = native.cuda_module() if x.device.type == "cuda" else native.cpu_module()
    mod.group_norm_(x=x.data_ptr(), weight=0 if weight is None else weight.data_ptr(),
                    bias=0 if bias is None else bias.data_ptr(), n=n, hw=h * w, c=c, groups=num_groups,
                    eps=float(eps), relu=bool(relu), dtype=FLOAT_CODES[x.dtype], stream=stream_handle(x.device))
    return x

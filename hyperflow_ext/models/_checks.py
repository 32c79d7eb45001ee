"""Small input checks shared by the model modules (messages name the function and argument).

Integers are checked by :func:`hyperflow_ext._checks.check_int`, shared with the data loaders.
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["check_tensor", "check_image_batch"]


def check_tensor(fn: str, arg: str, value: Any) -> torch.Tensor:
    """Raise ``TypeError`` unless ``value`` is a tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{fn}: {arg} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_image_batch(fn: str, x: Any, in_channels: int) -> torch.Tensor:
    """Check that ``x`` is a floating ``(batch, in_channels, height, width)`` tensor."""
    check_tensor(fn, "x", x)
    if x.dim() != 4:
        raise ValueError(f"{fn}: x must have shape (batch, channels, height, width), "
                         f"got {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"{fn}: x must have {in_channels} channels (in_channels), "
                         f"got {x.shape[1]}")
    if not x.is_floating_point():
        raise ValueError(f"{fn}: x must be a floating-point tensor, got {x.dtype}")
    return x

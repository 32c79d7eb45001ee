"""Name → backbone class registry: :func:`build_backbone` and :func:`available_backbones`."""
from __future__ import annotations

from typing import Any, Dict, List, Type

from torch import nn

from .conv import Conv4, ResNet8
from .vit import TinyViT

__all__ = ["BACKBONES", "build_backbone", "available_backbones"]

BACKBONES: Dict[str, Type[nn.Module]] = {
    "conv4": Conv4,
    "resnet8": ResNet8,
    "vit_tiny": TinyViT,
}


def available_backbones() -> List[str]:
    """Return the registered backbone names, sorted."""
    return sorted(BACKBONES)


def build_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build a freshly initialised backbone by name.

    Args:
        name: one of :func:`available_backbones` (``"conv4"``, ``"resnet8"``, ``"vit_tiny"``).
        **kwargs: forwarded to the backbone's constructor (e.g. ``in_channels=3``, ``hidden=64``).

    Returns:
        The backbone; it maps ``(batch, C, H, W)`` to ``(batch, feature_dim)`` and exposes
        ``feature_dim``.

    Raises:
        TypeError: if ``name`` is not a string, or a keyword is not accepted by the constructor.
        ValueError: if ``name`` is not registered.

    Example:
        >>> build_backbone("conv4", hidden=16).feature_dim
        16
    """
    if not isinstance(name, str):
        raise TypeError(f"build_backbone: name must be a str, got {type(name).__name__}")
    try:
        cls = BACKBONES[name]
    except KeyError:
        raise ValueError(f"build_backbone: unknown backbone {name!r}; expected one of "
                         f"{available_backbones()}") from None
    return cls(**kwargs)

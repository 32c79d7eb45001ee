"""scikit-learn's bundled 8x8 handwritten digits, upsampled to the common image size."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import check_int
from .dataset import ImageDataset

__all__ = ["load_digits"]


def load_digits(image_size: int = 28) -> ImageDataset:
    """Load ``sklearn.datasets.load_digits`` (1797 images, ships with scikit-learn; no download).

    The 8x8 ink values ``0 .. 16`` are scaled to ``[0, 1]`` (bright ink on a dark background, like the
    glyphs) and resized bilinearly.

    Args:
        image_size: side of the returned images.

    Returns:
        An :class:`ImageDataset` with domain ``"digits"`` and classes ``"0" .. "9"``.

    Shape:
        - images: ``(1797, 1, image_size, image_size)``

    Raises:
        TypeError: if ``image_size`` is not an int.
        ValueError: if ``image_size < 1``.
    """
    image_size = check_int("load_digits", "image_size", image_size)
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if image_size != images.shape[-1]:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear",
                               align_corners=False)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    return ImageDataset(images.clamp_(0.0, 1.0).contiguous(), labels,
                        [str(d) for d in range(10)], "digits", {"source": "sklearn.datasets.load_digits"})

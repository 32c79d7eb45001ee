"""Coarse scans of a domain: the same classes captured the way the ``digits`` scans were.

scikit-learn's ``digits`` were made by size-normalising each handwritten character into a
32x32 bitmap and counting the ink pixels in every 4x4 block, which gives 8x8 images with ink
levels ``0..16``. A far domain like that differs from crisp glyph renders in how it was
captured, not only in what it shows. :func:`low_resolution` puts any domain through the same
capture, so meta-training can see that kind of shift without ever seeing the target data.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import check_int
from .dataset import ImageDataset

__all__ = ["low_resolution", "coarse_scan", "from_scans"]

BLOCK = 4       # bitmap pixels per grid cell along each side: ink levels 0..BLOCK**2
INK = 0.5       # a pixel at least this bright is ink in the bitmap


def coarse_scan(images: torch.Tensor, side: int = 8) -> torch.Tensor:
    """Size-normalise each image's ink into a ``4·side`` bitmap and count ink per 4x4 block.

    Shape:
        - images: ``(n, 1, H, W)`` in ``[0, 1]``.
        - Returns: ``(n, 1, side, side)``, values in ``{0, 1/16, ..., 1}``.
    """
    size = BLOCK * side
    bitmaps = torch.zeros(images.shape[0], 1, size, size, dtype=images.dtype)
    for i, img in enumerate(images):
        rows, cols = (img[0] >= INK).nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue  # no ink: a blank scan
        crop = img[:, int(rows.min()):int(rows.max()) + 1, int(cols.min()):int(cols.max()) + 1]
        h, w = crop.shape[-2:]
        # Keep the aspect ratio: the longer side fills the bitmap, the shorter one is centred.
        nh, nw = max(1, round(size * h / max(h, w))), max(1, round(size * w / max(h, w)))
        fitted = F.interpolate(crop[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
        top, left = (size - nh) // 2, (size - nw) // 2
        bitmaps[i, :, top:top + nh, left:left + nw] = (fitted >= INK).to(images.dtype)
    return F.avg_pool2d(bitmaps, BLOCK)


def low_resolution(dataset: ImageDataset, side: int = 8) -> ImageDataset:
    """Return ``dataset`` as coarse scans (same labels and classes, domain ``"<domain>@<side>px"``).

    Each image goes through :func:`coarse_scan` and is resized back to its original size
    bilinearly, as :func:`load_digits` resizes its 8x8 scans.

    Args:
        dataset: the images to scan.
        side: cells of the coarse grid along each side (``digits``: 8).

    Returns:
        An :class:`ImageDataset` with images of the original shape ``(n, 1, H, W)``.

    Raises:
        TypeError: if ``dataset`` is not an :class:`ImageDataset` or ``side`` is not an int.
        ValueError: if the images are not square or ``side`` exceeds their side.
    """
    fn = "low_resolution"
    if not isinstance(dataset, ImageDataset):
        raise TypeError(f"{fn}: dataset must be an ImageDataset, got {type(dataset).__name__}")
    side = check_int(fn, "side", side)
    h, w = dataset.images.shape[-2:]
    if h != w:
        raise ValueError(f"{fn}: images must be square, got {h}x{w}")
    if side > h:
        raise ValueError(f"{fn}: side must be <= the image side {h}, got {side}")
    return from_scans(dataset, coarse_scan(dataset.images, side))


def from_scans(dataset: ImageDataset, scans: torch.Tensor) -> ImageDataset:
    """``dataset`` with its images replaced by ``scans`` resized back to the original size
    (the second half of :func:`low_resolution`, for scans computed earlier or loaded from a cache).

    Shape:
        - scans: ``(n, 1, side, side)`` for the ``n`` images of ``dataset``.
    """
    n, _, h, w = dataset.images.shape
    if scans.dim() != 4 or scans.shape[0] != n or scans.shape[1] != 1 or scans.shape[2] != scans.shape[3]:
        raise ValueError(f"from_scans: scans must be (n={n}, 1, side, side), got {tuple(scans.shape)}")
    side = scans.shape[-1]
    images = F.interpolate(scans.to(dataset.images.dtype), size=(h, w), mode="bilinear",
                           align_corners=False).clamp_(0.0, 1.0)
    meta = {**dataset.meta, "low_resolution": {"side": side, "block": BLOCK}}
    return ImageDataset(images.contiguous(), dataset.labels, dataset.class_names, f"{dataset.domain}@{side}px", meta)

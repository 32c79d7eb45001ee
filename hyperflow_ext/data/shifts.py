"""Capture shifts: the same classes seen through a different camera, scanner or display.

Each shift is a pure function of an :class:`ImageDataset` (and a seed where it draws random
numbers): it returns a new data set with the same labels and classes, images of the same shape in
``[0, 1]``, and the domain renamed ``"<domain>~<suffix>"`` (``"Greek~rot"``), never touching its
input. Random shifts draw from a generator seeded by ``seed`` and the input's domain name, so a
shift is deterministic given its arguments and two domains shifted with one seed get independent
noise.

:data:`SHIFTS` maps a short name to a shift with fixed default settings; :func:`apply_shift`
applies one or several of them (``"blur+noise"``) by name.
"""
from __future__ import annotations

import math
import zlib
from typing import Callable, Dict, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .dataset import ImageDataset
from .resolution import BLOCK, coarse_scan, from_scans

__all__ = ["rotate", "flip", "invert", "blur", "add_noise", "contrast", "rescan", "SHIFTS", "apply_shift"]


def rotate(dataset: ImageDataset, degrees: float = 90.0, jitter: float = 0.0, seed: int = 0,
           suffix: str = "rot") -> ImageDataset:
    """Rotate every image about its centre by ``degrees`` (counter-clockwise) plus ``U(±jitter)``.

    Bilinear resampling; pixels from outside the image are black (the background).

    Raises:
        ValueError: if ``jitter`` is negative or an argument is not finite.
    """
    fn = "rotate"
    _check_finite(fn, degrees=degrees, jitter=jitter)
    if jitter < 0:
        raise ValueError(f"{fn}: jitter must be >= 0, got {jitter}")
    images = _images(fn, dataset)
    if jitter == 0 and float(degrees) % 90.0 == 0.0:  # exact: no resampling
        out = torch.rot90(images, int(degrees // 90) % 4, dims=(-2, -1))
        return _shifted(dataset, out, suffix, {"rotate": {"degrees": degrees, "jitter": jitter, "seed": seed}})
    n = images.shape[0]
    angles = torch.full((n,), float(degrees), dtype=torch.float64)
    if jitter > 0:
        angles += (torch.rand(n, generator=_generator(fn, seed, dataset), dtype=torch.float64) * 2 - 1) * jitter
    rad = angles * (math.pi / 180.0)
    cos, sin = torch.cos(rad), torch.sin(rad)
    # affine_grid maps output to input coordinates: the inverse of a counter-clockwise rotation
    # (image y points down, so this matrix rotates counter-clockwise on screen).
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros_like(cos)], 1),
                         torch.stack([sin, cos, torch.zeros_like(cos)], 1)], 1).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return _shifted(dataset, out, suffix, {"rotate": {"degrees": degrees, "jitter": jitter, "seed": seed}})


def flip(dataset: ImageDataset, axis: str = "horizontal", suffix: Optional[str] = None) -> ImageDataset:
    """Mirror every image left-right (``axis="horizontal"``) or upside down (``"vertical"``).

    Flipping twice along one axis gives the original images back. The default suffix is
    ``"flipx"`` or ``"flipy"``.

    Raises:
        ValueError: if ``axis`` is neither ``"horizontal"`` nor ``"vertical"``.
    """
    if axis not in ("horizontal", "vertical"):
        raise ValueError(f"flip: axis must be 'horizontal' or 'vertical', got {axis!r}")
    images = _images("flip", dataset)
    out = torch.flip(images, dims=[-1] if axis == "horizontal" else [-2])
    default = "flipx" if axis == "horizontal" else "flipy"
    return _shifted(dataset, out, suffix or default, {"flip": axis})


def invert(dataset: ImageDataset, suffix: str = "inv") -> ImageDataset:
    """Dark ink on a bright background: every pixel ``x`` becomes ``1 - x``."""
    return _shifted(dataset, 1.0 - _images("invert", dataset), suffix, {"invert": True})


def blur(dataset: ImageDataset, sigma: float = 1.0, suffix: str = "blur") -> ImageDataset:
    """Gaussian blur (an out-of-focus capture) with standard deviation ``sigma`` pixels.

    The kernel spans ``±ceil(3 sigma)`` pixels and sums to one; borders are zero-padded.

    Raises:
        ValueError: if ``sigma`` is not positive.
    """
    fn = "blur"
    _check_finite(fn, sigma=sigma)
    if sigma <= 0:
        raise ValueError(f"{fn}: sigma must be > 0, got {sigma}")
    images = _images(fn, dataset)
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-x ** 2 / (2 * sigma ** 2))
    kernel /= kernel.sum()
    out = F.conv2d(images, kernel.view(1, 1, 1, -1), padding=(0, radius))
    out = F.conv2d(out, kernel.view(1, 1, -1, 1), padding=(radius, 0))
    return _shifted(dataset, out, suffix, {"blur": {"sigma": sigma}})


def add_noise(dataset: ImageDataset, std: float = 0.2, seed: int = 0, suffix: str = "noise") -> ImageDataset:
    """Additive Gaussian sensor noise of standard deviation ``std``, clipped to ``[0, 1]``.

    Raises:
        ValueError: if ``std`` is negative.
    """
    fn = "add_noise"
    _check_finite(fn, std=std)
    if std < 0:
        raise ValueError(f"{fn}: std must be >= 0, got {std}")
    images = _images(fn, dataset)
    noise = torch.randn(images.shape, generator=_generator(fn, seed, dataset), dtype=images.dtype)
    return _shifted(dataset, images + std * noise, suffix, {"add_noise": {"std": std, "seed": seed}})


def contrast(dataset: ImageDataset, factor: float = 0.3, level: float = 0.5, jitter: float = 0.0,
             seed: int = 0, suffix: str = "contrast") -> ImageDataset:
    """Low (``factor < 1``) or high contrast: ``x -> level + f (x - level)``, clipped to ``[0, 1]``.

    ``f`` is ``factor`` times ``U(1 ± jitter)`` per image. With the defaults, black background and
    white ink become 0.35 and 0.65.

    Raises:
        ValueError: if ``factor`` is not positive, ``level`` is outside ``[0, 1]`` or ``jitter`` is
            outside ``[0, 1)``.
    """
    fn = "contrast"
    _check_finite(fn, factor=factor, level=level, jitter=jitter)
    if factor <= 0:
        raise ValueError(f"{fn}: factor must be > 0, got {factor}")
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"{fn}: level must lie in [0, 1], got {level}")
    if not 0.0 <= jitter < 1.0:
        raise ValueError(f"{fn}: jitter must lie in [0, 1), got {jitter}")
    images = _images(fn, dataset)
    f = torch.full((images.shape[0], 1, 1, 1), float(factor), dtype=images.dtype)
    if jitter > 0:
        u = torch.rand(f.shape, generator=_generator(fn, seed, dataset), dtype=images.dtype)
        f = f * (1.0 + (2.0 * u - 1.0) * jitter)
    out = level + f * (images - level)
    return _shifted(dataset, out, suffix,
                    {"contrast": {"factor": factor, "level": level, "jitter": jitter, "seed": seed}})


def rescan(dataset: ImageDataset, side: int = 8, suffix: Optional[str] = None) -> ImageDataset:
    """Coarse scans (the capture of scikit-learn's ``digits``; see
    :func:`~hyperflow_ext.data.low_resolution`), named ``"<domain>~scan<side>"`` by default.

    Raises:
        ValueError: if ``side`` is not an int in ``[1, image side]`` or the images are not square.
    """
    images = _images("rescan", dataset)
    if isinstance(side, bool) or not isinstance(side, int) or not 1 <= side <= images.shape[-1]:
        raise ValueError(f"rescan: side must be an int in [1, {images.shape[-1]}], got {side!r}")
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"rescan: images must be square, got {images.shape[-2]}x{images.shape[-1]}")
    scanned = from_scans(dataset, coarse_scan(images, side))
    return _shifted(dataset, scanned.images, suffix or f"scan{side}", {"rescan": {"side": side, "block": BLOCK}})


Shift = Callable[..., ImageDataset]
# Short name -> shift with its default settings (the names are the domain suffixes).
SHIFTS: Dict[str, Shift] = {
    "rot": lambda ds, seed=0: rotate(ds, 90.0, seed=seed),
    "rot30": lambda ds, seed=0: rotate(ds, 0.0, jitter=30.0, seed=seed, suffix="rot30"),
    "flipx": lambda ds, seed=0: flip(ds, "horizontal"),
    "flipy": lambda ds, seed=0: flip(ds, "vertical"),
    "inv": lambda ds, seed=0: invert(ds),
    "blur": lambda ds, seed=0: blur(ds, 1.0),
    "noise": lambda ds, seed=0: add_noise(ds, 0.2, seed=seed),
    "contrast": lambda ds, seed=0: contrast(ds, 0.3, jitter=0.3, seed=seed),
    "scan8": lambda ds, seed=0: rescan(ds, 8),
}


def apply_shift(dataset: ImageDataset, shift: Union[str, Sequence[str]], seed: int = 0) -> ImageDataset:
    """Apply the :data:`SHIFTS` named in ``shift`` in order (``"blur+noise"`` or ``["blur", "noise"]``).

    The result is named ``"<domain>~<name>~<name>..."``, one suffix per shift.

    Raises:
        TypeError: if ``shift`` is neither a str nor a sequence of str.
        ValueError: if a name is not in :data:`SHIFTS` or no shift is named.
    """
    names = shift.split("+") if isinstance(shift, str) else list(shift)
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"apply_shift: shift must be a str or a sequence of str, got {shift!r}")
    if not names or any(n not in SHIFTS for n in names):
        raise ValueError(f"apply_shift: shift must name shifts among {sorted(SHIFTS)}, got {shift!r}")
    for name in names:
        dataset = SHIFTS[name](dataset, seed=seed)
    return dataset


def _images(fn: str, dataset: object) -> torch.Tensor:
    if not isinstance(dataset, ImageDataset):
        raise TypeError(f"{fn}: dataset must be an ImageDataset, got {type(dataset).__name__}")
    return dataset.images


def _check_finite(fn: str, **values: float) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{fn}: {name} must be a finite number, got {value!r}")


def _generator(fn: str, seed: int, dataset: ImageDataset) -> torch.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"{fn}: seed must be a non-negative int, got {seed!r}")
    key = zlib.crc32(f"{fn}/{dataset.domain}".encode())
    return torch.Generator().manual_seed(seed * 0x1_0000_0001 + key)


def _shifted(dataset: ImageDataset, images: torch.Tensor, suffix: str, record: Dict[str, object]) -> ImageDataset:
    if not isinstance(suffix, str) or not suffix or any(c in suffix for c in "~@/"):
        raise ValueError(f"shift: suffix must be a non-empty str without '~', '@' or '/', got {suffix!r}")
    shifts = list(dataset.meta.get("shifts", [])) + [record]
    meta = {**dataset.meta, "shifts": shifts}
    return ImageDataset(images.clamp(0.0, 1.0).contiguous(), dataset.labels, dataset.class_names,
                        f"{dataset.domain}~{suffix}", meta)

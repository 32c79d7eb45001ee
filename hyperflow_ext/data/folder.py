"""Load a user's folder of class folders (Meta-Dataset style) as an :class:`ImageDataset`."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch
from PIL import Image

from .._checks import check_int
from .dataset import ImageDataset

__all__ = ["IMAGE_SUFFIXES", "load_folder", "load_images"]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})


def load_folder(path: os.PathLike, image_size: int = 28, min_images: int = 1) -> ImageDataset:
    """Load ``path/<class name>/<image>`` files, one class per sub-folder, classes sorted by name.

    Images (``.png .jpg .jpeg .bmp .gif .webp``, any case; the first frame of an animation) are
    converted to grayscale, resized to ``image_size x image_size`` (bilinear, aspect ratio not kept)
    and scaled to ``[0, 1]``. Other files and hidden entries are ignored. The domain is the folder
    name.

    Args:
        path: the root folder.
        image_size: side of the returned images.
        min_images: fewest images a class folder must hold.

    Returns:
        An :class:`ImageDataset`; ``meta["files"]`` lists the image paths in image order.

    Shape:
        - images: ``(n, 1, image_size, image_size)``

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        NotADirectoryError: if ``path`` is not a directory.
        ValueError: if there is no class folder, a class folder holds no image or fewer than
            ``min_images``, or an image cannot be read (the message names the class or file).
    """
    fn = "load_folder"
    image_size = check_int(fn, "image_size", image_size)
    min_images = check_int(fn, "min_images", min_images)
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{fn}: path {str(root)!r} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{fn}: path {str(root)!r} must be a directory of class folders, "
                                 f"got a file")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{fn}: path {str(root)!r} must contain class sub-folders, found none")
    images: List[np.ndarray] = []
    labels: List[int] = []
    files: List[str] = []
    for label, folder in enumerate(classes):
        class_files = _image_files(folder)
        if not class_files:
            raise ValueError(f"{fn}: class folder {folder.name!r} holds no image "
                             f"(expected files ending in {sorted(IMAGE_SUFFIXES)})")
        if len(class_files) < min_images:
            raise ValueError(f"{fn}: class {folder.name!r} must hold at least {min_images} images "
                             f"(min_images), got {len(class_files)}")
        images += [_read_image(fn, file, image_size) for file in class_files]
        labels += [label] * len(class_files)
        files += [str(file) for file in class_files]
    logger.debug("%s: loaded %d images in %d classes from %s", fn, len(images), len(classes), root)
    tensor = torch.from_numpy(np.stack(images)).unsqueeze(1).to(torch.float32).div_(255.0)
    return ImageDataset(tensor, torch.tensor(labels, dtype=torch.int64),
                        [folder.name for folder in classes], root.name or str(root),
                        {"source": "folder", "root": str(root), "files": files})


def _image_files(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def _read_image(fn: str, file: Path, image_size: int) -> np.ndarray:
    """Return ``file`` as a uint8 ``(image_size, image_size)`` grayscale array."""
    try:
        with Image.open(file) as image:
            image.seek(0)
            gray = image.convert("L")
            gray = gray.resize((image_size, image_size), Image.Resampling.BILINEAR)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{fn}: cannot read image file {str(file)!r} "
                         f"({type(exc).__name__}: {exc})") from exc
    return np.asarray(gray, dtype=np.uint8)


def load_images(path: os.PathLike, image_size: int = 28) -> Tuple[torch.Tensor, List[str]]:
    """Load every image directly inside ``path`` (no class folders), sorted by file name.

    Returns:
        ``(images (n, 1, image_size, image_size) in [0, 1], file paths)``.

    Raises:
        FileNotFoundError / NotADirectoryError: ``path`` missing or not a folder.
        ValueError: no image in the folder, or an unreadable image (named).
    """
    fn = "load_images"
    image_size = check_int(fn, "image_size", image_size)
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{fn}: path {str(root)!r} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{fn}: path {str(root)!r} must be a directory of images")
    files = _image_files(root)
    if not files:
        raise ValueError(f"{fn}: folder {str(root)!r} holds no image (expected files ending in "
                         f"{sorted(IMAGE_SUFFIXES)})")
    arrays = [_read_image(fn, f, image_size) for f in files]
    tensor = torch.from_numpy(np.stack(arrays)).unsqueeze(1).to(torch.float32).div_(255.0)
    return tensor, [str(f) for f in files]

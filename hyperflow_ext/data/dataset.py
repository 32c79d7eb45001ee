"""An in-memory labelled image set: the one container every loader in this package returns."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch

__all__ = ["ImageDataset"]

ClassKey = Union[int, str]


class ImageDataset:
    """Grayscale images with integer labels, class names and a domain name.

    Args:
        images: float32 tensor in ``[0, 1]``.
        labels: int64 tensor with values ``0 .. len(class_names) - 1``; every class must occur.
        class_names: one unique name per class; ``class_names[c]`` names label ``c``.
        domain: name of the domain the images come from (``"digits"``, ``"Latin"``, ...).
        meta: optional JSON-like information about how the set was made (fonts used, settings).

    Shape:
        - images: ``(n, 1, H, W)``
        - labels: ``(n,)``

    Raises:
        TypeError: if an argument has the wrong kind.
        ValueError: on a wrong shape or dtype, values out of range, duplicate class names or a class
            without images.

    Example:
        >>> ds = ImageDataset(torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 0, 1]), ["a", "b"], "toy")
        >>> ds.subset(["b"]).num_classes
        1
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str],
                 domain: str, meta: Optional[Mapping[str, Any]] = None) -> None:
        _validate(images, labels, class_names, domain)
        self.images = images
        self.labels = labels
        self.class_names: List[str] = list(class_names)
        self.domain = domain
        self.meta: Dict[str, Any] = dict(meta or {})
        self._by_class: Optional[List[torch.Tensor]] = None
        self._indices: Optional[List[torch.Tensor]] = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return (f"ImageDataset(domain={self.domain!r}, images={len(self)}, "
                f"classes={self.num_classes}, image_size={self.image_size})")

    @property
    def num_classes(self) -> int:
        """Number of classes ``C``."""
        return len(self.class_names)

    @property
    def image_size(self) -> int:
        """Side ``H`` of the (square) images; for non-square images, the height."""
        return int(self.images.shape[-2])

    def class_index(self, cls: ClassKey) -> int:
        """Return the label of ``cls`` (a label or a class name).

        Raises:
            TypeError: if ``cls`` is neither an int nor a str.
            ValueError: if ``cls`` is not a class of this data set.
        """
        if isinstance(cls, str):
            if cls not in self.class_names:
                raise ValueError(f"ImageDataset.class_index: no class named {cls!r} in domain "
                                 f"{self.domain!r}")
            return self.class_names.index(cls)
        if isinstance(cls, bool) or not isinstance(cls, int):
            raise TypeError(f"ImageDataset.class_index: class must be an int label or a str name, "
                            f"got {type(cls).__name__}")
        if not 0 <= cls < self.num_classes:
            raise ValueError(f"ImageDataset.class_index: label must be in [0, {self.num_classes}), "
                             f"got {cls}")
        return cls

    def indices_of(self, cls: ClassKey) -> torch.Tensor:
        """Return the int64 indices ``(n_c,)`` of the images of class ``cls`` (label or name)."""
        if self._indices is None:
            order = torch.argsort(self.labels, stable=True)
            counts = torch.bincount(self.labels, minlength=self.num_classes).tolist()
            self._indices = list(torch.split(order, counts))
        return self._indices[self.class_index(cls)]

    def by_class(self) -> List[torch.Tensor]:
        """Return the images grouped by class (computed once, then cached).

        Returns:
            A list of ``C`` tensors; entry ``c`` has shape ``(n_c, 1, H, W)``.
        """
        if self._by_class is None:
            self._by_class = [self.images[self.indices_of(c)] for c in range(self.num_classes)]
        return self._by_class

    def subset(self, classes: Sequence[ClassKey]) -> "ImageDataset":
        """Keep only ``classes`` (labels or names), relabelled ``0 .. k-1`` in the order given.

        Raises:
            ValueError: if ``classes`` is empty, repeats a class or names an unknown class.
        """
        wanted = [self.class_index(c) for c in classes]
        if not wanted:
            raise ValueError("ImageDataset.subset: classes must name at least one class, got none")
        if len(set(wanted)) != len(wanted):
            raise ValueError(f"ImageDataset.subset: classes must be distinct, got {list(classes)}")
        index = torch.cat([self.indices_of(c) for c in wanted])
        relabel = torch.full((self.num_classes,), -1, dtype=torch.int64)
        relabel[torch.tensor(wanted)] = torch.arange(len(wanted))
        return ImageDataset(self.images[index], relabel[self.labels[index]],
                            [self.class_names[c] for c in wanted], self.domain, self.meta)


def _validate(images: object, labels: object, class_names: object, domain: object) -> None:
    fn = "ImageDataset"
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(f"{fn}: images and labels must be torch.Tensor, got "
                        f"{type(images).__name__} and {type(labels).__name__}")
    if not isinstance(domain, str):
        raise TypeError(f"{fn}: domain must be a str, got {type(domain).__name__}")
    if isinstance(class_names, str) or not all(isinstance(c, str) for c in class_names):
        raise TypeError(f"{fn}: class_names must be a sequence of str, got {class_names!r}")
    if images.dtype != torch.float32:
        raise ValueError(f"{fn}: images must be float32, got {images.dtype}")
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"{fn}: images must have shape (n, 1, H, W), got {tuple(images.shape)}")
    if labels.dtype != torch.int64 or labels.dim() != 1:
        raise ValueError(f"{fn}: labels must be a 1-D int64 tensor, got {labels.dtype} with shape "
                         f"{tuple(labels.shape)}")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{fn}: labels must have {images.shape[0]} entries (one per image), "
                         f"got {labels.shape[0]}")
    if images.shape[0] == 0:
        raise ValueError(f"{fn}: domain {domain!r} must hold at least one image, got 0")
    low, high = float(images.min()), float(images.max())
    if not (0.0 <= low and high <= 1.0):  # also false for NaN
        raise ValueError(f"{fn}: images must lie in [0, 1], got values in [{low}, {high}]")
    names = list(class_names)
    if len(set(names)) != len(names):
        raise ValueError(f"{fn}: class_names must be unique, got {names}")
    if int(labels.min()) < 0 or int(labels.max()) >= len(names):
        raise ValueError(f"{fn}: labels must lie in [0, {len(names)}) (one per class name), got "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    counts = torch.bincount(labels, minlength=len(names))
    empty = [names[c] for c in torch.nonzero(counts == 0).flatten().tolist()]
    if empty:
        raise ValueError(f"{fn}: every class needs at least one image; domain {domain!r} has none "
                         f"for classes {empty}")

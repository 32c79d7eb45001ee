"""Seeded N-way K-shot episode sampling over one or several domains."""
from __future__ import annotations

import itertools
from typing import Dict, Iterator, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from .._checks import check_int
from .dataset import ImageDataset

__all__ = ["Episode", "EpisodeSampler", "episodes"]

Datasets = Union[ImageDataset, Mapping[str, ImageDataset], Sequence[ImageDataset]]


class Episode(NamedTuple):
    """One few-shot task. Labels are ``0 .. way-1``; ``classes[j]`` names label ``j``.

    Shape:
        - support_x: ``(way * shot, 1, H, W)``, class-major (``shot`` images of label 0, then 1, ...)
        - support_y: ``(way * shot,)`` int64
        - query_x: ``(way * query, 1, H, W)``, class-major
        - query_y: ``(way * query,)`` int64
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    domain: str
    classes: Tuple[str, ...]


class EpisodeSampler:
    """Draw ``way``-way ``shot``-shot episodes with ``query`` queries per class.

    Each episode picks a domain uniformly at random, then ``way`` distinct classes of it in random
    order (that order defines the labels), then ``shot + query`` distinct images per class.

    Args:
        datasets: one :class:`ImageDataset`, a ``{domain: ImageDataset}`` mapping, or a sequence of
            data sets with distinct ``domain`` names.
        way: classes per episode.
        shot: support images per class.
        query: query images per class (0 gives empty query tensors).
        seed: seed of the episode stream; two samplers with equal arguments yield equal episodes.

    Raises:
        TypeError: if ``datasets`` is not one of the accepted kinds or a count is not an int.
        ValueError: if a domain has fewer than ``way`` classes or a class fewer than ``shot + query``
            images (the message names the domain and class).

    Example:
        >>> sampler = EpisodeSampler({"digits": load_digits()}, way=5, shot=1, query=5)
        >>> sx, sy, qx, qy, domain, classes = sampler.sample()
        >>> sx.shape, qy.shape
        (torch.Size([5, 1, 28, 28]), torch.Size([25]))
    """

    def __init__(self, datasets: Datasets, way: int = 5, shot: int = 5, query: int = 15,
                 seed: int = 0) -> None:
        fn = "EpisodeSampler"
        self.domains: Dict[str, ImageDataset] = _as_domains(fn, datasets)
        self.way = check_int(fn, "way", way)
        self.shot = check_int(fn, "shot", shot)
        self.query = check_int(fn, "query", query, minimum=0)
        self.seed = check_int(fn, "seed", seed, minimum=0)
        for name, dataset in self.domains.items():
            _check_domain(fn, name, dataset, self.way, self.shot + self.query)
        self._names = list(self.domains)
        self._generator = self._fresh_generator()

    def __repr__(self) -> str:
        return (f"EpisodeSampler(domains={self._names}, way={self.way}, shot={self.shot}, "
                f"query={self.query}, seed={self.seed})")

    def sample(self, generator: Optional[torch.Generator] = None) -> Episode:
        """Draw one episode using ``generator`` (default: this sampler's own seeded stream)."""
        if generator is None:
            generator = self._generator
        elif not isinstance(generator, torch.Generator):
            raise TypeError(f"EpisodeSampler.sample: generator must be a torch.Generator or None, "
                            f"got {type(generator).__name__}")
        name = self._names[int(torch.randint(len(self._names), (1,), generator=generator))]
        dataset = self.domains[name]
        classes = torch.randperm(dataset.num_classes, generator=generator)[: self.way].tolist()
        per_class = self.shot + self.query
        picks = torch.stack([
            dataset.indices_of(c)[torch.randperm(len(dataset.indices_of(c)), generator=generator)
                                  [:per_class]]
            for c in classes])  # (way, shot + query) indices into dataset.images
        labels = torch.arange(self.way)
        return Episode(
            support_x=dataset.images[picks[:, : self.shot].reshape(-1)],
            support_y=labels.repeat_interleave(self.shot),
            query_x=dataset.images[picks[:, self.shot:].reshape(-1)],
            query_y=labels.repeat_interleave(self.query),
            domain=name,
            classes=tuple(dataset.class_names[c] for c in classes),
        )

    def episodes(self, n: Optional[int] = None) -> Iterator[Episode]:
        """Yield ``n`` episodes (forever if ``None``) from a fresh generator seeded with ``seed``."""
        if n is not None:
            n = check_int("EpisodeSampler.episodes", "n", n, minimum=0)
        generator = self._fresh_generator()
        counter = itertools.count() if n is None else range(n)
        for _ in counter:
            yield self.sample(generator)

    def __iter__(self) -> Iterator[Episode]:
        """Yield episodes forever; every new iterator restarts the seeded stream."""
        return self.episodes(None)

    def _fresh_generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)


def episodes(datasets: Datasets, way: int = 5, shot: int = 5, query: int = 15,
             n: Optional[int] = None, seed: int = 0) -> Iterator[Episode]:
    """Yield ``n`` episodes (forever if ``None``); shorthand for ``EpisodeSampler(...).episodes(n)``.

    Example:
        >>> for support_x, support_y, query_x, query_y, domain, classes in episodes(ds, 5, 1, n=10):
        ...     ...
    """
    return EpisodeSampler(datasets, way, shot, query, seed).episodes(n)


def _as_domains(fn: str, datasets: object) -> Dict[str, ImageDataset]:
    if isinstance(datasets, ImageDataset):
        return {datasets.domain: datasets}
    if isinstance(datasets, Mapping):
        domains = dict(datasets)
    elif isinstance(datasets, Sequence) and not isinstance(datasets, str):
        domains = {}
        for dataset in datasets:
            if isinstance(dataset, ImageDataset) and dataset.domain in domains:
                raise ValueError(f"{fn}: datasets must have distinct domain names, got "
                                 f"{dataset.domain!r} twice")
            domains[getattr(dataset, "domain", len(domains))] = dataset
    else:
        raise TypeError(f"{fn}: datasets must be an ImageDataset, a mapping of them or a sequence "
                        f"of them, got {type(datasets).__name__}")
    if not domains:
        raise ValueError(f"{fn}: datasets must hold at least one domain, got none")
    for name, dataset in domains.items():
        if not isinstance(dataset, ImageDataset):
            raise TypeError(f"{fn}: datasets[{name!r}] must be an ImageDataset, got "
                            f"{type(dataset).__name__}")
    return {str(name): dataset for name, dataset in domains.items()}


def _check_domain(fn: str, name: str, dataset: ImageDataset, way: int, per_class: int) -> None:
    if dataset.num_classes < way:
        raise ValueError(f"{fn}: domain {name!r} must have at least way={way} classes, got "
                         f"{dataset.num_classes}")
    counts = torch.bincount(dataset.labels, minlength=dataset.num_classes)
    short = torch.nonzero(counts < per_class).flatten().tolist()
    if short:
        c = short[0]
        raise ValueError(f"{fn}: class {dataset.class_names[c]!r} of domain {name!r} must have at "
                         f"least shot + query = {per_class} images, got {int(counts[c])}"
                         + (f" ({len(short) - 1} more classes are short)" if len(short) > 1 else ""))

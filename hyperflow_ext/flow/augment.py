"""Capture shifts drawn on meta-training episodes, so that fine-tuning pays on them.

HyperFlow emulates the fine-tuning it records. On meta-training episodes drawn from the domains a
backbone already handles, fine-tuning barely moves and the drift learns to stand still. Seeing each
episode through a random camera or scanner (:data:`AUGMENTATIONS`: inversion, contrast, gamma, blur,
noise, rotation, flips, translation) gives tasks on which adaptation pays and a drift that learns to
undo shifts. One shift (or two) is drawn per episode and applied to its support and query images
alike, since a real domain shift affects a whole task.

Every shift works in the episode's own intensity range (``[min, max]`` of its images), so images
normalised any way (``[0, 1]``, ImageNet statistics) stay in their range.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Union

import torch
import torch.nn.functional as F

__all__ = ["AUGMENTATIONS", "augment_episode", "EpisodeAugmenter"]


def _unit(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return (x - lo) / (hi - lo)


def _invert(x, lo, hi, g):
    return lo + hi - x


def _contrast(x, lo, hi, g):
    f = 0.25 + 0.5 * float(torch.rand((), generator=g))
    mid = lo + (hi - lo) * (0.2 + 0.6 * float(torch.rand((), generator=g)))
    return mid + f * (x - mid)


def _gamma(x, lo, hi, g):
    gamma = math.exp((2 * float(torch.rand((), generator=g)) - 1) * math.log(2.5))
    return lo + (hi - lo) * _unit(x, lo, hi).clamp(0, 1).pow(gamma)


def _blur(x, lo, hi, g):
    sigma = 0.6 + 0.9 * float(torch.rand((), generator=g))
    r = max(1, int(math.ceil(2 * sigma)))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=x.dtype).pow(2) / (2 * sigma ** 2))
    k = (k / k.sum()).to(x.device)
    c = x.shape[1]
    y = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _noise(x, lo, hi, g):
    std = (0.05 + 0.15 * float(torch.rand((), generator=g))) * (hi - lo)
    return (x + std * torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)).clamp(lo, hi)


def _rotate(x, lo, hi, g):
    k = 1 + int(torch.randint(3, (), generator=g))
    return torch.rot90(x, k, dims=(-2, -1)) if x.shape[-1] == x.shape[-2] else torch.rot90(x, 2, dims=(-2, -1))


def _flip(x, lo, hi, g):
    return torch.flip(x, dims=(-1,) if float(torch.rand((), generator=g)) < 0.5 else (-2,))


def _translate(x, lo, hi, g):
    h, w = x.shape[-2:]
    dy, dx = (int(torch.randint(-s // 6, s // 6 + 1, (), generator=g)) for s in (h, w))
    background = float(x.amin())
    out = torch.full_like(x, background)
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[..., yd, xd] = x[..., ys, xs]
    return out


Shift = Callable[[torch.Tensor, float, float, torch.Generator], torch.Tensor]
AUGMENTATIONS: Dict[str, Shift] = {
    "invert": _invert, "contrast": _contrast, "gamma": _gamma, "blur": _blur, "noise": _noise,
    "rotate": _rotate, "flip": _flip, "translate": _translate,
}


def augment_episode(episode: Sequence, generator: torch.Generator,
                    shifts: Sequence[str] = tuple(AUGMENTATIONS), max_shifts: int = 2) -> tuple:
    """One episode seen through 1 to ``max_shifts`` random capture shifts (support and query alike).

    Args:
        episode: ``(support_x, support_y[, query_x, query_y, ...])`` with ``(n, C, H, W)`` images.
        generator: draws the shifts and their strengths.
        shifts: names from :data:`AUGMENTATIONS` to draw from.

    Returns:
        The episode as a tuple with its images replaced (labels and other fields unchanged).
    """
    ep = tuple(episode)
    images = [i for i in (0, 2) if i < len(ep) and isinstance(ep[i], torch.Tensor) and ep[i].numel()]
    if not images:
        return ep
    stacked = torch.cat([ep[i] for i in images])
    if stacked.dim() != 4 or not stacked.is_floating_point():
        raise ValueError(f"augment_episode: images must be floating (n, C, H, W), got {tuple(stacked.shape)} "
                         f"{stacked.dtype}")
    lo, hi = float(stacked.amin()), float(stacked.amax())
    if not hi > lo:
        return ep
    count = 1 + int(torch.randint(max_shifts, (), generator=generator))
    order = torch.randperm(len(shifts), generator=generator)[:count]
    for j in order.tolist():
        stacked = AUGMENTATIONS[shifts[j]](stacked, lo, hi, generator)
    parts = stacked.split([ep[i].shape[0] for i in images])
    out = list(ep)
    for i, part in zip(images, parts):
        out[i] = part.contiguous()
    return tuple(out)


class EpisodeAugmenter:
    """The ``augment=`` setting of :meth:`HyperFlow.fit`: which shifts, on what share of episodes.

    Args:
        shifts: names from :data:`AUGMENTATIONS` (default all).
        probability: share of episodes that are shifted (the rest stay as drawn).
        seed: seeds the draw; episode ``i`` is shifted the same way in every run.

    Raises:
        ValueError: an unknown shift name or a probability outside ``[0, 1]``.
    """

    def __init__(self, shifts: Optional[Sequence[str]] = None, probability: float = 0.75, seed: int = 0) -> None:
        shifts = tuple(AUGMENTATIONS) if shifts is None else tuple(shifts)
        unknown = [s for s in shifts if s not in AUGMENTATIONS]
        if unknown or not shifts:
            raise ValueError(f"EpisodeAugmenter: shifts must be names from {list(AUGMENTATIONS)}, got {list(shifts)}")
        if not (isinstance(probability, (int, float)) and 0.0 <= probability <= 1.0):
            raise ValueError(f"EpisodeAugmenter: probability must be in [0, 1], got {probability!r}")
        self.shifts, self.probability, self.seed = shifts, float(probability), int(seed)

    @classmethod
    def from_setting(cls, augment: Union[bool, Sequence[str], "EpisodeAugmenter", None], seed: int = 0
                     ) -> Optional["EpisodeAugmenter"]:
        """``True`` → every shift, ``False``/``None`` → none, names → those, or an augmenter as is."""
        if augment is None or augment is False:
            return None
        if augment is True:
            return cls(seed=seed)
        if isinstance(augment, EpisodeAugmenter):
            return augment
        if isinstance(augment, str):
            return cls([augment], seed=seed)
        return cls(list(augment), seed=seed)

    def __call__(self, episodes: Sequence) -> list:
        """Each episode shifted (with :attr:`probability`) by a generator seeded with its index."""
        out = []
        for i, ep in enumerate(episodes):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
            shifted = float(torch.rand((), generator=g)) < self.probability
            out.append(augment_episode(ep, g, self.shifts) if shifted else tuple(ep))
        return out

    def describe(self) -> dict:
        return {"shifts": list(self.shifts), "probability": self.probability, "seed": self.seed}

    def __repr__(self) -> str:
        return f"EpisodeAugmenter(shifts={list(self.shifts)}, probability={self.probability})"

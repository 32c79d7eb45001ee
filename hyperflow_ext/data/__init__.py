"""Data for few-shot experiments without downloads.

* :class:`ImageDataset` — images ``(n, 1, H, W)`` in ``[0, 1]`` with labels, class names, a domain.
* :func:`load_digits` — scikit-learn's bundled handwritten digits.
* :func:`render_glyphs` / :func:`glyph_domains` — letters of many Unicode scripts rendered from
  matplotlib's fonts, one domain per script, cached on disk.
* :func:`benchmark_domains` — the fixed pretrain / meta-train / test split (:data:`SOURCE_SCRIPTS`,
  :data:`META_SCRIPTS`, :data:`TARGET_SCRIPTS` plus ``digits``).
* :func:`low_resolution` — a domain seen as coarse scans (a meta-training domain for far targets).
* :func:`load_folder` — a user's folder of class folders.
* :class:`EpisodeSampler` / :func:`episodes` — seeded N-way K-shot episodes.
"""
from __future__ import annotations

from .benchmark import (BENCHMARK_AUGMENTATIONS, META_SCAN_SIDE, META_SCRIPTS, SOURCE_SCRIPTS, TARGET_SCRIPTS,
                        BenchmarkSplit, benchmark_domains)
from .dataset import ImageDataset
from .digits import load_digits
from .episodes import Episode, EpisodeSampler, episodes
from .folder import IMAGE_SUFFIXES, load_folder, load_images
from .fonts import usable_fonts
from .glyphs import MIN_CLASSES_PER_SCRIPT, glyph_cache_path, glyph_domains, render_glyphs
from .resolution import low_resolution
from .scripts import SCRIPTS, Script

__all__ = [
    "ImageDataset", "load_digits", "render_glyphs", "glyph_domains", "glyph_cache_path",
    "benchmark_domains", "BenchmarkSplit", "SOURCE_SCRIPTS", "META_SCRIPTS", "TARGET_SCRIPTS", "META_SCAN_SIDE",
    "BENCHMARK_AUGMENTATIONS",
    "MIN_CLASSES_PER_SCRIPT", "SCRIPTS", "Script", "usable_fonts", "load_folder", "load_images", "IMAGE_SUFFIXES",
    "Episode", "EpisodeSampler", "episodes", "low_resolution",
]

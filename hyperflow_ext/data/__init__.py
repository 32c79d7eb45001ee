"""Data for few-shot experiments without downloads.

* :class:`ImageDataset` — images ``(n, 1, H, W)`` in ``[0, 1]`` with labels, class names, a domain.
* :func:`load_digits` — scikit-learn's bundled handwritten digits.
* :func:`render_glyphs` / :func:`glyph_domains` — letters of many Unicode scripts rendered from
  matplotlib's fonts, one domain per script, cached on disk.
* :func:`benchmark_domains` — the fixed pretrain / meta-train / test split (:data:`SOURCE_SCRIPTS`,
  :data:`META_SCRIPTS`, :data:`TARGET_SCRIPTS` plus ``digits``).
* :func:`low_resolution` — a domain seen as coarse scans (a meta-training domain for far targets).
* :func:`stroke_domains` — handwriting-like domains drawn from the Hershey stroke fonts
  (:data:`STROKE_FAMILIES`), cached on disk.
* :func:`rotate`, :func:`flip`, :func:`invert`, :func:`blur`, :func:`add_noise`, :func:`contrast`,
  :func:`rescan` / :func:`apply_shift` — seeded capture shifts of a domain (``"Greek~rot"``).
* :func:`fewshot_benchmark` — the widened benchmark (many meta-training domains, targets on which
  adaptation pays), with :func:`domain_families`, :func:`families` and :func:`leave_one_out` for a
  leave-one-family-out table.
* :func:`load_folder` — a user's folder of class folders.
* :class:`EpisodeSampler` / :func:`episodes` — seeded N-way K-shot episodes.
"""
from __future__ import annotations

from .benchmark import (BENCHMARK_AUGMENTATIONS, META_SCAN_SIDE, META_SCRIPTS, SOURCE_SCRIPTS, TARGET_SCRIPTS,
                        BenchmarkSplit, benchmark_domains)
from .dataset import ImageDataset
from .digits import load_digits
from .fewshot import (FEWSHOT_META, FEWSHOT_TARGETS, HELD_OUT_FAMILIES, HELD_OUT_SCRIPTS, HELD_OUT_SHIFTS,
                      META_SHIFTS, STROKE_INSTANCES, domain_families, families, fewshot_benchmark, leave_one_out)
from .episodes import Episode, EpisodeSampler, episodes
from .folder import IMAGE_SUFFIXES, load_folder, load_images
from .fonts import usable_fonts
from .glyphs import MIN_CLASSES_PER_SCRIPT, glyph_cache_path, glyph_domains, render_glyphs
from .resolution import low_resolution
from .scripts import SCRIPTS, Script
from .shifts import SHIFTS, add_noise, apply_shift, blur, contrast, flip, invert, rescan, rotate
from .strokes import (STROKE_FAMILIES, STROKE_PREFIX, StrokeFamily, StrokeJitter, draw_strokes, stroke_cache_path,
                      stroke_domains)

__all__ = [
    "ImageDataset", "load_digits", "render_glyphs", "glyph_domains", "glyph_cache_path",
    "benchmark_domains", "BenchmarkSplit", "SOURCE_SCRIPTS", "META_SCRIPTS", "TARGET_SCRIPTS", "META_SCAN_SIDE",
    "BENCHMARK_AUGMENTATIONS",
    "MIN_CLASSES_PER_SCRIPT", "SCRIPTS", "Script", "usable_fonts", "load_folder", "load_images", "IMAGE_SUFFIXES",
    "Episode", "EpisodeSampler", "episodes", "low_resolution",
    "stroke_domains", "stroke_cache_path", "draw_strokes", "StrokeFamily", "StrokeJitter", "STROKE_FAMILIES",
    "STROKE_PREFIX",
    "rotate", "flip", "invert", "blur", "add_noise", "contrast", "rescan", "apply_shift", "SHIFTS",
    "fewshot_benchmark", "domain_families", "families", "leave_one_out", "FEWSHOT_META", "FEWSHOT_TARGETS",
    "META_SHIFTS", "HELD_OUT_SHIFTS", "HELD_OUT_FAMILIES", "HELD_OUT_SCRIPTS", "STROKE_INSTANCES",
]

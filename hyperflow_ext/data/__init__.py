"""Data for few-shot experiments without downloads.

* :class:`ImageDataset` — images ``(n, 1, H, W)`` in ``[0, 1]`` with labels, class names, a domain.
* :func:`load_digits` — scikit-learn's bundled handwritten digits.
* :func:`render_glyphs` / :func:`glyph_domains` — letters of many Unicode scripts rendered from
  matplotlib's fonts, one domain per script, cached on disk.
* :func:`benchmark_domains` — the fixed pretrain / meta-train / test split (its script lists are in
  :mod:`~hyperflow_ext.data.benchmark`).
* :func:`low_resolution` — a domain seen as coarse scans (a meta-training domain for far targets).
* :func:`stroke_domains` — handwriting-like domains drawn from the Hershey stroke fonts
  (:data:`~hyperflow_ext.data.strokes.STROKE_FAMILIES`), cached on disk.
* :func:`rotate`, :func:`flip`, :func:`invert`, :func:`blur`, :func:`add_noise`, :func:`contrast`,
  :func:`rescan` / :func:`apply_shift` — seeded capture shifts of a domain (``"Greek~rot"``).
* :func:`fewshot_benchmark` — the widened benchmark (many meta-training domains, targets on which
  adaptation pays), with :func:`domain_families`, :func:`families` and :func:`leave_one_out` for a
  leave-one-family-out table.
* :func:`load_folder` — a user's folder of class folders.
* :class:`EpisodeSampler` / :func:`episodes` — seeded N-way K-shot episodes.
"""
from __future__ import annotations

from .._compat import kept_names
from .benchmark import BenchmarkSplit, benchmark_domains
from .dataset import ImageDataset
from .digits import load_digits
from .episodes import Episode, EpisodeSampler, episodes
from .fewshot import domain_families, families, fewshot_benchmark, leave_one_out
from .folder import load_folder, load_images
from .fonts import usable_fonts
from .glyphs import glyph_domains, render_glyphs
from .resolution import low_resolution
from .scripts import Script
from .shifts import add_noise, apply_shift, blur, contrast, flip, invert, rescan, rotate
from .strokes import StrokeFamily, StrokeJitter, draw_strokes, stroke_domains

__all__ = [
    "ImageDataset", "load_digits", "render_glyphs", "glyph_domains", "benchmark_domains", "BenchmarkSplit",
    "Script", "usable_fonts", "load_folder", "load_images", "Episode", "EpisodeSampler", "episodes",
    "low_resolution", "stroke_domains", "draw_strokes", "StrokeFamily", "StrokeJitter",
    "rotate", "flip", "invert", "blur", "add_noise", "contrast", "rescan", "apply_shift",
    "fewshot_benchmark", "domain_families", "families", "leave_one_out",
]

# The split's constants and the cache paths live in their modules (hyperflow_ext.data.benchmark,
# .fewshot, .strokes ...); the old spellings hf.data.META_SCRIPTS etc. still resolve.
__getattr__ = kept_names(__name__, {
    **dict.fromkeys(["SOURCE_SCRIPTS", "META_SCRIPTS", "TARGET_SCRIPTS", "META_SCAN_SIDE", "BENCHMARK_AUGMENTATIONS"],
                    "benchmark"),
    **dict.fromkeys(["FEWSHOT_META", "FEWSHOT_TARGETS", "HELD_OUT_FAMILIES", "HELD_OUT_SCRIPTS", "HELD_OUT_SHIFTS",
                     "META_SHIFTS", "STROKE_INSTANCES"], "fewshot"),
    **dict.fromkeys(["STROKE_FAMILIES", "STROKE_PREFIX", "stroke_cache_path"], "strokes"),
    **dict.fromkeys(["MIN_CLASSES_PER_SCRIPT", "glyph_cache_path"], "glyphs"),
    "SCRIPTS": "scripts", "SHIFTS": "shifts", "IMAGE_SUFFIXES": "folder",
})

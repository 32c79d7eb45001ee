"""The fixed cross-domain split: glyph scripts to pretrain on, to meta-train on, and to test on.

Three disjoint groups, as in any few-shot benchmark with a meta-training stage:

* the source script (Latin, 52 letters) pretrains the backbone;
* meta-training scripts (Greek, Cyrillic, Georgian, Canadian Syllabics, Armenian, Lisu, Old
  Italic), which the backbone never saw, provide the episodes HyperFlow learns fine-tuning
  trajectories on: adapting to them is what adapting to a new domain looks like, which
  fine-tuning on the backbone's own training classes is not. Each is also seen as 8x8 coarse
  scans (:func:`~hyperflow_ext.data.low_resolution`), the capture process of the far target,
  so meta-training covers a change of capture as well as a change of alphabet;
* target scripts (Hebrew, Arabic, Lao) plus scikit-learn's handwritten ``digits`` (the farthest
  domain) are only ever tested on.

The benchmark renders with :data:`BENCHMARK_AUGMENTATIONS` so that every class, even of scripts
only the four DejaVu Sans fonts cover, has ``4 x (1 + 4) = 20`` images: enough for 5-shot
episodes with 15 queries.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, NamedTuple, Optional, Tuple

import torch

from .._io import load_tensors, save_tensors
from .dataset import ImageDataset
from .digits import load_digits
from .glyphs import glyph_cache_path, glyph_domains
from .resolution import BLOCK, INK, coarse_scan, from_scans

logger = logging.getLogger(__name__)

__all__ = ["SOURCE_SCRIPTS", "META_SCRIPTS", "TARGET_SCRIPTS", "META_SCAN_SIDE", "BENCHMARK_AUGMENTATIONS",
           "BenchmarkSplit", "benchmark_domains"]

SOURCE_SCRIPTS: Tuple[str, ...] = ("Latin",)
META_SCRIPTS: Tuple[str, ...] = ("Greek", "Cyrillic", "Georgian", "CanadianSyllabics", "Armenian", "Lisu", "OldItalic")
TARGET_SCRIPTS: Tuple[str, ...] = ("Hebrew", "Arabic", "Lao")
META_SCAN_SIDE = 8  # meta-training scripts are also seen as coarse scans of this many cells a side
BENCHMARK_AUGMENTATIONS = 4
# One render of every script, in a fixed order (the glyph cache is keyed by it).
_RENDERED = ("Latin", "Greek", "Cyrillic", "Georgian", "CanadianSyllabics", "Armenian", "Hebrew", "Arabic", "Lao",
             "Lisu", "OldItalic")


class BenchmarkSplit(NamedTuple):
    """``{domain: ImageDataset}`` for each stage of the benchmark."""

    source: Dict[str, ImageDataset]
    meta: Dict[str, ImageDataset]
    target: Dict[str, ImageDataset]


def benchmark_domains(cache_dir: Optional[os.PathLike] = None, progress: bool = True,
                      image_size: int = 28) -> BenchmarkSplit:
    """Return the ``(source, meta, target)`` domains of the cross-domain few-shot benchmark.

    Args:
        cache_dir: glyph cache folder; default :func:`hyperflow_ext.cache_dir`.
        progress: show a progress bar if the glyphs must be rendered.
        image_size: side of all images.

    Returns:
        A :class:`BenchmarkSplit`: ``source`` for :data:`SOURCE_SCRIPTS`; ``meta`` for
        :data:`META_SCRIPTS` followed by their coarse scans (``"<script>@8px"``); ``target`` for
        :data:`TARGET_SCRIPTS` followed by ``"digits"``.

    Raises:
        ValueError: if the bundled fonts no longer cover one of the fixed scripts.
    """
    render = dict(image_size=image_size, augmentations=BENCHMARK_AUGMENTATIONS, seed=0, cache_dir=cache_dir)
    glyphs = glyph_domains(_RENDERED, progress=progress, **render)
    target = {name: glyphs[name] for name in TARGET_SCRIPTS}
    target["digits"] = load_digits(image_size)
    meta = {name: glyphs[name] for name in META_SCRIPTS}
    scans = meta_scans(glyphs, glyph_cache_path(**render))  # the scans live beside these very renders
    meta.update({f"{name}@{META_SCAN_SIDE}px": from_scans(glyphs[name], scans[name]) for name in META_SCRIPTS})
    return BenchmarkSplit(source={name: glyphs[name] for name in SOURCE_SCRIPTS}, meta=meta, target=target)


def meta_scans(glyphs: Dict[str, ImageDataset], glyph_file: Path) -> Dict[str, torch.Tensor]:
    """Coarse scans of the meta-training scripts, cached beside the glyph renders they come from.

    Scanning fits every glyph into its own bitmap (about 2 s for the benchmark); the cached 8x8
    scans load in milliseconds. The file name carries the glyph cache's key and the scan settings,
    so new renders or a new scan rule never reuse stale scans; an unreadable file is rebuilt.
    """
    path = glyph_file.with_name(f"{glyph_file.stem}-scans{META_SCAN_SIDE}-b{BLOCK}-i{INK:g}.safetensors")
    shapes = {name: (glyphs[name].images.shape[0], 1, META_SCAN_SIDE, META_SCAN_SIDE) for name in META_SCRIPTS}
    if path.is_file():
        try:
            tensors, _ = load_tensors(path)
            if {k: tuple(v.shape) for k, v in tensors.items()} == shapes:
                return tensors
            logger.warning("benchmark_domains: %s does not match the glyphs; rescanning", path)
        except ValueError as err:
            logger.warning("benchmark_domains: %s is unreadable (%s); rescanning", path, err)
    scans = {name: coarse_scan(glyphs[name].images, META_SCAN_SIDE) for name in META_SCRIPTS}
    save_tensors(path, scans, {"side": META_SCAN_SIDE, "block": BLOCK, "ink": INK, "glyphs": glyph_file.name})
    return scans

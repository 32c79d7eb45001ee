"""The fixed cross-domain split: glyph scripts to pretrain on, held-out scripts and digits to test on.

Source scripts are the large ones (597 letters in all); target scripts are held out, from near
(Old Italic, Lisu: relatives of Latin) to far (Arabic, Hebrew, Lao), plus scikit-learn's
handwritten ``digits`` as the farthest domain. The benchmark renders with
:data:`BENCHMARK_AUGMENTATIONS` so that every class, even of scripts only the four DejaVu Sans
fonts cover, has ``4 x (1 + 4) = 20`` images: enough for 5-shot episodes with 15 queries.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

from .dataset import ImageDataset
from .digits import load_digits
from .glyphs import glyph_domains

__all__ = ["SOURCE_SCRIPTS", "TARGET_SCRIPTS", "BENCHMARK_AUGMENTATIONS", "benchmark_domains"]

SOURCE_SCRIPTS: Tuple[str, ...] = ("Latin", "Greek", "Cyrillic", "Georgian", "CanadianSyllabics")
TARGET_SCRIPTS: Tuple[str, ...] = ("Armenian", "Hebrew", "Arabic", "Lao", "Lisu", "OldItalic")
BENCHMARK_AUGMENTATIONS = 4


def benchmark_domains(cache_dir: Optional[os.PathLike] = None, progress: bool = True,
                      image_size: int = 28
                      ) -> Tuple[Dict[str, ImageDataset], Dict[str, ImageDataset]]:
    """Return ``(source, target)`` domains of the cross-domain few-shot benchmark.

    Args:
        cache_dir: glyph cache folder; default :func:`hyperflow_ext.cache_dir`.
        progress: show a progress bar if the glyphs must be rendered.
        image_size: side of all images.

    Returns:
        ``source``: ``{script: ImageDataset}`` for :data:`SOURCE_SCRIPTS`; ``target``: the same for
        :data:`TARGET_SCRIPTS` followed by ``"digits"``.

    Raises:
        ValueError: if the bundled fonts no longer cover one of the fixed scripts.
    """
    glyphs = glyph_domains(SOURCE_SCRIPTS + TARGET_SCRIPTS, image_size=image_size,
                           augmentations=BENCHMARK_AUGMENTATIONS, seed=0, cache_dir=cache_dir,
                           progress=progress)
    source = {name: glyphs[name] for name in SOURCE_SCRIPTS}
    target = {name: glyphs[name] for name in TARGET_SCRIPTS}
    target["digits"] = load_digits(image_size)
    return source, target

"""A multi-script glyph data set rendered from matplotlib's bundled fonts, cached on disk.

Classes are characters, instances are fonts times augmentations, domains are Unicode scripts
(:data:`~hyperflow_ext.data.scripts.SCRIPTS`). Letters that look like a letter of an earlier script
(or an earlier letter of the same script) in DejaVu Sans are dropped, so Latin ``A``, Greek ``Α`` and
Cyrillic ``А`` appear once, as Latin. The first call renders (tens of seconds) and writes
``cache_dir()/glyphs-<hash of settings>.safetensors``; later calls load that file.
"""
from __future__ import annotations

import functools
import logging
import os
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from .._checks import check_int
from ._store import domain_cache_file, load_domains, save_domains, to_float
from .dataset import ImageDataset
from .fonts import FontFile, usable_fonts
from .render import GlyphRenderer
from .scripts import SCRIPTS

__all__ = ["render_glyphs", "glyph_domains", "glyph_cache_path", "MIN_CLASSES_PER_SCRIPT"]

logger = logging.getLogger(__name__)

MIN_CLASSES_PER_SCRIPT = 5
_CACHE_VERSION = 1
_REFERENCE_FONT = "DejaVuSans"
_HOMOGLYPH_SIZE = 32
# Two letters are homoglyphs when their reference bitmaps differ by less than this fraction of their
# ink. Identical outlines score 0; Arabic alef vs Latin l and Armenian oh vs Latin o score ~0.015;
# letters told apart by a dot (Arabic tah vs zah) score ~0.03.
_HOMOGLYPH_TOLERANCE = 0.02


def render_glyphs(image_size: int = 28, augmentations: int = 2, seed: int = 0,
                  cache_dir: Optional[os.PathLike] = None, progress: bool = True,
                  min_instances: int = 10) -> Dict[str, ImageDataset]:
    """Render (or load from the cache) one glyph :class:`ImageDataset` per Unicode script.

    Every usable font contributes, for each letter it maps, one clean rendering plus
    ``augmentations`` randomly warped ones (deterministic given ``seed``). A letter is kept only with
    at least ``min_instances`` instances, a script only with at least
    :data:`MIN_CLASSES_PER_SCRIPT` letters.

    Args:
        image_size: side of the images.
        augmentations: augmented copies per (letter, font), besides the clean one.
        seed: seed of the augmentations.
        cache_dir: cache folder; default :func:`hyperflow_ext.cache_dir`.
        progress: show a tqdm progress bar while rendering.
        min_instances: fewest instances a letter needs to become a class.

    Returns:
        ``{script name: ImageDataset}`` in :data:`SCRIPTS` order. Each data set's ``meta`` holds
        ``fonts`` (the fonts that drew it), ``codepoints`` and the settings.

    Shape:
        - images of each data set: ``(n, 1, image_size, image_size)``, white glyph on black.

    Raises:
        TypeError: if an integer argument is not an int.
        ValueError: if ``image_size < 8``, ``augmentations < 0``, ``min_instances < 1``, or the fonts
            yield no script with enough letters.
    """
    fn = "render_glyphs"
    image_size = check_int(fn, "image_size", image_size, minimum=8)
    augmentations = check_int(fn, "augmentations", augmentations, minimum=0)
    seed = check_int(fn, "seed", seed, minimum=0)
    min_instances = check_int(fn, "min_instances", min_instances, minimum=1)
    fonts = usable_fonts()
    settings = _settings(fonts, image_size, augmentations, seed, min_instances)
    path = domain_cache_file(cache_dir, "glyphs", settings)
    if path.is_file():
        try:
            return load_domains(path, settings)
        except (ValueError, KeyError) as exc:
            logger.warning("render_glyphs: ignoring unreadable cache %s (%s); re-rendering", path, exc)
    builder = _GlyphSetBuilder(fonts, image_size, augmentations, seed, min_instances)
    domains = builder.build(progress)
    if not domains:
        raise ValueError(f"{fn}: no script has {MIN_CLASSES_PER_SCRIPT} letters with "
                         f"{min_instances} instances each; lower min_instances or raise augmentations")
    save_domains(path, settings, domains)
    logger.info("render_glyphs: cached %d scripts in %s", len(domains), path)
    return domains


def glyph_domains(scripts: Optional[Sequence[str]] = None, image_size: int = 28,
                  augmentations: int = 2, seed: int = 0, cache_dir: Optional[os.PathLike] = None,
                  progress: bool = True, min_instances: int = 10) -> Dict[str, ImageDataset]:
    """Return the glyph domains named in ``scripts`` (all rendered scripts if ``None``).

    Arguments other than ``scripts`` are those of :func:`render_glyphs`.

    Raises:
        ValueError: if a requested script was not rendered (unknown, or too few letters/instances).
    """
    domains = render_glyphs(image_size, augmentations, seed, cache_dir, progress, min_instances)
    if scripts is None:
        return domains
    if isinstance(scripts, str):
        raise TypeError(f"glyph_domains: scripts must be a sequence of script names, got the str "
                        f"{scripts!r}")
    missing = [s for s in scripts if s not in domains]
    if missing:
        raise ValueError(f"glyph_domains: scripts must be among the rendered scripts "
                         f"{sorted(domains)}, got unavailable {missing}")
    return {s: domains[s] for s in scripts}


def glyph_cache_path(image_size: int = 28, augmentations: int = 2, seed: int = 0,
                     cache_dir: Optional[os.PathLike] = None, min_instances: int = 10) -> Path:
    """Return the cache file :func:`render_glyphs` uses for these settings (it may not exist yet)."""
    settings = _settings(usable_fonts(), image_size, augmentations, seed, min_instances)
    return domain_cache_file(cache_dir, "glyphs", settings)


class _GlyphSetBuilder:
    """Renders every (script, letter, font) instance and assembles the per-script data sets."""

    def __init__(self, fonts: List[FontFile], image_size: int, augmentations: int, seed: int,
                 min_instances: int) -> None:
        self.fonts = fonts
        self.renderer = GlyphRenderer(image_size)
        self.augmentations = augmentations
        self.seed = seed
        self.min_instances = min_instances

    def build(self, progress: bool) -> Dict[str, ImageDataset]:
        letters = _distinct_letters(tuple(self.fonts))
        jobs = [(script, font, [cp for cp in cps if cp in font.cmap])
                for script, cps in letters.items() for font in self.fonts]
        total = sum(len(cps) for _, _, cps in jobs)
        instances: Dict[str, Dict[int, List[np.ndarray]]] = defaultdict(lambda: defaultdict(list))
        drawn_by: Dict[str, Dict[int, set]] = defaultdict(lambda: defaultdict(set))
        with tqdm(total=total, desc="rendering glyphs", unit="glyph", disable=not progress) as bar:
            for script, font, cps in jobs:
                for cp in cps:
                    images = self._instances(font, cp)
                    instances[script][cp].extend(images)
                    if images:
                        drawn_by[script][cp].add(font.name)
                bar.update(len(cps))
        domains = {}
        for script in letters:
            dataset = self._assemble(script, instances[script], drawn_by[script])
            if dataset is not None:
                domains[script] = dataset
        return domains

    def _instances(self, font: FontFile, cp: int) -> List[np.ndarray]:
        clean = self.renderer.clean(font, chr(cp))
        if clean is None:
            return []
        rng = np.random.default_rng([self.seed, zlib.crc32(font.name.encode()), cp])
        out = [self.renderer.finish(clean)]
        out += [self.renderer.finish(self.renderer.augment(clean, rng))
                for _ in range(self.augmentations)]
        return out

    def _assemble(self, script: str, instances: Mapping[int, List[np.ndarray]],
                  drawn_by: Mapping[int, set]) -> Optional[ImageDataset]:
        kept = [cp for cp in sorted(instances) if len(instances[cp]) >= self.min_instances]
        if len(kept) < MIN_CLASSES_PER_SCRIPT:
            logger.info("render_glyphs: dropping script %s (%d letters with >= %d instances, need %d)",
                        script, len(kept), self.min_instances, MIN_CLASSES_PER_SCRIPT)
            return None
        images = np.stack([img for cp in kept for img in instances[cp]])
        labels = np.repeat(np.arange(len(kept)), [len(instances[cp]) for cp in kept])
        fonts = sorted(set().union(*(drawn_by[cp] for cp in kept)))
        meta = {"source": "glyphs", "fonts": fonts, "codepoints": [f"U+{cp:04X}" for cp in kept],
                "image_size": self.renderer.image_size, "augmentations": self.augmentations,
                "seed": self.seed}
        return ImageDataset(to_float(torch.from_numpy(images)), torch.from_numpy(labels).long(),
                            [chr(cp) for cp in kept], script, meta)


@functools.lru_cache(maxsize=4)
def _distinct_letters(fonts: Tuple[FontFile, ...]) -> Dict[str, Tuple[int, ...]]:
    """Per script, the code points some font maps, minus homoglyphs of earlier letters."""
    covered = set().union(*(f.cmap for f in fonts))
    reference = next((f for f in fonts if f.name == _REFERENCE_FONT), fonts[0])
    renderer = GlyphRenderer(_HOMOGLYPH_SIZE, supersample=1)
    capacity = sum(len(s.codepoints()) for s in SCRIPTS)
    seen = np.empty((capacity, _HOMOGLYPH_SIZE * _HOMOGLYPH_SIZE), dtype=np.float32)
    seen_ink = np.empty(capacity, dtype=np.float32)
    count = 0
    letters: Dict[str, Tuple[int, ...]] = {}
    for script in SCRIPTS:
        kept = []
        for cp in script.codepoints():
            if cp not in covered:
                continue
            canvas = renderer.clean(reference, chr(cp)) if cp in reference.cmap else None
            if canvas is not None:
                bitmap = np.asarray(canvas, dtype=np.float32).ravel() / 255.0
                ink = float(bitmap.sum())
                if count:
                    diff = np.abs(seen[:count] - bitmap).sum(axis=1)
                    if float((diff / np.maximum(seen_ink[:count], ink)).min()) < _HOMOGLYPH_TOLERANCE:
                        logger.debug("render_glyphs: dropping homoglyph U+%04X (%s)", cp, script.name)
                        continue
                seen[count], seen_ink[count] = bitmap, ink
                count += 1
            kept.append(cp)
        letters[script.name] = tuple(kept)
    return letters




def _settings(fonts: Sequence[FontFile], image_size: int, augmentations: int, seed: int,
              min_instances: int) -> Dict[str, Any]:
    from PIL import __version__ as pillow_version
    from PIL import features

    return {
        "version": _CACHE_VERSION, "image_size": image_size, "augmentations": augmentations,
        "seed": seed, "min_instances": min_instances, "min_classes": MIN_CLASSES_PER_SCRIPT,
        "homoglyph_tolerance": _HOMOGLYPH_TOLERANCE,
        "fonts": [[f.name, f.path.stat().st_size] for f in fonts],
        "scripts": [[s.name, [list(r) for r in s.ranges]] for s in SCRIPTS],
        "pillow": pillow_version, "freetype": features.version("freetype2"),
    }






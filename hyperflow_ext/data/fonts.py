"""The text fonts bundled with matplotlib, minus the ones that would poison a glyph data set.

Two filters apply. A name rule drops fonts known to be unusable: ``LastResortHE`` (draws a
placeholder box per Unicode block), the Computer Modern ``cm*.ttf`` fonts (TeX encodings map
letters to symbols) and the ``STIXSiz*`` / ``STIXNonUni*`` fonts (size variants and unencoded
glyphs). A check then drops any remaining font that lacks the ASCII letters or draws ``A`` and ``B``
alike (DejaVu ``*Display`` fonts, for instance, hold a few dozen symbols only).
"""
from __future__ import annotations

import fnmatch
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import FrozenSet, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["FontFile", "EXCLUDED_FONT_PATTERNS", "bundled_font_dir", "usable_fonts"]

logger = logging.getLogger(__name__)

EXCLUDED_FONT_PATTERNS: Tuple[str, ...] = ("LastResort*", "cm*.ttf", "STIXSiz*", "STIXNonUni*")
_ASCII_LETTERS = frozenset(range(0x41, 0x5B)) | frozenset(range(0x61, 0x7B))


@dataclass(frozen=True)
class FontFile:
    """A font file and the code points its character map covers.

    Args:
        name: file name without extension (``"DejaVuSans-Bold"``).
        path: path of the ``.ttf`` file.
        cmap: code points with a glyph in the font's best Unicode cmap.
    """

    name: str
    path: Path
    cmap: FrozenSet[int]

    def load(self, size: int) -> ImageFont.FreeTypeFont:
        """Open the font at ``size`` pixels (basic layout: one code point, one glyph)."""
        return _open_font(str(self.path), size)


@functools.lru_cache(maxsize=256)
def _open_font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size, layout_engine=ImageFont.Layout.BASIC)


def bundled_font_dir() -> Path:
    """Return matplotlib's bundled TrueType folder (``mpl-data/fonts/ttf``)."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _read_cmap(path: Path) -> FrozenSet[int]:
    from fontTools.ttLib import TTFont

    with TTFont(str(path), lazy=True) as font:
        return frozenset((font.getBestCmap() or {}).keys())


def _draws_letters(font: FontFile) -> bool:
    """True if ``font`` maps all ASCII letters and renders ``A`` and ``B`` differently (and not blank)."""
    if not _ASCII_LETTERS <= font.cmap:
        return False
    face = font.load(32)
    bitmaps = []
    for char in "AB":
        image = Image.new("L", (48, 48))
        ImageDraw.Draw(image).text((4, 4), char, font=face, fill=255)
        bitmaps.append(np.asarray(image))
    return bool(bitmaps[0].any()) and not np.array_equal(bitmaps[0], bitmaps[1])


def usable_fonts(font_dir: Optional[os.PathLike] = None) -> List[FontFile]:
    """List the text fonts of ``font_dir`` (default: matplotlib's) that pass both filters.

    Returns:
        The usable fonts sorted by file name, so indices are stable across runs.

    Raises:
        FileNotFoundError: if ``font_dir`` does not exist.
    """
    folder = Path(font_dir) if font_dir is not None else bundled_font_dir()
    if not folder.is_dir():
        raise FileNotFoundError(f"usable_fonts: font_dir {folder} is not an existing directory")
    return list(_usable_fonts(str(folder.resolve())))


@functools.lru_cache(maxsize=8)
def _usable_fonts(folder: str) -> Tuple[FontFile, ...]:
    fonts = []
    for path in sorted(Path(folder).glob("*.ttf")):
        if any(fnmatch.fnmatch(path.name, pattern) for pattern in EXCLUDED_FONT_PATTERNS):
            logger.debug("usable_fonts: skipping %s (excluded by name)", path.name)
            continue
        font = FontFile(path.stem, path, _read_cmap(path))
        if not _draws_letters(font):
            logger.debug("usable_fonts: skipping %s (no distinct ASCII letters)", path.name)
            continue
        fonts.append(font)
    return tuple(fonts)

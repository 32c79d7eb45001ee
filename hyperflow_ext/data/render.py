"""Render one character of one font as a centred white-on-black square image, optionally augmented.

Glyphs are drawn at ``supersample`` times the output size, augmented there, then box-filtered down.
The font size is fixed per canvas (one em = the inner box), so upper and lower case keep their
relative size; a glyph larger than the box is shrunk to fit, and every glyph is centred on its ink
bounding box.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .fonts import FontFile

__all__ = ["GlyphRenderer"]


class GlyphRenderer:
    """Draw glyphs into ``image_size x image_size`` uint8 arrays.

    Args:
        image_size: side of the output images.
        supersample: drawing and augmentation happen at ``supersample * image_size``.
        margin: fraction of the canvas left empty on each side of the inner box.

    Augmentation (:meth:`augment`) draws a random affine map — rotation in ±10°, scale in
    [0.9, 1.1], shift in ±2 px per 28 px of output — and, a quarter of the time each, a thicker
    (max filter) or thinner (min filter) stroke; thinning is skipped when it would erase more than
    40% of the ink.
    """

    max_rotation = 10.0
    scale_range = (0.9, 1.1)
    max_shift = 2.0 / 28.0  # fraction of the image side

    def __init__(self, image_size: int, supersample: int = 2, margin: float = 0.1) -> None:
        self.image_size = image_size
        self.supersample = supersample
        self.canvas_size = image_size * supersample
        self.box = max(1, self.canvas_size - 2 * round(margin * self.canvas_size))

    def clean(self, font: FontFile, char: str) -> Optional[Image.Image]:
        """Draw ``char`` centred on a black ``canvas_size`` square; ``None`` if the glyph has no ink."""
        face = font.load(self.box)
        left, top, right, bottom = face.getbbox(char)
        if right <= left or bottom <= top:
            return None
        glyph = Image.new("L", (right - left, bottom - top))
        ImageDraw.Draw(glyph).text((-left, -top), char, font=face, fill=255)
        ink = glyph.getbbox()
        if ink is None:
            return None
        glyph = glyph.crop(ink)
        width, height = glyph.size
        if max(width, height) > self.box:
            scale = self.box / max(width, height)
            width, height = max(1, round(width * scale)), max(1, round(height * scale))
            glyph = glyph.resize((width, height), Image.Resampling.LANCZOS)
        canvas = Image.new("L", (self.canvas_size, self.canvas_size))
        canvas.paste(glyph, ((self.canvas_size - width) // 2, (self.canvas_size - height) // 2))
        return canvas

    def augment(self, canvas: Image.Image, rng: np.random.Generator) -> Image.Image:
        """Return a randomly warped (and maybe re-stroked) copy of a :meth:`clean` canvas."""
        angle = math.radians(rng.uniform(-self.max_rotation, self.max_rotation))
        scale = rng.uniform(*self.scale_range)
        shift_x, shift_y = rng.uniform(-1.0, 1.0, size=2) * self.max_shift * self.canvas_size
        stroke = rng.random()
        # Inverse map (output pixel -> input pixel) of: scale and rotate about the centre, then shift.
        centre = self.canvas_size / 2.0
        cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
        ox, oy = centre + shift_x, centre + shift_y
        matrix = (cos, sin, centre - cos * ox - sin * oy,
                  -sin, cos, centre + sin * ox - cos * oy)
        out = canvas.transform(canvas.size, Image.Transform.AFFINE, matrix,
                               resample=Image.Resampling.BILINEAR)
        if stroke < 0.25:
            out = out.filter(ImageFilter.MaxFilter(3))
        elif stroke < 0.5:
            thinner = out.filter(ImageFilter.MinFilter(3))
            if _ink(thinner) >= 0.6 * _ink(out):
                out = thinner
        return out

    def finish(self, canvas: Image.Image) -> np.ndarray:
        """Downsample a canvas to the output size.

        Returns:
            uint8 array ``(image_size, image_size)``.
        """
        if self.supersample != 1:
            canvas = canvas.resize((self.image_size, self.image_size), Image.Resampling.BOX)
        return np.asarray(canvas, dtype=np.uint8)


def _ink(image: Image.Image) -> int:
    return int(np.asarray(image, dtype=np.int64).sum())

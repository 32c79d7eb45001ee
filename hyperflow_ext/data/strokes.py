"""Handwriting-like glyph domains drawn from the public-domain Hershey stroke fonts.

The Hershey fonts (shipped in the PyPI package ``Hershey-Fonts``, import name ``HersheyFonts``)
describe every glyph as pen paths: polylines in font units (cap line at -12, base line at 9).
Each :data:`STROKE_FAMILIES` entry groups faces of one character (Latin roman, italic, script,
Gothic; Greek; Cyrillic; Japanese kana and kanji; symbols) and becomes one domain
``"Hershey-<family>"``; classes are its distinct glyphs. Every instance is drawn from the pen
paths of one face (cycling through the family's faces) after jittering them like a hand would:
a random affine map (rotation, shear, anisotropic scale), a random offset per stroke, Gaussian
noise on every control point, and a random pen width. Drawing happens at 4x the output size with
round caps and joints; a box filter antialiases it down to ``image_size``.

The first call draws every family (a few seconds) and writes
``cache_dir()/strokes-<hash of settings>.safetensors`` atomically; later calls load that file.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import zlib
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from .._checks import check_int
from ._store import domain_cache_file, load_domains, save_domains, to_float
from .dataset import ImageDataset

__all__ = ["StrokeFamily", "STROKE_FAMILIES", "STROKE_PREFIX", "StrokeJitter", "stroke_domains",
           "stroke_cache_path", "draw_strokes"]

logger = logging.getLogger(__name__)

_CACHE_VERSION = 1
STROKE_PREFIX = "Hershey-"
Glyph = Tuple[Tuple[Tuple[float, float], ...], ...]


class StrokeFamily(NamedTuple):
    """One stroke domain: Hershey faces that draw the same set of glyphs.

    Attributes:
        name: family name; the domain is ``"Hershey-<name>"``.
        faces: Hershey font names (``HersheyFonts().default_font_names``).
        glyphs: ``"letters"`` (the ASCII letter slots ``A-Z a-z``, which the Greek and Cyrillic faces
            fill with their own alphabets), ``"all"`` (every non-blank slot) or ``"symbols"``
            (every slot whose pen paths are not those of a Latin text face; each face's symbols are
            distinct classes).
    """

    name: str
    faces: Tuple[str, ...]
    glyphs: str


_LATIN_TEXT_FACES = ("futural", "futuram", "rowmans", "rowmand", "rowmant", "timesr", "timesrb",
                     "timesi", "timesib")

STROKE_FAMILIES: Tuple[StrokeFamily, ...] = (
    StrokeFamily("Roman", ("futural", "futuram", "rowmans", "rowmand", "rowmant", "timesr", "timesrb"),
                 "letters"),
    StrokeFamily("Italic", ("timesi", "timesib"), "letters"),
    StrokeFamily("Script", ("scripts", "scriptc", "cursive"), "letters"),
    StrokeFamily("Gothic", ("gothiceng", "gothgbt", "gothicger", "gothgrt", "gothicita", "gothitt"),
                 "letters"),
    StrokeFamily("Greek", ("greek", "greekc", "greeks", "timesg"), "letters"),
    StrokeFamily("Cyrillic", ("cyrillic", "cyrilc_1"), "letters"),
    StrokeFamily("Japanese", ("japanese",), "all"),
    StrokeFamily("Symbols", ("symbolic", "astrology", "meteorology", "music", "markers"), "symbols"),
)
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


class StrokeJitter(NamedTuple):
    """How far a drawn instance departs from the font's pen paths (font units: cap height 21).

    Attributes:
        rotation: largest rotation, degrees (uniform in ``±rotation``).
        shear: largest horizontal shear (uniform in ``±shear``).
        scale: ``(low, high)`` range of the independent x and y scale factors.
        stroke_offset: standard deviation of each stroke's random offset.
        point_noise: standard deviation of the noise on each control point.
        width: ``(low, high)`` pen width in output pixels at ``image_size = 28`` (scaled with it).
    """

    rotation: float = 10.0
    shear: float = 0.2
    scale: Tuple[float, float] = (0.85, 1.15)
    stroke_offset: float = 0.6
    point_noise: float = 0.45
    width: Tuple[float, float] = (1.1, 2.5)


_EM = 30.0          # font units mapped onto the inner box (cap line -12 to bottom line 16, plus slack)
_MARGIN = 0.1       # fraction of the image left empty on each side of the inner box
_SUPERSAMPLE = 4


def draw_strokes(strokes: Sequence[Sequence[Tuple[float, float]]], image_size: int,
                 rng: Optional[np.random.Generator] = None,
                 jitter: StrokeJitter = StrokeJitter()) -> np.ndarray:
    """Draw one glyph's pen paths as a white-on-black ``(image_size, image_size)`` uint8 image.

    The glyph is scaled so that :data:`_EM` font units fill the inner box (upper and lower case
    keep their relative size), shrunk if its ink would not fit, and centred on its ink box.

    Args:
        strokes: polylines of ``(x, y)`` font-unit points (y grows downwards).
        image_size: side of the output image.
        rng: source of the jitter; ``None`` draws the clean glyph with the mean pen width.
        jitter: jitter magnitudes.

    Returns:
        A ``uint8`` array of shape ``(image_size, image_size)``.
    """
    from PIL import Image, ImageDraw

    paths = [np.asarray(s, dtype=np.float64).reshape(-1, 2) for s in strokes if len(s)]
    if rng is None:
        width = 0.5 * (jitter.width[0] + jitter.width[1])
    else:
        angle = math.radians(rng.uniform(-jitter.rotation, jitter.rotation))
        shear = rng.uniform(-jitter.shear, jitter.shear)
        sx, sy = rng.uniform(*jitter.scale, size=2)
        cos, sin = math.cos(angle), math.sin(angle)
        matrix = np.array([[cos, -sin], [sin, cos]]) @ np.array([[sx, shear * sy], [0.0, sy]])
        paths = [(p + rng.normal(0.0, jitter.stroke_offset, size=2)
                  + rng.normal(0.0, jitter.point_noise, size=p.shape)) @ matrix.T for p in paths]
        width = rng.uniform(*jitter.width)
    canvas = image_size * _SUPERSAMPLE
    pen = width * image_size / 28.0 * _SUPERSAMPLE
    box = canvas * (1.0 - 2.0 * _MARGIN)
    if not paths:
        return np.zeros((image_size, image_size), dtype=np.uint8)
    image = Image.new("L", (canvas, canvas))
    points = np.concatenate(paths)
    low, high = points.min(axis=0), points.max(axis=0)
    scale = min(box / _EM, (box - pen) / max(float((high - low).max()), 1e-6))
    centre = (low + high) / 2.0
    draw = ImageDraw.Draw(image)
    radius = pen / 2.0
    for path in paths:
        xy = [(float(x), float(y)) for x, y in (path - centre) * scale + canvas / 2.0]
        if len(xy) > 1:
            draw.line(xy, fill=255, width=max(1, round(pen)), joint="curve")
        for x, y in (xy[0], xy[-1]):  # round caps
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=255)
    small = image.resize((image_size, image_size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.uint8)


def stroke_domains(families: Optional[Sequence[str]] = None, image_size: int = 28, instances: int = 20,
                   seed: int = 0, cache_dir: Optional[os.PathLike] = None,
                   progress: bool = True) -> Dict[str, ImageDataset]:
    """Draw (or load from the cache) one :class:`ImageDataset` per Hershey stroke family.

    Every class gets ``instances`` images; instance ``i`` is drawn from face ``i mod F`` among the
    ``F`` faces of the family that have the glyph, with its own jitter (deterministic given
    ``seed``, the family, the class and ``i``).

    Args:
        families: family names of :data:`STROKE_FAMILIES` (``"Script"``) or domain names
            (``"Hershey-Script"``); ``None`` for all, in :data:`STROKE_FAMILIES` order.
        image_size: side of the images.
        instances: images per class.
        seed: seed of the jitter.
        cache_dir: cache folder; default :func:`hyperflow_ext.cache_dir`.
        progress: show a tqdm progress bar while drawing.

    Returns:
        ``{"Hershey-<family>": ImageDataset}``. Each data set's ``meta`` holds ``faces``, ``glyphs``
        (the Hershey slot of each class) and the settings.

    Shape:
        - images of each data set: ``(classes * instances, 1, image_size, image_size)`` in ``[0, 1]``.

    Raises:
        TypeError: if ``families`` is a str or an integer argument is not an int.
        ValueError: if ``image_size < 8``, ``instances < 1``, ``seed < 0`` or a family is unknown.
    """
    fn = "stroke_domains"
    image_size = check_int(fn, "image_size", image_size, minimum=8)
    instances = check_int(fn, "instances", instances, minimum=1)
    seed = check_int(fn, "seed", seed, minimum=0)
    wanted = _resolve_families(fn, families)
    settings = _settings(image_size, instances, seed)
    path = domain_cache_file(cache_dir, "strokes", settings)
    domains: Optional[Dict[str, ImageDataset]] = None
    if path.is_file():
        try:
            domains = load_domains(path, settings)
        except (ValueError, KeyError) as exc:
            logger.warning("%s: ignoring unreadable cache %s (%s); redrawing", fn, path, exc)
    if domains is None:
        domains = _build(image_size, instances, seed, progress)
        save_domains(path, settings, domains)
        logger.info("%s: cached %d stroke families in %s", fn, len(domains), path)
    return {STROKE_PREFIX + f.name: domains[STROKE_PREFIX + f.name] for f in wanted}


def stroke_cache_path(image_size: int = 28, instances: int = 20, seed: int = 0,
                      cache_dir: Optional[os.PathLike] = None) -> Path:
    """Return the cache file :func:`stroke_domains` uses for these settings (it may not exist yet)."""
    return domain_cache_file(cache_dir, "strokes", _settings(image_size, instances, seed))


def _resolve_families(fn: str, families: Optional[Sequence[str]]) -> List[StrokeFamily]:
    if families is None:
        return list(STROKE_FAMILIES)
    if isinstance(families, str):
        raise TypeError(f"{fn}: families must be a sequence of family names, got the str {families!r}")
    by_name = {f.name: f for f in STROKE_FAMILIES}
    out = []
    for name in families:
        key = name[len(STROKE_PREFIX):] if isinstance(name, str) and name.startswith(STROKE_PREFIX) else name
        if key not in by_name:
            raise ValueError(f"{fn}: families must be among {sorted(by_name)} (optionally prefixed "
                             f"{STROKE_PREFIX!r}), got {name!r}")
        out.append(by_name[key])
    return out


@functools.lru_cache(maxsize=None)
def _face(name: str) -> Dict[str, Glyph]:
    """``{slot: pen paths}`` of one built-in Hershey face (blank slots dropped)."""
    try:
        from HersheyFonts import HersheyFonts
    except ImportError as exc:
        raise RuntimeError("stroke_domains: the Hershey stroke fonts are missing (import HersheyFonts "
                           f"failed: {exc}). Fix: pip install Hershey-Fonts (a 64 KB wheel, a dependency "
                           "of hyperflow).") from exc
    font = HersheyFonts()
    font.load_default_font(name)
    glyphs = {}
    for slot, glyph in font.all_glyphs.items():
        paths = tuple(tuple((float(x), float(y)) for x, y in s) for s in glyph.strokes if len(s))
        if paths:
            glyphs[slot] = paths
    return glyphs


def _classes(family: StrokeFamily) -> List[Tuple[str, List[Glyph]]]:
    """``[(class name, [pen paths of each face that has it])]`` for one family, duplicates dropped."""
    seen = set()
    classes: List[Tuple[str, List[Glyph]]] = []
    if family.glyphs == "symbols":
        seen.update(g for face in _LATIN_TEXT_FACES for g in _face(face).values())
        for face in family.faces:
            for slot, glyph in _face(face).items():
                if glyph not in seen:
                    seen.add(glyph)
                    classes.append((f"{face}:{_slot_name(slot)}", [glyph]))
        return classes
    slots = _LETTERS if family.glyphs == "letters" else sorted({s for f in family.faces for s in _face(f)})
    for slot in slots:
        drawn = [_face(f)[slot] for f in family.faces if slot in _face(f)]
        if not drawn or drawn[0] in seen or (family.glyphs == "all" and _points(drawn[0]) < 3):
            continue  # blank, a duplicate of an earlier slot, or a lone dot (placeholder)
        seen.add(drawn[0])
        classes.append((_slot_name(slot), drawn))
    return classes


def _points(glyph: Glyph) -> int:
    return sum(len(s) for s in glyph)


def _slot_name(slot: str) -> str:
    return slot if slot.isascii() and slot.isprintable() and not slot.isspace() else f"#{ord(slot)}"


def _build(image_size: int, instances: int, seed: int, progress: bool) -> Dict[str, ImageDataset]:
    plan = [(family, _classes(family)) for family in STROKE_FAMILIES]
    total = sum(len(classes) for _, classes in plan) * instances
    domains = {}
    with tqdm(total=total, desc="drawing strokes", unit="glyph", disable=not progress) as bar:
        for family, classes in plan:
            key = zlib.crc32(family.name.encode())
            images = np.empty((len(classes) * instances, image_size, image_size), dtype=np.uint8)
            for c, (_, faces) in enumerate(classes):
                for i in range(instances):
                    rng = np.random.default_rng([seed, key, c, i])
                    images[c * instances + i] = draw_strokes(faces[i % len(faces)], image_size, rng)
                bar.update(instances)
            labels = torch.arange(len(classes)).repeat_interleave(instances)
            meta = {"source": "hershey", "family": family.name, "faces": list(family.faces),
                    "image_size": image_size, "instances": instances, "seed": seed}
            name = STROKE_PREFIX + family.name
            domains[name] = ImageDataset(to_float(torch.from_numpy(images)), labels,
                                         [n for n, _ in classes], name, meta)
    return domains




def _settings(image_size: int, instances: int, seed: int) -> Dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    from PIL import __version__ as pillow_version

    try:
        hershey = version("Hershey-Fonts")
    except PackageNotFoundError:  # imported from a checkout rather than installed
        hershey = "unknown"
    return {"version": _CACHE_VERSION, "image_size": image_size, "instances": instances, "seed": seed,
            "families": [list(f) for f in STROKE_FAMILIES], "jitter": list(StrokeJitter()),
            "em": _EM, "margin": _MARGIN, "supersample": _SUPERSAMPLE,
            "hershey_fonts": hershey, "pillow": pillow_version}






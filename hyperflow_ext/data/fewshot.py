"""The few-shot benchmark on which adaptation can be seen: many meta-training domains of
different character, and targets on which tuning the backbone pays.

:func:`benchmark_domains` (the first benchmark) tests on printed scripts on which a Latin-trained
backbone already reaches 95-98 %, so no adaptation method can show its value there.
:func:`fewshot_benchmark` keeps its source (the Latin glyph script pretrains the backbone) and
widens the rest:

* **meta-training** (:data:`FEWSHOT_META`): the seven printed meta scripts and their 8x8 coarse
  scans, six Hershey stroke families drawn like handwriting (:mod:`.strokes`), and printed or
  stroke domains seen through the capture shifts :data:`META_SHIFTS` (:mod:`.shifts`);
* **targets** (:data:`FEWSHOT_TARGETS`): ``digits``; a held-out stroke family
  (:data:`HELD_OUT_FAMILIES`) and held-out scripts (:data:`HELD_OUT_SCRIPTS`), seen through
  capture shifts no meta domain shows (:data:`HELD_OUT_SHIFTS`: inversion, low contrast). On each,
  bias tuning beats direct transfer by at least 3 points at 5-way 5-shot (measured with
  ``benchmarks/fewshot_targets.py``); the unshifted held-out scripts and families do not qualify
  (saturated, or a smaller gain), which is why they are not targets.

A stroke family, script or shift used by a target is never meta-trained on.
:func:`domain_families` names the families a domain belongs to and :func:`leave_one_out` turns
the split into one fold of a leave-one-family-out table.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

from .benchmark import (BENCHMARK_AUGMENTATIONS, META_SCAN_SIDE, META_SCRIPTS, SOURCE_SCRIPTS, BenchmarkSplit,
                        meta_scans)
from .dataset import ImageDataset
from .digits import load_digits
from .glyphs import glyph_cache_path, glyph_domains
from .resolution import from_scans
from .shifts import apply_shift
from .strokes import STROKE_PREFIX, stroke_domains

__all__ = ["FEWSHOT_META", "FEWSHOT_TARGETS", "META_SHIFTS", "HELD_OUT_SHIFTS", "HELD_OUT_FAMILIES",
           "HELD_OUT_SCRIPTS", "STROKE_INSTANCES", "fewshot_benchmark", "domain_families", "families",
           "leave_one_out"]

STROKE_INSTANCES = 20
META_STROKES: Tuple[str, ...] = ("Roman", "Italic", "Script", "Greek", "Cyrillic", "Symbols")
HELD_OUT_FAMILIES: Tuple[str, ...] = ("Gothic", "Japanese")
META_SHIFTS: Tuple[str, ...] = ("rot", "flipx", "flipy", "blur", "noise", "scan8")
HELD_OUT_SHIFTS: Tuple[str, ...] = ("inv", "contrast")
HELD_OUT_SCRIPTS: Tuple[str, ...] = ("Hebrew", "Arabic", "Lao")

# Meta-training domains, in order: printed scripts, their coarse scans, stroke families, shifted domains.
_META_SHIFTED: Tuple[Tuple[str, str], ...] = (
    ("Georgian", "rot"), ("Armenian", "flipx"), ("Greek", "flipy"), ("Lisu", "blur"),
    ("OldItalic", "noise"), ("Hershey-Script", "blur"), ("Hershey-Greek", "noise"),
    ("Hershey-Cyrillic", "rot"), ("Hershey-Italic", "scan8"),
)
FEWSHOT_META: Tuple[str, ...] = (
    META_SCRIPTS + tuple(f"{s}@{META_SCAN_SIDE}px" for s in META_SCRIPTS)
    + tuple(STROKE_PREFIX + f for f in META_STROKES) + tuple(f"{d}~{s}" for d, s in _META_SHIFTED))
# Targets: (base domain, shifts applied in order or "").
# Each was measured to show adaptation (benchmarks/fewshot_targets.py, docs/fewshot-targets.md):
# bias tuning beats direct transfer by >= 3 points at 5-way 5-shot and direct transfer stays below
# ~93 %. The plain held-out families did not qualify (Gothic +2.5 points, Japanese saturated at 98 %).
_TARGETS: Tuple[Tuple[str, str], ...] = (
    ("digits", ""), ("Hershey-Gothic", "contrast"), ("Hebrew", "inv"), ("Lao", "inv"), ("Lao", "contrast"),
    ("Arabic", "contrast"),
)
FEWSHOT_TARGETS: Tuple[str, ...] = tuple(d if not s else f"{d}~" + s.replace("+", "~") for d, s in _TARGETS)
# Every printed script the glyph cache holds, in its fixed order (shared with benchmark_domains).
_RENDERED = ("Latin", "Greek", "Cyrillic", "Georgian", "CanadianSyllabics", "Armenian", "Hebrew", "Arabic", "Lao",
             "Lisu", "OldItalic")


def fewshot_benchmark(cache_dir: Optional[os.PathLike] = None, progress: bool = True,
                      image_size: int = 28, seed: int = 0) -> BenchmarkSplit:
    """Return the ``(source, meta, target)`` domains of the widened few-shot benchmark.

    Args:
        cache_dir: cache folder of the glyph renders and stroke drawings; default
            :func:`hyperflow_ext.cache_dir`.
        progress: show progress bars while rendering or drawing.
        image_size: side of all images.
        seed: seed of the random capture shifts (noise, contrast jitter).

    Returns:
        A :class:`~hyperflow_ext.data.BenchmarkSplit`: ``source`` is :data:`SOURCE_SCRIPTS` (what
        :func:`~hyperflow_ext.models.load_pretrained` trains on), ``meta`` the
        :data:`FEWSHOT_META` domains, ``target`` the :data:`FEWSHOT_TARGETS` domains, in those orders.

    Raises:
        ValueError: if the bundled fonts no longer cover one of the fixed scripts.
    """
    render = dict(image_size=image_size, augmentations=BENCHMARK_AUGMENTATIONS, seed=0, cache_dir=cache_dir)
    glyphs = glyph_domains(_RENDERED, progress=progress, **render)
    strokes = stroke_domains(None, image_size=image_size, instances=STROKE_INSTANCES, seed=0,
                             cache_dir=cache_dir, progress=progress)
    base: Dict[str, ImageDataset] = {**glyphs, **strokes}
    scans = meta_scans(glyphs, glyph_cache_path(**render))
    meta = {name: glyphs[name] for name in META_SCRIPTS}
    meta.update({f"{s}@{META_SCAN_SIDE}px": from_scans(glyphs[s], scans[s]) for s in META_SCRIPTS})
    meta.update({STROKE_PREFIX + f: strokes[STROKE_PREFIX + f] for f in META_STROKES})
    for domain, shift in _META_SHIFTED:
        shifted = apply_shift(base[domain], shift, seed=seed)
        meta[shifted.domain] = shifted
    target = {}
    for domain, shift in _TARGETS:
        ds = load_digits(image_size) if domain == "digits" else base[domain]
        ds = apply_shift(ds, shift, seed=seed) if shift else ds
        target[ds.domain] = ds
    return BenchmarkSplit(source={name: glyphs[name] for name in SOURCE_SCRIPTS}, meta=meta, target=target)


def domain_families(domain: str) -> Tuple[str, ...]:
    """Name the families a benchmark domain belongs to (what a leave-one-out fold holds out).

    A domain ``"<base>~<shift>~..."`` or ``"<base>@<side>px"`` belongs to its base's family and to
    one family per capture shift. Families are ``"strokes:<family>"`` for a Hershey family,
    ``"glyphs"`` for the printed scripts, ``"digits"``, ``"scan"`` for coarse scans (``@8px`` and
    ``~scan8``) and ``"shift:<name>"`` for any other shift.

    Example:
        >>> domain_families("Hershey-Script~blur")
        ('strokes:Script', 'shift:blur')
    """
    if not isinstance(domain, str) or not domain:
        raise ValueError(f"domain_families: domain must be a non-empty str, got {domain!r}")
    head, *shifts = domain.split("~")
    head, scanned = (head.split("@", 1)[0], True) if "@" in head else (head, False)
    if head.startswith(STROKE_PREFIX):
        out: List[str] = [f"strokes:{head[len(STROKE_PREFIX):]}"]
    elif head == "digits":
        out = ["digits"]
    else:
        out = ["glyphs"]
    if scanned:
        out.append("scan")
    for shift in shifts:
        name = "scan" if shift.startswith("scan") else f"shift:{shift}"
        if name not in out:
            out.append(name)
    return tuple(out)


def families(split: BenchmarkSplit) -> Tuple[str, ...]:
    """The families of ``split.meta``'s domains (see :func:`domain_families`), sorted: the folds of a
    leave-one-family-out table."""
    return tuple(sorted({f for d in split.meta for f in domain_families(d)}))


def leave_one_out(split: BenchmarkSplit, family: str) -> BenchmarkSplit:
    """One fold of a leave-one-family-out table: meta-train on every other family, test on ``family``.

    Args:
        split: a benchmark split, e.g. :func:`fewshot_benchmark`'s.
        family: one of :func:`families`\\ ``(split)`` (``"strokes:Script"``, ``"shift:blur"``, ...).

    Returns:
        A split with the same ``source``, ``meta`` without every domain of ``family``, and
        ``target`` holding exactly those domains.

    Raises:
        ValueError: if ``family`` names no meta-training family of ``split``, or holding it out would
            leave no meta-training domain.
    """
    known = families(split)
    if family not in known:
        raise ValueError(f"leave_one_out: family must be one of {list(known)}, got {family!r}")
    held = {d: ds for d, ds in split.meta.items() if family in domain_families(d)}
    meta = {d: ds for d, ds in split.meta.items() if d not in held}
    if not meta:
        raise ValueError(f"leave_one_out: holding out {family!r} leaves no meta-training domain")
    return BenchmarkSplit(source=dict(split.source), meta=meta, target=held)

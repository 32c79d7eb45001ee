"""Unicode scripts used as glyph domains: a name and the code-point ranges of its letters.

The order of :data:`SCRIPTS` is the priority order for homoglyph removal: a letter that looks like a
letter of an earlier script (Cyrillic ``А`` vs Latin ``A``) is dropped from the later one. Ranges
list letters only (no digits, punctuation, combining marks or presentation forms). A script the
bundled fonts do not cover simply renders nothing and is dropped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

__all__ = ["Script", "SCRIPTS", "script_by_name"]


@dataclass(frozen=True)
class Script:
    """A Unicode script as a glyph domain.

    Args:
        name: domain name (``"Latin"``).
        ranges: inclusive ``(first, last)`` code-point ranges of its letters.
    """

    name: str
    ranges: Tuple[Tuple[int, int], ...]

    def codepoints(self) -> List[int]:
        """All code points of the script, ascending, without duplicates."""
        return sorted({cp for first, last in self.ranges for cp in range(first, last + 1)})


SCRIPTS: Tuple[Script, ...] = (
    Script("Latin", ((0x0041, 0x005A), (0x0061, 0x007A))),
    Script("Greek", ((0x0391, 0x03A9), (0x03B1, 0x03C9))),
    Script("Cyrillic", ((0x0410, 0x044F),)),
    Script("Armenian", ((0x0531, 0x0556), (0x0561, 0x0586))),
    Script("Georgian", ((0x10A0, 0x10C5), (0x10D0, 0x10FA))),
    Script("Hebrew", ((0x05D0, 0x05EA),)),
    Script("Arabic", ((0x0621, 0x063A), (0x0641, 0x064A))),  # letters, without the tatweel U+0640
    Script("Lao", ((0x0E81, 0x0EAE),)),
    Script("Thai", ((0x0E01, 0x0E2E),)),
    Script("Devanagari", ((0x0905, 0x0939),)),
    Script("CanadianSyllabics", ((0x1401, 0x166C),)),
    Script("Lisu", ((0xA4D0, 0xA4F7),)),
    Script("OldItalic", ((0x10300, 0x1031E),)),
    Script("Ogham", ((0x1681, 0x169A),)),
    Script("Tifinagh", ((0x2D30, 0x2D67),)),
    Script("NKo", ((0x07CA, 0x07EA),)),
    Script("Cherokee", ((0x13A0, 0x13F4),)),
    Script("Runic", ((0x16A0, 0x16EA),)),
)

_BY_NAME: Dict[str, Script] = {s.name: s for s in SCRIPTS}


def script_by_name(name: str) -> Script:
    """Return the :class:`Script` called ``name``.

    Raises:
        ValueError: if no script has that name.
    """
    if name not in _BY_NAME:
        raise ValueError(f"script_by_name: name must be one of {sorted(_BY_NAME)}, got {name!r}")
    return _BY_NAME[name]

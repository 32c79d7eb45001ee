"""Small argument checks shared by the data loaders (messages name function, argument, expected, got)."""
from __future__ import annotations

import numbers

__all__ = ["check_int"]


def check_int(fn: str, name: str, value: object, minimum: int = 1) -> int:
    """Return ``value`` as an ``int`` if it is an integer ``>= minimum``.

    Raises:
        TypeError: if ``value`` is not an integer (``bool`` is rejected too).
        ValueError: if ``value < minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{fn}: {name} must be >= {minimum}, got {value}")
    return int(value)

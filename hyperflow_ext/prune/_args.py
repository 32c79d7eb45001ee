"""Argument checks and layer selection rules of :class:`~hyperflow_ext.prune.pruner.Pruner`."""
from __future__ import annotations

import fnmatch
import math
from typing import Any, Callable, Iterable, List, Optional, Type, Union

from torch import nn

__all__ = ["Rule", "finite_number", "as_rules", "matches", "unsupported_reason"]

Rule = Union[str, Type[nn.Module], Callable[[str, nn.Module], bool]]


def finite_number(op: str, name: str, value: Any, *, minimum: Optional[float] = None,
                  positive: bool = False) -> float:
    """``value`` as a finite ``float`` (``> 0`` with ``positive``, ``>= minimum`` if given); raise otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{op}: {name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{op}: {name} must be > 0, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value}")
    return value


def as_rules(op: str, name: str, rules: Union[None, Rule, Iterable[Rule]]) -> Optional[List[Rule]]:
    """``include=`` / ``exclude=`` as a list of rules (``None`` stays ``None``); ``TypeError`` for a bad entry."""
    if rules is None:
        return None
    if isinstance(rules, (str, type)) or (callable(rules) and not isinstance(rules, (list, tuple, set))):
        rules = [rules]
    out = list(rules)
    for r in out:
        if not (isinstance(r, str) or isinstance(r, type) or callable(r)):
            raise TypeError(f"{op}: {name} entries must be names/glob patterns, module types or callables "
                            f"(name, module) -> bool, got {type(r).__name__}")
    return out


def matches(name: str, module: nn.Module, rules: List[Rule]) -> bool:
    """True when any rule selects the module: its name (or a parent's, or a glob), its type, or a callable."""
    for r in rules:
        if isinstance(r, str):
            if name == r or name.startswith(r + ".") or fnmatch.fnmatchcase(name, r):
                return True
        elif isinstance(r, type):
            if isinstance(module, r):
                return True
        elif r(name, module):
            return True
    return False


def unsupported_reason(module: nn.Module) -> Optional[str]:
    """``None`` if ``module`` can be wrapped, else the reason it cannot."""
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return "an attention output projection (its weight is read directly, not through forward)"
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}"
        if isinstance(module.padding, str):
            return f"string padding {module.padding!r}"
    return None

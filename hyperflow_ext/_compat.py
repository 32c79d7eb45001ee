"""Names a package keeps answering for after they left its public surface (``__all__``).

A package whose ``__all__`` was trimmed (test oracles, experiment runners, data constants) still
resolves the old spelling, ``hf.data.META_SCRIPTS``, from the module that defines the name, with no
warning: code written against the old surface keeps working, while ``__all__``, ``dir()`` and the
documentation show only what users call.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping

__all__ = ["kept_names"]


def kept_names(package: str, where: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``package`` resolving each name of ``where`` from its module.

    Args:
        package: the package's ``__name__``.
        where: ``{name: module}``: a bare module name is relative to ``package`` (``"benchmark"`` for
            ``package + ".benchmark"``), a dotted one absolute (``"hyperflow_ext.sparse.fx_passes"``).

    Example::

        __getattr__ = kept_names(__name__, {"META_SCRIPTS": "benchmark"})
    """
    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module if "." in module else f"{package}.{module}"), name)

    return __getattr__

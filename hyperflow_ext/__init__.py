"""hyperflow: kernel-accelerated flow methods for PyTorch models.

* HyperFlow — gradient-free few-shot adaptation (:func:`fused_adapt`).
* Hyperflows — pruning by flow (:class:`Pruner`).
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import native  # noqa: E402  (never raises: a missing build is reported, not fatal)
from ._io import cache_dir  # noqa: E402

__all__ = ["__version__", "native", "cache_dir"]

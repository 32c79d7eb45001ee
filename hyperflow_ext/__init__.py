"""hyperflow: kernel-accelerated flow methods for PyTorch models.

* HyperFlow — gradient-free few-shot adaptation: :class:`HyperFlow`, :func:`fused_adapt`.
* Hyperflows — pruning by flow: :class:`Pruner`, :mod:`hyperflow_ext.prune`, sparse kernels in
  :mod:`hyperflow_ext.sparse`.

Sub-modules: :mod:`~hyperflow_ext.data` (embedded data sets and episodes),
:mod:`~hyperflow_ext.models` (backbones, ProtoNet, pretraining), :mod:`~hyperflow_ext.native`
(what the compiled extension holds), :mod:`~hyperflow_ext.measure` (wall time and peak memory of a call),
:mod:`~hyperflow_ext.testing` (the pure-PyTorch reference of every kernel).
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import native  # noqa: E402  (never raises: a missing build is reported, not fatal)
from . import data, distributed, flow, measure, models, prune, sparse  # noqa: E402
from . import testing  # noqa: E402
from ._io import cache_dir  # noqa: E402
from .flow import HyperFlow, fused_adapt  # noqa: E402
from .prune import Pruner  # noqa: E402

__all__ = ["__version__", "native", "data", "models", "flow", "prune", "sparse", "measure", "testing", "cache_dir",
           "HyperFlow", "fused_adapt", "Pruner"]

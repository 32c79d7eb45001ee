"""Old home of the masked training ops, kept so that ``from hyperflow_ext.sparse.masked import ...`` still
works: they live in :mod:`hyperflow_ext.prune.masked_ops` (pruning is their only user)."""
from __future__ import annotations

from ..prune.masked_ops import (masked_matmul, masked_matmul_grad_input,  # noqa: F401  (re-exported)
                                masked_matmul_grad_input_reference, masked_matmul_reference, score_mask)

__all__: list = []  # nothing new is defined here

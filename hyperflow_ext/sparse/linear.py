"""Sparse inference layers for exported (pruned) models.

``SparseLinear`` computes ``y = x @ Wᵀ + b`` with ``W`` stored in CSR (int32 indices when they
fit). Layout choice: for a batch, the native kernel transposes ``x`` once into a
``(in_features, batch)`` buffer and forms every output row as a sparse combination of its rows
(unit-stride SIMD over the batch, accumulators in registers), then writes a 16-row tile of the
result back as ``(batch, out_features)`` (register transposes); the transposed operand is cut
into panels of batch columns that stay in L2. For batch 1 it is a CSR mat-vec with AVX-512
gathers, a register of rows at a time. CSR of ``W``
(rows = output features) is exactly what this row-wise form needs, so no other format is kept.

``SparseConv2d`` (direct sparse convolution) lives in :mod:`hyperflow_ext.sparse.conv`. Both are
inference-only: no autograd.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .. import native
from ..backend import pick_backend
from .._checks import FLOAT_CODES, INDEX_CODES, check_tensor, stream_handle
from .csr import CSRBuffers, CSRMatrix, apply_mask, check_bias, index_dtype_for

__all__ = ["csr_linear", "csr_linear_reference", "SparseLinear"]


def _no_grad_input(op: str, x: torch.Tensor) -> None:
    if x.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError(f"{op} is inference-only (no autograd): call it under torch.no_grad() / "
                                  f"torch.inference_mode(), or pass x.detach()")


def csr_linear_reference(x: torch.Tensor, weight: CSRMatrix, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pure-torch reference: ``x @ weight.to_dense().T + bias``."""
    y = x @ weight.to_dense().T
    return y if bias is None else y + bias


def csr_linear(x: torch.Tensor, weight: CSRMatrix, bias: Optional[torch.Tensor] = None,
               backend: Optional[str] = None) -> torch.Tensor:
    """``y = x @ Wᵀ + bias`` with a CSR weight ``W`` of shape ``(out_features, in_features)``.

    Args:
        x: ``(*, in_features)``, same dtype and device as ``weight``; any strides.
        weight: :class:`CSRMatrix` ``(out_features, in_features)`` (validated at construction, and
            again after an in-place edit).
        bias: optional ``(out_features,)``.
        backend: ``"auto" | "native" | "torch"``.

    Shape:
        ``(*, in_features) -> (*, out_features)``.

    Raises:
        TypeError / ValueError: wrong kinds, dtypes, shapes or devices.
        NotImplementedError: ``x`` requires grad while autograd is enabled (inference only).

    Example:
        >>> w = CSRMatrix.from_dense(torch.randn(64, 32) * (torch.rand(64, 32) > 0.9))
        >>> csr_linear(torch.randn(8, 32), w).shape
        torch.Size([8, 64])
    """
    op = "csr_linear"
    if not isinstance(weight, CSRMatrix):
        raise TypeError(f"{op}: weight must be a CSRMatrix, got {type(weight).__name__}")
    weight.validate(op)  # O(1) unless the matrix was edited since its last check
    out_f, in_f = weight.shape
    values = weight.values
    device = values.device
    if not (isinstance(x, torch.Tensor) and x.dtype == values.dtype and x.device == device
            and x.layout == torch.strided):
        check_tensor(op, "x", x, dtypes=(values.dtype,), device=device)  # raises the precise error
    ndim = x.dim()
    if ndim < 1 or x.shape[-1] != in_f:
        raise ValueError(f"{op}: x must have {in_f} features in its last dimension (= columns of the weight), "
                         f"got shape {tuple(x.shape)}")
    if x.requires_grad:
        _no_grad_input(op, x)
    if bias is not None:
        bias = check_bias(op, bias, weight)
    if pick_backend(backend, device, op) == "torch":
        with torch.no_grad():
            return csr_linear_reference(x, weight, bias)
    x2 = x if ndim == 2 else x.reshape(math.prod(x.shape[:-1]), in_f)  # not -1: in_features may be 0
    batch = x2.shape[0]
    y = torch.empty((batch, out_f), dtype=values.dtype, device=device)
    if device.type == "cuda":
        x2 = x2.t().contiguous().t()  # (in, batch) storage: threads over the batch read coalesced
        mod, stream = native.cuda_module(), stream_handle(device)
    else:
        mod, stream = native.cpu_module(), 0
    rowptr, col = weight.crow_indices, weight.col_indices
    mod.csr_linear(rowptr=rowptr.data_ptr(), col=col.data_ptr(), val=values.data_ptr(), x=x2.data_ptr(),
                   bias=0 if bias is None else bias.data_ptr(), y=y.data_ptr(), batch=batch, in_=in_f, out=out_f,
                   nnz=col.shape[0], x_sb=x2.stride(0), x_si=x2.stride(1), ldy=max(1, out_f),
                   dtype=FLOAT_CODES[values.dtype], itype=INDEX_CODES[rowptr.dtype], stream=stream)
    return y if ndim == 2 else y.reshape(*x.shape[:-1], out_f)


class SparseLinear(CSRBuffers):
    """Inference-only ``nn.Linear`` replacement with a CSR weight.

    Args:
        weight: :class:`CSRMatrix` ``(out_features, in_features)``.
        bias: optional ``(out_features,)`` tensor (stored as a buffer).

    Shape:
        ``(*, in_features) -> (*, out_features)``.

    Example:
        >>> lin = nn.Linear(32, 64)
        >>> sp = SparseLinear.from_linear(lin, mask=torch.rand(64, 32) > 0.9)
        >>> with torch.inference_mode():
        ...     y = sp(torch.randn(8, 32))
    """

    def __init__(self, weight: CSRMatrix, bias: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        if not isinstance(weight, CSRMatrix):
            raise TypeError(f"SparseLinear: weight must be a CSRMatrix, got {type(weight).__name__}")
        self.out_features, self.in_features = weight.shape
        self._set_weight("SparseLinear", weight, bias)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> "SparseLinear":
        """Build from a dense ``(out_features, in_features)`` weight, keeping its exact nonzeros."""
        check_tensor("SparseLinear.from_dense", "weight", weight, dtypes=FLOAT_CODES, ndim=2)
        csr = CSRMatrix.from_dense(weight.detach(), index_dtype=index_dtype_for(*weight.shape, weight.numel()))
        return cls(csr, bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: Optional[torch.Tensor] = None) -> "SparseLinear":
        """Build from an ``nn.Linear``; ``mask`` (bool, weight-shaped) zeroes pruned weights first."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SparseLinear.from_linear: expected nn.Linear, got {type(linear).__name__}")
        w = apply_mask("SparseLinear.from_linear", linear.weight.detach(), mask)
        return cls.from_dense(w, None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return csr_linear(x, self.csr(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"density={self.density():.4f}")

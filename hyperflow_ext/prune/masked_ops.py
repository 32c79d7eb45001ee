"""Masked matmul ``X · (W⊙m)ᵀ`` and its input gradient, skipping masked entries: the kernels under
:func:`~hyperflow_ext.prune.functional.masked_linear` while a model is pruned.

The mask changes every training step, so nothing is precomputed: the native CPU kernel
compacts each mask row (or, for the input gradient, each 16-column slice of the mask) into its
active indices in the same pass that consumes them — 64 mask bytes per AVX-512 test — and
never materialises ``W⊙m``. The dense operand is transposed once into a ``(features, batch)``
buffer so every active weight is one unit-stride SIMD update over the batch.

A masked entry contributes exactly zero whatever its weight (NaN/Inf included), on every
back-end; a ``uint8`` mask counts any nonzero byte as active.

These ops lived in ``hyperflow_ext.sparse.masked`` before; that spelling (and
``hyperflow_ext.sparse.masked_matmul`` ...) still resolves here.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import native
from .._checks import FLOAT_CODES, check_tensor, row_major, same_dtype, stream_handle
from ..backend import pick_backend

__all__ = ["masked_matmul", "masked_matmul_grad_input", "masked_matmul_reference",
           "masked_matmul_grad_input_reference", "score_mask", "masked_weight"]

MASK_DTYPES = (torch.bool, torch.uint8)


def masked_weight(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``weight ⊙ mask`` as a new tensor, with masked entries exactly zero (NaN/Inf weights included).

    Args:
        weight: any shape, floating point.
        mask: ``weight``'s shape, bool or uint8 (nonzero = active).
    """
    return torch.where(mask.bool(), weight, torch.zeros((), dtype=weight.dtype, device=weight.device))


def masked_matmul_reference(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                            bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pure-torch reference: ``x @ (weight ⊙ mask).T + bias`` (materialises ``W⊙m``)."""
    y = x @ masked_weight(weight, mask).T
    return y if bias is None else y + bias


def masked_matmul_grad_input_reference(grad_out: torch.Tensor, weight: torch.Tensor,
                                       mask: torch.Tensor) -> torch.Tensor:
    """Pure-torch reference: ``grad_out @ (weight ⊙ mask)``."""
    return grad_out @ masked_weight(weight, mask)


def _check_weight_mask(op: str, weight: torch.Tensor, mask: torch.Tensor, device: torch.device):
    check_tensor(op, "weight", weight, dtypes=FLOAT_CODES, ndim=2, device=device)
    check_tensor(op, "mask", mask, dtypes=MASK_DTYPES, shape=tuple(weight.shape), device=device)
    if weight.shape[1] >= 2**31 or weight.shape[0] >= 2**31:
        raise ValueError(f"{op}: weight dimensions must be < 2**31, got {tuple(weight.shape)}")


def _native_operands(op: str, weight: torch.Tensor, mask: torch.Tensor):
    weight, ldw = row_major(op, "weight", weight.detach())
    mask = mask.contiguous()  # an input: copied once if it is a strided view
    mod = native.cuda_module() if weight.device.type == "cuda" else native.cpu_module()
    return mod, weight, ldw, mask


def masked_matmul(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                  bias: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> torch.Tensor:
    """``y = x @ (weight ⊙ mask)ᵀ + bias`` without materialising ``weight ⊙ mask``.

    Args:
        x: ``(batch, in_features)``, float32/float64, any strides.
        weight: ``(out_features, in_features)``, same dtype and device as ``x``.
        mask: ``(out_features, in_features)`` bool (or uint8: nonzero = active).
        bias: optional ``(out_features,)``.
        backend: ``"auto" | "native" | "torch"``.

    Shape:
        ``(batch, in_features) -> (batch, out_features)``.

    Returns:
        A new ``(batch, out_features)`` tensor; no autograd graph (see
        :func:`hyperflow_ext.prune.functional.masked_linear` for the differentiable op).

    Raises:
        TypeError / ValueError: wrong kinds, dtypes, shapes or devices.

    Example:
        >>> w, m = torch.randn(64, 32), torch.rand(64, 32) > 0.95
        >>> masked_matmul(torch.randn(8, 32), w, m).shape
        torch.Size([8, 64])
    """
    op = "masked_matmul"
    check_tensor(op, "x", x, dtypes=FLOAT_CODES, ndim=2)
    _check_weight_mask(op, weight, mask, x.device)
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"{op}: x must have {weight.shape[1]} columns (= in_features of weight), got {x.shape[1]}")
    same_dtype(op, x=x, weight=weight)
    if bias is not None:
        check_tensor(op, "bias", bias, dtypes=(x.dtype,), shape=(weight.shape[0],), device=x.device)
    if pick_backend(backend, x.device, op) == "torch":
        with torch.no_grad():
            return masked_matmul_reference(x, weight, mask, bias)
    mod, weight, ldw, mask = _native_operands(op, weight, mask)
    batch, (out_f, in_f) = x.shape[0], weight.shape
    y = torch.empty((batch, out_f), dtype=x.dtype, device=x.device)
    if bias is not None:
        bias = bias.contiguous()  # bound to a name: alive across the call
    mod.masked_matmul(x=x.data_ptr(), w=weight.data_ptr(), mask=mask.data_ptr(),
                      bias=0 if bias is None else bias.data_ptr(), y=y.data_ptr(), batch=batch, in_=in_f, out=out_f,
                      x_sb=x.stride(0), x_si=x.stride(1), ldw=ldw, ldy=max(1, out_f), dtype=FLOAT_CODES[x.dtype],
                      stream=stream_handle(x.device))
    return y


def masked_matmul_grad_input(grad_out: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                             backend: Optional[str] = None) -> torch.Tensor:
    """``grad_x = grad_out @ (weight ⊙ mask)`` — the input gradient of :func:`masked_matmul`.

    Args:
        grad_out: ``(batch, out_features)``, float32/float64, any strides.
        weight: ``(out_features, in_features)``, same dtype and device.
        mask: ``(out_features, in_features)`` bool (or uint8: nonzero = active).
        backend: ``"auto" | "native" | "torch"``.

    Shape:
        ``(batch, out_features) -> (batch, in_features)``.
    """
    op = "masked_matmul_grad_input"
    check_tensor(op, "grad_out", grad_out, dtypes=FLOAT_CODES, ndim=2)
    _check_weight_mask(op, weight, mask, grad_out.device)
    if grad_out.shape[1] != weight.shape[0]:
        raise ValueError(f"{op}: grad_out must have {weight.shape[0]} columns (= out_features of weight), "
                         f"got {grad_out.shape[1]}")
    same_dtype(op, grad_out=grad_out, weight=weight)
    if pick_backend(backend, grad_out.device, op) == "torch":
        with torch.no_grad():
            return masked_matmul_grad_input_reference(grad_out, weight, mask)
    mod, weight, ldw, mask = _native_operands(op, weight, mask)
    batch, (out_f, in_f) = grad_out.shape[0], weight.shape
    gx = torch.empty((batch, in_f), dtype=grad_out.dtype, device=grad_out.device)
    mod.masked_matmul_grad_input(g=grad_out.data_ptr(), w=weight.data_ptr(), mask=mask.data_ptr(), gx=gx.data_ptr(),
                                 batch=batch, in_=in_f, out=out_f, g_sb=grad_out.stride(0), g_so=grad_out.stride(1),
                                 ldw=ldw, ldgx=max(1, in_f), dtype=FLOAT_CODES[grad_out.dtype],
                                 stream=stream_handle(grad_out.device))
    return gx


def score_mask(scores: torch.Tensor, backend: Optional[str] = None) -> Tuple[torch.Tensor, int]:
    """``(scores >= 0, number of active entries)`` in one pass.

    Args:
        scores: float32/float64 tensor, any shape (copied once if not contiguous).
        backend: ``"auto" | "native" | "torch"``.

    Returns:
        A bool tensor shaped like ``scores`` and the count of ``True`` entries (a Python int;
        on CUDA reading it synchronises with the stream).
    """
    op = "score_mask"
    check_tensor(op, "scores", scores, dtypes=FLOAT_CODES)
    if pick_backend(backend, scores.device, op) == "torch":
        with torch.no_grad():
            mask = scores >= 0
            return mask, int(mask.sum())
    scores = scores.detach().contiguous()
    mask = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    count = torch.empty((1,), dtype=torch.int64, device=scores.device)
    mod = native.cuda_module() if scores.device.type == "cuda" else native.cpu_module()
    mod.score_mask(scores=scores.data_ptr(), mask=mask.data_ptr(), count=count.data_ptr(), n=scores.numel(),
                   dtype=FLOAT_CODES[scores.dtype], stream=stream_handle(scores.device))
    return mask, int(count.item())

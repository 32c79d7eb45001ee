"""Sparse inference layers for exported (pruned) models.

``SparseLinear`` computes ``y = x @ Wᵀ + b`` with ``W`` stored in CSR (int32 indices when they
fit). Layout choice: for a batch, the native kernel transposes ``x`` once into a
``(in_features, batch)`` buffer and forms every output row as a sparse combination of its rows
(unit-stride SIMD over the batch, accumulators in registers), then writes a 16-row tile of the
result back as ``(batch, out_features)`` (register transposes); the transposed operand is cut
into panels of batch columns that stay in L2. For batch 1 it is a CSR mat-vec with AVX-512
gathers, a register of rows at a time. CSR of ``W``
(rows = output features) is exactly what this row-wise form needs, so no other format is kept.

``SparseConv2d`` lowers the convolution with ``F.unfold`` (im2col) and multiplies the CSR
weight ``(out_channels, in_channels·kh·kw)`` with each sample's column matrix in one batched
native call. Both are inference-only: no autograd.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import native
from .._checks import FLOAT_CODES, INDEX_CODES, check_tensor, stream_handle
from .csr import CSRMatrix
from .masked import _pick_backend

__all__ = ["csr_linear", "csr_linear_reference", "csr_conv2d", "csr_conv2d_reference", "SparseLinear",
           "SparseConv2d"]

_Pair = Union[int, Tuple[int, int]]


def _no_grad_input(op: str, x: torch.Tensor) -> None:
    if x.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError(f"{op} is inference-only (no autograd): call it under torch.no_grad() / "
                                  f"torch.inference_mode(), or pass x.detach()")


def _check_bias(op: str, bias: Optional[torch.Tensor], n: int, weight: CSRMatrix) -> Optional[torch.Tensor]:
    if bias is None:
        return None
    check_tensor(op, "bias", bias, dtypes=(weight.dtype,), shape=(n,), device=weight.device)
    return bias.contiguous()


def csr_linear_reference(x: torch.Tensor, weight: CSRMatrix, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pure-torch reference: ``x @ weight.to_dense().T + bias``."""
    y = x @ weight.to_dense().T
    return y if bias is None else y + bias


def csr_linear(x: torch.Tensor, weight: CSRMatrix, bias: Optional[torch.Tensor] = None,
               backend: Optional[str] = None) -> torch.Tensor:
    """``y = x @ Wᵀ + bias`` with a CSR weight ``W`` of shape ``(out_features, in_features)``.

    Args:
        x: ``(*, in_features)``, same dtype and device as ``weight``; any strides.
        weight: :class:`CSRMatrix` ``(out_features, in_features)`` (validated at construction).
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
        bias = _check_bias(op, bias, out_f, weight)
    if _pick_backend(backend, device, op) == "torch":
        with torch.no_grad():
            return csr_linear_reference(x, weight, bias)
    x2 = x if ndim == 2 else x.reshape(-1, in_f)
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


def _conv_out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def csr_conv2d_reference(x: torch.Tensor, weight: CSRMatrix, kernel_size: Tuple[int, int],
                         bias: Optional[torch.Tensor] = None, stride: _Pair = 1, padding: _Pair = 0,
                         dilation: _Pair = 1) -> torch.Tensor:
    """Pure-torch reference: ``F.conv2d`` with the dense weight."""
    out_c, k = weight.shape
    kh, kw = kernel_size
    w = weight.to_dense().reshape(out_c, k // (kh * kw), kh, kw)
    return F.conv2d(x, w, bias, stride, padding, dilation)


def csr_conv2d(x: torch.Tensor, weight: CSRMatrix, kernel_size: Tuple[int, int], bias: Optional[torch.Tensor] = None,
               stride: _Pair = 1, padding: _Pair = 0, dilation: _Pair = 1,
               backend: Optional[str] = None) -> torch.Tensor:
    """2-D convolution (groups = 1) with a CSR weight ``(out_channels, in_channels·kh·kw)``.

    im2col (``F.unfold``) followed by one batched sparse × dense product per call.

    Args:
        x: ``(batch, in_channels, height, width)`` or unbatched ``(in_channels, height, width)``.
        weight: :class:`CSRMatrix`; column ``c·kh·kw + i·kw + j`` is input channel ``c``, tap ``(i, j)``
            (the layout of ``conv.weight.reshape(out_channels, -1)``).
        kernel_size, stride, padding, dilation: as :func:`torch.nn.functional.conv2d` (integers).
        bias: optional ``(out_channels,)``.
        backend: ``"auto" | "native" | "torch"``.

    Shape:
        ``(N, C, H, W) -> (N, out_channels, H_out, W_out)``.
    """
    op = "csr_conv2d"
    if not isinstance(weight, CSRMatrix):
        raise TypeError(f"{op}: weight must be a CSRMatrix, got {type(weight).__name__}")
    pair = nn.modules.utils._pair
    (kh, kw), stride, padding, dilation = pair(kernel_size), pair(stride), pair(padding), pair(dilation)
    out_c, kdim = weight.shape
    check_tensor(op, "x", x, dtypes=(weight.dtype,), device=weight.device)
    unbatched = x.dim() == 3
    if x.dim() not in (3, 4):
        raise ValueError(f"{op}: x must be (batch, channels, height, width) or (channels, height, width), "
                         f"got shape {tuple(x.shape)}")
    if unbatched:
        x = x.unsqueeze(0)
    if x.shape[1] * kh * kw != kdim:
        raise ValueError(f"{op}: x has {x.shape[1]} channels, but the weight has {kdim} columns "
                         f"(expected channels·{kh}·{kw})")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"{op}: stride and dilation must be >= 1 and padding >= 0, got stride={stride}, "
                         f"padding={padding}, dilation={dilation}")
    _no_grad_input(op, x)
    bias = _check_bias(op, bias, out_c, weight)
    hout = _conv_out_size(x.shape[2], kh, stride[0], padding[0], dilation[0])
    wout = _conv_out_size(x.shape[3], kw, stride[1], padding[1], dilation[1])
    if hout < 1 or wout < 1:
        raise ValueError(f"{op}: input {tuple(x.shape[2:])} is too small for kernel {(kh, kw)} with "
                         f"padding {padding} and dilation {dilation}")
    chosen = _pick_backend(backend, weight.device, op)
    with torch.no_grad():
        if chosen == "torch":
            y = csr_conv2d_reference(x, weight, (kh, kw), bias, stride, padding, dilation)
            return y.squeeze(0) if unbatched else y
        n = x.shape[0]
        cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride).contiguous()  # (N, K, L)
        length = cols.shape[2]
        y = torch.empty((n, out_c, length), dtype=x.dtype, device=x.device)
        mod = native.cuda_module() if x.device.type == "cuda" else native.cpu_module()
        mod.csr_spmm_batched(rowptr=weight.crow_indices.data_ptr(), col=weight.col_indices.data_ptr(),
                             val=weight.values.data_ptr(), b=cols.data_ptr(), out=y.data_ptr(), batch=n, rows=out_c,
                             k=kdim, n=length, nnz=weight.nnz, b_bs=kdim * length, ldb=max(1, length),
                             o_bs=out_c * length, ldo=max(1, length), dtype=FLOAT_CODES[weight.dtype],
                             itype=INDEX_CODES[weight.crow_indices.dtype], stream=stream_handle(x.device))
        if bias is not None:
            y.add_(bias.view(1, -1, 1))
        y = y.view(n, out_c, hout, wout)
    return y.squeeze(0) if unbatched else y


def _index_dtype(*dims: int) -> torch.dtype:
    return torch.int32 if max(dims, default=0) < 2**31 - 1 else torch.int64


class _CSRBuffers(nn.Module):
    """Holds a CSR weight as three buffers (so ``.to()``, ``state_dict`` and ``load_state_dict``
    work) and re-validates it whenever a buffer was replaced or modified in place."""

    def _set_csr(self, csr: CSRMatrix) -> None:
        self.register_buffer("crow_indices", csr.crow_indices)
        self.register_buffer("col_indices", csr.col_indices)
        self.register_buffer("values", csr.values)
        self._csr_shape = csr.shape
        self._csr_cache: Optional[Tuple[tuple, CSRMatrix]] = (self._csr_key(), csr)

    def _csr_key(self) -> tuple:
        # Identity + in-place version of each array: any replacement or in-place edit (to(),
        # load_state_dict, user code) changes it.
        c, i, v = self.crow_indices, self.col_indices, self.values
        return (id(c), c._version, id(i), i._version, id(v), v._version)

    def csr(self) -> CSRMatrix:
        """The weight as a validated :class:`CSRMatrix` (cached until a buffer changes)."""
        key = self._csr_key()
        if self._csr_cache is None or self._csr_cache[0] != key:
            csr = CSRMatrix(self.crow_indices, self.col_indices, self.values, self._csr_shape)
            self._csr_cache = (key, csr)
        return self._csr_cache[1]

    def density(self) -> float:
        return self.csr().density()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Another checkpoint of the same layer usually has another nnz: adopt its arrays (on our
        # device) instead of copying into ours; the next forward validates the new structure.
        device = self.values.device
        for name in ("crow_indices", "col_indices", "values", "bias"):
            t = state_dict.get(prefix + name)
            cur = self._buffers.get(name)
            if isinstance(t, torch.Tensor) and (cur is None or cur.shape != t.shape):
                dtype = self.values.dtype if name in ("values", "bias") else t.dtype
                self._buffers[name] = t.detach().to(device=device, dtype=dtype, copy=True)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class SparseLinear(_CSRBuffers):
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
        self._set_csr(weight)
        if bias is not None:
            _check_bias("SparseLinear", bias, self.out_features, weight)
            bias = bias.detach().contiguous()
        self.register_buffer("bias", bias)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> "SparseLinear":
        """Build from a dense ``(out_features, in_features)`` weight, keeping its exact nonzeros."""
        check_tensor("SparseLinear.from_dense", "weight", weight, dtypes=FLOAT_CODES, ndim=2)
        csr = CSRMatrix.from_dense(weight.detach(), index_dtype=_index_dtype(*weight.shape, weight.numel()))
        return cls(csr, bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: Optional[torch.Tensor] = None) -> "SparseLinear":
        """Build from an ``nn.Linear``; ``mask`` (bool, weight-shaped) zeroes pruned weights first."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SparseLinear.from_linear: expected nn.Linear, got {type(linear).__name__}")
        w = _apply_mask("SparseLinear.from_linear", linear.weight.detach(), mask)
        return cls.from_dense(w, None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return csr_linear(x, self.csr(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"density={self.density():.4f}")


class SparseConv2d(_CSRBuffers):
    """Inference-only ``nn.Conv2d`` replacement (groups = 1, zero padding) with a CSR weight.

    Args:
        weight: :class:`CSRMatrix` ``(out_channels, in_channels·kh·kw)``.
        in_channels, kernel_size, stride, padding, dilation: as ``nn.Conv2d`` (integer padding).
        bias: optional ``(out_channels,)``.

    Shape:
        ``(N, in_channels, H, W) -> (N, out_channels, H_out, W_out)``.
    """

    def __init__(self, weight: CSRMatrix, in_channels: int, kernel_size: _Pair, stride: _Pair = 1,
                 padding: _Pair = 0, dilation: _Pair = 1, bias: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        if not isinstance(weight, CSRMatrix):
            raise TypeError(f"SparseConv2d: weight must be a CSRMatrix, got {type(weight).__name__}")
        pair = nn.modules.utils._pair
        self.in_channels, self.out_channels = int(in_channels), weight.shape[0]
        self.kernel_size, self.stride = pair(kernel_size), pair(stride)
        self.padding, self.dilation = pair(padding), pair(dilation)
        if weight.shape[1] != self.in_channels * self.kernel_size[0] * self.kernel_size[1]:
            raise ValueError(f"SparseConv2d: weight must have in_channels·kh·kw = "
                             f"{self.in_channels * self.kernel_size[0] * self.kernel_size[1]} columns, "
                             f"got {weight.shape[1]}")
        self._set_csr(weight)
        if bias is not None:
            _check_bias("SparseConv2d", bias, self.out_channels, weight)
            bias = bias.detach().contiguous()
        self.register_buffer("bias", bias)

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, mask: Optional[torch.Tensor] = None) -> "SparseConv2d":
        """Build from an ``nn.Conv2d``; ``mask`` (bool, weight-shaped) zeroes pruned weights first.

        Raises:
            NotImplementedError: ``groups != 1``, a non-zero ``padding_mode`` or string padding.
        """
        op = "SparseConv2d.from_conv2d"
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"{op}: expected nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise NotImplementedError(f"{op}: groups={conv.groups} is not supported (only groups=1)")
        if conv.padding_mode != "zeros":
            raise NotImplementedError(f"{op}: padding_mode={conv.padding_mode!r} is not supported (only 'zeros')")
        if isinstance(conv.padding, str):
            raise NotImplementedError(f"{op}: string padding {conv.padding!r} is not supported; use integers")
        w = _apply_mask(op, conv.weight.detach(), mask)
        w2 = w.reshape(conv.out_channels, -1)
        csr = CSRMatrix.from_dense(w2, index_dtype=_index_dtype(*w2.shape, w2.numel()))
        return cls(csr, conv.in_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                   None if conv.bias is None else conv.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return csr_conv2d(x, self.csr(), self.kernel_size, self.bias, self.stride, self.padding, self.dilation)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, "
                f"density={self.density():.4f}")


def _apply_mask(op: str, w: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is None:
        return w
    check_tensor(op, "mask", mask, dtypes=(torch.bool, torch.uint8), shape=tuple(w.shape), device=w.device)
    return torch.where(mask.bool(), w, torch.zeros((), dtype=w.dtype, device=w.device))

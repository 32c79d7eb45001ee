"""CSR matrices, CSR × dense products on the native kernels, and the CSR weight of a sparse layer
(:class:`CSRBuffers`, the base of :class:`~hyperflow_ext.sparse.SparseLinear` and
:class:`~hyperflow_ext.sparse.SparseConv2d`)."""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
from torch import nn

from .. import native
from .._checks import (FLOAT_CODES, INDEX_CODES, check_csr, check_no_overlap, check_tensor, row_major,
                      stream_handle)

__all__ = ["CSRMatrix", "csr_spmm", "csr_spmm_reference"]


class CSRMatrix:
    """A validated compressed-sparse-row matrix.

    Structure (monotone row pointers, in-range column indices) is checked once here, so the
    per-call checks of :func:`csr_spmm` are O(1). The arrays stay mutable: every native entry
    point calls :meth:`validate`, which notices an in-place edit or a replaced array through
    torch's per-tensor version counter and re-runs the checks before a pointer reaches native
    code. Editing ``values`` in place is legal (the next product uses the new values). Index
    arrays made under ``torch.inference_mode`` keep no version counter, so the matrix keeps
    normal copies of those (``values`` is always shared).

    Args:
        crow_indices: ``(rows + 1,)`` int32/int64 row pointers.
        col_indices: ``(nnz,)`` column indices, same dtype.
        values: ``(nnz,)`` float32/float64.
        shape: ``(rows, cols)``.
    """

    def __init__(self, crow_indices: torch.Tensor, col_indices: torch.Tensor, values: torch.Tensor,
                 shape: Tuple[int, int]) -> None:
        rows, cols = (int(s) for s in shape)
        if rows < 0 or cols < 0:
            raise ValueError(f"CSRMatrix: shape must be non-negative, got {shape}")
        check_csr("CSRMatrix", crow_indices, col_indices, values, (rows, cols))
        if crow_indices.is_inference() or col_indices.is_inference():
            # Inference tensors keep no version counter, so later edits could not be noticed: own
            # normal copies of the index arrays (values may stay shared; their content is never unsafe).
            with torch.inference_mode(False):
                crow_indices, col_indices = crow_indices.clone(), col_indices.clone()
        self.crow_indices, self.col_indices, self.values = crow_indices, col_indices, values
        self.shape = (rows, cols)
        self._record()

    def _fingerprint(self) -> Optional[tuple]:
        """What the index checks depend on (None: an index array cannot be tracked).

        Index arrays: identity and in-place version (every write, ``resize_`` and ``set_`` bumps it)
        plus the address (``.data =`` does not bump it). ``values``: identity, address, shape and
        strides only, since editing its numbers is legal. The arrays seen at the last check are
        kept alive, so an ``id`` is never reused for a replacement.
        """
        c, i, v = self.crow_indices, self.col_indices, self.values
        try:
            return (id(c), c._version, c.data_ptr(), id(i), i._version, i.data_ptr(),
                    id(v), v.data_ptr(), v.shape, v.stride())
        except (AttributeError, RuntimeError):  # not a tensor, or an inference tensor assigned later
            return None

    def _record(self) -> None:
        self._checked = (self.crow_indices, self.col_indices, self.values)  # keeps the fingerprinted ids alive
        self._fp = self._fingerprint()

    def validate(self, op: str = "CSRMatrix") -> bool:
        """Re-check the arrays if any was edited in place or replaced since the last check.

        O(1) when nothing changed (about 1 µs); a replaced or resized ``values`` re-checks its
        shape, dtype and layout (O(1)); a change of an index array re-runs the O(nnz) index checks.

        Returns:
            True when checks ran (the structure may differ from the last call), False otherwise.

        Raises:
            TypeError / ValueError: as the constructor, naming ``op``.
        """
        fp = self._fingerprint()
        if fp is not None and fp == self._fp:
            return False
        if fp is not None and self._fp is not None and fp[:6] == self._fp[:6]:  # index arrays untouched
            check_tensor(op, "values", self.values, dtypes=FLOAT_CODES, shape=(self.col_indices.shape[0],),
                         device=self.crow_indices.device, contiguous=True)
        else:
            try:
                check_csr(op, self.crow_indices, self.col_indices, self.values, self.shape)
            except (TypeError, ValueError) as e:
                raise type(e)(f"{e} (the CSRMatrix was modified after construction)") from None
        self._record()
        return True

    @classmethod
    def from_dense(cls, dense: torch.Tensor, index_dtype: torch.dtype = torch.int64) -> "CSRMatrix":
        """Build from a 2-D dense tensor, keeping its exact nonzeros."""
        check_tensor("CSRMatrix.from_dense", "dense", dense, dtypes=FLOAT_CODES, ndim=2)
        if index_dtype not in INDEX_CODES:
            raise ValueError(f"CSRMatrix.from_dense: index_dtype must be int32 or int64, got {index_dtype}")
        with warnings.catch_warnings():  # torch flags CSR as beta on every conversion
            warnings.simplefilter("ignore", UserWarning)
            csr = dense.detach().to_sparse_csr()
        return cls(csr.crow_indices().to(index_dtype).contiguous(), csr.col_indices().to(index_dtype).contiguous(),
                   csr.values().contiguous(), tuple(dense.shape))

    @property
    def nnz(self) -> int:
        return int(self.col_indices.shape[0])

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def density(self) -> float:
        rows, cols = self.shape
        return self.nnz / max(1, rows * cols)

    def to_dense(self) -> torch.Tensor:
        return self.to_torch().to_dense()

    def to_torch(self) -> torch.Tensor:
        """The same matrix as a ``torch.sparse_csr_tensor`` (shares memory)."""
        self.validate("CSRMatrix.to_torch")
        return torch.sparse_csr_tensor(self.crow_indices, self.col_indices, self.values, self.shape,
                                       check_invariants=False)  # validated just above

    def to(self, device: torch.device | str) -> "CSRMatrix":
        return CSRMatrix(self.crow_indices.to(device), self.col_indices.to(device), self.values.to(device), self.shape)

    def __repr__(self) -> str:
        return (f"CSRMatrix(shape={self.shape}, nnz={self.nnz}, density={self.density():.4f}, "
                f"dtype={self.dtype}, device={self.device})")


def csr_spmm_reference(a: CSRMatrix, b: torch.Tensor) -> torch.Tensor:
    """Pure-torch reference: ``a.to_dense() @ b``."""
    return a.to_dense() @ b


def csr_spmm(a: CSRMatrix, b: torch.Tensor, out: Optional[torch.Tensor] = None,
             backend: Optional[str] = None) -> torch.Tensor:
    """Sparse × dense product ``out = A @ B``.

    Args:
        a: the sparse matrix, shape ``(rows, k)``.
        b: dense ``(k, n)``, same dtype and device as ``a``.
        out: optional ``(rows, n)`` output with unit column stride; must not overlap ``b`` or ``a``.
        backend: ``"auto"``, ``"native"`` or ``"torch"`` (see :func:`hyperflow_ext.native.resolve_backend`).

    Returns:
        ``(rows, n)`` dense tensor.

    Raises:
        TypeError / ValueError: wrong kinds, dtypes, shapes or devices, ``out`` overlapping an
            input, or ``a`` edited in place into an invalid matrix.
    """
    op = "csr_spmm"
    if not isinstance(a, CSRMatrix):
        raise TypeError(f"{op}: a must be a CSRMatrix, got {type(a).__name__}")
    a.validate(op)
    rows, k = a.shape
    check_tensor(op, "b", b, dtypes=(a.dtype,), ndim=2, device=a.device)
    if b.shape[0] != k:
        raise ValueError(f"{op}: b must have {k} rows (= columns of the matrix), got {b.shape[0]}")
    n = b.shape[1]
    if out is None:
        out = torch.empty((rows, n), dtype=a.dtype, device=a.device)
    else:
        check_tensor(op, "out", out, dtypes=(a.dtype,), shape=(rows, n), device=a.device)
        if (n > 1 and out.stride(1) != 1) or (rows > 1 and out.stride(0) < n):
            raise ValueError(f"{op}: out must have unit column stride and row stride >= {n}, got strides {out.stride()}")
        check_no_overlap(op, "out", out, b=b, crow_indices=a.crow_indices, col_indices=a.col_indices,
                         values=a.values)
    chosen = native.resolve_backend(backend, a.device, op, triton_ok=False)
    if chosen == "torch":
        return out.copy_(csr_spmm_reference(a, b))
    b, ldb = row_major(op, "b", b)
    mod = native.cuda_module() if a.device.type == "cuda" else native.cpu_module()
    mod.csr_spmm(rowptr=a.crow_indices.data_ptr(), col=a.col_indices.data_ptr(), val=a.values.data_ptr(),
                 b=b.data_ptr(), out=out.data_ptr(), rows=rows, k=k, n=n, nnz=a.nnz, ldb=ldb,
                 ldo=max(1, out.stride(0)), dtype=FLOAT_CODES[a.dtype], itype=INDEX_CODES[a.crow_indices.dtype],
                 stream=stream_handle(a.device))
    return out


# ----------------------------------------------------------------------------------------- a layer's CSR weight
def index_dtype_for(*sizes: int) -> torch.dtype:
    """``torch.int32`` when every size (rows, columns, element count) fits it, else ``torch.int64``: the index
    dtype of a layer's CSR weight built from a dense one."""
    return torch.int32 if max(sizes, default=0) < 2**31 - 1 else torch.int64


def check_bias(op: str, bias: Optional[torch.Tensor], weight: CSRMatrix) -> Optional[torch.Tensor]:
    """Check a bias of ``weight``'s rows (``(rows,)``, its dtype and device); return it contiguous (None stays None).

    Raises:
        TypeError / ValueError: naming ``op`` and ``bias``.
    """
    if bias is None:
        return None
    check_tensor(op, "bias", bias, dtypes=(weight.dtype,), shape=(weight.shape[0],), device=weight.device)
    return bias.contiguous()


def apply_mask(op: str, weight: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``weight`` with the entries where ``mask`` (bool or uint8, ``weight``'s shape) is zero set to exactly zero;
    ``weight`` itself when ``mask`` is None. What a sparse layer builds its CSR weight from (``from_linear`` ...)."""
    if mask is None:
        return weight
    check_tensor(op, "mask", mask, dtypes=(torch.bool, torch.uint8), shape=tuple(weight.shape), device=weight.device)
    return torch.where(mask.bool(), weight, torch.zeros((), dtype=weight.dtype, device=weight.device))


class CSRBuffers(nn.Module):
    """The base of the sparse inference layers: holds a CSR weight as three buffers (so ``.to()``,
    ``state_dict`` and ``load_state_dict`` work) and re-validates it whenever a buffer was replaced or
    modified in place. Subclasses call :meth:`_set_weight` in ``__init__`` and read :meth:`csr` in ``forward``."""

    def _set_weight(self, op: str, weight: CSRMatrix, bias: Optional[torch.Tensor]) -> None:
        """Register ``weight``'s arrays and ``bias`` (checked against ``weight``'s rows, or None) as buffers."""
        self._set_csr(weight)
        bias = check_bias(op, bias, weight)
        self.register_buffer("bias", None if bias is None else bias.detach())

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
        try:
            return (id(c), c._version, id(i), i._version, id(v), v._version)
        except RuntimeError:  # inference tensors (made under inference_mode) keep no version counter
            return (id(c), c.data_ptr(), id(i), i.data_ptr(), id(v), v.data_ptr())

    def csr(self) -> CSRMatrix:
        """The weight as a validated :class:`CSRMatrix` (cached until a buffer changes)."""
        key = self._csr_key()
        if self._csr_cache is None or self._csr_cache[0] != key:
            csr = CSRMatrix(self.crow_indices, self.col_indices, self.values, self._csr_shape)
            for name in ("crow_indices", "col_indices"):  # inference-mode buffers: adopt the tracked copies
                if getattr(csr, name) is not self._buffers[name]:
                    self._buffers[name] = getattr(csr, name)
            key = self._csr_key()
            self._csr_cache = (key, csr)
        return self._csr_cache[1]

    def density(self) -> float:
        """The fraction of the weight's entries stored (nonzeros / rows·columns)."""
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

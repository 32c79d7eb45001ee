"""Argument validation shared by every native wrapper.

Native code never sees a tensor, so everything that could make it read out of bounds is
checked here first. Messages name the operation and argument, expected vs actual.
"""
from __future__ import annotations

import numbers
from typing import Iterable, Optional, Sequence, Tuple

import torch

FLOAT_CODES = {torch.float32: 0, torch.float64: 1}
INDEX_CODES = {torch.int32: 0, torch.int64: 1}


def module_dtype(module: torch.nn.Module) -> Optional[torch.dtype]:
    """The dtype of the module's first floating parameter or buffer (``None`` if it has none): the
    dtype its inputs are cast to (:func:`as_model_input`)."""
    for t in (*module.parameters(), *module.buffers()):
        if t.dtype.is_floating_point:
            return t.dtype
    return None


def as_model_input(x: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """Floating ``x`` in ``dtype`` (a model's, NumPy hands over float64); anything else unchanged."""
    return x.to(dtype) if dtype is not None and x.dtype.is_floating_point and x.dtype != dtype else x


def as_class_labels(y: torch.Tensor) -> torch.Tensor:
    """Integer labels of any width (NumPy's int32) as int64; float and bool labels unchanged, for the
    checks that refuse them."""
    return y.long() if not y.dtype.is_floating_point and y.dtype != torch.bool else y


def check_tensor(op: str, name: str, t: object, *,
                 dtypes: Optional[Iterable[torch.dtype]] = None,
                 ndim: Optional[int] = None,
                 shape: Optional[Sequence[Optional[int]]] = None,
                 device: Optional[torch.device] = None,
                 contiguous: bool = False,
                 finite: bool = False) -> torch.Tensor:
    """Validate one tensor argument and return it unchanged.

    Raises:
        TypeError: ``t`` is not a tensor.
        ValueError: wrong dtype, rank, shape, device, layout or non-finite values.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise ValueError(f"{op}: {name} must be a dense (strided) tensor, got layout {t.layout}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise ValueError(f"{op}: {name} must have dtype in ({allowed}), got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{op}: {name} must have shape {want}, got {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, expected {device} (all operands on one device)")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous")
    if finite and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{op}: {name} contains NaN or Inf")
    return t


def same_dtype(op: str, **tensors: torch.Tensor) -> torch.dtype:
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{k}={str(v).replace('torch.', '')}" for k, v in dtypes.items())
        raise ValueError(f"{op}: operands must share one dtype, got {listing}")
    return next(iter(dtypes.values()))


def row_major(op: str, name: str, t: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """Return ``(t, leading_dim)`` for a 2-D tensor whose rows are unit-stride.

    Inputs (never ``out=``) with another layout are copied once.
    """
    if t.dim() != 2:
        raise ValueError(f"{op}: {name} must be 2-D, got shape {tuple(t.shape)}")
    if t.stride(1) != 1 or t.stride(0) < max(1, t.shape[1]):
        t = t.contiguous()
    return t, max(1, t.stride(0))


def stream_handle(device: torch.device) -> int:
    """The raw ``cudaStream_t`` of torch's current stream on ``device`` (0 on CPU)."""
    if device.type != "cuda":
        return 0
    return int(torch.cuda.current_stream(device).cuda_stream)


def check_csr(op: str, rowptr: torch.Tensor, col: torch.Tensor, val: torch.Tensor,
              shape: Tuple[int, int]) -> None:
    """Validate CSR arrays for a ``shape = (rows, cols)`` matrix (structure and index ranges)."""
    rows, cols = shape
    check_tensor(op, "crow_indices", rowptr, dtypes=INDEX_CODES, shape=(rows + 1,), contiguous=True)
    check_tensor(op, "col_indices", col, dtypes=INDEX_CODES, ndim=1, device=rowptr.device, contiguous=True)
    check_tensor(op, "values", val, dtypes=FLOAT_CODES, shape=(col.shape[0],), device=rowptr.device,
                 contiguous=True)
    if col.dtype != rowptr.dtype:
        raise ValueError(f"{op}: crow_indices and col_indices must share a dtype, got "
                         f"{rowptr.dtype} and {col.dtype}")
    nnz = col.shape[0]
    if int(rowptr[0]) != 0 or int(rowptr[-1]) != nnz:
        raise ValueError(f"{op}: crow_indices must start at 0 and end at nnz={nnz}, got "
                         f"{int(rowptr[0])} .. {int(rowptr[-1])}")
    if rows and bool((rowptr[1:] < rowptr[:-1]).any()):
        raise ValueError(f"{op}: crow_indices must be non-decreasing")
    if nnz and (int(col.min()) < 0 or int(col.max()) >= cols):
        raise ValueError(f"{op}: col_indices must lie in [0, {cols}), got range "
                         f"[{int(col.min())}, {int(col.max())}]")
    if rowptr.dtype == torch.int32 and nnz >= 2**31:
        raise ValueError(f"{op}: nnz={nnz} does not fit int32 indices")


def memory_span(t: torch.Tensor) -> Tuple[int, int]:
    """``[start, end)`` byte addresses that ``t``'s elements can touch (empty span for no elements)."""
    start = t.data_ptr()
    if t.numel() == 0:
        return start, start
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return start, start + (last + 1) * t.element_size()


def check_no_overlap(op: str, name: str, out: torch.Tensor, allow_same: Iterable[str] = (),
                     **inputs: Optional[torch.Tensor]) -> None:
    """Raise when the output ``out`` shares memory with any input (a kernel writing ``out`` would
    then read values it already overwrote).

    Bounds-based (as ``numpy.may_share_memory``): two views whose address ranges interleave without
    sharing an element are also refused. ``allow_same`` names inputs that ``out`` may be exactly
    (same address, shape and strides), for element-wise ops. ``None`` inputs are skipped.

    Raises:
        ValueError: naming ``name`` and the input it overlaps.
    """
    o0, o1 = memory_span(out)
    if o0 == o1:
        return
    allow = set(allow_same)
    for other, t in inputs.items():
        if t is None:
            continue
        t0, t1 = memory_span(t)
        if t0 < o1 and o0 < t1:
            if other in allow and t0 == o0 and t.shape == out.shape and t.stride() == out.stride() \
                    and t.dtype == out.dtype:
                continue
            same = " (it is the same tensor)" if t is out else ""
            raise ValueError(f"{op}: {name} overlaps the memory of {other}{same}; pass an output that shares "
                             f"no memory with the inputs")


def check_int(op: str, name: str, value: object, minimum: int = 1) -> int:
    """Return ``value`` as an ``int`` if it is an integer (a Python or NumPy int, not ``bool``) ``>= minimum``.

    Raises:
        TypeError: ``value`` is not an integer.
        ValueError: ``value < minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value}")
    return int(value)

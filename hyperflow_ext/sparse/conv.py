"""Direct sparse 2-D convolution for exported (pruned) CNNs.

:func:`csr_conv2d` computes ``act(conv2d(x, W) + bias)`` with ``W`` in CSR
``(out_channels, in_channels·kh·kw)`` and no im2col buffer. On CPU the native kernel copies the
input once, zero-padded (and, for stride > 1, split into stride phases), so that every kernel tap
is a constant offset; each output channel is then its CSR row times shifted contiguous input rows
(AVX-512 FMAs with register-resident accumulators), parallel over samples, lane tiles and blocks
of output channels (batch 1 uses every thread too). Small maps interleave up to 16 samples so the
SIMD lanes stay full. Bias and ReLU are fused into the epilogue. A 1x1 convolution with stride 1
and no padding is a plain CSR × dense product per sample and goes through the SpMM kernel.

Layout: the kernel reads any input strides and writes NCHW or channels-last output; NCHW maps are
packed row by row, channels-last ones (and channels-last output) by 16x16 register transposes. The
output follows the input's memory format unless ``channels_last`` says otherwise; exported models
write channels-last maps, because torch's CPU max-pool runs about 13x faster on them (measured:
``max_pool2d`` of a (32, 64, 32, 32) map, 10.1 ms NCHW vs 0.79 ms channels-last, 1 thread).
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import native
from ..backend import pick_backend
from .._checks import FLOAT_CODES, INDEX_CODES, check_tensor, stream_handle
from .csr import CSRBuffers, CSRMatrix, apply_mask, check_bias, index_dtype_for
from .linear import csr_linear

__all__ = ["csr_conv2d", "csr_conv2d_reference", "SparseConv2d", "conv_out_size"]

_Pair = Union[int, Tuple[int, int]]
_ALGOS = {"packed": 0, "direct": 1}


def conv_out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    """Output length of one spatial dimension, as :func:`torch.nn.functional.conv2d`."""
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _pair(op: str, name: str, v: _Pair, low: int) -> Tuple[int, int]:
    t = nn.modules.utils._pair(v)
    if len(t) != 2 or any(isinstance(a, bool) or not isinstance(a, int) or a < low for a in t):
        raise ValueError(f"{op}: {name} must be an int or a pair of ints >= {low}, got {v!r}")
    return int(t[0]), int(t[1])


def csr_conv2d_reference(x: torch.Tensor, weight: CSRMatrix, kernel_size: Tuple[int, int],
                         bias: Optional[torch.Tensor] = None, stride: _Pair = 1, padding: _Pair = 0,
                         dilation: _Pair = 1, relu: bool = False) -> torch.Tensor:
    """Pure-torch reference: ``F.conv2d`` with the dense weight (then ReLU when ``relu``)."""
    out_c, k = weight.shape
    kh, kw = nn.modules.utils._pair(kernel_size)
    w = weight.to_dense().reshape(out_c, k // (kh * kw), kh, kw)
    y = F.conv2d(x, w, bias, stride, padding, dilation)
    return torch.relu(y) if relu else y


def csr_conv2d(x: torch.Tensor, weight: CSRMatrix, kernel_size: _Pair, bias: Optional[torch.Tensor] = None,
               stride: _Pair = 1, padding: _Pair = 0, dilation: _Pair = 1, relu: bool = False,
               backend: Optional[str] = None, *, residual: Optional[torch.Tensor] = None,
               channels_last: Optional[bool] = None, batch_block: int = 0, algo: str = "packed",
               plans: Optional[Dict[tuple, Callable]] = None) -> torch.Tensor:
    """2-D convolution (groups = 1, zero padding) with a CSR weight; bias, a residual and ReLU fused:
    ``act(conv2d(x, W) + bias + residual)``.

    Args:
        x: ``(batch, in_channels, height, width)`` or unbatched ``(in_channels, height, width)``, same
            dtype (float32/float64) and device as ``weight``; any strides (NCHW is fastest).
        weight: :class:`CSRMatrix` ``(out_channels, in_channels·kh·kw)``; column ``c·kh·kw + i·kw + j`` is
            input channel ``c``, tap ``(i, j)`` (the layout of ``conv.weight.reshape(out_channels, -1)``).
        kernel_size, stride, padding, dilation: as :func:`torch.nn.functional.conv2d` (ints or pairs).
        bias: optional ``(out_channels,)``.
        relu: apply ``max(·, 0)`` to the result (NaN stays NaN, as ``torch.relu``).
        residual: optional tensor of the output's shape (any strides) added before the ReLU — a residual
            block's ``relu(conv(x) + shortcut)`` in one pass.
        backend: ``"auto" | "native" | "torch"``.
        channels_last: memory format of the output: ``True`` channels-last, ``False`` NCHW, ``None``
            (default) the input's (channels-last when ``x`` is, as ``F.conv2d``).
        batch_block: CPU tuning: samples interleaved in the packed input (0 = chosen per layer).
        algo: CPU: ``"packed"`` (production) or ``"direct"`` (the per-output body the CUDA kernel
            runs; slow, for tests).
        plans: a dict owned by the caller (a layer) that keeps the prepared call (sizes, strides, tap
            offsets) per input geometry; it must be cleared whenever ``weight`` changes.

    Shape:
        ``(N, C, H, W) -> (N, out_channels, H_out, W_out)``.

    Returns:
        The convolution, a new tensor.

    Raises:
        TypeError: ``weight`` is not a :class:`CSRMatrix`, ``x`` is not a tensor.
        ValueError: wrong dtype, device, rank, channel count, kernel arguments, or an input smaller
            than the (dilated) kernel.
        NotImplementedError: ``x`` requires grad while autograd is enabled (inference only).

    Example:
        >>> conv = nn.Conv2d(16, 32, 3, padding=1)
        >>> w = CSRMatrix.from_dense((conv.weight * (torch.rand_like(conv.weight) > 0.9)).reshape(32, -1))
        >>> csr_conv2d(torch.randn(2, 16, 8, 8), w, 3, conv.bias.detach(), padding=1, relu=True).shape
        torch.Size([2, 32, 8, 8])
    """
    op = "csr_conv2d"
    if not isinstance(weight, CSRMatrix):
        raise TypeError(f"{op}: weight must be a CSRMatrix, got {type(weight).__name__}")
    if weight.validate(op) and plans:  # edited since its last check: prepared calls hold stale tap offsets
        plans.clear()
    kh, kw = _pair(op, "kernel_size", kernel_size, 1)
    (sh, sw), (ph, pw), (dh, dw) = _pair(op, "stride", stride, 1), _pair(op, "padding", padding, 0), \
        _pair(op, "dilation", dilation, 1)
    if not isinstance(relu, bool):
        raise ValueError(f"{op}: relu must be a bool, got {relu!r}")
    if algo not in _ALGOS:
        raise ValueError(f"{op}: algo must be one of {tuple(_ALGOS)}, got {algo!r}")
    if channels_last is not None and not isinstance(channels_last, bool):
        raise ValueError(f"{op}: channels_last must be None or a bool, got {channels_last!r}")
    if isinstance(batch_block, bool) or not isinstance(batch_block, int) or batch_block < 0:
        raise ValueError(f"{op}: batch_block must be an int >= 0, got {batch_block!r}")
    out_c, kdim = weight.shape
    check_tensor(op, "x", x, dtypes=(weight.dtype,), device=weight.device)
    if x.dim() not in (3, 4):
        raise ValueError(f"{op}: x must be (batch, channels, height, width) or (channels, height, width), "
                         f"got shape {tuple(x.shape)}")
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    n, in_c, h, w = x.shape
    if in_c * kh * kw != kdim:
        raise ValueError(f"{op}: x has {in_c} channels, but the weight has {kdim} columns "
                         f"(expected channels·{kh}·{kw} = {in_c * kh * kw})")
    if x.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError(f"{op} is inference-only (no autograd): call it under torch.no_grad() / "
                                  f"torch.inference_mode(), or pass x.detach()")
    bias = check_bias(op, bias, weight)
    ho, wo = conv_out_size(h, kh, sh, ph, dh), conv_out_size(w, kw, sw, pw, dw)
    if h < 1 or w < 1 or ho < 1 or wo < 1:
        raise ValueError(f"{op}: input {(h, w)} is too small for kernel {(kh, kw)} with padding {(ph, pw)} "
                         f"and dilation {(dh, dw)}")
    if residual is not None:
        check_tensor(op, "residual", residual, dtypes=(weight.dtype,), device=weight.device,
                     shape=(out_c, ho, wo) if unbatched else (n, out_c, ho, wo))
        if unbatched:
            residual = residual.unsqueeze(0)
    run = _runner(x, weight, (kh, kw), bias, (sh, sw), (ph, pw), (dh, dw), relu, backend, batch_block, algo,
                  _is_channels_last(x) if channels_last is None else channels_last,
                  None if residual is None else residual.stride())
    if plans is not None and not unbatched:  # runners take 4-D inputs: the module looks up 4-D ones
        if len(plans) >= 16:
            plans.clear()
        plans[_plan_key(x, bias, backend, channels_last, residual)] = run
    y = run(x, residual)
    return y.squeeze(0) if unbatched else y


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _plan_key(x: torch.Tensor, bias: Optional[torch.Tensor], backend: Optional[str],
              channels_last: Optional[bool], residual: Optional[torch.Tensor] = None) -> tuple:
    """What a prepared call depends on besides the layer: the input's (and residual's) geometry, the
    bias's address and length (a ``resize_`` or a replaced bias misses), the output format and the back-end."""
    return (x.shape, x.stride(), x.dtype, x.device, None if bias is None else (bias.data_ptr(), bias.shape),
            backend, os.environ.get("HYPERFLOW_BACKEND"), channels_last,
            None if residual is None else (residual.shape, residual.stride(), residual.dtype, residual.device))


def _runner(x: torch.Tensor, weight: CSRMatrix, kernel: Tuple[int, int], bias: Optional[torch.Tensor],
            stride: Tuple[int, int], padding: Tuple[int, int], dilation: Tuple[int, int], relu: bool,
            backend: Optional[str], batch_block: int, algo: str,
            channels_last: bool, res_strides: Optional[Tuple[int, ...]] = None) -> Callable[..., torch.Tensor]:
    """A call for 4-D inputs of exactly x's geometry (validated by the caller): ``run(x[, residual]) -> y``.

    Everything but the input and output pointers is fixed here (sizes, strides, the batch block and the
    tap offsets), so a layer that sees one input geometry pays for the checks and the planning once.
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    n, in_c, h, w = x.shape
    out_c = weight.shape[0]
    ho, wo = conv_out_size(h, kh, sh, ph, dh), conv_out_size(w, kw, sw, pw, dw)
    dtype_, device = x.dtype, x.device
    shape = (n, out_c, ho, wo)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def torch_epilogue(y: torch.Tensor, r: Optional[torch.Tensor]) -> torch.Tensor:
        if r is not None:
            y = y.add_(r)
        return y.relu_() if relu else y

    if pick_backend(backend, weight.device, "csr_conv2d") == "torch":
        def run_torch(t: torch.Tensor, r: Optional[torch.Tensor] = None) -> torch.Tensor:
            with torch.no_grad():
                y = csr_conv2d_reference(t, weight, kernel, bias, stride, padding, dilation, False)
                return torch_epilogue(y.contiguous(memory_format=fmt), r)
        return run_torch
    if n == 0 or out_c == 0:
        return lambda t, r=None: torch.empty(shape, dtype=dtype_, device=device, memory_format=fmt)
    cuda = device.type == "cuda"
    mod = native.cuda_module() if cuda else native.cpu_module()
    itype, dtype = INDEX_CODES[weight.crow_indices.dtype], FLOAT_CODES[weight.dtype]
    if kh == kw == 1 and sh == sw == 1 and ph == pw == 0 and not cuda and algo == "packed":
        if channels_last:  # (N·H·W, C) rows: the CSR linear kernel, bias fused
            def run_1x1(t: torch.Tensor, r: Optional[torch.Tensor] = None) -> torch.Tensor:
                rows = t.permute(0, 2, 3, 1).reshape(-1, in_c)
                return torch_epilogue(csr_linear(rows, weight, bias).view(n, h, w, out_c).permute(0, 3, 1, 2), r)
            return run_1x1

        def run_1x1(t: torch.Tensor, r: Optional[torch.Tensor] = None) -> torch.Tensor:
            y = torch.empty(shape, dtype=dtype_, device=device)
            _conv1x1(mod, t, weight, y, dtype, itype)
            if bias is not None:
                y.add_(bias.view(1, -1, 1, 1))
            return torch_epilogue(y, r)
        return run_1x1
    ys = (ho * wo * out_c, 1, wo * out_c, out_c) if channels_last else (out_c * ho * wo, ho * wo, wo, 1)
    rs = res_strides if res_strides is not None else (0, 0, 0, 0)
    args = dict(rowptr=weight.crow_indices.data_ptr(), col=weight.col_indices.data_ptr(),
                val=weight.values.data_ptr(), x=0, bias=0 if bias is None else bias.data_ptr(), y=0, n=n, in_c=in_c,
                h=h, w=w, out_c=out_c, ho=ho, wo=wo, kh=kh, kw=kw, sh=sh, sw=sw, ph=ph, pw=pw, dh=dh, dw=dw,
                nnz=weight.nnz, xs_n=x.stride(0), xs_c=x.stride(1), xs_h=x.stride(2), xs_w=x.stride(3), ys_n=ys[0],
                ys_c=ys[1], ys_h=ys[2], ys_w=ys[3], res=0, rs_n=rs[0], rs_c=rs[1], rs_h=rs[2], rs_w=rs[3],
                batch_block=min(batch_block, n), off=0, algo=_ALGOS[algo],
                relu=relu, dtype=dtype, itype=itype, stream=stream_handle(device))
    offsets = None
    if not cuda and algo == "packed":
        args["batch_block"], offsets = _plan_offsets(mod, {**args, "x": 1, "y": 1}, weight.nnz)
        if offsets is not None:
            args["off"] = offsets.data_ptr()
    values = list(args.values())
    head, b_ptr, mid, tail = tuple(values[:3]), values[4], tuple(values[6:30]), tuple(values[31:])
    fn = mod.sparse_conv2d
    keep = (weight, bias, offsets)  # alive as long as the runner: the pointers above stay valid

    def run(t: torch.Tensor, r: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = torch.empty(shape, dtype=dtype_, device=device, memory_format=fmt)
        fn(*head, t.data_ptr(), b_ptr, y.data_ptr(), *mid, 0 if r is None else r.data_ptr(), *tail)
        return y

    run.keep = keep  # type: ignore[attr-defined]
    return run


def _plan_offsets(mod, kw: dict, nnz: int) -> Tuple[int, Optional[torch.Tensor]]:
    """The batch block the kernel picks for this geometry and its int32 tap offsets (None: 64-bit needed)."""
    nb = kw["batch_block"] or int(mod.sparse_conv2d_batch_block(**kw))
    off = torch.empty(max(1, nnz), dtype=torch.int32)
    ok = mod.sparse_conv2d_offsets(**{**kw, "batch_block": nb, "off": off.data_ptr()})
    return nb, (off if ok else None)


def _conv1x1(mod, x: torch.Tensor, weight: CSRMatrix, y: torch.Tensor, dtype: int, itype: int) -> None:
    """y[s] (out_c x HW) = W (out_c x C) @ x[s] (C x HW) with the batched CSR SpMM kernel."""
    n, c, h, w = x.shape
    if not (x.stride(3) == 1 and x.stride(2) == w) or x.stride(1) < h * w:
        x = x.contiguous()
    hw = h * w
    mod.csr_spmm_batched(rowptr=weight.crow_indices.data_ptr(), col=weight.col_indices.data_ptr(),
                         val=weight.values.data_ptr(), b=x.data_ptr(), out=y.data_ptr(), batch=n, rows=y.shape[1],
                         k=c, n=hw, nnz=weight.nnz, b_bs=x.stride(0), ldb=max(1, x.stride(1)), o_bs=y.stride(0),
                         ldo=max(1, hw), dtype=dtype, itype=itype, stream=0)


class SparseConv2d(CSRBuffers):
    """Inference-only ``nn.Conv2d`` replacement (groups = 1, zero padding) with a CSR weight.

    Runs :func:`csr_conv2d` (direct sparse convolution; bias and an optional ReLU fused into the
    epilogue) and keeps the kernel's per-nonzero tap offsets per input geometry.

    Args:
        weight: :class:`CSRMatrix` ``(out_channels, in_channels·kh·kw)``.
        in_channels, kernel_size, stride, padding, dilation: as ``nn.Conv2d`` (integer padding).
        bias: optional ``(out_channels,)``.
        relu: apply ReLU to the output (a fused ``Conv2d → ReLU``).
        channels_last: output memory format (``None``: the input's; see :func:`csr_conv2d`).

    Shape:
        ``(N, in_channels, H, W) -> (N, out_channels, H_out, W_out)``.

    Example:
        >>> conv = nn.Conv2d(16, 32, 3, padding=1)
        >>> sp = SparseConv2d.from_conv2d(conv, mask=torch.rand_like(conv.weight) > 0.9, relu=True)
        >>> with torch.inference_mode():
        ...     y = sp(torch.randn(2, 16, 8, 8))
    """

    def __init__(self, weight: CSRMatrix, in_channels: int, kernel_size: _Pair, stride: _Pair = 1,
                 padding: _Pair = 0, dilation: _Pair = 1, bias: Optional[torch.Tensor] = None,
                 relu: bool = False, channels_last: Optional[bool] = None) -> None:
        super().__init__()
        op = "SparseConv2d"
        if not isinstance(weight, CSRMatrix):
            raise TypeError(f"{op}: weight must be a CSRMatrix, got {type(weight).__name__}")
        if not isinstance(relu, bool):
            raise ValueError(f"{op}: relu must be a bool, got {relu!r}")
        self.in_channels, self.out_channels = int(in_channels), weight.shape[0]
        self.kernel_size, self.stride = _pair(op, "kernel_size", kernel_size, 1), _pair(op, "stride", stride, 1)
        self.padding, self.dilation = _pair(op, "padding", padding, 0), _pair(op, "dilation", dilation, 1)
        self.relu = relu
        #: set by :func:`~hyperflow_ext.sparse.fx_passes.fuse_residuals`: forward receives the residual of a rewritten graph
        self.residual_fused = False
        self._plans: Tuple[Optional[CSRMatrix], Dict[tuple, Callable]] = (None, {})
        self._checked_weight: Optional[tuple] = None  # _weight_key() of the last call that validated the weight
        self.channels_last = channels_last
        if weight.shape[1] != self.in_channels * self.kernel_size[0] * self.kernel_size[1]:
            raise ValueError(f"{op}: weight must have in_channels·kh·kw = "
                             f"{self.in_channels * self.kernel_size[0] * self.kernel_size[1]} columns, "
                             f"got {weight.shape[1]}")
        self._set_weight(op, weight, bias)

    @property
    def channels_last(self) -> Optional[bool]:
        """Output memory format: ``True`` channels-last, ``False`` NCHW, ``None`` the input's."""
        return self._channels_last

    @channels_last.setter
    def channels_last(self, value: Optional[bool]) -> None:
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"SparseConv2d: channels_last must be None or a bool, got {value!r}")
        self._channels_last = value  # part of the prepared calls' key: switching back and forth is free

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, mask: Optional[torch.Tensor] = None, relu: bool = False,
                    channels_last: Optional[bool] = None) -> "SparseConv2d":
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
        w = apply_mask(op, conv.weight.detach(), mask)
        return cls.from_dense(w, conv.stride, conv.padding, conv.dilation,
                              None if conv.bias is None else conv.bias.detach(), relu, channels_last)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, stride: _Pair = 1, padding: _Pair = 0, dilation: _Pair = 1,
                   bias: Optional[torch.Tensor] = None, relu: bool = False,
                   channels_last: Optional[bool] = None) -> "SparseConv2d":
        """Build from a dense ``(out_channels, in_channels, kh, kw)`` weight, keeping its exact nonzeros."""
        check_tensor("SparseConv2d.from_dense", "weight", weight, dtypes=FLOAT_CODES, ndim=4)
        out_c, in_c, kh, kw = weight.shape
        w2 = weight.detach().reshape(out_c, -1)
        csr = CSRMatrix.from_dense(w2, index_dtype=index_dtype_for(*w2.shape, w2.numel()))
        return cls(csr, in_c, (kh, kw), stride, padding, dilation, bias, relu, channels_last)

    def _weight_key(self) -> Optional[tuple]:
        """What the prepared calls depend on in the weight, read cheaply: the buffers are still the cached
        CSRMatrix's own arrays (same objects), with the in-place versions and addresses and the ``values``
        geometry of the last validated call (None: cannot tell, validate)."""
        b = self._buffers
        c, i, v, bias = b["crow_indices"], b["col_indices"], b["values"], b["bias"]
        cache = self._csr_cache
        csr = cache[1] if cache is not None else None
        if csr is None or csr.crow_indices is not c or csr.col_indices is not i or csr.values is not v:
            return None
        try:
            return (c._version, c.data_ptr(), i._version, i.data_ptr(), v.data_ptr(), v.shape, v.stride(),
                    None if bias is None else (id(bias), bias.data_ptr(), bias.shape))
        except RuntimeError:  # inference tensors keep no version counter
            return None

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``act(conv(x) + bias [+ residual])``; ``residual`` as in :func:`csr_conv2d`."""
        wkey = self._weight_key()
        if wkey is None or wkey != self._checked_weight:
            csr = self.csr()
            # A new or re-checked weight (an in-place edit, a replaced array): the prepared calls hold its
            # old pointers and tap offsets.
            if csr.validate("SparseConv2d") or self._plans[0] is not csr:
                self._plans = (csr, {})
            y = csr_conv2d(x, csr, self.kernel_size, self.bias, self.stride, self.padding, self.dilation,
                           self.relu, residual=residual, channels_last=self.channels_last, plans=self._plans[1])
            self._checked_weight = self._weight_key()  # the weight this call validated
            return y
        # Same weight as a validated call: look up the prepared call of x's geometry.
        if type(x) is torch.Tensor and x.dim() == 4 and x.layout == torch.strided:
            run = self._plans[1].get(_plan_key(x, self.bias, None, self._channels_last, residual))
            if run is not None:  # same geometry as a validated call: only the autograd check is per call
                if x.requires_grad and torch.is_grad_enabled():
                    raise NotImplementedError("csr_conv2d is inference-only (no autograd): call it under "
                                              "torch.no_grad() / torch.inference_mode(), or pass x.detach()")
                return run(x, residual)
        return csr_conv2d(x, self._plans[0], self.kernel_size, self.bias, self.stride, self.padding, self.dilation,
                          self.relu, residual=residual, channels_last=self.channels_last, plans=self._plans[1])

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, "
                f"relu={self.relu}, channels_last={self.channels_last}, density={self.density():.4f}")

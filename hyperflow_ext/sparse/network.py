"""One native call for a pruned CNN's feature extractor, depth-first over the batch.

Layer by layer, a batch's activations leave the cache between layers and every layer pays a Python
call, an allocation and a parallel region: at 98 % sparsity those costs, not the multiply-adds, set
the speed. :func:`~hyperflow_ext.sparse.fx_passes.fuse_network` replaces the longest supported chain at
the start of a model's ``torch.fx`` graph — :class:`~hyperflow_ext.sparse.SparseConv2d` layers (with their fused residuals),
max pools and a final global average pool — by one :class:`SparseConvNet` call. It runs each sample
through the whole chain before the next (its maps stay in the thread's cache-resident scratch),
samples in parallel across the native threads; a single sample uses every thread per convolution.

The convolutions stay the model's own modules (same names, same state dict): :class:`SparseConvNet`
looks them up by name on every call, and a program built for them (geometry, CSR pointers, tap
offsets) is rebuilt whenever one of their weights changes or a module was replaced. Inputs the native program does not cover
(autograd, CUDA, another dtype) take the same steps through the modules themselves.
"""
from __future__ import annotations

import operator
import threading
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import native
from .._checks import FLOAT_CODES, INDEX_CODES
from .._compat import kept_names
from .conv import SparseConv2d, conv_out_size
from .linear import SparseLinear

__all__ = ["SparseConvNet"]

# fuse_network, the graph pass that builds a SparseConvNet, lives with the other fx passes; the old spelling
# hyperflow_ext.sparse.network.fuse_network keeps resolving.
__getattr__ = kept_names(__name__, {"fuse_network": "hyperflow_ext.sparse.fx_passes"})

CONV, MAX_POOL, AVG_POOL, LINEAR = 0, 1, 2, 3
#: The fields of one native program step, one int64 each, in the order of ``struct ConvNetStep``
#: (csrc/include/hf_conv_net.h, which documents them): the kind; the slots read and written; the input and
#: output map of one sample; kernel, stride, padding, dilation; then the convolution's nonzeros, ReLU, CSR
#: arrays, bias and tap offsets (a dense head's weight goes in ``val``), and how it gets its packed input.
STEP_FIELDS = ("kind", "in", "res", "out", "c", "h", "w", "oc", "oh", "ow", "kh", "kw", "sh", "sw", "ph", "pw",
               "dh", "dw", "nnz", "relu", "rowptr", "col", "val", "bias", "off", "prepacked", "lane_pitch")
#: field name -> its column in a program's ``steps`` tensor
STEP_COLUMN = {name: i for i, name in enumerate(STEP_FIELDS)}
_GEOMETRY = ("kh", "kw", "sh", "sw", "ph", "pw", "dh", "dw")
_MAX_SLOTS = 64
# A single sample gets the whole thread team only above this many multiply-adds: waking a parallel
# region's idle workers costs more than splitting smaller programs saves (measured on the benchmark
# CNNs at batch 1, 2 threads: a 6 M multiply-add ResNet-style program ran 12 % faster on one thread,
# a 10 M VGG-style one 6 % faster on two).
TEAM_MULTIPLY_ADDS = 2_000_000


class NetStep(NamedTuple):
    """One step: ``kind``, the index of its module (convolution or linear head) among the call's
    modules (or -1), the values it reads (``inp``, ``res``: 0 is the network input, -1 none) and
    writes (``out``), and the pool's ``(kernel, stride)``."""

    kind: int
    module: int
    inp: int
    res: int
    out: int
    pool: Tuple[int, int, int, int] = (0, 0, 0, 0)


class _Program(NamedTuple):
    steps: torch.Tensor        # (nsteps, len(STEP_FIELDS)) int64
    slot_size: torch.Tensor    # (2, nslots) int64: bordered map sizes, then borders
    out_shape: Tuple[int, int, int]
    dtype: torch.dtype
    codes: Tuple[int, int]     # (float code, index code)
    modules: Tuple[nn.Module, ...]
    watch: Optional[tuple]     # (dict, name, tensor, version, address) of every tensor the modules hold (None: cannot tell)
    keep: tuple                # tensors whose addresses the program holds (offsets, CSR arrays)
    multiply_adds: int         # per sample (the convolutions' nonzeros times their output pixels)


class SparseConvNet(nn.Module):
    """A chain of sparse convolutions, pools and a linear head run as one native call (see the module docstring).

    Args:
        steps: the chain, in order (:class:`NetStep`); the last step's value is the output.
        layer_names: the names of the modules in the model, in the order the steps index them.

    Call it as ``net(x, *modules)`` with ``x`` ``(N, C, H, W)`` and the chain's modules
    (:class:`SparseConv2d` layers, an ``nn.Linear`` head) in the order the steps index them, or as
    ``net(x)`` once attached (:meth:`attach`) to the model that holds them (what :func:`~hyperflow_ext.sparse.fx_passes.fuse_network` does). Returns
    the value of the last step: ``(N, C', H', W')`` (NCHW), ``(N, C', 1, 1)`` after a global average
    pool, ``(N, out_features)`` after the head.
    """

    def __init__(self, steps: Sequence[NetStep], layer_names: Sequence[str] = ()) -> None:
        super().__init__()
        if not steps:
            raise ValueError("SparseConvNet: needs at least one step")
        self.steps = [NetStep(*s) for s in steps]
        self.layer_names = list(layer_names)  # the convolutions' names in the model (for save's manifest)
        self.single_sample_team = None
        self._programs: Dict[tuple, Optional[_Program]] = {}
        self._lock = threading.Lock()

    # deep copies and pickles drop the programs (raw pointers into the original's tensors) and the lock
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_programs"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_single_sample_team", None)
        self._lock = threading.Lock()

    @property
    def single_sample_team(self) -> Optional[bool]:
        """Whether a single sample runs on the whole thread team (True), on the calling thread (False), or
        as ``TEAM_MULTIPLY_ADDS`` decides (None); ``sparsify(example_input=)`` of one sample times both."""
        return self._single_sample_team

    @single_sample_team.setter
    def single_sample_team(self, value: Optional[bool]) -> None:
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"SparseConvNet: single_sample_team must be True, False or None, got {value!r}")
        self._single_sample_team = value

    def forward(self, x: torch.Tensor, *modules: nn.Module) -> torch.Tensor:
        if not modules:
            modules = self._resolve()
        prog = self._program(x, modules)
        if prog is None:
            return self.reference(x, modules)
        n = x.shape[0]
        y = torch.empty((n,) + prog.out_shape, dtype=x.dtype)
        team = self._single_sample_team
        if team is None:
            team = prog.multiply_adds > TEAM_MULTIPLY_ADDS
        threads = 1 if n == 1 and not team else 0  # 0: every thread OpenMP allows
        native.cpu_module().sparse_conv_net(prog.steps.data_ptr(), prog.steps.shape[0], prog.slot_size.data_ptr(),
                                            prog.slot_size.shape[1], x.data_ptr(), n, *x.stride(), y.data_ptr(),
                                            *prog.codes, threads)
        return y.view(n, -1) if self.steps[-1].kind == LINEAR else y

    def attach(self, root: nn.Module) -> None:
        """Look the modules up by :attr:`layer_names` in ``root`` on every call (``net(x)``): a module
        replaced there is seen at the next call, at a few dictionary look-ups per module."""
        self._root = (root,)  # a tuple: not registered as a submodule (no cycle in modules(), state_dict)
        self._paths = [tuple(name.split(".")) for name in self.layer_names]

    def _resolve(self) -> List[nn.Module]:
        root = getattr(self, "_root", None)
        if root is None:
            raise RuntimeError("SparseConvNet: call it with its modules, or attach() it to the model first")
        out = []
        for path in self._paths:
            m = root[0]
            for key in path:
                m = m._modules[key]
            out.append(m)
        return out

    def reference(self, x: torch.Tensor, modules: Sequence[nn.Module]) -> torch.Tensor:
        """The same steps through the modules and torch (any device, dtype or autograd mode)."""
        values: Dict[int, torch.Tensor] = {0: x}
        for s in self.steps:
            t = values[s.inp]
            if s.kind == CONV:
                values[s.out] = modules[s.module](t) if s.res < 0 else modules[s.module](t, values[s.res])
            elif s.kind == MAX_POOL:
                values[s.out] = F.max_pool2d(t, s.pool[:2], s.pool[2:])
            elif s.kind == AVG_POOL:
                values[s.out] = F.adaptive_avg_pool2d(t, 1)
            else:
                values[s.out] = modules[s.module](torch.flatten(t, 1))
        return values[self.steps[-1].out]

    # -- native programs ---------------------------------------------------------------------------
    def _program(self, x: torch.Tensor, modules: Sequence[nn.Module]) -> Optional[_Program]:
        """The native program for x's geometry and these modules, or None when x needs the reference path."""
        if type(x) is not torch.Tensor or x.dim() != 4 or x.layout != torch.strided or x.device.type != "cpu" \
                or x.dtype not in FLOAT_CODES or (x.requires_grad and torch.is_grad_enabled()) \
                or not native.available() or x.shape[0] == 0:
            return None
        key = (tuple(x.shape[1:]), x.dtype)
        prog = self._programs.get(key, False)
        if prog is not False and (prog is None or self._current(prog, modules)):
            return prog
        with self._lock:
            prog = self._build(x, modules)
            self._programs[key] = prog
        return prog

    @staticmethod
    def _current(prog: _Program, modules: Sequence[nn.Module]) -> bool:
        """Same modules, holding the same tensors at the same in-place versions and addresses. Every
        call pays this check, so it is a flat loop (each call runs with cold caches in a larger model)."""
        if prog.watch is None or len(modules) != len(prog.modules) or not all(map(operator.is_, modules, prog.modules)):
            return False
        for d, name, t, version, address in prog.watch:
            if d.get(name) is not t or (t is not None and (t._version != version or t.data_ptr() != address)):
                return False
        return True

    def _borders(self, modules: Sequence[nn.Module]) -> Dict[int, int]:
        """The zero border of each map slot, in order of precedence:

        1. read by a stride-1 convolution with square padding p: p, so that convolution reads the slot in place
           as its packed input (the first such reader decides);
        2. read as the residual of a convolution with square padding p: p, the border its output gets by rule 3,
           so the residual's rows have the pitch of the output's;
        3. read or written by a convolution with square padding p (any stride): p. A 3x3/p1 layer then writes
           rows whose pitch is its packed row width, and stores whole registers instead of masked row runs.
        Borders only place the maps; the results are the same under any choice.
        """
        def square_padding(s) -> Optional[int]:
            conv = modules[s.module]
            return int(conv.padding[0]) if conv.padding[0] == conv.padding[1] else None

        convs = [s for s in self.steps if s.kind == CONV]
        border: Dict[int, int] = {}
        for s in convs:
            if s.inp > 0 and s.inp not in border and tuple(modules[s.module].stride) == (1, 1) \
                    and square_padding(s) is not None:
                border[s.inp] = square_padding(s)
        for s in convs:
            if s.res > 0 and square_padding(s) is not None:
                border.setdefault(s.res, square_padding(s))
        for s in convs:
            for v in (s.inp, s.out):
                if v > 0 and square_padding(s) is not None:
                    border.setdefault(v, square_padding(s))
        return border

    def _build(self, x: torch.Tensor, modules: Sequence[nn.Module]) -> Optional[_Program]:
        kinds = {s.module: s.kind for s in self.steps if s.module >= 0}
        allowed = {CONV: (SparseConv2d,), LINEAR: (nn.Linear, SparseLinear)}
        if not all(type(modules[i]) in allowed[k] for i, k in kinds.items()):
            return None  # a layer swapped after export: run the modules
        shapes: Dict[int, Tuple[int, int, int]] = {0: tuple(x.shape[1:])}
        last_use = {}
        for i, s in enumerate(self.steps):
            last_use[s.inp] = i
            if s.res >= 0:
                last_use[s.res] = i
        border = self._borders(modules)
        built: List[Dict[str, int]] = []  # one {field: value} per step
        keep: List[torch.Tensor] = []
        codes = set()
        slot_of: Dict[int, int] = {0: 0}
        slot_size: List[int] = [0]
        slot_border: List[int] = [0]
        free: List[int] = []
        multiply_adds = 0
        mod = native.cpu_module()
        for i, s in enumerate(self.steps):
            c, h, w = shapes[s.inp]
            step = dict.fromkeys(STEP_FIELDS, 0)
            head = modules[s.module] if s.kind == LINEAR else None
            if s.kind == CONV or isinstance(head, SparseLinear):  # a sparse head is a 1x1 convolution of a 1x1 map
                conv = modules[s.module]
                csr = conv.csr()
                if s.kind == CONV:
                    in_c, relu, bias = conv.in_channels, conv.relu, conv.bias
                    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
                    oc = conv.out_channels
                else:
                    in_c, relu, bias = conv.in_features, False, conv.bias
                    kh = kw = sh = sw = dh = dw = 1
                    ph = pw = 0
                    oc = conv.out_features
                    if (h, w) != (1, 1):
                        return None
                if in_c != c or csr.values.dtype != x.dtype or csr.values.device.type != "cpu" \
                        or (bias is not None and bias.dtype != x.dtype):
                    return None
                oh, ow = conv_out_size(h, kh, sh, ph, dh), conv_out_size(w, kw, sw, pw, dw)
                if oh <= 0 or ow <= 0 or (s.res >= 0 and shapes[s.res] != (oc, oh, ow)):
                    return None
                col = csr.col_indices
                prev = built[-1] if built else None
                if s.kind == CONV and prev is not None and prev["kind"] == CONV and prev["in"] == slot_of[s.inp] \
                        and prev["prepacked"] == 0 and (kh, kw, sh, sw, ph, pw, dh, dw) == (1, 1, 2, 2, 0, 0, 1, 1) \
                        and tuple(prev[f] for f in _GEOMETRY) == (3, 3, 2, 2, 1, 1, 1, 1):
                    # A 1x1/s2 shortcut beside its block's 3x3/s2/p1 convolution on the same input is that
                    # geometry's centre tap: it reads the buffer the convolution just packed.
                    col = (col.to(torch.int64) * 9 + 4).to(col.dtype)
                    kh = kw = 3
                    ph = pw = 1
                    reuse = True
                else:
                    reuse = False
                prepacked = 2 if reuse else int(s.inp > 0 and (sh, sw) == (1, 1) and ph == pw == border.get(s.inp, -1))
                # Packed rows as wide as the output slot's rows (a stride-2 layer's natural width is one short
                # of them): the convolution then stores whole registers. A prepacked slot fixes its own width.
                natural = (w + 2 * pw + sw - 1) // sw
                pitch = ow + 2 * border.get(s.out, 0)
                lane_pitch = (prev["lane_pitch"] if reuse
                              else pitch if prepacked == 0 and natural < pitch <= natural + 2 else 0)
                off = torch.empty(max(1, csr.nnz), dtype=torch.int32)
                geometry = dict(rowptr=csr.crow_indices.data_ptr(), col=col.data_ptr(),
                                val=csr.values.data_ptr(), x=1, bias=0, y=1, n=1, in_c=c, h=h, w=w, out_c=oc, ho=oh,
                                wo=ow, kh=kh, kw=kw, sh=sh, sw=sw, ph=ph, pw=pw, dh=dh, dw=dw, nnz=csr.nnz, xs_n=0,
                                xs_c=h * w, xs_h=w, xs_w=1, ys_n=0, ys_c=oh * ow, ys_h=ow, ys_w=1, res=0, rs_n=0,
                                rs_c=0, rs_h=0, rs_w=0, batch_block=1, off=off.data_ptr(), algo=0, relu=relu,
                                dtype=FLOAT_CODES[x.dtype], itype=INDEX_CODES[csr.crow_indices.dtype], stream=0,
                                lane_pitch=lane_pitch)
                if not mod.sparse_conv2d_offsets(**geometry):
                    return None
                keep += [off, col, csr.crow_indices, csr.col_indices, csr.values] + ([bias] if bias is not None else [])
                codes.add((FLOAT_CODES[x.dtype], INDEX_CODES[csr.crow_indices.dtype]))
                multiply_adds += csr.nnz * oh * ow
                step.update(kh=kh, kw=kw, sh=sh, sw=sw, ph=ph, pw=pw, dh=dh, dw=dw, nnz=csr.nnz, relu=int(relu),
                            rowptr=csr.crow_indices.data_ptr(), col=col.data_ptr(), val=csr.values.data_ptr(),
                            bias=0 if bias is None else bias.data_ptr(), off=off.data_ptr(), prepacked=prepacked,
                            lane_pitch=lane_pitch)
            elif s.kind == MAX_POOL:
                kh, kw, sh, sw = s.pool
                if h < kh or w < kw:
                    return None
                oc, oh, ow = c, (h - kh) // sh + 1, (w - kw) // sw + 1
                step.update(kh=kh, kw=kw, sh=sh, sw=sw)
            elif s.kind == AVG_POOL:
                oc, oh, ow = c, 1, 1
            else:  # a dense head
                wt, bias = head.weight, head.bias
                if (h, w) != (1, 1) or head.in_features != c or wt.dtype != x.dtype or wt.device.type != "cpu" \
                        or not wt.is_contiguous() or (bias is not None and bias.dtype != x.dtype):
                    return None
                oc, oh, ow = head.out_features, 1, 1
                multiply_adds += c * oc
                keep += [wt] + ([bias] if bias is not None else [])
                step.update(val=wt.data_ptr(), bias=0 if bias is None else bias.data_ptr())  # oc x c row-major
            shapes[s.out] = (oc, oh, ow)
            for v in {s.inp, s.res} - {-1, 0}:  # maps read for the last time here are free for later steps
                if last_use.get(v) == i:
                    free.append(slot_of[v])
            b = border.get(s.out, 0)
            size = oc * (oh + 2 * b) * (ow + 2 * b)
            busy = (slot_of.get(s.inp), slot_of.get(s.res))
            fits = [f for f in free if slot_border[f] == b and slot_size[f] >= size and f not in busy]
            if fits:
                slot = fits[0]
                free.remove(slot)
            else:
                slot = len(slot_size)
                slot_size.append(size)
                slot_border.append(b)
            slot_of[s.out] = slot
            kind = CONV if isinstance(head, SparseLinear) else s.kind
            step.update({"kind": kind, "in": slot_of[s.inp], "res": slot_of[s.res] if s.res >= 0 else -1, "out": slot,
                         "c": c, "h": h, "w": w, "oc": oc, "oh": oh, "ow": ow})
            built.append(step)
        if len(codes) > 1 or len(slot_size) > _MAX_SLOTS:
            return None
        float_code = FLOAT_CODES[x.dtype]
        index_code = next(iter(codes))[1] if codes else INDEX_CODES[torch.int32]
        if any(len(st) != len(STEP_FIELDS) for st in built):  # a misspelt field name above
            raise AssertionError(f"SparseConvNet: step fields other than {STEP_FIELDS}: {built}")
        rows = [[st[name] for name in STEP_FIELDS] for st in built]
        return _Program(torch.tensor(rows, dtype=torch.int64), torch.tensor([slot_size, slot_border], dtype=torch.int64),
                        shapes[self.steps[-1].out], x.dtype, (float_code, index_code), tuple(modules),
                        _watch(modules), tuple(keep), multiply_adds)

    def extra_repr(self) -> str:
        kinds = [s.kind for s in self.steps]
        return (f"convs={kinds.count(CONV)}, max_pools={kinds.count(MAX_POOL)}, avg_pool={AVG_POOL in kinds}, "
                f"head={LINEAR in kinds}")


def _watch(modules: Sequence[nn.Module]) -> Optional[tuple]:
    """What :meth:`SparseConvNet._current` compares: each module's parameters and buffers (the program's
    pointers and offsets derive from them alone). None for inference tensors, which keep no version counter."""
    try:
        return tuple((d, name, t, 0 if t is None else t._version, 0 if t is None else t.data_ptr())
                     for m in modules for d in (m._parameters, m._buffers) for name, t in d.items())
    except RuntimeError:
        return None

"""Turn a (pruned) dense model into a stand-alone sparse inference model, and save / load it.

:func:`sparsify` rewrites a copy of a model for inference:

1. **BatchNorm folding.** An eval-mode ``BatchNorm2d`` (with running statistics) whose only input is a
   ``Conv2d`` that feeds nothing else is folded into the convolution: ``W' = W·γ/√(σ²+ε)``,
   ``b' = (b − μ)·γ/√(σ²+ε) + β``; the norm becomes ``nn.Identity``. Pruned weights stay exactly zero.
2. **ReLU fusion.** When the (folded) convolution's only consumer is a ReLU, the ReLU moves into the
   convolution's epilogue; a ``nn.ReLU`` module used only there becomes ``nn.Identity`` (a functional
   ``F.relu`` stays in ``forward`` and is then a no-op, so fusing is always safe).
   The structure is read from a ``torch.fx`` trace (one per call, shared by every graph pass of
   :mod:`~hyperflow_ext.sparse.fx_passes`); a model that does not trace falls back to consecutive children
   of ``nn.Sequential`` containers.
   **Residual fusion**: ``relu(conv(x) + r)`` (a residual block's last convolution, its norm folded,
   ``r`` not computed from the convolution) becomes one call ``conv(x, r)`` that adds ``r`` and applies
   the ReLU in the kernel's epilogue; the model is then returned as a ``torch.fx.GraphModule`` (same
   module names and state dict), and :func:`load` re-applies the same rewrite.
3. **Sparse or dense, by measurement.** Each selected ``Conv2d`` / ``Linear`` becomes a
   :class:`~hyperflow_ext.sparse.SparseConv2d` (writing channels-last maps, on which torch's CPU pooling
   is much faster) / :class:`~hyperflow_ext.sparse.SparseLinear`. With an
   ``example_input`` the layer is also timed both ways on its real input shape, interleaved, at the
   current thread count: **the layer stays dense when the dense median time is below the sparse
   median** (ties go to sparse). Dense convolutions keep the fused ReLU (:class:`DenseConv2d`). Without
   an example input, a layer denser than its ISA path's measured threshold stays dense (``dense_above``).
4. **Depth-first execution.** The chain of sparse convolutions, pools and the linear head at the start
   of the network runs as one native call that takes each sample through every layer while its maps are
   in cache (:mod:`~hyperflow_ext.sparse.network`). With an ``example_input`` it is timed against
   layer-by-layer execution (interleaved) and kept only when its median is not slower; without one it
   is always used. CPU only: CUDA inputs run the same layers one call each.

5. **Never slower than dense.** With an ``example_input`` the whole export is finally timed against the
   dense model in both layouts and against the folded all-dense model; the fastest is returned
   (:mod:`._dense_guard`).

Every decision is returned as a per-layer report (:func:`format_report` prints it), each record with
the ``reason`` for its kind.

:func:`~hyperflow_ext.sparse.save` / :func:`~hyperflow_ext.sparse.load` (:mod:`.serialize`) write the result
to one safetensors file and rebuild it with no pickle and no :class:`~hyperflow_ext.prune.Pruner`.
"""
from __future__ import annotations

import copy
import logging
import statistics
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

import torch
from torch import fx, nn

from .. import native
from ..measure import interleaved_times
from ._dense_guard import dense_above as dense_threshold
from ._dense_guard import keep_faster_than_dense
from .conv import SparseConv2d
from .fx_passes import conv_chains, fuse_network, fuse_residuals, sequential_chains, set_module, trace
from .linear import SparseLinear
from .network import SparseConvNet

__all__ = ["DenseConv2d", "fold_batchnorm", "sparsify", "format_report", "FORMAT", "CollapsedLayerWarning"]

logger = logging.getLogger(__name__)


class CollapsedLayerWarning(RuntimeWarning):
    """A layer being exported has no nonzero weight left: its output no longer depends on its input,
    so the exported network ignores its input from there on (pruned to death, not compressed)."""

FORMAT = "hyperflow-sparse/1"


class DenseConv2d(nn.Conv2d):
    """``nn.Conv2d`` with an optional fused ReLU: the dense layer an export keeps where sparse is slower."""

    def __init__(self, *args: Any, relu: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.relu = bool(relu)

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, relu: bool = False) -> "DenseConv2d":
        """A copy of ``conv`` (same weights) that applies ReLU when ``relu``."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, conv.bias is not None, conv.padding_mode, relu=relu,
                  device=conv.weight.device, dtype=conv.weight.dtype)
        new.load_state_dict(conv.state_dict())
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y.relu_() if self.relu else y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", relu={self.relu}"


# ----------------------------------------------------------------------------------------- BatchNorm folding
def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new ``nn.Conv2d`` computing ``bn(conv(x))`` of an eval-mode ``bn`` (zeros stay exactly zero)."""
    with torch.no_grad():
        w = conv.weight
        inv = torch.rsqrt(bn.running_var.to(torch.float64) + bn.eps)
        scale = (bn.weight.to(torch.float64) * inv) if bn.weight is not None else inv
        shift = -bn.running_mean.to(torch.float64) * scale
        if bn.bias is not None:
            shift = shift + bn.bias.to(torch.float64)
        if conv.bias is not None:
            shift = shift + conv.bias.to(torch.float64) * scale
        fused = copy.deepcopy(conv)
        fused.weight.copy_((w.to(torch.float64) * scale.view(-1, 1, 1, 1)).to(w.dtype))
        fused.bias = nn.Parameter(shift.to(w.dtype), requires_grad=False)
    return fused


# ----------------------------------------------------------------------------------------- sparsify
def _time_pair(a: nn.Module, b: nn.Module, x: torch.Tensor, budget_s: float, min_rounds: int = 7,
               max_rounds: int = 50) -> Tuple[float, float]:
    """Median seconds of a(x) and b(x), timed interleaved."""
    with torch.inference_mode():
        times, _ = interleaved_times([lambda: a(x), lambda: b(x)], budget_s, min_rounds=min_rounds,
                                     max_rounds=max_rounds)
    return statistics.median(times[0]), statistics.median(times[1])


def sparsify(model: nn.Module, example_input: Optional[torch.Tensor] = None, *,
             layers: Optional[Iterable[str]] = None, fold_bn: bool = True, fuse_relu: bool = True,
             time_budget_s: float = 0.1, inplace: bool = False,
             depth_first: bool = True, dense_above: Any = "auto",
             never_slower: bool = True) -> Tuple[nn.Module, List[Dict[str, Any]]]:
    """Fold BatchNorm, fuse ReLU and replace layers by sparse kernels (or keep them dense if faster).

    Args:
        model: the dense model, its pruned weights exactly zero (e.g. ``W⊙m``).
        example_input: a representative input; when given, each layer is timed sparse vs dense on its
            real input shape and kept dense when that is faster (see the module docstring).
        layers: names of the ``Conv2d`` / ``Linear`` modules to make sparse (default: all of them with
            ``groups == 1`` and zero padding mode); other convolutions are still BN-folded and fused.
        fold_bn: fold eval-mode ``BatchNorm2d`` into the preceding convolution.
        fuse_relu: fuse a following ReLU (and a residual add before it, see
            :func:`~hyperflow_ext.sparse.fx_passes.fuse_residuals`)
            into the convolution's epilogue.
        time_budget_s: timing budget per layer (interleaved rounds, at least 7 each); with
            ``example_input`` the whole model is also timed with channels-last vs NCHW maps.
        inplace: rewrite ``model`` itself instead of a deep copy.
        depth_first: run the chain of sparse convolutions, pools and head at the start of the network as
            one native call, depth-first over the batch (:func:`~hyperflow_ext.sparse.fx_passes.fuse_network`);
            with ``example_input``, only when that times faster than layer by layer. A convolution that
            timed faster dense on its own but ends the chain early is also tried sparse inside the
            program, and the faster whole model is kept.
        dense_above: without ``example_input``, a selected layer whose density is above this stays dense:
            ``"auto"`` (default) the active ISA path's measured threshold
            (:data:`~hyperflow_ext.sparse._dense_guard.DENSITY_THRESHOLDS`), a number in [0, 1], or ``None``
            to make every selected layer sparse. Ignored with ``example_input`` (then everything is timed,
            and the whole model is kept dense when the dense model is faster).
        never_slower: with ``example_input``, finally time the whole export against the dense model (NCHW
            and channels-last) and the folded all-dense model, and return the fastest (step 5 above).

    Returns:
        ``(sparse_model, report)``: the model (a ``torch.fx.GraphModule`` when a residual was fused) in
        eval mode with gradients off, and one dict per converted layer (``name, layer, kind, density,
        bn, relu, collapsed, residual, depth_first, sparse_ms, dense_ms, speedup, reason`` and, when timed,
        ``channels_last``).

    Warns:
        CollapsedLayerWarning: a convolution or linear layer has no nonzero weight left (a layer pruned
            to zero makes a dead network); the layers are named, and flagged ``collapsed`` in the report.

    Example:
        >>> sparse_model, report = sparsify(model.eval(), torch.randn(32, 3, 32, 32))
        >>> print(format_report(report))

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``layers`` names a module that is not a ``Conv2d`` / ``Linear``.
    """
    op = "sparsify"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{op}: model must be a torch.nn.Module, got {type(model).__name__}")
    retry = depth_first and example_input is not None
    # the retry and the dense referees need the model as given
    original = copy.deepcopy(model) if example_input is not None and inplace else model
    threshold = None if example_input is not None else dense_threshold(dense_above)
    work = (model if inplace else copy.deepcopy(model)).eval()
    # One trace serves every conversion below (each rewrites a copy of the same model) and every pass of each.
    graph = trace(work)
    if graph is None:
        logger.info("sparsify: no fx graph; folding within nn.Sequential only")
    settings = dict(graph=graph, example_input=example_input, layers=layers, fold_bn=fold_bn, fuse_relu=fuse_relu,
                    time_budget_s=time_budget_s, depth_first=depth_first, dense_above=threshold)
    out, report, collapsed = _convert(work, **settings)
    dense_convs = {r["name"] for r in report if r["kind"] == "dense" and r["layer"] == "Conv2d"}
    if retry and dense_convs:
        # Timed alone, a small layer can be faster dense, but as the only dense layer it ends the
        # depth-first chain there: try it sparse, and keep whichever whole model is faster.
        alt, alt_report, _ = _convert(copy.deepcopy(original), keep_sparse=dense_convs,
                                      **settings)
        fused = sum(r["depth_first"] for r in report)
        if sum(r["depth_first"] for r in alt_report) > fused and _faster(alt, out, example_input, time_budget_s):
            logger.info("sparsify: kept %s sparse inside the depth-first program", sorted(dense_convs))
            out, report = alt, alt_report
            for r in report:
                if r["name"] in dense_convs:
                    r["reason"] = "faster dense alone, but kept sparse: the depth-first program then runs further"
    if example_input is not None and never_slower:
        out, _ = keep_faster_than_dense(
            original, out, report, example_input, budget_s=time_budget_s,
            all_dense=lambda: _convert(copy.deepcopy(original), **{**settings, "example_input": None, "layers": [],
                                                                   "depth_first": False})[0])
    if collapsed:
        warnings.warn(f"{op}: layer(s) {', '.join(collapsed)} have no nonzero weight left (pruned to zero): their "
                      f"output no longer depends on their input, so the exported network ignores its input there; "
                      f"prune less, or leave these layers out of pruning", CollapsedLayerWarning, stacklevel=2)
    logger.debug("sparsify:\n%s", format_report(report))
    return out, report


def _convert(model: nn.Module, graph: Optional[fx.Graph], example_input: Optional[torch.Tensor],
             layers: Optional[Iterable[str]], fold_bn: bool, fuse_relu: bool, time_budget_s: float, depth_first: bool,
             dense_above: Optional[float] = None,
             keep_sparse: Set[str] = frozenset()) -> Tuple[nn.Module, List[Dict[str, Any]], List[str]]:
    """One conversion of ``model`` (rewritten in place) as :func:`sparsify` describes, from ``graph``, its
    trace (None: it does not trace); the layers in ``keep_sparse`` stay sparse whatever their timing; untimed
    layers denser than ``dense_above`` stay dense. Returns ``(model, report, collapsed layer names)``."""
    model.eval()
    modules = dict(model.named_modules())
    selected = _select_layers("sparsify", modules, layers)
    chains = conv_chains(graph, modules) if graph is not None else sequential_chains(model)
    inputs: Dict[str, torch.Tensor] = {}
    if example_input is not None:
        hooks = [modules[n].register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0].detach()))
                 for n in selected]
        try:
            with torch.inference_mode():
                model(example_input)
        finally:
            for h in hooks:
                h.remove()
    report: List[Dict[str, Any]] = []
    collapsed: List[str] = []
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, (nn.Conv2d, nn.Linear)) or isinstance(mod, DenseConv2d):
            continue
        bn, relu_mod, fused = chains.get(name, (None, None, False)) if isinstance(mod, nn.Conv2d) else (None, None, False)
        if bn is not None and not fold_bn:  # the ReLU follows the norm, not the convolution
            bn, fused = None, False
        fused = fused and fuse_relu
        dense = fold_batchnorm(mod, modules[bn]) if bn else mod
        if bn:
            set_module(model, bn, nn.Identity())
        if fused and relu_mod:
            set_module(model, relu_mod, nn.Identity())
        if not bool(dense.weight.detach().any()):
            collapsed.append(name)
        if name not in selected:
            if bn or fused:
                set_module(model, name, DenseConv2d.from_conv2d(dense, relu=fused))
            continue
        if isinstance(dense, nn.Conv2d):
            sparse_mod: nn.Module = SparseConv2d.from_conv2d(dense, relu=fused, channels_last=True)
            dense_mod: nn.Module = DenseConv2d.from_conv2d(dense, relu=fused)
        else:
            sparse_mod, dense_mod = SparseLinear.from_linear(dense), dense
        rec: Dict[str, Any] = {"name": name, "kind": "sparse", "layer": type(mod).__name__,
                               "density": sparse_mod.density(), "bn": bn, "relu": fused, "collapsed": name in collapsed,
                               "sparse_ms": None, "dense_ms": None, "speedup": None,
                               "reason": "untimed: every selected layer sparse (dense_above=None)"}
        chosen = sparse_mod
        if name in inputs:
            t_sparse, t_dense = _time_pair(sparse_mod, dense_mod, inputs[name], time_budget_s)
            rec.update(sparse_ms=1e3 * t_sparse, dense_ms=1e3 * t_dense, speedup=t_dense / t_sparse,
                       reason=f"timed alone: sparse {t_dense / t_sparse:.2f}x dense")
            if t_dense < t_sparse and name not in keep_sparse:
                chosen, rec["kind"] = dense_mod, "dense"
        elif dense_above is not None:
            over = rec["density"] > dense_above and name not in keep_sparse
            rec["reason"] = (f"untimed: density {rec['density']:.3f} {'>' if over else '<='} {dense_above:.3f}, "
                             f"the {_isa_name()} path's threshold")
            if over:
                chosen, rec["kind"] = dense_mod, "dense"
        set_module(model, name, chosen)
        report.append(rec)
    if fuse_relu:
        model, fused_names = fuse_residuals(model, graph=graph) if graph is not None else (model, [])
        if fused_names:
            graph = model.graph  # the rewritten model's own graph: what a new trace of it would read
        for r in report:
            r["residual"] = r["name"] in fused_names
            r["relu"] = r["relu"] or r["residual"]
    model.requires_grad_(False)
    if example_input is not None:
        _pick_layout(model, example_input, report, time_budget_s)
    chain: List[str] = []
    if depth_first and graph is not None:
        model, chain = _pick_depth_first(model, example_input, time_budget_s, graph)
    for r in report:
        r["depth_first"] = r["name"] in chain
    return model, report, collapsed


def _pick_depth_first(model: nn.Module, x: Optional[torch.Tensor], budget_s: float,
                      graph: Optional[fx.Graph] = None) -> Tuple[nn.Module, List[str]]:
    """The model (traced as ``graph``, None: trace it) with its leading chain fused (:func:`fuse_network`), unless timing on ``x`` says the
    layer-by-layer model is faster (small maps at a large batch: the layers interleave 16 samples per
    SIMD register, the depth-first program one).

    With a single sample and more than one thread, the program is also timed on the whole thread team
    and on the calling thread alone, and keeps the faster (``SparseConvNet.single_sample_team``): which one
    wins depends on the layers' sizes and the machine (a barrier per shared layer against the split work).
    """
    fused, chain = fuse_network(model, graph=graph)
    if not chain or x is None:
        return fused, chain
    net = next(m for m in fused.modules() if isinstance(m, SparseConvNet))
    teams = [True, False] if x.shape[0] == 1 and torch.get_num_threads() > 1 else [None]

    def run_fused(team: Optional[bool]) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            net.single_sample_team = team
            return fused(x)
        return call
    with torch.inference_mode():
        ts, _ = interleaved_times([run_fused(t) for t in teams] + [lambda: model(x)], max(budget_s, 0.05) * 4,
                                  min_rounds=9, max_rounds=100)
    medians = [statistics.median(t) for t in ts]
    best = min(range(len(teams)), key=medians.__getitem__)
    net.single_sample_team = teams[best]
    logger.info("sparsify: depth-first %s ms (team %s) vs layer by layer %.3f ms",
                "/".join(f"{1e3 * m:.3f}" for m in medians[:-1]), teams, 1e3 * medians[-1])
    return (fused, chain) if medians[best] <= medians[-1] else (model, [])


def _isa_name() -> str:
    try:
        return native.isa() if native.available() else "torch"
    except (ValueError, RuntimeError):
        return "unknown"


def _faster(a: nn.Module, b: nn.Module, x: torch.Tensor, budget_s: float) -> bool:
    """Whether model a's median time on x is below model b's (whole models: the depth-first budget)."""
    t_a, t_b = _time_pair(a, b, x, max(budget_s, 0.05) * 4, min_rounds=9, max_rounds=100)
    return t_a < t_b


def _pick_layout(model: nn.Module, x: torch.Tensor, report: List[Dict[str, Any]], budget_s: float) -> None:
    """Time the whole model with the sparse convolutions writing channels-last vs NCHW maps; keep the faster.

    Channels-last pays where torch's pooling follows (its CPU max-pool is much faster on channels-last
    maps); NCHW saves the kernel's register transposes where nothing does (e.g. residual networks).
    """
    convs = [m for m in model.modules() if isinstance(m, SparseConv2d)]
    if not convs:
        return

    def set_layout(cl: bool) -> None:
        for m in convs:
            m.channels_last = cl
    with torch.inference_mode():
        fns = []
        for cl in (True, False):
            set_layout(cl)
            model(x)  # prepare the calls of this layout (the cache keeps both)
        for cl in (True, False):
            fns.append(lambda cl=cl: (set_layout(cl), model(x)))
        ts, _ = interleaved_times(fns, max(budget_s, 0.05) * 4, min_rounds=5, max_rounds=50)
        times = {True: statistics.median(ts[0]), False: statistics.median(ts[1])}
    best = times[True] <= times[False]
    set_layout(best)
    for r in report:
        r["channels_last"] = best if r["layer"] == "Conv2d" and r["kind"] == "sparse" else None
    logger.info("sparsify: %s maps (end to end %.3f ms channels-last vs %.3f ms NCHW)",
                "channels-last" if best else "NCHW", 1e3 * times[True], 1e3 * times[False])


def _select_layers(op: str, modules: Dict[str, nn.Module], layers: Optional[Iterable[str]]) -> Set[str]:
    def ok(m: nn.Module) -> bool:
        if isinstance(m, nn.Linear):
            return True
        return isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros" and \
            not isinstance(m.padding, str)
    if layers is None:
        return {n for n, m in modules.items() if ok(m) and not isinstance(m, DenseConv2d)}
    chosen = set(layers)
    for n in chosen:
        if n not in modules or not ok(modules[n]):
            raise ValueError(f"{op}: layers must name Conv2d (groups=1, zero padding) or Linear modules; "
                             f"{n!r} is {type(modules.get(n)).__name__}")
    return chosen


def format_report(report: List[Dict[str, Any]]) -> str:
    """A plain-text table of a :func:`sparsify` report."""
    head = (f"{'layer':<28} {'kind':<6} {'density':>8} {'bn':>3} {'relu':>4} {'res':>3} {'df':>2} {'sparse ms':>10} "
            f"{'dense ms':>9} {'speedup':>8}  reason")
    rows = [head]
    for r in report:
        t = (f"{r['sparse_ms']:10.3f} {r['dense_ms']:9.3f} {r['speedup']:7.2f}x" if r["sparse_ms"] is not None
             else f"{'-':>10} {'-':>9} {'-':>8}")
        rows.append(f"{r['name']:<28} {r['kind']:<6} {r['density']:8.4f} {'y' if r['bn'] else '-':>3} "
                    f"{'y' if r['relu'] else '-':>4} {'y' if r.get('residual') else '-':>3} "
                    f"{'y' if r.get('depth_first') else '-':>2} {t}  {r.get('reason', '')}")
    return "\n".join(rows)

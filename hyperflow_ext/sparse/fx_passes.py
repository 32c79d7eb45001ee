"""The ``torch.fx`` passes of the sparse export: one tracer, the structure it reads, the rewrites it makes.

:func:`~hyperflow_ext.sparse.sparsify` traces a model once (:func:`trace`) and hands that graph to every
pass; :func:`~hyperflow_ext.sparse.load` replays the same passes on a freshly built model.

* :func:`conv_chains` — which convolutions a BatchNorm folds into and which ReLU fuses into them
  (:func:`sequential_chains` reads the same from ``nn.Sequential`` children for models fx cannot trace).
* :func:`fuse_residuals` — ``relu(conv(x) + r)`` becomes one :class:`~hyperflow_ext.sparse.SparseConv2d`
  call ``conv(x, r)``.
* :func:`fuse_network` — the chain of sparse convolutions, pools and linear head at the start of the
  graph becomes one :class:`~hyperflow_ext.sparse.SparseConvNet` call (depth-first execution).
* :func:`set_module` — replace a submodule by its dotted name.

Each pass that rewrites a graph works on a copy of the one it is given, so one trace serves them all;
the module names and the state dict stay those of the model.
"""
from __future__ import annotations

import copy
import logging
import operator
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from .conv import SparseConv2d
from .linear import SparseLinear
from .network import AVG_POOL, CONV, LINEAR, MAX_POOL, NetStep, SparseConvNet

__all__ = ["Tracer", "trace", "set_module", "conv_chains", "sequential_chains", "fuse_residuals", "fuse_network"]

logger = logging.getLogger(__name__)

#: conv name -> (BatchNorm folded into it or None, ReLU module it absorbs or None, ReLU fused)
Chains = Dict[str, Tuple[Optional[str], Optional[str], bool]]

_RELU_FUNCS = (F.relu, torch.relu, torch.relu_)
_ADD_FUNCS = (operator.add, torch.add)
_LEAVES = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d, SparseConv2d,
           SparseLinear, SparseConvNet)


class Tracer(fx.Tracer):
    """``fx.Tracer`` that keeps the layers the passes rewrite as single ``call_module`` nodes (convolutions,
    norms, ReLUs, pools, linear layers and their sparse replacements, subclasses included)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _LEAVES) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> Optional[fx.Graph]:
    """The graph of ``model`` as :class:`Tracer` reads it, or None when ``torch.fx`` cannot trace it
    (data-dependent control flow ...: the passes then leave the model as it is; the reason is logged)."""
    try:
        return Tracer().trace(model)
    except Exception as exc:  # noqa: BLE001  (fx raises many kinds)
        logger.info("%s does not trace with torch.fx (%s): no graph rewrite", type(model).__name__, exc)
        return None


def _own_graph(model: nn.Module, graph: Optional[fx.Graph]) -> Optional[fx.Graph]:
    """A graph of ``model`` a pass may rewrite: a copy of ``graph``, or a new trace (None: it does not trace)."""
    return copy.deepcopy(graph) if graph is not None else trace(model)


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule of ``root`` called ``name`` (dotted, as ``named_modules`` spells it) by ``module``."""
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _call_counts(graph: fx.Graph) -> Dict[str, int]:
    calls: Dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    return calls


# ----------------------------------------------------------------------------------------- fold and fuse
def _is_relu(node: fx.Node, modules: Dict[str, nn.Module]) -> bool:
    """Whether ``node`` applies a ReLU (an ``nn.ReLU`` module, ``F.relu`` / ``torch.relu(_)``, ``x.relu(_)``)."""
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FUNCS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def conv_chains(graph: fx.Graph, modules: Dict[str, nn.Module]) -> Chains:
    """For each convolution called once in ``graph``: the eval-mode BatchNorm that folds into it (its only
    user, called once), and whether its only user after that is a ReLU (then fused) and which ReLU module.

    Args:
        graph: a trace of the model (:func:`trace`).
        modules: the model's ``dict(named_modules())``.

    Returns:
        ``{conv name: (bn name or None, relu module name or None, relu fused)}``.
    """
    calls = _call_counts(graph)
    out: Chains = {}
    for node in graph.nodes:
        name = str(node.target)
        if node.op != "call_module" or not isinstance(modules.get(name), nn.Conv2d) or calls[name] != 1:
            continue
        head, bn = node, None
        users = list(head.users)
        if len(users) == 1 and users[0].op == "call_module" and calls[str(users[0].target)] == 1 \
                and _foldable(modules.get(str(users[0].target)), modules[name]):
            bn, head = str(users[0].target), users[0]
            users = list(head.users)
        relu_mod, fused = None, False
        if len(users) == 1 and _is_relu(users[0], modules):
            fused = True
            if users[0].op == "call_module" and calls[str(users[0].target)] == 1:
                relu_mod = str(users[0].target)
        out[name] = (bn, relu_mod, fused)
    return out


def sequential_chains(model: nn.Module) -> Chains:
    """What :func:`conv_chains` finds, read from consecutive children of ``nn.Sequential`` containers (for
    models fx cannot trace)."""
    out: Chains = {}
    for prefix, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        kids = list(seq.named_children())
        for i, (name, mod) in enumerate(kids):
            if not isinstance(mod, nn.Conv2d):
                continue
            full = lambda n: f"{prefix}.{n}" if prefix else n  # noqa: E731
            j, bn = i + 1, None
            if j < len(kids) and _foldable(kids[j][1], mod):
                bn, j = full(kids[j][0]), j + 1
            relu = j < len(kids) and isinstance(kids[j][1], nn.ReLU)
            out[full(name)] = (bn, full(kids[j][0]) if relu else None, relu)
    return out


def _foldable(bn: Optional[nn.Module], conv: nn.Conv2d) -> bool:
    return (isinstance(bn, nn.BatchNorm2d) and not bn.training and bn.track_running_stats
            and bn.running_mean is not None and bn.num_features == conv.out_channels)


def _is_add(node: fx.Node) -> bool:
    if node.kwargs or len(node.args) != 2:
        return False
    return (node.op == "call_function" and node.target in _ADD_FUNCS) or \
        (node.op == "call_method" and node.target == "add")


def _depends_on(node: fx.Node, target: fx.Node) -> bool:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n is target:
            return True
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


def fuse_residuals(model: nn.Module, only: Optional[Iterable[str]] = None, *,
                   graph: Optional[fx.Graph] = None) -> Tuple[nn.Module, List[str]]:
    """Rewrite ``relu(conv(x) + r)`` into ``conv(x, r)`` for :class:`SparseConv2d` layers (fx graph).

    Args:
        model: a model whose convolutions are already :class:`SparseConv2d` (norms folded to Identity).
        only: the layer names to fuse (as recorded by :func:`~hyperflow_ext.sparse.save`); default: every
            site found, for convolutions without a fused ReLU of their own.
        graph: a trace of ``model`` (:func:`trace`) to start from instead of tracing it again; not modified.
            One taken before layers were swapped by name serves: its nodes name modules, not hold them.

    Returns:
        ``(model or a GraphModule, fused layer names)``; ``model`` itself when nothing was fused or it
        does not trace.
    """
    wanted = None if only is None else set(only)
    graph = _own_graph(model, graph)
    if graph is None:
        return model, []
    modules = dict(model.named_modules())
    calls = _call_counts(graph)
    fused: List[str] = []
    for node in list(graph.nodes):
        name = str(node.target)
        mod = modules.get(name) if node.op == "call_module" else None
        if not isinstance(mod, SparseConv2d) or calls[name] != 1 or len(node.args) != 1 or node.kwargs:
            continue
        if (wanted is None and mod.relu) or (wanted is not None and name not in wanted):
            continue
        chain, head = [node], node
        while len(head.users) == 1:
            u = next(iter(head.users))
            if u.op == "call_module" and isinstance(modules.get(str(u.target)), nn.Identity) and len(u.args) == 1:
                chain.append(u)
                head = u
            else:
                break
        if len(head.users) != 1:
            continue
        add = next(iter(head.users))
        if not _is_add(add) or add.args[0] is add.args[1] or len(add.users) != 1:
            continue
        other = add.args[1] if add.args[0] is head else add.args[0]
        relu = next(iter(add.users))
        if not isinstance(other, fx.Node) or not _is_relu(relu, modules) or _depends_on(other, node):
            continue
        with graph.inserting_before(add):
            new = graph.call_module(name, args=(node.args[0], other))
        relu.replace_all_uses_with(new)
        graph.erase_node(relu)
        graph.erase_node(add)
        for n in reversed(chain):
            if not n.users:
                graph.erase_node(n)
        mod.relu = True
        mod.residual_fused = True
        mod.residual_chain = [str(n.target) for n in chain[1:]]  # the folded norms the rewrite removed
        fused.append(name)
    if not fused:
        return model, []
    # Identity modules (folded norms, fused ReLUs, identity shortcuts) drop out of the graph: about a
    # microsecond of module call each, 13 % of a batch-1 ResNet-style forward at 98 % sparsity.
    skipped = []
    for node in list(graph.nodes):
        if node.op == "call_module" and isinstance(modules.get(str(node.target)), nn.Identity) and \
                len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], fx.Node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            skipped.append(str(node.target))
    graph.lint()
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__ + "Fused")
    for name in skipped:  # still listed by named_modules, so save's manifest and load see them
        try:
            gm.get_submodule(name)
        except AttributeError:
            gm.add_submodule(name, nn.Identity())
    gm.train(model.training)
    return gm, fused


# ----------------------------------------------------------------------------------------- depth-first chain
def _pair(v) -> Tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _classify(node: fx.Node, modules: Dict[str, nn.Module]):
    """``(kind, module, inputs, pool)`` for a node the program covers, ``("alias", None, (inp,), None)``
    for an Identity, else None."""
    if node.op == "call_module":
        m = modules.get(str(node.target))
        args = node.args
        if node.kwargs or not args or not all(isinstance(a, fx.Node) for a in args):
            return None
        if isinstance(m, SparseConv2d) and len(args) in (1, 2):
            return CONV, m, tuple(args), None
        if isinstance(m, nn.Identity) and len(args) == 1:
            return "alias", None, tuple(args), None
        if isinstance(m, nn.MaxPool2d) and len(args) == 1 and _pair(m.padding) == (0, 0) \
                and _pair(m.dilation) == (1, 1) and not m.ceil_mode and not m.return_indices:
            k = _pair(m.kernel_size)
            return MAX_POOL, None, tuple(args), k + _pair(m.stride if m.stride is not None else k)
        if isinstance(m, nn.AdaptiveAvgPool2d) and len(args) == 1 and _pair(m.output_size) == (1, 1):
            return AVG_POOL, None, tuple(args), None
        return None
    if node.op == "call_function" and node.target is F.adaptive_avg_pool2d and not node.kwargs \
            and len(node.args) == 2 and isinstance(node.args[0], fx.Node) and _pair(node.args[1]) == (1, 1):
        return AVG_POOL, None, (node.args[0],), None
    return None


def _head(rest: Sequence[fx.Node], pooled: fx.Node, modules: Dict[str, nn.Module]) -> List[Tuple[fx.Node, tuple]]:
    """A flatten of ``pooled`` from dim 1 (``torch.flatten(x, 1)``, ``x.flatten(1)`` or ``nn.Flatten()``) and a
    ``nn.Linear`` / ``SparseLinear`` on it, if they come next (else fewer or none)."""
    if len(rest) < 2:
        return []
    flat, lin = rest[0], rest[1]
    if not (flat.args[:1] == (pooled,) and _flattens_from_dim_1(flat, modules)):
        return []
    out = [(flat, ("alias", None, (pooled,), None))]
    m = modules.get(str(lin.target)) if lin.op == "call_module" else None
    if type(m) in (nn.Linear, SparseLinear) and lin.args == (flat,) and not lin.kwargs:
        out.append((lin, (LINEAR, m, (flat,), None)))
    return out


def _flattens_from_dim_1(node: fx.Node, modules: Dict[str, nn.Module]) -> bool:
    dims = tuple(node.args[1:]) + tuple(node.kwargs.values())
    if node.op == "call_module":
        m = modules.get(str(node.target))
        return type(m) is nn.Flatten and (m.start_dim, m.end_dim) in ((1, -1), (1, 3)) and len(node.args) == 1 \
            and not node.kwargs
    return ((node.op == "call_function" and node.target is torch.flatten) or
            (node.op == "call_method" and node.target == "flatten")) and dims in ((1,), (1, -1), (1, 3))


def _is_relu_call(node: fx.Node) -> bool:
    if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
        return False
    return (node.op == "call_function" and node.target in (torch.relu, F.relu)) or \
        (node.op == "call_method" and node.target == "relu")


def fuse_network(model: nn.Module, min_convs: int = 2, *,
                 graph: Optional[fx.Graph] = None) -> Tuple[nn.Module, List[str]]:
    """Replace the longest supported chain at the start of ``model``'s graph by one :class:`SparseConvNet`.

    The chain starts at the model's single input and takes nodes in graph order while they are
    :class:`SparseConv2d` calls (with or without a fused residual), ``nn.Identity``, ``nn.MaxPool2d``
    without padding, or a global average pool (``nn.AdaptiveAvgPool2d(1)`` / ``F.adaptive_avg_pool2d(x, 1)``);
    after the pool, a flatten from dim 1 (``torch.flatten(x, 1)``, ``x.flatten(1)``, ``nn.Flatten()``) and an
    ``nn.Linear`` head end it. Values of the chain used later in the graph must be its last one.

    Args:
        model: a :func:`~hyperflow_ext.sparse.sparsify` result (eval mode, no autograd).
        min_convs: fuse only chains with at least this many convolutions.
        graph: a trace of ``model`` (:func:`trace`) to start from instead of tracing it again; not modified.
            One taken before layers were swapped by name serves: its nodes name modules, not hold them.

    Returns:
        ``(model, fused layer names)``: a ``torch.fx.GraphModule`` with the same module names and
        state dict, or ``model`` itself (and ``[]``) when nothing qualifies or it does not trace.
    """
    graph = _own_graph(model, graph)
    if graph is None:
        return model, []
    modules = dict(model.named_modules())
    nodes = list(graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return model, []
    value: Dict[fx.Node, int] = {inputs[0]: 0}  # node -> value index (aliases share their input's)
    chain: List[Tuple[fx.Node, tuple]] = []
    rectified = set()  # values already through a fused ReLU (a functional relu left on them is a no-op)
    for node in nodes[nodes.index(inputs[0]) + 1:]:
        info = _classify(node, modules)
        if info is None and _is_relu_call(node) and value.get(node.args[0]) in rectified:
            info = ("alias", None, (node.args[0],), None)
        if info is None or not all(a in value for a in info[2]):
            break
        if info[0] == "alias":
            value[node] = value[info[2][0]]
        else:
            value[node] = len(chain) + 1
            if info[0] == CONV and info[1].relu:
                rectified.add(value[node])
        chain.append((node, info))
        if info[0] == AVG_POOL:  # only the flatten and the linear head may follow
            tail = _head(nodes[nodes.index(node) + 1:], node, modules)
            for n, head_info in tail:
                value[n] = value[node] if head_info[0] == "alias" else len(chain) + 1
                chain.append((n, head_info))
            break
    # Trim until only the chain's last value is used outside it.
    while chain:
        members = {n for n, _ in chain}
        last = chain[-1][0]
        if chain[-1][1][0] != "alias" and all(u in members for n, _ in chain[:-1] for u in n.users):
            break
        chain.pop()
    convs = [info[1] for _, info in chain if info[0] == CONV]
    used = [(n, info) for n, info in chain if info[0] in (CONV, LINEAR)]
    names = [str(n.target) for n, _ in used]
    if len(convs) < min_convs or len({id(info[1]) for _, info in used}) != len(used):
        return model, []
    steps: List[NetStep] = []
    for node, (kind, mod, args, pool) in chain:
        if kind == "alias":
            continue
        res = value[args[1]] if kind == CONV and len(args) == 2 else -1
        if res == 0:  # the input as a residual: not a slot the program can hold
            return model, []
        steps.append(NetStep(kind, names.index(str(node.target)) if kind in (CONV, LINEAR) else -1, value[args[0]],
                             res, value[node], pool or (0, 0, 0, 0)))
    last = chain[-1][0]
    target = "sparse_net"
    while target in modules:
        target += "_"
    with graph.inserting_before(last.next):  # in creation order, after the chain's last node
        call = graph.call_module(target, (inputs[0],))
    last.replace_all_uses_with(call)
    for node, _ in reversed(chain):
        graph.erase_node(node)
    graph.lint()
    owned = {target: SparseConvNet(steps, names)}
    root = {str(n.target): owned.get(str(n.target)) or operator.attrgetter(str(n.target))(model)
            for n in graph.nodes if n.op in ("call_module", "get_attr")}
    gm = fx.GraphModule(root, graph, class_name=type(model).__name__)
    # The model's own children (containers keep their type and indexing) and root tensors: the same names,
    # modules and state dict as before, plus the SparseConvNet.
    for name, child in model.named_children():
        gm.add_module(name, child)
    for name, param in model._parameters.items():
        if name not in gm._parameters:
            gm.register_parameter(name, param)
    for name, buf in model._buffers.items():
        if name not in gm._buffers and buf is not None:
            gm.register_buffer(name, buf, persistent=name not in model._non_persistent_buffers_set)
    gm.get_submodule(target).attach(gm)
    gm.train(model.training)
    return gm, names

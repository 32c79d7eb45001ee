"""Save a :func:`~hyperflow_ext.sparse.sparsify` model to one safetensors file and rebuild it without pickle.

:func:`save` writes the state dict (CSR buffers included) plus a JSON manifest of the rewritten layers in
the file's metadata, atomically; :func:`load` rebuilds the model from ``model_factory()`` (the dense
architecture) by replaying the rewrite the manifest records (sparse / dense layers, folded norms, fused
residuals, the depth-first chain), with no pickle and no :class:`~hyperflow_ext.prune.Pruner`.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from .._io import load_tensors, save_tensors
from .conv import SparseConv2d
from .csr import CSRMatrix
from .export import FORMAT, DenseConv2d
from .fx_passes import fuse_network, fuse_residuals, set_module, trace
from .linear import SparseLinear
from .network import SparseConvNet

__all__ = ["save", "load"]

def _manifest(model: nn.Module) -> Dict[str, Any]:
    layers: Dict[str, Dict[str, Any]] = {}
    identity: List[str] = []
    network: List[str] = []
    team: Optional[bool] = None
    for name, m in model.named_modules():
        if isinstance(m, SparseConv2d):
            layers[name] = {"kind": "sparse_conv2d", "in_channels": m.in_channels, "shape": list(m.csr().shape),
                            "kernel_size": list(m.kernel_size), "stride": list(m.stride), "padding": list(m.padding),
                            "dilation": list(m.dilation), "relu": m.relu, "bias": m.bias is not None,
                            "channels_last": m.channels_last, "residual": m.residual_fused,
                            "residual_chain": list(getattr(m, "residual_chain", []))}
        elif isinstance(m, SparseLinear):
            layers[name] = {"kind": "sparse_linear", "shape": [m.out_features, m.in_features],
                            "bias": m.bias is not None}
        elif isinstance(m, DenseConv2d):
            layers[name] = {"kind": "dense_conv2d", "in_channels": m.in_channels, "out_channels": m.out_channels,
                            "kernel_size": list(m.kernel_size), "stride": list(m.stride), "padding": list(m.padding),
                            "dilation": list(m.dilation), "groups": m.groups, "relu": m.relu,
                            "bias": m.bias is not None, "padding_mode": m.padding_mode}
        elif isinstance(m, nn.Identity) and name:
            identity.append(name)
        elif isinstance(m, SparseConvNet):
            network = list(m.layer_names)
            team = m.single_sample_team
    return {"format": FORMAT, "layers": layers, "identity": identity, "depth_first": network,
            "single_sample_team": team}


def save(model: nn.Module, path: os.PathLike, metadata: Optional[Dict[str, Any]] = None) -> None:
    """Write a :func:`sparsify` / ``Pruner.export()`` model to one safetensors file, atomically.

    The file holds the state dict (CSR ``crow_indices`` / ``col_indices`` / ``values`` of every sparse
    layer included) and, in its metadata, a JSON manifest of the rewritten layers; ``metadata`` is
    stored beside it (JSON-serialisable values).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"save: model must be a torch.nn.Module, got {type(model).__name__}")
    tensors = {k: v for k, v in model.state_dict().items()}
    save_tensors(path, tensors, {"manifest": _manifest(model), "user": dict(metadata or {})})


def _build(op: str, name: str, spec: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> nn.Module:
    def t(key: str) -> torch.Tensor:
        full = f"{name}.{key}"
        if full not in tensors:
            raise ValueError(f"{op}: the file has no tensor {full!r} for layer {name!r}")
        return tensors[full]
    kind = spec.get("kind")
    if kind in ("sparse_conv2d", "sparse_linear"):
        csr = CSRMatrix(t("crow_indices"), t("col_indices"), t("values"), tuple(spec["shape"]))  # validated
        bias = t("bias") if spec.get("bias") else None
        if kind == "sparse_linear":
            return SparseLinear(csr, bias)
        return SparseConv2d(csr, spec["in_channels"], tuple(spec["kernel_size"]), tuple(spec["stride"]),
                            tuple(spec["padding"]), tuple(spec["dilation"]), bias, bool(spec["relu"]),
                            spec.get("channels_last"))
    if kind == "dense_conv2d":
        w = t("weight")
        return DenseConv2d(spec["in_channels"], spec["out_channels"], tuple(spec["kernel_size"]),
                           tuple(spec["stride"]), tuple(spec["padding"]), tuple(spec["dilation"]), spec["groups"],
                           bool(spec["bias"]), spec.get("padding_mode", "zeros"), relu=bool(spec["relu"]),
                           dtype=w.dtype)
    raise ValueError(f"{op}: unknown layer kind {kind!r} for {name!r}")


def load(path: os.PathLike, model_factory: Callable[[], nn.Module],
         device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model written by :func:`save` without unpickling anything and without a Pruner.

    Args:
        path: the safetensors file.
        model_factory: builds the dense architecture the model was exported from (e.g. ``lambda: VGG()``);
            its layers named in the manifest are replaced, everything else is loaded strictly.
        device: where the tensors go.

    Returns:
        The model in eval mode with gradients off.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a hyperflow sparse export, a missing tensor, a corrupt CSR structure, or a state dict
            that does not match the factory's architecture.
    """
    op = "hf.sparse.load"
    tensors, meta = load_tensors(path, device=device)
    manifest = meta.get("manifest") if isinstance(meta, dict) else None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{op}: {path} is not a hyperflow sparse export (format {FORMAT!r})")
    model = model_factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"{op}: model_factory must return an nn.Module, got {type(model).__name__}")
    model.to(device)
    names = dict(model.named_modules())
    for name in manifest["identity"] + list(manifest["layers"]):
        if name not in names:
            raise ValueError(f"{op}: the factory's model has no module {name!r} (another architecture?)")
    for name in manifest["identity"]:
        set_module(model, name, nn.Identity())
    for name, spec in manifest["layers"].items():
        set_module(model, name, _build(op, name, spec, tensors).to(device))
    residual = [n for n, spec in manifest["layers"].items() if spec.get("residual")]
    for n in residual:
        for folded in manifest["layers"][n].get("residual_chain", []):
            if folded not in names:
                raise ValueError(f"{op}: the factory's model has no module {folded!r} (another architecture?)")
            set_module(model, folded, nn.Identity())
    graph = trace(model) if residual or manifest.get("depth_first") else None  # one trace for both passes
    if residual:
        model, done = fuse_residuals(model, only=residual, graph=graph) if graph is not None else (model, [])
        if done:
            graph = model.graph
        if set(done) != set(residual):
            raise ValueError(f"{op}: could not re-apply the residual fusion of {sorted(set(residual) - set(done))} "
                             f"to the factory's model (another architecture?)")
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{op}: {path} does not match the factory's architecture: {exc}") from exc
    if manifest.get("depth_first"):  # an execution plan only: whatever chain the rebuilt graph allows
        model, _ = fuse_network(model, graph=graph) if graph is not None else (model, [])
        team = manifest.get("single_sample_team")
        if not (team is None or isinstance(team, bool)):
            raise ValueError(f"{op}: {path}: single_sample_team must be true, false or null, got {team!r}")
        for m in model.modules():
            if isinstance(m, SparseConvNet):
                m.single_sample_team = team  # timed at export (None: the multiply-add rule)
    model.eval()
    model.requires_grad_(False)
    return model

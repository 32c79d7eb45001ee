"""Validation of few-shot support sets (shared by fused_adapt and the baselines)."""
from __future__ import annotations

import warnings
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from .._checks import as_class_labels, as_model_input, module_dtype

__all__ = ["as_episode", "check_support"]


def as_episode(backbone: nn.Module, episode: Sequence) -> tuple:
    """``episode`` as a tuple ``(support_x, support_y[, query_x, query_y, ...])`` in the dtypes the
    backbone runs: images in its floating dtype, integer labels as int64 (anything else is left
    for the checks that follow)."""
    dtype = module_dtype(backbone)
    out = list(episode)
    for i, t in enumerate(out[:4]):
        if isinstance(t, torch.Tensor):  # images at even positions, their labels after them
            out[i] = as_model_input(t, dtype) if i % 2 == 0 else as_class_labels(t)
    return tuple(out)


def _warn_training(op: str, backbone: nn.Module) -> None:
    """Warn when layers that act differently in training mode are in it: BatchNorm then normalises
    with each batch's own statistics and Dropout drops at random, so the adaptation and every
    prediction of the returned model depend on the batch. The backbone is the user's; it is read,
    never switched to eval mode here."""
    training = sorted({type(m).__name__ for m in backbone.modules()
                       if m.training and isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd))})
    if training:
        warnings.warn(f"{op}: the backbone has {', '.join(training)} layers in training mode, so adaptation and "
                      f"predictions depend on each batch; call backbone.eval() first", RuntimeWarning, stacklevel=3)


def check_support(op: str, backbone: nn.Module, support_x: torch.Tensor, support_y: torch.Tensor,
                  way: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, int, bool]:
    """Check a support set for one task or a stacked batch of tasks.

    Returns ``(support_x, support_y, way, batched)``: the images in the backbone's floating dtype
    (NumPy's float64 arrives often) and the labels as int64, whatever integer dtype they came in.

    Raises:
        TypeError: non-tensor inputs.
        ValueError: mismatched shapes, non-integer or out-of-range labels, a class with no
            example, NaN/Inf pixels, or tensors on another device than the backbone.
    """
    for name, t in (("support_x", support_x), ("support_y", support_y)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    batched = support_x.dim() == 5
    if support_x.dim() not in (4, 5):
        raise ValueError(f"{op}: support_x must be (shots, C, H, W) or (tasks, shots, C, H, W), got {tuple(support_x.shape)}")
    if tuple(support_y.shape) != tuple(support_x.shape[:support_x.dim() - 3]):
        raise ValueError(f"{op}: support_y must have shape {tuple(support_x.shape[:support_x.dim() - 3])} "
                         f"to match support_x, got {tuple(support_y.shape)}")
    if support_y.dtype.is_floating_point or support_y.dtype == torch.bool:
        raise ValueError(f"{op}: support_y must hold integer labels, got {support_y.dtype}")
    if not support_x.dtype.is_floating_point:
        raise ValueError(f"{op}: support_x must be floating point, got {support_x.dtype}")
    try:
        dev = next(backbone.parameters()).device
    except StopIteration:
        dev = support_x.device
    for name, t in (("support_x", support_x), ("support_y", support_y)):
        if t.device != dev:
            raise ValueError(f"{op}: {name} is on {t.device} but the backbone is on {dev}")
    if support_y.numel() == 0:
        raise ValueError(f"{op}: the support set is empty")
    if not bool(torch.isfinite(support_x).all()):
        raise ValueError(f"{op}: support_x contains NaN or Inf")
    lo, hi = int(support_y.min()), int(support_y.max())
    way = hi + 1 if way is None else int(way)
    if lo < 0 or hi >= way:
        raise ValueError(f"{op}: labels must lie in [0, {way}), got range [{lo}, {hi}]")
    rows = support_y.reshape(-1, support_y.shape[-1])
    counts = torch.zeros(rows.shape[0], way, dtype=torch.long, device=rows.device)
    counts.scatter_add_(1, rows.long(), torch.ones_like(rows, dtype=torch.long))
    empty = (counts == 0).nonzero()
    if empty.numel():
        task, cls = (int(v) for v in empty[0])
        where = f" in task {task}" if batched else ""
        raise ValueError(f"{op}: class {cls} has no support example{where} (labels must cover 0..{way - 1})")
    _warn_training(op, backbone)
    return as_model_input(support_x, module_dtype(backbone)), as_class_labels(support_y), way, batched

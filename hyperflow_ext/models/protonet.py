"""Prototypical-network classification: :func:`prototypes`, :func:`proto_logits`, :class:`ProtoNet`.

A class prototype is the mean feature of the class's support examples; a query is scored against
each prototype by scaled cosine similarity or negative squared euclidean distance. Every function
accepts one task or a batch of tasks with a leading ``tasks`` dimension.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_int
from ._checks import check_tensor

__all__ = ["METRICS", "prototypes", "proto_logits", "ProtoNet"]

METRICS = ("cosine", "euclidean")
_DEFAULT_SCALE = {"cosine": 10.0, "euclidean": 1.0}


def _resolve_scale(fn: str, metric: str, scale: Optional[float]) -> float:
    if metric not in METRICS:
        raise ValueError(f"{fn}: metric must be one of {METRICS}, got {metric!r}")
    if scale is None:
        return _DEFAULT_SCALE[metric]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{fn}: scale must be a float or None, got {type(scale).__name__}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{fn}: scale must be finite and > 0, got {scale}")
    return float(scale)


def prototypes(features: torch.Tensor, labels: torch.Tensor,
               way: Optional[int] = None) -> torch.Tensor:
    """Mean feature per class.

    Args:
        features: support features, floating point.
        labels: integer class of each support example, in ``[0, way)``.
        way: number of classes; ``None`` infers ``labels.max() + 1``. Every class needs at
            least one example (in every task).

    Shape:
        - features: ``(shots, features)`` or ``(tasks, shots, features)``; ``shots`` counts all
          support examples of a task.
        - labels: ``(shots,)`` or ``(tasks, shots)``.
        - Returns: ``(way, features)`` or ``(tasks, way, features)``.

    Raises:
        TypeError: if an argument has the wrong type.
        ValueError: on mismatched shapes, non-integer labels, labels outside ``[0, way)``, or a
            class with no example.

    Example:
        >>> prototypes(torch.tensor([[0., 2.], [2., 0.], [5., 5.]]), torch.tensor([0, 0, 1]))
        tensor([[1., 1.],
                [5., 5.]])
    """
    fn = "prototypes"
    check_tensor(fn, "features", features)
    check_tensor(fn, "labels", labels)
    if features.dim() not in (2, 3):
        raise ValueError(f"{fn}: features must have shape (shots, features) or "
                         f"(tasks, shots, features), got {tuple(features.shape)}")
    if not features.is_floating_point():
        raise ValueError(f"{fn}: features must be floating point, got {features.dtype}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{fn}: labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != features.shape[:-1]:
        raise ValueError(f"{fn}: labels must have shape {tuple(features.shape[:-1])} "
                         f"(features.shape[:-1]), got {tuple(labels.shape)}")
    if labels.numel() == 0:
        raise ValueError(f"{fn}: the support set is empty")
    lo, hi = int(labels.min()), int(labels.max())
    way = hi + 1 if way is None else check_int(fn, "way", way)
    if lo < 0 or hi >= way:
        raise ValueError(f"{fn}: labels must lie in [0, {way}) (way={way}), got values in "
                         f"[{lo}, {hi}]")
    one_hot = F.one_hot(labels.long(), way).to(features.dtype)  # (..., shots, way)
    counts = one_hot.sum(dim=-2)                                 # (..., way)
    if bool((counts == 0).any()):
        missing = sorted({int(c) for c in (counts == 0).nonzero()[:, -1]})
        raise ValueError(f"{fn}: every class in [0, {way}) needs at least one support example; "
                         f"classes {missing} have none")
    return one_hot.transpose(-1, -2) @ features / counts.unsqueeze(-1)


def proto_logits(query: torch.Tensor, protos: torch.Tensor, metric: str = "cosine",
                 scale: Optional[float] = None) -> torch.Tensor:
    """Score query features against prototypes.

    ``cosine``: ``scale * cos(query, proto)``; ``euclidean``: ``-scale * ||query - proto||^2``.

    Args:
        query: query features.
        protos: class prototypes (see :func:`prototypes`).
        metric: ``"cosine"`` or ``"euclidean"``.
        scale: temperature; ``None`` means 10.0 for cosine and 1.0 for euclidean (plain negative
            squared distance).

    Shape:
        - query: ``(queries, features)`` or ``(tasks, queries, features)``.
        - protos: ``(way, features)`` or ``(tasks, way, features)`` (same rank as ``query``).
        - Returns: ``(queries, way)`` or ``(tasks, queries, way)``.

    Raises:
        TypeError: if an argument has the wrong type.
        ValueError: on an unknown metric, a non-positive scale or mismatched shapes.
    """
    fn = "proto_logits"
    scale = _resolve_scale(fn, metric, scale)
    check_tensor(fn, "query", query)
    check_tensor(fn, "protos", protos)
    if query.dim() not in (2, 3) or protos.dim() != query.dim():
        raise ValueError(f"{fn}: query and protos must both be 2-D (items, features) or both 3-D "
                         f"(tasks, items, features), got {tuple(query.shape)} and "
                         f"{tuple(protos.shape)}")
    if query.shape[-1] != protos.shape[-1]:
        raise ValueError(f"{fn}: query and protos must have the same feature size, got "
                         f"{query.shape[-1]} and {protos.shape[-1]}")
    if query.dim() == 3 and query.shape[0] != protos.shape[0]:
        raise ValueError(f"{fn}: query and protos must have the same number of tasks, got "
                         f"{query.shape[0]} and {protos.shape[0]}")
    if metric == "cosine":
        q = F.normalize(query, dim=-1, eps=1e-8)
        p = F.normalize(protos, dim=-1, eps=1e-8)
        return scale * (q @ p.transpose(-1, -2))
    sq = (query * query).sum(-1, keepdim=True) - 2.0 * (query @ protos.transpose(-1, -2)) \
        + (protos * protos).sum(-1).unsqueeze(-2)
    return -scale * sq.clamp_min(0.0)


class ProtoNet(nn.Module):
    """A prototypical-network classifier on top of a feature backbone.

    Args:
        backbone: maps ``(batch, C, H, W)`` images to ``(batch, features)``.
        metric: ``"cosine"`` (default) or ``"euclidean"``.
        scale: fixed logit temperature (not learned); ``None`` means 10.0 for cosine and 1.0
            for euclidean.

    Shape:
        - support_x: ``(shots, C, H, W)`` or ``(tasks, shots, C, H, W)``.
        - support_y: ``(shots,)`` or ``(tasks, shots)``, integers in ``[0, way)``.
        - query_x: ``(queries, C, H, W)`` or ``(tasks, queries, C, H, W)``.
        - Output: ``(queries, way)`` or ``(tasks, queries, way)`` logits.

    Example:
        >>> net = ProtoNet(Conv4())
        >>> sx, sy = torch.rand(10, 1, 28, 28), torch.arange(5).repeat(2)
        >>> net(sx, sy, torch.rand(7, 1, 28, 28)).shape
        torch.Size([7, 5])
    """

    def __init__(self, backbone: nn.Module, metric: str = "cosine",
                 scale: Optional[float] = None) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"ProtoNet: backbone must be an nn.Module, got "
                            f"{type(backbone).__name__}")
        self.scale = _resolve_scale("ProtoNet", metric, scale)
        self.metric = metric
        self.backbone = backbone

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features of ``(batch, C, H, W)`` or ``(tasks, batch, C, H, W)`` images."""
        check_tensor("ProtoNet.embed", "x", x)
        if x.dim() == 5:
            return self.backbone(x.flatten(0, 1)).unflatten(0, x.shape[:2])
        if x.dim() != 4:
            raise ValueError(f"ProtoNet.embed: x must have shape (batch, C, H, W) or "
                             f"(tasks, batch, C, H, W), got {tuple(x.shape)}")
        return self.backbone(x)

    def forward(self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor,
                way: Optional[int] = None) -> torch.Tensor:
        protos = prototypes(self.embed(support_x), support_y, way)
        return proto_logits(self.embed(query_x), protos, self.metric, self.scale)

    def support_loss(self, support_x: torch.Tensor, support_y: torch.Tensor,
                     way: Optional[int] = None) -> torch.Tensor:
        """Cross entropy of the support examples against the support set's own prototypes.

        This is the few-shot fine-tuning objective: it needs no query labels. With cosine
        logits it stays informative at 1 shot (each example sits on its own prototype, and the
        loss still pushes the other prototypes away).

        Returns:
            A scalar tensor (mean over support examples and tasks), differentiable with respect
            to the backbone's parameters.
        """
        feats = self.embed(support_x)
        logits = proto_logits(feats, prototypes(feats, support_y, way), self.metric, self.scale)
        return F.cross_entropy(logits.flatten(0, -2), support_y.flatten().long())

    def extra_repr(self) -> str:
        return f"metric={self.metric!r}, scale={self.scale}"

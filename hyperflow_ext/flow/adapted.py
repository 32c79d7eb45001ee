"""A ProtoNet whose selected backbone parameters are replaced by adapted values."""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from .._checks import as_model_input
from ..models import proto_logits, prototypes
from .functional import features_with
from .params import ParamSubset

__all__ = ["AdaptedProtoNet"]


class AdaptedProtoNet(nn.Module):
    """Classifies queries with adapted parameters and prototypes from the support set.

    Shares every frozen tensor with ``backbone`` (which is referenced, not copied, and not
    registered as a submodule) and owns only ``theta``.

    Args:
        backbone: the original backbone.
        subset: which of its parameters ``theta`` replaces.
        theta: ``(P,)`` for one task or ``(tasks, P)``.
        support_x: ``(shots, C, H, W)`` or ``(tasks, shots, C, H, W)``.
        support_y: ``(shots,)`` or ``(tasks, shots)``.
        way: number of classes.
        buffers: ``{name: tensor}`` buffers substituted as well (one task only), e.g. BatchNorm
            statistics re-estimated on the support set.

    Shape:
        - query_x: ``(queries, C, H, W)`` or ``(tasks, queries, C, H, W)`` (matching ``theta``).
        - Output: ``(queries, way)`` or ``(tasks, queries, way)`` logits.
    """

    def __init__(self, backbone: nn.Module, subset: ParamSubset, theta: torch.Tensor, support_x: torch.Tensor,
                 support_y: torch.Tensor, way: int, metric: str = "cosine", scale: float = 10.0,
                 buffers: Optional[Dict[str, torch.Tensor]] = None) -> None:
        super().__init__()
        object.__setattr__(self, "backbone", backbone)  # not a submodule: nothing is copied or re-registered
        self.subset = subset
        self.register_buffer("theta", theta.detach())
        self.support_x, self.support_y = support_x, support_y
        self.way, self.metric, self.scale = way, metric, scale
        self.buffers = dict(buffers or {})
        self._protos: Optional[torch.Tensor] = None

    @property
    def batched(self) -> bool:
        return self.theta.dim() == 2

    def adapted_parameters(self) -> dict:
        """``{name: tensor}`` views of the adapted values (``(tasks, *shape)`` when batched)."""
        return self.subset.unflatten(self.theta)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        want = 5 if self.batched else 4
        if x.dim() != want:
            raise ValueError(f"AdaptedProtoNet: expected {want}-D images for "
                             f"{'a batch of tasks' if self.batched else 'one task'}, got shape {tuple(x.shape)}")
        if self.batched and x.shape[0] != self.theta.shape[0]:
            raise ValueError(f"AdaptedProtoNet: query batch has {x.shape[0]} tasks, the model {self.theta.shape[0]}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"AdaptedProtoNet: queries must be floating point, got {x.dtype}")
        x = as_model_input(x, self.support_x.dtype)  # the support set was cast to the backbone's dtype
        return features_with(self.backbone, self.subset, self.theta, x, buffers=self.buffers)

    def prototypes(self) -> torch.Tensor:
        if self._protos is None:
            with torch.no_grad():
                self._protos = prototypes(self.embed(self.support_x), self.support_y, self.way)
        return self._protos

    def forward(self, query_x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return proto_logits(self.embed(query_x), self.prototypes(), self.metric, self.scale)

    def extra_repr(self) -> str:
        tasks = self.theta.shape[0] if self.batched else 1
        return f"tasks={tasks}, way={self.way}, adapted={self.subset.numel}, metric={self.metric!r}"

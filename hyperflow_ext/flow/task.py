"""The frozen task encoder: a support set → an order-invariant task embedding ``z``."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..models import prototypes

__all__ = ["TaskEncoder"]


class TaskEncoder(nn.Module):
    """Summarises a support set with a frozen feature extractor.

    ``z = [mean feature, std of the class prototypes, mean within-class std, 1/shots]`` over
    L2-normalised features: which feature directions separate this task's classes and which
    vary inside them. Every statistic is a mean over classes and shots, so ``z`` does not depend
    on the order of classes or of shots.

    Args:
        encoder: the frozen feature extractor (by default the backbone at its pretrained
            parameters; the encoder is run once per task, never during integration).
        feature_dim: output size of ``encoder``.

    Shape:
        - support_x: ``(shots, C, H, W)`` or ``(tasks, shots, C, H, W)``.
        - support_y: ``(shots,)`` or ``(tasks, shots)``.
        - Output: ``(tasks, 3 * feature_dim + 1)``.
    """

    def __init__(self, encoder: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.feature_dim = feature_dim

    @property
    def dim(self) -> int:
        return 3 * self.feature_dim + 1

    @torch.no_grad()
    def forward(self, support_x: torch.Tensor, support_y: torch.Tensor, way: Optional[int] = None) -> torch.Tensor:
        if support_x.dim() == 4:
            support_x, support_y = support_x[None], support_y[None]
        tasks, shots = support_y.shape
        feats = F.normalize(self.encoder(support_x.flatten(0, 1)), dim=-1).unflatten(0, (tasks, shots))
        way = int(support_y.max()) + 1 if way is None else way
        protos = prototypes(feats, support_y, way)                         # (tasks, way, d)
        centred = feats - torch.gather(protos, 1, support_y[..., None].expand_as(feats))
        within = centred.pow(2).mean(dim=1).sqrt()
        per_class = shots / way
        inv_shots = torch.full((tasks, 1), 1.0 / per_class, dtype=feats.dtype, device=feats.device)
        return torch.cat([feats.mean(dim=1), protos.std(dim=1, unbiased=False), within, inv_shots], dim=-1)

"""The methods HyperFlow is compared with: direct transfer and autograd fine-tuning."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .adapted import AdaptedProtoNet
from .checks import check_support
from .functional import finetune
from .params import ParamSpec, ParamSubset

__all__ = ["direct_transfer", "finetune_adapt"]


def direct_transfer(backbone: nn.Module, support_x: torch.Tensor, support_y: torch.Tensor,
                    metric: str = "cosine", scale: float = 10.0, way: Optional[int] = None) -> AdaptedProtoNet:
    """No adaptation: a ProtoNet on the pretrained backbone."""
    way, _ = check_support("direct_transfer", backbone, support_x, support_y, way)
    subset = ParamSubset(backbone, "bias" if any(n.endswith("bias") for n, _ in backbone.named_parameters()) else "all")
    return AdaptedProtoNet(backbone, subset, subset.vector(backbone), support_x, support_y, way, metric, scale)


def finetune_adapt(backbone: nn.Module, support_x: torch.Tensor, support_y: torch.Tensor,
                   params: ParamSpec = "bias", steps: int = 50, lr: float = 1e-2, optimizer: str = "adam",
                   metric: str = "cosine", scale: float = 10.0, way: Optional[int] = None) -> AdaptedProtoNet:
    """Fine-tune ``params`` of the backbone on the support loss with ``torch.optim`` (autograd).

    ``params="bias"`` is bias tuning, ``"head"`` head tuning, ``"all"`` full fine-tuning. The
    backbone is not modified; the tuned values live in the returned model.
    """
    way, batched = check_support("finetune_adapt", backbone, support_x, support_y, way)
    if batched:
        raise NotImplementedError("finetune_adapt: adapt one task at a time (support_x of shape (shots, C, H, W))")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"finetune_adapt: steps must be a non-negative int, got {steps!r}")
    subset = ParamSubset(backbone, params)
    theta, _, _ = finetune(backbone, subset, support_x, support_y, subset.vector(backbone), steps, way,
                           metric, scale, optimizer, lr)
    return AdaptedProtoNet(backbone, subset, theta, support_x, support_y, way, metric, scale)

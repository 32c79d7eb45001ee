"""Running a backbone with substituted parameters, and the support-set fine-tuning loop.

Both HyperFlow's trajectory recorder and the fine-tuning baselines call :func:`finetune`, so the
"real fine-tuning" HyperFlow learns from is exactly the baseline it is compared with.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .._stateless import call_with
from ..models import proto_logits, prototypes
from .params import ParamSubset

__all__ = ["features_with", "support_loss", "query_loss", "finetune", "OPTIMIZERS", "OBJECTIVES"]

OPTIMIZERS = ("adam", "sgd")
OBJECTIVES = ("support", "query")


def features_with(backbone: nn.Module, subset: ParamSubset, theta: torch.Tensor, x: torch.Tensor,
                  shared_x: bool = False, buffers: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
    """Backbone features with the selected parameters replaced by ``theta`` (and named buffers by
    ``buffers``, e.g. re-estimated BatchNorm statistics).

    Shape:
        - theta: ``(P,)`` or ``(runs, P)``.
        - x: ``(n, C, H, W)`` (one batch; with ``shared_x`` used by every run) or
          ``(runs, n, C, H, W)``.
        - Returns: ``(n, d)`` or ``(runs, n, d)``.
    """
    # A private view per call, never functional_call: that swaps the backbone's own attributes for
    # the length of the call, and overlapping calls (serving threads) corrupt it for good.
    extra = buffers or {}
    if theta.dim() == 1:
        return call_with(backbone, {**subset.unflatten(theta), **extra}, x)
    # A loop, not vmap: vmap cannot run channels-last convolution maps through GroupNorm, and
    # the runs are few (perturbed starts, a handful of tasks).
    params = subset.unflatten(theta)
    return torch.stack([call_with(backbone, {**{k: v[r] for k, v in params.items()}, **extra}, x if shared_x else x[r])
                        for r in range(theta.shape[0])])


def support_loss(feats: torch.Tensor, labels: torch.Tensor, way: int, metric: str, scale: float) -> torch.Tensor:
    """ProtoNet loss of the support set against its own prototypes (sum over leading runs)."""
    labels = labels.expand(feats.shape[:-1])
    logits = proto_logits(feats, prototypes(feats, labels, way), metric, scale)
    return F.cross_entropy(logits.reshape(-1, way), labels.reshape(-1), reduction="sum") / labels.shape[-1]


def query_loss(support_feats: torch.Tensor, support_y: torch.Tensor, query_feats: torch.Tensor,
               query_y: torch.Tensor, way: int, metric: str, scale: float) -> torch.Tensor:
    """ProtoNet loss of the queries against the support prototypes (sum over leading runs)."""
    protos = prototypes(support_feats, support_y.expand(support_feats.shape[:-1]), way)
    logits = proto_logits(query_feats, protos, metric, scale)
    labels = query_y.expand(query_feats.shape[:-1])
    return F.cross_entropy(logits.reshape(-1, way), labels.reshape(-1), reduction="sum") / query_y.shape[-1]


def finetune(backbone: nn.Module, subset: ParamSubset, support_x: torch.Tensor, support_y: torch.Tensor,
             theta0: torch.Tensor, steps: int, way: int, metric: str = "cosine", scale: float = 10.0,
             optimizer: str = "adam", lr: float = 1e-3, record: bool = False,
             query: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
             ) -> Tuple[torch.Tensor, Optional[torch.Tensor], List[float]]:
    """Fine-tune the selected parameters on one episode with a ``torch.optim`` optimizer.

    The loss is the support set's ProtoNet loss against its own prototypes, or, when ``query``
    ``(query_x, query_y)`` is given, the queries' loss against the support prototypes (the
    episode objective: fine-tuning toward parameters that generalise past the support set).
    Several runs (e.g. from perturbed starts) share the episode and train independently:
    the loss is a sum over runs and both optimizers act element-wise.

    Shape:
        - support_x: ``(shots, C, H, W)``; support_y: ``(shots,)``.
        - theta0: ``(P,)`` or ``(runs, P)``.
        - Returns: ``(theta, path, losses)``: ``theta`` like ``theta0``; ``path``
          ``(runs, steps + 1, P)`` when ``record`` (else ``None``); mean support loss per step.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"finetune: optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    batched = theta0.dim() == 2
    theta = theta0.detach().clone().requires_grad_(True)
    opt = (torch.optim.Adam([theta], lr=lr) if optimizer == "adam"
           else torch.optim.SGD([theta], lr=lr, momentum=0.9))
    runs = theta.shape[0] if batched else 1
    path = [theta.detach().clone()] if record else None
    losses: List[float] = []
    inputs = support_x if query is None else torch.cat([support_x, query[0]])
    shots = support_x.shape[0]
    for _ in range(steps):
        feats = features_with(backbone, subset, theta, inputs, shared_x=True)
        if query is None:
            loss = support_loss(feats, support_y, way, metric, scale)
        else:
            loss = query_loss(feats[..., :shots, :], support_y, feats[..., shots:, :], query[1], way, metric, scale)
        # autograd.grad, not backward: backward would also accumulate .grad into the backbone's own
        # parameters (a write to the user's model) and spend work on gradients nobody uses.
        (theta.grad,) = torch.autograd.grad(loss, [theta])
        opt.step()
        losses.append(float(loss.detach()) / runs)
        if path is not None:
            path.append(theta.detach().clone())
    out = theta.detach()
    if path is not None:
        stacked = torch.stack(path, dim=-2)  # (runs, steps+1, P) or (steps+1, P)
        return out, stacked if batched else stacked[None], losses
    return out, None, losses

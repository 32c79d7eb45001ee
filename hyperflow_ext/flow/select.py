"""Per-task selection among a few adapted models by a support-only criterion (no gradients).

:func:`select_adapt` integrates the learned drift once (:func:`~hyperflow_ext.flow.flow_path`),
takes the states at a few horizons (the unadapted backbone among them) and, on a BatchNorm
backbone, the support-statistics model as well, and keeps, per task, the candidate whose features
classify the support set best by leave-one-out prototypes (:func:`loo_scores`). Integration never
runs the backbone; the criterion costs one support forward per candidate, no backward pass.

Measured on ``fewshot_benchmark`` (5-way 5-shot, 100 episodes per target,
``docs/fewshot-study/report.md``, third study session), with the default ``"calibrated"``
criterion: on the BatchNorm Conv4 it recovers 101 % of bias tuning's mean gain over direct
transfer (HyperFlow alone 28 %, support statistics alone 55 % but 12 points below direct transfer
under inversion), almost all of it by choosing between support statistics and no adaptation, at
about 8 % of bias tuning's time; on the GroupNorm Conv4 it adds little (27 % against 18 %, at
about 5 %). No target was more than its 95 % interval below direct transfer on either backbone.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..models import proto_logits, prototypes
from .adapted import AdaptedProtoNet
from .baselines import support_statistics
from .checks import check_support
from .functional import features_with
from .hyperflow import HyperFlow, flow_path, fused_adapt

__all__ = ["loo_scores", "select_adapt", "HORIZONS", "CRITERIA", "CALIBRATION_SCALES"]

HORIZONS = (0.0, 0.25, 0.5, 1.0, 1.5)   # candidate horizons, times the flow's tuned horizon
CRITERIA = ("calibrated", "accuracy", "loss")
CALIBRATION_SCALES = (2.5, 5.0, 10.0, 20.0, 40.0, 80.0)  # logit scales the calibrated loss minimises over


def loo_scores(features: torch.Tensor, labels: torch.Tensor, way: Optional[int] = None, metric: str = "cosine",
               scale: float = 10.0) -> Tuple[float, float, float]:
    """Leave-one-out prototype classification of a support set:
    ``(mean cross-entropy, accuracy, calibrated cross-entropy)``.

    Each support sample is scored against the prototypes of the other classes and against its
    own class's prototype computed without it, with :func:`~hyperflow_ext.models.proto_logits`'
    metric and scale. The calibrated cross-entropy is the lowest mean cross-entropy of those
    logits rescaled to each of :data:`CALIBRATION_SCALES` (for ``metric="cosine"`` the logit
    scale itself; otherwise relative to ``scale`` by the same factors divided by 10): it scores
    how well the classes separate, not how far apart adaptation spread the features.

    Shape:
        - features: ``(shots, d)``; labels: ``(shots,)`` in ``0..way-1``.

    Raises:
        ValueError: a class has fewer than 2 support samples (leave-one-out is undefined).
    """
    way = int(labels.max()) + 1 if way is None else way
    counts = torch.bincount(labels, minlength=way)
    if bool((counts < 2).any()):
        raise ValueError("loo_scores: every class needs at least 2 support samples")
    protos = prototypes(features, labels, way)
    n = counts.to(features.dtype)[labels, None]
    own = (protos[labels] * n - features) / (n - 1)           # each sample's class mean without it
    logits = proto_logits(features, protos, metric, scale)
    if metric == "cosine":
        own_logit = scale * (F.normalize(features, dim=-1, eps=1e-8) * F.normalize(own, dim=-1, eps=1e-8)).sum(-1)
    else:
        own_logit = -scale * ((features - own) ** 2).sum(-1)
    logits = logits.scatter(1, labels[:, None], own_logit[:, None].to(logits.dtype))
    factors = [s / scale if metric == "cosine" else s / 10.0 for s in CALIBRATION_SCALES]
    calibrated = min(float(F.cross_entropy(logits * f, labels)) for f in factors)
    return (float(F.cross_entropy(logits, labels)), float((logits.argmax(-1) == labels).float().mean()),
            calibrated)


def _path_steps(horizons: Sequence[float], base_dt: float) -> int:
    """Fewest Euler steps to ``max(horizons)`` with ``dt <= base_dt`` that land on every horizon."""
    top = max(horizons)
    n = max(1, math.ceil(top / base_dt - 1e-9))
    while not all(abs(h / top * n - round(h / top * n)) < 1e-6 for h in horizons):
        n += 1
        if n > 100_000:
            raise ValueError(f"select_adapt: horizons {list(horizons)} share no step size; use simple ratios")
    return n


def select_adapt(backbone: nn.Module, support_x: torch.Tensor, support_y: torch.Tensor, flow: HyperFlow,
                 horizons: Sequence[float] = HORIZONS, relative: bool = True, criterion: str = "calibrated",
                 support_stats: Optional[bool] = None, steps: int = 50, way: Optional[int] = None,
                 ood_radius: float = 2.0) -> AdaptedProtoNet:
    """Adapt with the flow and keep, per task, the candidate the support set prefers — no autograd.

    Candidates: the flow's states at ``horizons`` (times ``flow.horizon`` when ``relative``; ``0``
    is the unadapted backbone), from one integration with steps no longer than
    ``fused_adapt``'s ``flow.horizon / steps``, plus, when ``support_stats`` (default: the
    backbone has BatchNorm layers with running statistics), :func:`support_statistics`. Each is
    scored by :func:`loo_scores` on its support features.

    Args:
        criterion: ``"calibrated"`` (lowest calibrated leave-one-out cross-entropy, see
            :func:`loo_scores`; the best of the three on ``fewshot_benchmark``), ``"accuracy"``
            (highest leave-one-out accuracy, lower cross-entropy breaking ties) or ``"loss"``
            (lowest leave-one-out cross-entropy at the flow's scale; it picks the longest horizon
            almost always, since adaptation spreads the features and that alone lowers it).
        steps: ``fused_adapt``'s step count that sets the step size.

    Returns:
        The chosen :class:`AdaptedProtoNet`; its ``selection`` attribute holds ``{"chosen": name,
        "scores": {name: (loss, accuracy, calibrated loss)}}``. With fewer than 2 shots in some class the
        criterion is undefined: ``fused_adapt`` at the tuned horizon is returned, with empty scores.

    Raises:
        ValueError: bad support sets, horizons (finite, ``>= 0``, one ``> 0``) or criterion.
        NotImplementedError: a stacked batch of tasks (adapt one task at a time).
    """
    op = "select_adapt"
    if criterion not in CRITERIA:
        raise ValueError(f"{op}: criterion must be one of {CRITERIA}, got {criterion!r}")
    if not horizons or not all(isinstance(h, (int, float)) and math.isfinite(h) and h >= 0 for h in horizons) \
            or max(horizons) <= 0:
        raise ValueError(f"{op}: horizons must be finite, >= 0 and not all 0, got {list(horizons)}")
    way, batched = check_support(op, backbone, support_x, support_y, way)
    if batched:
        raise NotImplementedError(f"{op}: adapt one task at a time (support_x of shape (shots, C, H, W))")
    if bool((torch.bincount(support_y, minlength=way) < 2).any()):
        model = fused_adapt(backbone, support_x, support_y, flow=flow, steps=steps, way=way, ood_radius=ood_radius)
        model.selection = {"chosen": f"h={flow.horizon:g}", "scores": {}}
        return model
    if support_stats is None:
        support_stats = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
                            for m in backbone.modules())
    scale = flow.horizon if relative else 1.0
    times = sorted({float(h) * scale for h in horizons})
    n = _path_steps(times, flow.horizon / steps)
    path = flow_path(backbone, support_x, support_y, flow, steps=n, horizon=times[-1], ood_radius=ood_radius)[0]
    models: Dict[str, AdaptedProtoNet] = {}
    for h in times:
        theta = path[int(round(h / times[-1] * n))]
        models[f"h={h:g}"] = AdaptedProtoNet(backbone, flow.subset, theta, support_x, support_y, way,
                                             flow.metric, flow.scale)
    if support_stats:
        models["support statistics"] = support_statistics(backbone, support_x, support_y, flow.metric, flow.scale,
                                                          way)
    scores: Dict[str, Tuple[float, float, float]] = {}
    with torch.no_grad():
        for name, m in models.items():
            feats = features_with(backbone, m.subset, m.theta, support_x, buffers=m.buffers)
            m._protos = prototypes(feats, support_y, way)  # the chosen model reuses this forward
            scores[name] = loo_scores(feats, support_y, way, flow.metric, flow.scale)
    if criterion == "loss":
        chosen = min(scores, key=lambda k: scores[k][0])
    elif criterion == "calibrated":
        chosen = min(scores, key=lambda k: scores[k][2])
    else:
        chosen = min(scores, key=lambda k: (-scores[k][1], scores[k][0]))
    model = models[chosen]
    model.selection = {"chosen": chosen, "scores": scores}
    return model

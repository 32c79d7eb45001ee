"""The support-only criterion behind :func:`~hyperflow_ext.flow.fused_adapt`'s per-task choice.

:func:`loo_scores` classifies a support set by leave-one-out prototypes; :func:`choose_candidate`
scores a few adapted models with it (one support forward each, no gradients) and keeps the best.
A gradient-free adapter may use the support set this way: it never sees a query.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .._stateless import stateless_view
from ..models import proto_logits, prototypes
from .adapted import AdaptedProtoNet
from .baselines import batch_statistics
from .params import ParamSubset

__all__ = ["loo_scores", "loo_scores_many", "choose_candidate", "support_features", "pseudo_shots", "select_adapt",
           "selection_horizons", "has_batchnorm_stats", "CALIBRATION_SCALES", "SELECT_MARGIN", "PSEUDO_MARGIN"]

CALIBRATION_SCALES = (2.5, 5.0, 10.0, 20.0, 40.0, 80.0)  # logit scales the calibrated loss minimises over
SCORING_PARTS = 5  # each candidate's support forward runs in this many equal parts
SELECT_MARGIN = 0.1  # nats of calibrated leave-one-out loss a candidate must gain over no adaptation
PSEUDO_MARGIN = 0.2  # the same with pseudo-shots (half the real evidence): a stricter bar


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
    return loo_scores_many(features[None], labels, way, metric, scale)[0]


def loo_scores_many(features: torch.Tensor, labels: torch.Tensor, way: Optional[int] = None,
                    metric: str = "cosine", scale: float = 10.0) -> List[Tuple[float, float, float]]:
    """:func:`loo_scores` of several candidates' features of one support set, in one batched op.

    Shape:
        - features: ``(candidates, shots, d)``; labels: ``(shots,)``.
    """
    way = int(labels.max()) + 1 if way is None else way
    counts = torch.bincount(labels, minlength=way)
    if bool((counts < 2).any()):
        raise ValueError("loo_scores: every class needs at least 2 support samples")
    k = features.shape[0]
    batch_labels = labels.expand(k, -1)
    protos = prototypes(features, batch_labels, way)                    # (k, way, d)
    n = counts.to(features.dtype)[labels, None]
    own = (protos[:, labels] * n - features) / (n - 1)                  # each sample's class mean without it
    logits = proto_logits(features, protos, metric, scale)              # (k, shots, way)
    if metric == "cosine":
        own_logit = scale * (F.normalize(features, dim=-1, eps=1e-8) * F.normalize(own, dim=-1, eps=1e-8)).sum(-1)
    else:
        own_logit = -scale * ((features - own) ** 2).sum(-1)
    logits = logits.scatter(2, batch_labels[..., None], own_logit[..., None].to(logits.dtype))
    factors = torch.tensor([1.0] + [s / scale if metric == "cosine" else s / 10.0 for s in CALIBRATION_SCALES],
                           dtype=logits.dtype, device=logits.device)
    scaled = logits[None] * factors[:, None, None, None]               # the logits and every rescaling at once
    losses = F.cross_entropy(scaled.reshape(-1, way), labels.repeat(len(factors) * k), reduction="none")
    losses = losses.view(len(factors), k, -1).mean(dim=2).T.tolist()   # (k, factors)
    accuracy = (logits.argmax(-1) == labels).double().mean(dim=1).tolist()
    return [(row[0], acc, min(row[1:])) for row, acc in zip(losses, accuracy)]


def selection_horizons(horizon: float) -> Tuple[float, ...]:
    """The drift states :func:`fused_adapt` offers as candidates: half the horizon and the horizon
    (later states overshoot more often than they help)."""
    return (horizon / 2, horizon)


def has_batchnorm_stats(backbone: nn.Module) -> bool:
    """Whether ``backbone`` has a BatchNorm layer with running statistics (support statistics apply)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in backbone.modules())


def choose_candidate(backbone: nn.Module, subset: ParamSubset,
                     candidates: Dict[str, Tuple[torch.Tensor, Optional[object]]], support_x: torch.Tensor,
                     support_y: torch.Tensor, way: int, metric: str = "cosine", scale: float = 10.0,
                     fallback: Optional[str] = None, reference: str = "none",
                     margin: float = SELECT_MARGIN, features: Optional[Dict[str, torch.Tensor]] = None,
                     whole_batch: bool = False, pseudo_x: Optional[torch.Tensor] = None,
                     pseudo_margin: float = PSEUDO_MARGIN) -> AdaptedProtoNet:
    """The candidate whose support features give the lowest calibrated leave-one-out loss, kept only
    when it beats ``reference`` (the unadapted model) by more than ``margin``; otherwise ``reference``.

    Args:
        candidates: ``{name: (theta (P,), buffers)}`` where ``buffers`` is ``None``, a ``{name:
            tensor}`` dict, or ``"support"`` for BatchNorm statistics re-estimated on the support set.
        fallback: the candidate kept when some class has a single shot and no ``pseudo_x`` is
            given (no criterion then); default the first.
        reference: the candidate to keep unless another is clearly better (must be in ``candidates``).
        margin: how much lower (in nats) another candidate's calibrated loss must be: the support set
            is small, and a candidate that wins by less is as likely to hurt the queries as to help.
        features: ``{name: (shots, d)}`` support features already computed for some candidates
            (e.g. by the forward that built them); the others get one support forward each.
        whole_batch: run every support forward on the whole support set at once (faster; the
            default runs :data:`SCORING_PARTS` equal parts, for a fraction of the peak memory, and
            re-estimates BatchNorm statistics from one forward of the parts per layer).
        pseudo_x: when some class has a single shot, a second view of every support image
            (labelled like it, e.g. :func:`pseudo_shots`): the criterion then runs on the support
            set and these views together, with ``pseudo_margin``. The chosen model's prototypes
            still come from ``support_x`` alone.

    Returns:
        The chosen :class:`AdaptedProtoNet` with ``selection = {"chosen": name, "scores": {name:
        (loss, accuracy, calibrated loss)}}`` (empty scores for the fallback).
    """
    features = dict(features or {})

    def model(name: str) -> AdaptedProtoNet:
        theta, buffers = candidates[name]
        if isinstance(buffers, str):  # statistics and the features at them, from forwards of the parts
            buffers, features[name] = batch_statistics(backbone, support_x, parts)
        return AdaptedProtoNet(backbone, subset, theta, support_x, support_y, way, metric, scale, buffers=buffers)

    single = bool((torch.bincount(support_y, minlength=way) < 2).any())
    if single and pseudo_x is not None and pseudo_x.shape != support_x.shape:
        raise ValueError(f"choose_candidate: pseudo_x must have the support set's shape {tuple(support_x.shape)}, "
                         f"got {tuple(pseudo_x.shape)}")
    parts = 1 if whole_batch else SCORING_PARTS  # parts: a fraction of the peak, at some speed
    if single and pseudo_x is None:
        name = fallback if fallback in candidates else next(iter(candidates))
        chosen = model(name)
        chosen.selection = {"chosen": name, "scores": {}}
        return chosen
    models = {name: model(name) for name in candidates}
    with torch.no_grad():
        for name, m in models.items():
            if name not in features:
                features[name] = support_features(backbone, subset, m.theta, support_x, m.buffers, parts)
        scoring, labels = features, support_y
        if single:  # each image and its second view: two shots per class
            scoring = {name: torch.cat([features[name], support_features(backbone, subset, m.theta, pseudo_x,
                                                                          m.buffers, parts)])
                       for name, m in models.items()}
            labels, margin = torch.cat([support_y, support_y]), pseudo_margin
        # a candidate that breaks the features is never chosen
        finite = [name for name in models if bool(torch.isfinite(scoring[name]).all())]
        if not finite:
            raise FloatingPointError("choose_candidate: every candidate gives non-finite support features")
        scored = loo_scores_many(torch.stack([scoring[n] for n in finite]), labels, way, metric, scale)
        scores: Dict[str, Tuple[float, float, float]] = dict(zip(finite, scored))
    name = min(scores, key=lambda k: scores[k][2])
    if name != reference and reference in scores and scores[name][2] > scores[reference][2] - margin:
        name = reference
    chosen = models[name]
    with torch.no_grad():
        chosen._protos = prototypes(features[name], support_y, way)  # the chosen model reuses its forward
    chosen.selection = {"chosen": name, "scores": scores}
    return chosen


def pseudo_shots(support_x: torch.Tensor) -> Optional[torch.Tensor]:
    """A second view of every support image for the criterion at one shot per class: the image
    shifted by one pixel down and right (wrapping round), a change a convolutional backbone should
    not care about and a single-shot class cannot tell apart from its own variation. ``None`` for
    inputs that are not ``(shots, C, H, W)`` images of at least 4x4.
    """
    if support_x.dim() != 4 or min(support_x.shape[-2:]) < 4:
        return None
    return torch.roll(support_x, shifts=(1, 1), dims=(-2, -1))


def support_features(backbone: nn.Module, subset: ParamSubset, theta: torch.Tensor, support_x: torch.Tensor,
                     buffers: Optional[Dict[str, torch.Tensor]] = None, parts: int = SCORING_PARTS) -> torch.Tensor:
    """Support features with ``theta`` (and ``buffers``) substituted: one private view, the support
    set in ``parts`` equal parts (activation memory of a fifth of it by default, like the task encoder).

    Shape:
        - theta: ``(P,)``; support_x: ``(shots, C, H, W)``; returns ``(shots, d)``.
    """
    view = stateless_view(backbone, {**subset.unflatten(theta), **(buffers or {})})
    with torch.no_grad():
        return torch.cat([view(part) for part in support_x.tensor_split(max(1, min(parts, support_x.shape[0])))])


def select_adapt(backbone: nn.Module, support_x: torch.Tensor, support_y: torch.Tensor, flow,
                 **kwargs) -> AdaptedProtoNet:
    """Deprecated alias of :func:`~hyperflow_ext.flow.fused_adapt`, whose default now chooses per task."""
    warnings.warn("select_adapt is deprecated: fused_adapt chooses per task by default", DeprecationWarning,
                  stacklevel=2)
    from .adapt import fused_adapt
    return fused_adapt(backbone, support_x, support_y, flow, **kwargs)

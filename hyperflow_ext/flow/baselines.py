"""The methods HyperFlow is compared with: direct transfer and autograd fine-tuning, and the
learning-rate search that tunes fine-tuning (and so the recipe HyperFlow emulates) on
meta-training episodes."""
from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from .._stateless import stateless_view
from ..models import proto_logits, prototypes
from .adapted import AdaptedProtoNet
from .checks import as_episode, check_support
from .functional import features_with, finetune
from .params import ParamSpec, ParamSubset

__all__ = ["direct_transfer", "support_statistics", "batch_statistics", "finetune_adapt", "tune_lr", "split_support", "LrChoice",
           "LR_GRID"]

logger = logging.getLogger(__name__)

LR_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)


def direct_transfer(backbone: nn.Module, support_x: torch.Tensor, support_y: torch.Tensor,
                    metric: str = "cosine", scale: float = 10.0, way: Optional[int] = None) -> AdaptedProtoNet:
    """No adaptation: a ProtoNet on the pretrained backbone."""
    support_x, support_y, way, _ = check_support("direct_transfer", backbone, support_x, support_y, way)
    subset = ParamSubset(backbone, "bias" if any(n.endswith("bias") for n, _ in backbone.named_parameters()) else "all")
    return AdaptedProtoNet(backbone, subset, subset.vector(backbone), support_x, support_y, way, metric, scale)


def support_statistics(backbone: nn.Module, support_x: torch.Tensor, support_y: torch.Tensor,
                       metric: str = "cosine", scale: float = 10.0, way: Optional[int] = None) -> AdaptedProtoNet:
    """Gradient-free baseline for BatchNorm backbones: re-estimate every BatchNorm layer's
    statistics on the support set (one forward, no gradients), then a ProtoNet on that backbone.

    The statistics live in the returned model; the backbone's own buffers are not touched.

    Raises:
        ValueError: the backbone has no BatchNorm layer with running statistics, or bad support data.
    """
    support_x, support_y, way, batched = check_support("support_statistics", backbone, support_x, support_y, way)
    if batched:
        raise NotImplementedError("support_statistics: adapt one task at a time (support_x of shape (shots, C, H, W))")
    stats, _ = batch_statistics(backbone, support_x)
    subset = ParamSubset(backbone, "bias" if any(n.endswith("bias") for n, _ in backbone.named_parameters()) else "all")
    return AdaptedProtoNet(backbone, subset, subset.vector(backbone), support_x, support_y, way, metric, scale,
                           buffers=stats)


def batch_statistics(backbone: nn.Module, x: torch.Tensor,
                     parts: int = 1) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """Every BatchNorm layer's statistics of ``x`` (no gradients), and the features at them.

    The variances are the ones BatchNorm normalises with in training mode (biased), so the
    backbone in eval mode with these buffers gives exactly the returned features.

    With ``parts > 1`` no forward holds more than ``1/parts`` of ``x``: the statistics stay exact
    (the same as one whole-batch forward, up to float rounding), at the price of one forward of
    the parts per BatchNorm layer, each stopping at that layer (:func:`_statistics_in_parts`).

    Shape:
        - x: ``(n, ...)`` a batch the backbone takes; features ``(n, d)``.

    Returns:
        ``({"<layer>.running_mean" / ".running_var": tensor}, features (n, d))``.

    Raises:
        ValueError: the backbone has no BatchNorm layer with running statistics, or a bad ``parts``.
    """
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise ValueError(f"batch_statistics: parts must be a positive int, got {parts!r}")
    norms = {n: m for n, m in backbone.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}
    if not norms:
        raise ValueError("support_statistics: the backbone has no BatchNorm layer with running statistics")
    chunks = x.tensor_split(max(1, min(parts, x.shape[0])))
    # a BatchNorm without running statistics normalises each part by its own: only the whole batch is exact
    per_batch = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None
                    for m in backbone.modules())
    if len(chunks) > 1 and not per_batch:
        found = _statistics_in_parts(backbone, norms, chunks)
        if found is not None:
            return found
    return _statistics_whole(backbone, norms, x)


def _channel_moments(inp: torch.Tensor) -> Tuple[int, torch.Tensor, torch.Tensor]:
    """``(values per channel, channel means, sums of squared deviations)`` of a map (channels on
    dim 1), the moments in float64.

    Two passes (``torch.var_mean`` over these dims is several times slower on CPU), the second
    over quarters of the batch: its temporary is a quarter of the map, not a second map.
    """
    x = inp.detach()
    dims = [d for d in range(x.dim()) if d != 1]
    mean = x.mean(dim=dims, keepdim=True)
    m2 = sum((piece - mean).square_().sum(dim=dims, dtype=torch.float64)
             for piece in x.split(max(1, -(-x.shape[0] // 4))))
    return x.numel() // x.shape[1], mean.flatten().double(), m2


def _statistics_whole(backbone: nn.Module, norms: Dict[str, nn.Module],
                      x: torch.Tensor) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """:func:`batch_statistics` in one forward: each layer measures its input as it is reached
    and normalises with what it measured, as BatchNorm does in training mode (a layer called twice
    normalises each call by its own input and keeps the last). The layers run in eval mode, so a
    backbone with an in-place norm path (Conv4) keeps it."""
    fresh: Dict[str, torch.Tensor] = {}
    for n, m in norms.items():
        fresh[f"{n}.running_mean"] = torch.zeros_like(m.running_mean)
        fresh[f"{n}.running_var"] = torch.ones_like(m.running_var)

    def measure(name: str):
        def hook(module, args):
            count, mean, m2 = _channel_moments(args[0])
            if count < 2:  # what BatchNorm in training mode refuses too
                raise ValueError(f"batch_statistics: {name} sees one value per channel ({tuple(args[0].shape)}); "
                                 f"statistics need more")
            fresh[f"{name}.running_mean"].copy_(mean)
            fresh[f"{name}.running_var"].copy_(m2 / count)
        hook.reads_only = True  # it writes the view's statistics, never the input
        return hook

    view = stateless_view(backbone, fresh, forward_pre_hooks={n: measure(n) for n in norms})
    for n, m in view.named_modules():
        if n in norms:  # the view's own flags: normalise with the buffers the hook just wrote
            m.training = False
    with torch.no_grad():
        feats = view(x)
    return fresh, feats


class _ReachedUnknown(BaseException):
    """Raised by a BatchNorm layer's pre-hook to end a forward once its input has been measured
    (a ``BaseException``, so a backbone's own ``except Exception`` cannot swallow it)."""


def _statistics_in_parts(backbone: nn.Module, norms: Dict[str, nn.Module],
                         chunks: Sequence[torch.Tensor]) -> Optional[Tuple[Dict[str, torch.Tensor], torch.Tensor]]:
    """Exact BatchNorm statistics from forwards of ``chunks`` only.

    A layer's statistics depend on those of every layer before it, so each round runs the chunks
    up to the first layer not yet measured (in eval mode at the statistics found so far), pools
    the channel means and variances of its input over the chunks (combined in float64), and stops there.
    The last round, with every layer known, gives the features. ``None`` when the forward does
    not allow it (a layer called twice, or the chunks reaching different layers first); the
    caller then runs the whole batch.
    """
    known: Dict[str, torch.Tensor] = {}
    moments: List[Tuple[int, torch.Tensor, torch.Tensor]] = []  # (count, mean, sum of squared deviations)
    reached: List[str] = []
    calls: Dict[str, int] = {}

    def pre_hook(name: str):
        def hook(module, args):
            calls[name] = calls.get(name, 0) + 1
            if f"{name}.running_mean" in known:
                return None
            moments.append(_channel_moments(args[0]))
            reached.append(name)
            raise _ReachedUnknown
        hook.reads_only = True  # it stops the forward before the layer writes anything
        return hook

    pending = dict(norms)
    with torch.no_grad():
        while True:
            moments.clear()
            reached.clear()
            view = stateless_view(backbone, known, forward_pre_hooks={n: pre_hook(n) for n in norms})
            for n, m in view.named_modules():
                if n in norms:
                    m.training = False  # known layers normalise with the statistics found so far
            feats = []
            for chunk in chunks:
                calls.clear()
                try:
                    feats.append(view(chunk))
                except _ReachedUnknown:
                    pass
                if any(c > 1 for c in calls.values()):
                    return None
            if not reached:
                for n, m in pending.items():  # never ran: the fresh buffers, as one forward leaves them
                    known[f"{n}.running_mean"] = torch.zeros_like(m.running_mean)
                    known[f"{n}.running_var"] = torch.ones_like(m.running_var)
                return known, torch.cat(feats)
            name = reached[0]
            if len(reached) != len(chunks) or any(r != name for r in reached):
                return None
            count, mean, m2 = moments[0]
            for c, mu, s in moments[1:]:  # pooled moments (Chan et al.)
                delta = mu - mean
                total = count + c
                mean, m2, count = mean + delta * (c / total), m2 + s + delta * delta * (count * c / total), total
            module = pending.pop(name)
            known[f"{name}.running_mean"] = mean.to(module.running_mean)
            known[f"{name}.running_var"] = (m2 / count).to(module.running_var)


def finetune_adapt(backbone: nn.Module, support_x: torch.Tensor, support_y: torch.Tensor,
                   params: ParamSpec = "bias", steps: int = 50, lr: float = 1e-2, optimizer: str = "adam",
                   metric: str = "cosine", scale: float = 10.0, way: Optional[int] = None) -> AdaptedProtoNet:
    """Fine-tune ``params`` of the backbone on the support loss with ``torch.optim`` (autograd).

    ``params="bias"`` is bias tuning, ``"head"`` head tuning, ``"all"`` full fine-tuning. The
    backbone is not modified; the tuned values live in the returned model.
    """
    support_x, support_y, way, batched = check_support("finetune_adapt", backbone, support_x, support_y, way)
    if batched:
        raise NotImplementedError("finetune_adapt: adapt one task at a time (support_x of shape (shots, C, H, W))")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"finetune_adapt: steps must be a non-negative int, got {steps!r}")
    subset = ParamSubset(backbone, params)
    theta, _, _ = finetune(backbone, subset, support_x, support_y, subset.vector(backbone), steps, way,
                           metric, scale, optimizer, lr)
    return AdaptedProtoNet(backbone, subset, theta, support_x, support_y, way, metric, scale)


@dataclass
class LrChoice:
    """The outcome of :func:`tune_lr`.

    Attributes:
        lr: the chosen learning rate.
        accuracy: mean query accuracy after fine-tuning, per candidate learning rate.
        unadapted: mean query accuracy of the pretrained parameters on the same episodes.
        loss_drop: mean relative drop of the support loss at the chosen rate (``1 - end/start``).
        tasks: how many episodes were scored.
    """

    lr: float
    accuracy: Dict[float, float] = field(default_factory=dict)
    unadapted: float = float("nan")
    loss_drop: float = float("nan")
    tasks: int = 0

    def as_dict(self) -> dict:
        return {"lr": self.lr, "accuracy": {f"{k:g}": v for k, v in self.accuracy.items()},
                "unadapted": self.unadapted, "loss_drop": self.loss_drop, "tasks": self.tasks}


def split_support(episode: Sequence) -> tuple:
    """``(support_x, support_y, query_x, query_y)`` from a support set alone: per class, the first
    half of its shots (at least one) stay support and the rest become queries (leave shots out).

    Raises:
        ValueError: a class with fewer than 2 shots (nothing to hold out).
    """
    sx, sy = episode[0], episode[1]
    way = int(sy.max()) + 1
    keep = torch.zeros_like(sy, dtype=torch.bool)
    for c in range(way):
        idx = (sy == c).nonzero().flatten()
        if idx.numel() < 2:
            raise ValueError(f"split_support: class {c} has {idx.numel()} shot(s); leaving shots out needs >= 2")
        keep[idx[: idx.numel() // 2]] = True
    return sx[keep], sy[keep], sx[~keep], sy[~keep]


def has_queries(episode: Sequence) -> bool:
    return len(episode) >= 4 and isinstance(episode[2], torch.Tensor) and episode[2].numel() > 0


def tune_lr(backbone: nn.Module, episodes: Iterable, params: ParamSpec = "bias", grid: Sequence[float] = LR_GRID,
            tasks: int = 20, steps: int = 50, optimizer: str = "adam", metric: str = "cosine", scale: float = 10.0,
            progress: bool = False) -> LrChoice:
    """Pick fine-tuning's learning rate by query accuracy on a few (meta-training) episodes.

    The way a user tunes bias tuning: fine-tune on each support set for ``steps`` steps at every
    rate in ``grid`` and keep the rate with the best mean query accuracy (ties: the smaller
    rate). Use episodes of the meta-training domains only, never of a test domain. Episodes
    without queries are scored by leaving shots out (:func:`split_support`): half of each class's
    shots fine-tune, the other half score.

    Args:
        backbone: the pretrained backbone (not modified).
        episodes: iterable of ``(support_x, support_y[, query_x, query_y, ...])``.
        params: which parameters fine-tuning adapts.
        grid: candidate learning rates (each finite and > 0).
        tasks: how many episodes to score.
        steps: fine-tuning steps per episode.

    Returns:
        An :class:`LrChoice` with the rate, every candidate's accuracy and the loss drop.

    Raises:
        ValueError: an empty or invalid grid, or episodes with neither queries nor 2 shots per class.
    """
    if not grid or not all(isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0 for lr in grid):
        raise ValueError(f"tune_lr: grid must hold finite learning rates > 0, got {list(grid)}")
    if isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 1:
        raise ValueError(f"tune_lr: tasks must be a positive int, got {tasks!r}")
    eps = [as_episode(backbone, ep) for ep in itertools.islice(episodes, tasks)]
    if not eps:
        raise ValueError("tune_lr: the episode iterable is empty")
    try:
        eps = [tuple(ep) if has_queries(ep) else split_support(ep) for ep in eps]
    except ValueError as err:
        raise ValueError(f"tune_lr: needs episodes with query sets (EpisodeSampler(query > 0)) or at least 2 "
                         f"shots per class to leave out ({err})") from None
    subset = ParamSubset(backbone, params)
    theta0 = subset.vector(backbone)
    grid = sorted(float(lr) for lr in grid)

    def accuracy(theta: torch.Tensor, ep) -> float:
        with torch.no_grad():
            way = int(ep[1].max()) + 1
            protos = prototypes(features_with(backbone, subset, theta, ep[0]), ep[1], way)
            logits = proto_logits(features_with(backbone, subset, theta, ep[2]), protos, metric, scale)
            return float((logits.argmax(-1) == ep[3]).float().mean())

    scores: Dict[float, float] = {}
    drops: Dict[float, float] = {}
    for lr in tqdm(grid, desc="lr search", disable=not progress, unit="lr"):
        accs, rel = [], []
        for ep in eps:
            theta, _, losses = finetune(backbone, subset, ep[0], ep[1], theta0, steps, int(ep[1].max()) + 1,
                                        metric, scale, optimizer, lr)
            accs.append(accuracy(theta, ep))
            rel.append(1.0 - losses[-1] / losses[0] if losses and losses[0] > 0 else 0.0)
        scores[lr], drops[lr] = sum(accs) / len(accs), sum(rel) / len(rel)
    best = max(grid, key=lambda lr: (scores[lr], -lr))
    choice = LrChoice(best, scores, sum(accuracy(theta0, ep) for ep in eps) / len(eps), drops[best], len(eps))
    logger.info("tune_lr: %s on %d episodes -> lr %g (accuracy %.3f, unadapted %.3f, loss drop %.1f %%)",
                {f"{k:g}": round(v, 4) for k, v in scores.items()}, len(eps), best, scores[best], choice.unadapted,
                100 * choice.loss_drop)
    return choice

"""Gradual magnitude pruning (Zhu & Gupta, "To prune, or not to prune", 2017): the standard strong baseline.

Sparsity rises during training on the cubic schedule

    s_t = s_f + (s_i - s_f) · (1 - (t - t_0) / (t_end - t_0))³      for t_0 <= t <= t_end,

and the masks are recomputed every ``frequency`` steps by global weight magnitude over every selected
``nn.Linear`` / ``nn.Conv2d`` (the smallest ``|w|`` across layers go first; weights already pruned stay
pruned because they are zero). Pruning ends at ``prune_fraction`` of the training steps; the rest
fine-tunes at the final sparsity. Same recipe as :func:`~hyperflow_ext.prune.magnitude_prune` (SGD with
momentum, cosine learning rate over all epochs, label-smoothed cross-entropy), so the two baselines and
the Hyperflows pruner can be compared at the same epoch budget.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence, Type

import torch
from torch import nn
from tqdm.auto import tqdm

from ._loop import cosine_lr, evaluate, train_epoch

__all__ = ["cubic_sparsity", "gradual_magnitude_prune"]


def cubic_sparsity(step: int, begin: int, end: int, final: float, initial: float = 0.0) -> float:
    """Zhu & Gupta's target sparsity at ``step``: ``initial`` before ``begin``, ``final`` after ``end``."""
    if step <= begin:
        return float(initial)
    if step >= end or end <= begin:
        return float(final)
    frac = (step - begin) / (end - begin)
    return float(final + (initial - final) * (1.0 - frac) ** 3)


def gradual_magnitude_prune(model: nn.Module, sparsity: float, train_loader: Iterable, epochs: int, *,
                            initial_sparsity: float = 0.0, prune_fraction: float = 0.75,
                            frequency: Optional[int] = None, lr: float = 0.05, momentum: float = 0.9,
                            weight_decay: float = 5e-4, label_smoothing: float = 0.1,
                            layer_types: Sequence[Type[nn.Module]] = (nn.Linear, nn.Conv2d),
                            val_loader: Optional[Iterable] = None, progress: bool = True) -> Dict[str, Any]:
    """Train ``model`` while pruning it gradually to ``sparsity`` (cubic schedule, global magnitude).

    Args:
        model: modified in place; ends with plain layers whose pruned weights are exactly zero.
        sparsity: final fraction of the selected weights pruned, in ``[0, 1)``.
        train_loader: re-iterable ``(inputs, labels)`` batches with a ``len()``.
        epochs: training epochs in total (pruning and fine-tuning), ``>= 1``.
        initial_sparsity: sparsity at the first step.
        prune_fraction: share of the training steps over which the sparsity ramps up, in ``(0, 1]``.
        frequency: steps between mask updates (default: a quarter epoch, at least 1).
        lr, momentum, weight_decay, label_smoothing: the training recipe (cosine over all epochs).
        layer_types: prunable module types.
        val_loader: optional loader evaluated after every epoch.
        progress: show a tqdm bar.

    Returns:
        ``{"sparsity": achieved overall sparsity, "history": per-epoch records,
        "schedule": [(step, target sparsity) at every mask update]}``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: bad sparsity, fractions, epochs, an unsized loader, or nothing to prune.
    """
    op = "gradual_magnitude_prune"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{op}: model must be a torch.nn.Module, got {type(model).__name__}")
    for name, v, hi in (("sparsity", sparsity, 1.0), ("initial_sparsity", initial_sparsity, 1.0)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) < hi:
            raise ValueError(f"{op}: {name} must be a float in [0, 1), got {v!r}")
    if initial_sparsity > sparsity:
        raise ValueError(f"{op}: initial_sparsity ({initial_sparsity}) exceeds sparsity ({sparsity})")
    if isinstance(prune_fraction, bool) or not isinstance(prune_fraction, (int, float)) or not 0 < prune_fraction <= 1:
        raise ValueError(f"{op}: prune_fraction must be in (0, 1], got {prune_fraction!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"{op}: epochs must be an int >= 1, got {epochs!r}")
    try:
        steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{op}: train_loader must have a len() (the schedule is in steps)") from None
    weights = [m.weight for m in model.modules() if isinstance(m, tuple(layer_types))]
    if not weights:
        raise ValueError(f"{op}: nothing to prune: the model has no {'/'.join(t.__name__ for t in layer_types)} layer")
    total_steps = max(1, steps_per_epoch * epochs)
    end = max(1, int(round(prune_fraction * total_steps)))
    freq = frequency if frequency is not None else max(1, steps_per_epoch // 4)
    if isinstance(freq, bool) or not isinstance(freq, int) or freq < 1:
        raise ValueError(f"{op}: frequency must be an int >= 1, got {frequency!r}")
    masks = [torch.ones_like(w, dtype=torch.bool) for w in weights]
    schedule: List[tuple] = []

    def update_masks(step: int) -> None:
        target = cubic_sparsity(step, 0, end, float(sparsity), float(initial_sparsity))
        scores = torch.cat([w.detach().abs().flatten() for w in weights])
        drop = int(round(target * scores.numel()))
        if drop:
            threshold = torch.kthvalue(scores, drop).values
            for i, w in enumerate(weights):
                masks[i] = w.detach().abs() > threshold
        schedule.append((step, target))

    def before_forward(step: int) -> None:
        if step <= end and (step % freq == 0 or step == end):
            update_masks(step)
        with torch.no_grad():
            for w, m in zip(weights, masks):
                w.mul_(m)

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=momentum,
                          weight_decay=weight_decay)
    history: List[Dict[str, Any]] = []
    step = 0
    with tqdm(total=epochs, desc="gradual magnitude", unit="epoch", disable=not progress, leave=False) as bar:
        for e in range(epochs):
            loss, acc, step = train_epoch(model, train_loader, opt, label_smoothing=label_smoothing,
                                          lr_at=lambda s: cosine_lr(lr, s, total_steps), step0=step,
                                          before_forward=before_forward)
            rec: Dict[str, Any] = {"epoch": e + 1, "loss": loss, "acc": acc,
                                   "target_sparsity": cubic_sparsity(step, 0, end, float(sparsity),
                                                                     float(initial_sparsity))}
            if val_loader is not None:
                with torch.no_grad():
                    for w, m in zip(weights, masks):
                        w.mul_(m)
                rec["val_acc"] = evaluate(model, val_loader)
            history.append(rec)
            bar.update(1)
    if step <= end:  # fewer steps than planned (a short loader): land on the target
        update_masks(end)
    with torch.no_grad():
        for w, m in zip(weights, masks):
            w.mul_(m)
    pruned = sum(int((w == 0).sum()) for w in weights)
    return {"sparsity": pruned / sum(w.numel() for w in weights), "history": history, "schedule": schedule}

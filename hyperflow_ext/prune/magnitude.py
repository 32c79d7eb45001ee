"""The referee: global magnitude pruning with ``torch.nn.utils.prune`` plus fine-tuning.

:func:`magnitude_prune` prunes every ``nn.Linear`` / ``nn.Conv2d`` weight of a model together
(``prune.global_unstructured`` with ``prune.L1Unstructured``: the smallest ``|w|`` across all
layers go first) and fine-tunes with the same recipe the pruner uses for its weights (SGD with
momentum, cosine schedule, label-smoothed cross-entropy). ``rounds > 1`` spreads the pruning
over the epochs (geometric steps toward the target, each followed by its share of fine-tuning);
the default is one-shot pruning followed by fine-tuning for all ``epochs``.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Type

import torch
from torch import nn
from torch.nn.utils import prune
from tqdm.auto import tqdm

from ._loop import cosine_lr, evaluate, train_epoch

__all__ = ["magnitude_prune"]


def _targets(model: nn.Module, layer_types: Tuple[Type[nn.Module], ...]) -> List[Tuple[nn.Module, str]]:
    return [(m, "weight") for _, m in model.named_modules() if isinstance(m, layer_types)]


def magnitude_prune(model: nn.Module, sparsity: float, train_loader: Iterable, epochs: int, *,
                    rounds: int = 1, lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 5e-4,
                    label_smoothing: float = 0.1, layer_types: Sequence[Type[nn.Module]] = (nn.Linear, nn.Conv2d),
                    val_loader: Optional[Iterable] = None, progress: bool = True) -> Dict[str, Any]:
    """Globally prune ``model`` to ``sparsity`` by weight magnitude, fine-tuning for ``epochs``.

    The pruning is made permanent at the end (``prune.remove``): the model keeps plain layers
    whose pruned weights are exactly zero.

    Args:
        model: modified in place.
        sparsity: fraction of the selected weights to prune, in ``[0, 1)``.
        train_loader: re-iterable ``(inputs, labels)`` batches.
        epochs: fine-tuning epochs in total (``>= rounds``).
        rounds: pruning steps (1 = one-shot before fine-tuning).
        lr, momentum, weight_decay, label_smoothing: fine-tuning recipe (cosine over each round).
        layer_types: prunable module types.
        val_loader: optional loader evaluated after every epoch.
        progress: show a tqdm bar.

    Returns:
        ``{"sparsity": achieved overall sparsity, "history": per-epoch records}``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``sparsity`` outside ``[0, 1)``, bad epoch counts, nothing to prune.
    """
    op = "magnitude_prune"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{op}: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"{op}: sparsity must be a float in [0, 1), got {sparsity!r}")
    for name, v, low in (("epochs", epochs, 0), ("rounds", rounds, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{op}: {name} must be an int >= {low}, got {v!r}")
    if rounds > max(1, epochs):
        raise ValueError(f"{op}: rounds ({rounds}) cannot exceed epochs ({epochs})")
    params = _targets(model, tuple(layer_types))
    if not params:
        raise ValueError(f"{op}: nothing to prune: the model has no {'/'.join(t.__name__ for t in layer_types)} layer")
    total = sum(m.weight.numel() for m, _ in params)
    per_round = [epochs // rounds + (1 if r < epochs % rounds else 0) for r in range(rounds)]
    history: List[Dict[str, Any]] = []
    bar = tqdm(total=epochs, desc="magnitude", unit="epoch", disable=not progress, leave=False)
    try:
        for r in range(rounds):
            # cumulative density after round r: geometric steps from 1 to (1 - sparsity)
            keep = (1.0 - float(sparsity)) ** ((r + 1) / rounds)
            already = sum(int((m.weight_mask == 0).sum()) if hasattr(m, "weight_mask") else 0 for m, _ in params)
            target_pruned = int(round(total * (1.0 - keep)))
            if target_pruned > already:
                # global_unstructured prunes `amount` of the still-unpruned entries (PruningContainer)
                prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=target_pruned - already)
            n_ep = per_round[r]
            if n_ep == 0:
                continue
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=momentum,
                                  weight_decay=weight_decay)
            try:
                steps = len(train_loader)  # type: ignore[arg-type]
            except TypeError:
                steps = 0
            n_total, step = steps * n_ep, 0
            for e in range(n_ep):
                epoch_lr = cosine_lr(lr, e, n_ep)
                loss, acc, step = train_epoch(model, train_loader, opt, label_smoothing=label_smoothing,
                                              lr_at=(lambda s: cosine_lr(lr, s, n_total)) if n_total
                                              else (lambda s, v=epoch_lr: v), step0=step)
                rec: Dict[str, Any] = {"epoch": len(history) + 1, "round": r + 1, "loss": loss, "acc": acc}
                if val_loader is not None:
                    rec["val_acc"] = evaluate(model, val_loader)
                history.append(rec)
                bar.set_postfix({"loss": f"{loss:.3f}", "acc": f"{acc:.3f}"}, refresh=False)
                bar.update(1)
    finally:
        bar.close()
    pruned = 0
    for m, name in params:
        if prune.is_pruned(m):
            prune.remove(m, name)
        pruned += int((m.weight == 0).sum())
    return {"sparsity": pruned / total, "history": history}

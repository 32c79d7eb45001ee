"""The one supervised training loop shared by the pruner, the magnitude baseline and the experiment.

* :class:`TensorLoader` — shuffled in-memory mini-batches (much lighter than a ``DataLoader`` for
  small tensors held in memory); reseeded per epoch, so runs are reproducible.
* :func:`train_epoch` — one pass with SGD-style stepping, an optional per-step learning-rate
  function and a hook called between ``backward`` and ``optimizer.step``.
* :func:`evaluate` — accuracy (and mean loss) of a classifier over a loader.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from .._checks import as_class_labels, as_model_input, module_dtype

__all__ = ["TensorLoader", "train_epoch", "evaluate", "cosine_lr", "batch_to"]


class TensorLoader:
    """Mini-batches ``(x, y)`` of in-memory tensors.

    Args:
        x: ``(n, ...)`` inputs.
        y: ``(n,)`` labels.
        batch_size: batch size (the last batch may be smaller unless ``drop_last``).
        shuffle: reshuffle every epoch (seeded by ``seed`` and the epoch count).
        seed: base seed of the shuffling.
        drop_last: drop an incomplete last batch.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 64, shuffle: bool = False,
                 seed: int = 0, drop_last: bool = False) -> None:
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError("TensorLoader: x and y must be tensors")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"TensorLoader: x and y must have the same length, got {x.shape[0]} and {y.shape[0]}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"TensorLoader: batch_size must be a positive int, got {batch_size!r}")
        self.x, self.y, self.batch_size = x, y, batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, int(seed), drop_last
        self._epoch = 0

    def fresh(self) -> "TensorLoader":
        """A copy that starts again from the first epoch's order (same data, same seed)."""
        return TensorLoader(self.x, self.y, self.batch_size, self.shuffle, self.seed, self.drop_last)

    def __len__(self) -> int:
        n = self.x.shape[0]
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        n = self.x.shape[0]
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self._epoch)
            order = torch.randperm(n, generator=gen)
        else:
            order = None
        self._epoch += 1
        for i in range(len(self)):
            sl = slice(i * self.batch_size, min(n, (i + 1) * self.batch_size))
            if order is None:
                yield self.x[sl], self.y[sl]
            else:
                idx = order[sl]
                yield self.x[idx], self.y[idx]


def batch_to(batch, device: torch.device, dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split a batch into ``(x, y)`` on ``device``: floating inputs in ``dtype`` (the model's; NumPy
    hands over float64) and integer labels as int64 (NumPy's int32 too).

    Raises:
        TypeError: the batch is not an ``(inputs, labels)`` pair of tensors.
    """
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise TypeError(f"batches must be (inputs, labels) pairs, got {type(batch).__name__}")
    x, y = batch[0], batch[1]
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"batches must hold tensors, got ({type(x).__name__}, {type(y).__name__})")
    return (as_model_input(x.to(device, non_blocking=True), dtype),
            as_class_labels(y.to(device, non_blocking=True)))


def cosine_lr(base: float, step: int, total: int, final: float = 0.0) -> float:
    """Cosine annealing from ``base`` at ``step = 0`` to ``final`` at ``step = total``."""
    if total <= 0:
        return base
    t = min(max(step, 0), total) / total
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * t))


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def train_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, *,
                label_smoothing: float = 0.0, lr_at: Optional[Callable[[int], float]] = None, step0: int = 0,
                after_backward: Optional[Callable[[int], None]] = None,
                before_forward: Optional[Callable[[int], None]] = None, shard: bool = False
                ) -> Tuple[float, float, int]:
    """One epoch of cross-entropy training.

    Args:
        model: a classifier returning logits ``(batch, classes)``.
        loader: iterable of ``(x, y)`` batches.
        optimizer: steps after every backward.
        label_smoothing: of the cross-entropy.
        lr_at: ``global step -> learning rate`` set on every param group before the step.
        step0: global step count at the start of this epoch.
        after_backward: ``hook(global_step)`` called after ``loss.backward()``, before the step.
        before_forward: ``hook(global_step)`` called before the forward pass.
        shard: under ``torch.distributed``, every rank reads the same global batches (checked on the
            first batch of the epoch) and trains on
            its rows (:func:`~hyperflow_ext.distributed.batch_slice`) with the loss weighted by its
            share, so that a ``DistributedDataParallel`` ``model`` averages to the global batch's
            gradient; the returned loss and accuracy are over the global batches.

    Returns:
        ``(mean loss, accuracy, global step after the epoch)``.

    Raises:
        FloatingPointError: the loss became NaN/Inf.
    """
    model.train()
    device, dtype = _device_of(model), module_dtype(model)
    total_loss, correct, seen, step = 0.0, 0, 0, step0
    world = distributed.world_size() if shard else 1
    for batch in loader:
        x, y = batch_to(batch, device, dtype)
        weight = 1.0
        if world > 1:
            if step == step0:  # once per epoch: the ranks must be reading the same global batches
                distributed.agree_across_ranks([y], "train_epoch: the epoch's first global batch (every rank must "
                                                    "iterate the same batches: a seeded loader)")
            lo, hi = distributed.batch_slice(y.shape[0])
            x, y, weight = x[lo:hi], y[lo:hi], (hi - lo) * world / y.shape[0]
        if lr_at is not None:
            lr = lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
        if before_forward is not None:
            before_forward(step)
        optimizer.zero_grad(set_to_none=True)
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training diverged: loss is {float(loss.detach())} at step {step} "
                                     f"(lower the learning rate)")
        (loss * weight if world > 1 else loss).backward()
        if after_backward is not None:
            after_backward(step)
        optimizer.step()
        step += 1
        n = y.shape[0]
        total_loss += float(loss.detach()) * n
        correct += int((logits.detach().argmax(1) == y).sum())
        seen += n
    if world > 1:
        totals = torch.tensor([total_loss, float(correct), float(seen)], dtype=torch.float64)
        distributed.all_reduce_sum_([totals])
        total_loss, correct, seen = float(totals[0]), int(totals[1]), int(totals[2])
    if seen == 0:
        raise ValueError("train_epoch: the training loader yielded no batches")
    return total_loss / seen, correct / seen, step


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable) -> float:
    """Top-1 accuracy of ``model`` over ``loader`` (eval mode; restores the previous mode)."""
    was_training = model.training
    model.eval()
    device, dtype = _device_of(model), module_dtype(model)
    correct = seen = 0
    try:
        for batch in loader:
            x, y = batch_to(batch, device, dtype)
            correct += int((model(x).argmax(1) == y).sum())
            seen += y.shape[0]
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("evaluate: the loader yielded no batches")
    return correct / seen


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable) -> torch.Tensor:
    """Concatenated logits of ``model`` over ``loader`` (eval mode)."""
    was_training = model.training
    model.eval()
    device, dtype = _device_of(model), module_dtype(model)
    try:
        out = [model(batch_to(b, device, dtype)[0]) for b in loader]
    finally:
        model.train(was_training)
    return torch.cat(out)

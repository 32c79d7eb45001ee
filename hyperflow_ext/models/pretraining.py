"""Supervised backbone pretraining on source domains: :func:`pretrain`.

:func:`pretrain` trains a backbone plus a throw-away classifier head on the union of the source
domains' classes (each domain's labels are offset so classes stay disjoint). Cached, named
pretrained backbones are in :mod:`hyperflow_ext.models.pretrained`.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .._checks import check_int
from ._checks import check_tensor

__all__ = ["pretrain", "random_shift", "merge_datasets", "CosineHead", "HEADS"]

logger = logging.getLogger(__name__)

HEADS = ("linear", "cosine")


class CosineHead(nn.Module):
    """Cosine classifier: ``scale * cos(features, weight_c)`` for each class ``c``.

    Shape:
        - Input: ``(batch, in_features)``.
        - Output: ``(batch, num_classes)``.
    """

    def __init__(self, in_features: int, num_classes: int, scale: float = 10.0) -> None:
        super().__init__()
        self.in_features, self.num_classes, self.scale = in_features, num_classes, float(scale)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.normalize(x, dim=-1), F.normalize(self.weight, dim=-1))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}, scale={self.scale}"


def random_shift(x: torch.Tensor, max_shift: int,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Translate each image by an independent random offset in ``[-max_shift, max_shift]`` pixels.

    Borders are filled by replicating the edge pixels, so the background stays the background
    whether it is dark or light.

    Shape:
        - x: ``(batch, C, H, W)``; returns the same shape.
    """
    if max_shift == 0:
        return x
    b, _, h, w = x.shape
    s = max_shift
    padded = F.pad(x, (s, s, s, s), mode="replicate")
    off = torch.randint(0, 2 * s + 1, (2, b), generator=generator).to(x.device)
    rows = off[0][:, None] + torch.arange(h, device=x.device)  # (batch, H)
    cols = off[1][:, None] + torch.arange(w, device=x.device)  # (batch, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # (batch, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def _as_list(fn: str, datasets: Any) -> List[Any]:
    if isinstance(datasets, Mapping):
        return list(datasets.values())
    if hasattr(datasets, "images"):
        return [datasets]
    if isinstance(datasets, Sequence) and not isinstance(datasets, (str, bytes)):
        return list(datasets)
    raise TypeError(f"{fn}: datasets must be a dataset, a sequence of datasets or a mapping "
                    f"name -> dataset, got {type(datasets).__name__}")


def merge_datasets(datasets: Any, caller: str = "merge_datasets"
                   ) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Concatenate datasets, offsetting labels so classes stay disjoint.

    Args:
        datasets: as in :func:`pretrain`.
        caller: function name used in error messages.

    Returns:
        ``(images, labels, num_classes)``: float32 ``(n, C, H, W)`` and int64 ``(n,)`` tensors on
        the CPU, and the total number of classes.

    Raises:
        TypeError: if a dataset lacks ``images``, ``labels`` or ``num_classes``.
        ValueError: on an empty list, inconsistent image shapes or labels out of range.
    """
    fn = caller
    items = _as_list(fn, datasets)
    if not items:
        raise ValueError(f"{fn}: datasets is empty")
    images, labels, offset, shape = [], [], 0, None
    for i, ds in enumerate(items):
        for attr in ("images", "labels", "num_classes"):
            if not hasattr(ds, attr):
                raise TypeError(f"{fn}: datasets[{i}] has no attribute {attr!r} (expected an "
                                f"object with .images, .labels and .num_classes)")
        x = check_tensor(fn, f"datasets[{i}].images", ds.images)
        y = check_tensor(fn, f"datasets[{i}].labels", ds.labels)
        k = check_int(fn, f"datasets[{i}].num_classes", ds.num_classes)
        if x.dim() != 4 or x.shape[0] == 0:
            raise ValueError(f"{fn}: datasets[{i}].images must have shape (n, C, H, W) with "
                             f"n > 0, got {tuple(x.shape)}")
        if shape is None:
            shape = tuple(x.shape[1:])
        elif tuple(x.shape[1:]) != shape:
            raise ValueError(f"{fn}: datasets[{i}].images must have shape (n, *{shape}) like "
                             f"datasets[0], got {tuple(x.shape)}")
        if y.shape != (x.shape[0],) or y.is_floating_point() or y.dtype == torch.bool:
            raise ValueError(f"{fn}: datasets[{i}].labels must be an integer tensor of shape "
                             f"({x.shape[0]},), got {y.dtype} {tuple(y.shape)}")
        if int(y.min()) < 0 or int(y.max()) >= k:
            raise ValueError(f"{fn}: datasets[{i}].labels must lie in [0, {k}) (num_classes), "
                             f"got values in [{int(y.min())}, {int(y.max())}]")
        images.append(x.detach().to("cpu", torch.float32))
        labels.append(y.detach().to("cpu", torch.int64) + offset)
        offset += k
    return torch.cat(images), torch.cat(labels), offset


def _feature_dim(backbone: nn.Module, sample: torch.Tensor) -> int:
    dim = getattr(backbone, "feature_dim", None)
    if isinstance(dim, int):
        return dim
    with torch.no_grad():
        return int(backbone(sample).shape[-1])


def _warmup_cosine(total: int):
    warm = max(1, total // 20)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
    return factor


def pretrain(backbone: nn.Module, datasets: Any, epochs: int = 6, batch_size: int = 32,
             lr: float = 2e-3, weight_decay: float = 5e-4, head: str = "linear",
             max_shift: int = 2, label_smoothing: float = 0.0, seed: int = 0,
             progress: bool = True, device: Union[str, torch.device] = "cpu",
             history: Optional[List[Dict[str, float]]] = None) -> nn.Module:
    """Supervised pretraining of ``backbone`` on the union of the datasets' classes.

    A classifier head (``"linear"`` or ``"cosine"``) is trained jointly and discarded. AdamW with
    a linear warm-up (5% of the steps) then a cosine decay to zero; augmentation is a random
    translation of up to ``max_shift`` pixels. Shuffling, augmentation and the head's
    initialisation are drawn from ``seed``, so two runs from the same initial backbone give the
    same weights.

    Args:
        backbone: maps ``(batch, C, H, W)`` to ``(batch, feature_dim)``; trained in place.
        datasets: objects with ``images`` (float ``(n, C, H, W)``), ``labels`` (int ``(n,)``)
            and ``num_classes`` — one, a sequence, or a mapping name -> dataset (values in
            order). Dataset ``i``'s labels are offset by the classes of datasets ``0..i-1``.
        epochs: passes over the merged data.
        batch_size: examples per step.
        lr: peak learning rate.
        weight_decay: AdamW decoupled weight decay.
        head: ``"linear"`` or ``"cosine"`` (scale 10) classifier head.
        max_shift: random-translation range in pixels (0 disables augmentation).
        label_smoothing: cross-entropy label smoothing.
        seed: seeds shuffling, augmentation and the head.
        progress: show a tqdm bar with the running loss and accuracy.
        device: where to train; the backbone is moved there.
        history: if given, one ``{"epoch", "loss", "acc", "lr"}`` dict per epoch is appended
            (``loss``/``acc`` are running means over that epoch's augmented batches).

    Returns:
        The same ``backbone`` object, trained, in ``eval()`` mode.

    Raises:
        TypeError: if an argument has the wrong type or a dataset lacks an attribute.
        ValueError: on bad values or inconsistent datasets, or a backbone with nothing to train.
        RuntimeError: if the loss becomes non-finite.
    """
    fn = "pretrain"
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"{fn}: backbone must be an nn.Module, got {type(backbone).__name__}")
    check_int(fn, "epochs", epochs)
    check_int(fn, "batch_size", batch_size)
    check_int(fn, "max_shift", max_shift, minimum=0)
    check_int(fn, "seed", seed, minimum=0)
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"{fn}: lr must be finite and > 0, got {lr}")
    if not weight_decay >= 0:
        raise ValueError(f"{fn}: weight_decay must be >= 0, got {weight_decay}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"{fn}: label_smoothing must be in [0, 1), got {label_smoothing}")
    if head not in HEADS:
        raise ValueError(f"{fn}: head must be one of {HEADS}, got {head!r}")
    trainable = [p for p in backbone.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"{fn}: backbone has no parameters with requires_grad=True")
    images, labels, num_classes = merge_datasets(datasets, fn)
    n = images.shape[0]

    device = torch.device(device)
    backbone.to(device)
    feat_dim = _feature_dim(backbone, images[:1].to(device))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf: nn.Module = (nn.Linear(feat_dim, num_classes) if head == "linear"
                          else CosineHead(feat_dim, num_classes))
    clf.to(device)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(trainable + list(clf.parameters()), lr=lr, weight_decay=weight_decay)
    steps = math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(epochs * steps))

    backbone.train()
    logger.info("pretrain: %s on %d images, %d classes, %d epochs x %d steps",
                type(backbone).__name__, n, num_classes, epochs, steps)
    with tqdm(total=epochs * steps, disable=not progress, unit="step",
              desc=f"pretrain {type(backbone).__name__}") as bar:
        for epoch in range(epochs):
            perm = torch.randperm(n, generator=gen)
            loss_sum, correct = 0.0, 0
            for i in range(steps):
                idx = perm[i * batch_size:(i + 1) * batch_size]
                x = random_shift(images[idx], max_shift, gen).to(device)
                y = labels[idx].to(device)
                logits = clf(backbone(x))
                loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                value = loss.item()
                if not math.isfinite(value):
                    raise RuntimeError(f"{fn}: loss became non-finite ({value}) at epoch "
                                       f"{epoch + 1}, step {i + 1}; try a lower lr (now {lr})")
                loss_sum += value * idx.numel()
                correct += int((logits.argmax(-1) == y).sum())
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{value:.3f}",
                                acc=f"{correct / min(n, (i + 1) * batch_size):.3f}", refresh=False)
            stats = {"epoch": epoch + 1, "loss": loss_sum / n, "acc": correct / n,
                     "lr": opt.param_groups[0]["lr"]}
            logger.info("pretrain: epoch %d/%d loss %.4f acc %.4f", epoch + 1, epochs,
                        stats["loss"], stats["acc"])
            if history is not None:
                history.append(stats)
    return backbone.eval()

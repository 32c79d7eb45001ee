"""Supervised backbone pretraining on source domains, and cached pretrained backbones.

:func:`pretrain` trains a backbone plus a throw-away classifier head on the union of the source
domains' classes (each domain's labels are offset so classes stay disjoint). :func:`load_pretrained`
returns a frozen pretrained backbone by name, training it once and caching it as a safetensors
file (never pickle) under ``cache_dir()/backbones/``.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .._io import cache_dir as _cache_dir
from .._io import load_tensors, save_tensors
from ._checks import check_int, check_tensor
from .registry import BACKBONES, available_backbones, build_backbone

__all__ = ["pretrain", "load_pretrained", "available_pretrained", "pretrained_path",
           "random_shift", "CosineHead", "HEADS"]

logger = logging.getLogger(__name__)

HEADS = ("linear", "cosine")
_SUFFIX = "-glyphs"
# Default epochs per architecture for load_pretrained, chosen so each pretraining run on the
# glyph source domains (a few thousand 28x28 images) takes a minute or two on 2 CPU cores.
_DEFAULT_EPOCHS = {"conv4": 15, "resnet8": 6, "vit_tiny": 8}
_TRAIN_KEYS = ("epochs", "batch_size", "lr", "weight_decay", "head", "max_shift",
               "label_smoothing")


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


def _merge_datasets(fn: str, datasets: Any) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Concatenate datasets with disjoint (offset) labels → ``(images, labels, num_classes)``."""
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


def pretrain(backbone: nn.Module, datasets: Any, epochs: int = 15, batch_size: int = 128,
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
    images, labels, num_classes = _merge_datasets(fn, datasets)
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
                value = float(loss)
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


# --------------------------------------------------------------------------- cached backbones


def available_pretrained() -> List[str]:
    """Names accepted by :func:`load_pretrained`: ``"<arch>-glyphs"`` per registered backbone."""
    return [f"{arch}{_SUFFIX}" for arch in available_backbones()]


def _parse_name(fn: str, name: Any) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{fn}: name must be a str, got {type(name).__name__}")
    arch = name[:-len(_SUFFIX)] if name.endswith(_SUFFIX) else None
    if arch not in BACKBONES:
        raise ValueError(f"{fn}: unknown pretrained backbone {name!r}; expected one of "
                         f"{available_pretrained()}")
    return arch


def _fingerprint(datasets: Any) -> str:
    images, labels, num_classes = _merge_datasets("load_pretrained", datasets)
    h = hashlib.sha256()
    h.update(images.contiguous().numpy().tobytes())
    h.update(labels.numpy().tobytes())
    h.update(str((tuple(images.shape), num_classes)).encode())
    return h.hexdigest()[:16]


def _config(fn: str, arch: str, datasets: Any, seed: int, backbone_kw: Mapping[str, Any],
            train_kw: Mapping[str, Any]) -> Dict[str, Any]:
    unknown = sorted(set(train_kw) - set(_TRAIN_KEYS))
    if unknown:
        raise TypeError(f"{fn}: unexpected training keyword(s) {unknown}; expected some of "
                        f"{list(_TRAIN_KEYS)} or device")
    defaults = inspect.signature(pretrain).parameters
    train = {k: defaults[k].default for k in _TRAIN_KEYS}
    train["epochs"] = _DEFAULT_EPOCHS.get(arch, train["epochs"])
    train.update(train_kw)
    from .. import __version__
    config = {"arch": arch, "backbone_kw": dict(backbone_kw), "seed": seed, "train": train,
              "data": "benchmark_domains" if datasets is None else "custom:" + _fingerprint(datasets),
              "version": __version__}
    try:
        json.dumps(config, sort_keys=True)
    except TypeError as exc:
        raise TypeError(f"{fn}: backbone_kw and training keywords must be JSON-serialisable: "
                        f"{exc}") from None
    return config


def _digest(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def pretrained_path(name: str = "conv4-glyphs", cache_dir: Optional[os.PathLike] = None,
                    datasets: Any = None, seed: int = 0,
                    backbone_kw: Optional[Mapping[str, Any]] = None, **train_kw: Any) -> Path:
    """The checkpoint file :func:`load_pretrained` would read or write for these arguments."""
    arch = _parse_name("pretrained_path", name)
    config = _config("pretrained_path", arch, datasets, seed, backbone_kw or {}, train_kw)
    return _cache_dir(cache_dir) / "backbones" / f"{name}-{_digest(config)}.safetensors"


def _load_checkpoint(fn: str, path: Path, backbone: nn.Module, arch: str) -> Dict[str, Any]:
    hint = "delete the file to retrain it"
    try:
        tensors, meta = load_tensors(path)
    except ValueError as exc:
        raise ValueError(f"{fn}: corrupt checkpoint {path} ({hint}): {exc}") from exc
    expected = backbone.state_dict()
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{fn}: checkpoint {path} does not match architecture {arch!r} ({hint}): "
                         f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    for key, value in expected.items():
        if tensors[key].shape != value.shape:
            raise ValueError(f"{fn}: checkpoint {path} does not match architecture {arch!r} "
                             f"({hint}): {key} has shape {tuple(tensors[key].shape)}, expected "
                             f"{tuple(value.shape)}")
    if meta.get("arch", arch) != arch:
        raise ValueError(f"{fn}: checkpoint {path} was written for {meta.get('arch')!r}, not "
                         f"{arch!r} ({hint})")
    backbone.load_state_dict(tensors)
    return meta


def load_pretrained(name: str = "conv4-glyphs", cache_dir: Optional[os.PathLike] = None,
                    progress: bool = True, datasets: Any = None, *, seed: int = 0,
                    backbone_kw: Optional[Mapping[str, Any]] = None,
                    device: Union[str, torch.device] = "cpu", **train_kw: Any) -> nn.Module:
    """Return a frozen backbone pretrained on the glyph source domains, training it once.

    The checkpoint lives at ``cache_dir(cache_dir)/backbones/<name>-<hash>.safetensors`` where
    the hash covers the architecture, ``backbone_kw``, ``seed``, the training settings, the data
    (the benchmark source domains, or a fingerprint of injected ``datasets``) and the package
    version. If the file exists it is loaded (safetensors, no pickle); otherwise the source
    domains are built with :func:`hyperflow_ext.data.benchmark_domains` (imported lazily), the
    backbone is trained with :func:`pretrain` and the file is written atomically with metadata
    (arch, config, seed, epochs, final train accuracy/loss, training seconds).

    Args:
        name: ``"<arch>-glyphs"``, one of :func:`available_pretrained`.
        cache_dir: cache root override (see :func:`hyperflow_ext.cache_dir`).
        progress: show progress bars when building data or training.
        datasets: training data to use instead of the benchmark's source domains (any
            ``datasets`` argument accepted by :func:`pretrain`).
        seed: seeds the backbone's initialisation and :func:`pretrain`.
        backbone_kw: constructor keywords for :func:`build_backbone`.
        device: device of the returned backbone (and of training).
        **train_kw: :func:`pretrain` settings (``epochs``, ``batch_size``, ``lr``,
            ``weight_decay``, ``head``, ``max_shift``, ``label_smoothing``); the default epochs
            depend on the architecture (conv4: 15, resnet8: 6, vit_tiny: 8).

    Returns:
        The backbone in ``eval()`` mode with ``requires_grad=False`` on every parameter.

    Raises:
        ValueError: for an unknown name (the message lists valid ones), or a corrupt checkpoint
            or one whose tensors do not match the architecture.
        TypeError: for unknown training keywords or non-serialisable settings.

    Example:
        >>> net = load_pretrained("conv4-glyphs")  # trains (~1-2 min on 2 cores) the first time
        >>> net(torch.rand(4, 1, 28, 28)).shape
        torch.Size([4, 32])
    """
    fn = "load_pretrained"
    arch = _parse_name(fn, name)
    check_int(fn, "seed", seed, minimum=0)
    backbone_kw = dict(backbone_kw or {})
    config = _config(fn, arch, datasets, seed, backbone_kw, train_kw)
    path = _cache_dir(cache_dir) / "backbones" / f"{name}-{_digest(config)}.safetensors"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = build_backbone(arch, **backbone_kw)
    if path.is_file():
        meta = _load_checkpoint(fn, path, backbone, arch)
        logger.info("load_pretrained: loaded %s (final train acc %s)", path,
                    meta.get("final_train_acc"))
    else:
        if datasets is None:
            from hyperflow_ext.data import benchmark_domains  # lazy: heavy, and optional here
            datasets, _ = benchmark_domains(cache_dir=cache_dir, progress=progress)
        history: List[Dict[str, float]] = []
        start = time.perf_counter()
        pretrain(backbone, datasets, seed=seed, progress=progress, device=device,
                 history=history, **config["train"])
        seconds = time.perf_counter() - start
        images, _, num_classes = _merge_datasets(fn, datasets)
        meta = {"name": name, "arch": arch, "config": config, "seed": seed,
                "epochs": config["train"]["epochs"], "final_train_acc": history[-1]["acc"],
                "final_train_loss": history[-1]["loss"], "train_seconds": round(seconds, 2),
                "num_images": int(images.shape[0]), "num_classes": num_classes,
                "history": history}
        save_tensors(path, backbone.state_dict(), meta)
        logger.info("load_pretrained: trained %s in %.1fs (final train acc %.4f), saved %s",
                    name, seconds, history[-1]["acc"], path)
    backbone.to(device).eval()
    backbone.requires_grad_(False)
    return backbone

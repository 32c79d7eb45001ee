"""Cached pretrained backbones: :func:`load_pretrained` and friends.

:func:`load_pretrained` returns a frozen pretrained backbone by name (``"<arch>-glyphs"``), training
it once with :func:`~hyperflow_ext.models.pretraining.pretrain` on the benchmark's source domains
and caching it as a safetensors file (never pickle) under ``cache_dir()/backbones/``.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
from torch import nn

from .._io import cache_dir as _cache_dir
from .._io import load_tensors, save_tensors
from .._checks import check_int
from .pretraining import merge_datasets, pretrain
from .registry import BACKBONES, available_backbones, build_backbone

__all__ = ["load_pretrained", "available_pretrained", "pretrained_path"]

logger = logging.getLogger(__name__)

_SUFFIX = "-glyphs"
# Per-architecture overrides of pretrain()'s defaults used by load_pretrained. The benchmark's
# source domains are ~22k 28x28 images in ~600 classes; these keep one pretraining run to
# roughly 1-2 minutes (conv4) and 2-4 minutes (resnet8, vit_tiny) on 2 CPU cores.
_ARCH_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "conv4": {"epochs": 6},
    "resnet8": {"epochs": 4},
    "vit_tiny": {"epochs": 4, "lr": 1e-3},
}
_TRAIN_KEYS = ("epochs", "batch_size", "lr", "weight_decay", "head", "max_shift",
               "label_smoothing")

_PRETRAIN_DEFAULTS = {k: inspect.signature(pretrain).parameters[k].default for k in _TRAIN_KEYS}


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
    images, labels, num_classes = merge_datasets(datasets, "load_pretrained")
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
    train = dict(_PRETRAIN_DEFAULTS)
    train.update(_ARCH_DEFAULTS.get(arch, {}))
    train.update(train_kw)
    from .. import __version__
    if datasets is None:
        from ..data.benchmark import SOURCE_SCRIPTS  # the default data: a new split is a new backbone

        data = "benchmark_domains:" + ",".join(SOURCE_SCRIPTS)
    else:
        data = "custom:" + _fingerprint(datasets)
    config = {"arch": arch, "backbone_kw": dict(backbone_kw), "seed": seed, "train": train,
              "data": data, "version": __version__}
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
            ``weight_decay``, ``head``, ``max_shift``, ``label_smoothing``). Unset ones take
            :func:`pretrain`'s defaults except per-architecture epochs (conv4: 6, resnet8: 4,
            vit_tiny: 4) and ``lr=1e-3`` for vit_tiny.

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
            datasets = benchmark_domains(cache_dir=cache_dir, progress=progress).source
        history: List[Dict[str, float]] = []
        start = time.perf_counter()
        pretrain(backbone, datasets, seed=seed, progress=progress, device=device,
                 history=history, **config["train"])
        seconds = time.perf_counter() - start
        images, _, num_classes = merge_datasets(datasets, fn)
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

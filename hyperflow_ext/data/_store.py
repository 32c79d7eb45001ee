"""On-disk cache of rendered image domains, shared by the glyph and stroke renderers.

One safetensors file per set of render settings: every domain's images as uint8 and its labels,
plus a JSON header with the settings, the domain order, class names and metadata. A file whose
settings differ from the requested ones is refused, so the caller re-renders.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch

from .._io import cache_dir as _cache_dir
from .._io import load_tensors, save_tensors
from .dataset import ImageDataset

__all__ = ["to_float", "domain_cache_file", "save_domains", "load_domains"]


def to_float(images_u8: torch.Tensor) -> torch.Tensor:
    """``(n, H, W)`` uint8 → ``(n, 1, H, W)`` float32 in ``[0, 1]``."""
    return images_u8.unsqueeze(1).to(torch.float32).div_(255.0)


def domain_cache_file(cache_dir: Optional[os.PathLike], prefix: str, settings: Mapping[str, Any]) -> Path:
    """``<cache>/<prefix>-<digest of settings>.safetensors``."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return _cache_dir(cache_dir) / f"{prefix}-{digest}.safetensors"


def save_domains(path: Path, settings: Mapping[str, Any], domains: Mapping[str, ImageDataset]) -> None:
    """Write ``domains`` (images in ``[0, 1]``) to ``path`` atomically."""
    tensors = {}
    for name, ds in domains.items():
        tensors[f"{name}/images"] = (ds.images.squeeze(1) * 255.0).round().to(torch.uint8)
        tensors[f"{name}/labels"] = ds.labels
    meta = {"settings": settings, "order": list(domains),
            "domains": {n: {"class_names": ds.class_names, "meta": ds.meta} for n, ds in domains.items()}}
    save_tensors(path, tensors, meta)


def load_domains(path: Path, settings: Mapping[str, Any]) -> Dict[str, ImageDataset]:
    """Read a file written by :func:`save_domains`.

    Raises:
        ValueError: unreadable file, or one written for other settings.
        KeyError: a file missing one of its domains' tensors.
    """
    tensors, meta = load_tensors(path)
    if meta.get("settings") != json.loads(json.dumps(settings)):
        raise ValueError("settings stored in the file differ from the requested ones")
    domains = {}
    for name in meta["order"]:
        info = meta["domains"][name]
        domains[name] = ImageDataset(to_float(tensors[f"{name}/images"]), tensors[f"{name}/labels"],
                                     info["class_names"], name, info["meta"])
    return domains

"""Backbones, prototypical-network classification and backbone pretraining.

* Backbones (``(batch, C, H, W) -> (batch, feature_dim)``, biased layers, no BatchNorm):
  :class:`Conv4`, :class:`ResNet8`, :class:`TinyViT`; :func:`build_backbone` by name.
* ProtoNet: :func:`prototypes`, :func:`proto_logits`, :class:`ProtoNet` (with ``support_loss``,
  the few-shot fine-tuning objective).
* Pretraining: :func:`pretrain` on source domains; :func:`load_pretrained` for cached, frozen
  ``"<arch>-glyphs"`` backbones.
* :mod:`~hyperflow_ext.models.norm` — ``group_norm_``: GroupNorm (+ ReLU) of a channels-last map in place.
"""
from __future__ import annotations

from . import norm
from .conv import Conv4, ResNet8
from .pretrained import available_pretrained, load_pretrained, pretrained_path
from .pretraining import merge_datasets, pretrain, random_shift
from .protonet import METRICS, ProtoNet, proto_logits, prototypes
from .registry import BACKBONES, available_backbones, build_backbone
from .vit import TinyViT

__all__ = [
    "Conv4", "ResNet8", "TinyViT", "norm", "BACKBONES", "build_backbone", "available_backbones",
    "METRICS", "prototypes", "proto_logits", "ProtoNet",
    "pretrain", "merge_datasets", "random_shift",
    "load_pretrained", "available_pretrained", "pretrained_path",
]

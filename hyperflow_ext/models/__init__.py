"""Backbones, prototypical-network classification and backbone pretraining.

* Backbones (``(batch, C, H, W) -> (batch, feature_dim)``, biased layers, no BatchNorm):
  :class:`Conv4`, :class:`ResNet8`, :class:`TinyViT`; :func:`build_backbone` by name.
* ProtoNet: :func:`prototypes`, :func:`proto_logits`, :class:`ProtoNet` (with ``support_loss``,
  the few-shot fine-tuning objective).
* Pretraining: :func:`pretrain` on source domains; :func:`load_pretrained` for cached, frozen
  ``"<arch>-glyphs"`` backbones.
"""
from __future__ import annotations

from .conv import Conv4, ResNet8
from .pretraining import (available_pretrained, load_pretrained, pretrain, pretrained_path,
                          random_shift)
from .protonet import METRICS, ProtoNet, proto_logits, prototypes
from .registry import BACKBONES, available_backbones, build_backbone
from .vit import TinyViT

__all__ = [
    "Conv4", "ResNet8", "TinyViT", "BACKBONES", "build_backbone", "available_backbones",
    "METRICS", "prototypes", "proto_logits", "ProtoNet",
    "pretrain", "load_pretrained", "available_pretrained", "pretrained_path", "random_shift",
]

"""Two CIFAR-sized CNNs for measuring pruned inference end to end, and magnitude masks for them.

* :class:`VGGStyle`: five 3x3 conv-BN-ReLU blocks (64, 128, 256, 256, 512 channels; max-pool after the
  1st, 2nd and 4th) on 32x32 inputs, global average pool, linear head — about 2.1 M conv weights.
* :class:`ResNetStyle`: a 3x3 stem and four basic residual blocks (32, 64, 128, 256 channels, strides
  1, 2, 2, 2; 1x1 projection shortcuts), global average pool, linear head.
* :func:`magnitude_masks` / :func:`apply_masks`: magnitude masks over the conv weights (per layer, or
  one global threshold), applied as exact zeros.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
from torch import nn

__all__ = ["VGGStyle", "ResNetStyle", "magnitude_masks", "apply_masks", "randomize_batchnorm"]


def _conv_bn_relu(cin: int, cout: int) -> Tuple[nn.Module, ...]:
    return nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)


class VGGStyle(nn.Module):
    """VGG-style CNN for ``(N, in_channels, 32, 32)`` inputs.

    Args:
        widths: channels of the five convolutions.
        num_classes: outputs of the linear head.
        in_channels: input channels (3 for colour images, 1 for grey-scale ones such as digits).
    """

    def __init__(self, widths: Sequence[int] = (64, 128, 256, 256, 512), num_classes: int = 10,
                 in_channels: int = 3) -> None:
        super().__init__()
        w = list(widths)
        pool = {0, 1, 3}
        layers = []
        cin = int(in_channels)
        for i, c in enumerate(w):
            layers += list(_conv_bn_relu(cin, c))
            if i in pool:
                layers.append(nn.MaxPool2d(2))
            cin = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with a 1x1 projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetStyle(nn.Module):
    """ResNet-style CNN for ``(N, 3, 32, 32)`` inputs.

    Args:
        widths: channels of the four residual blocks (the stem has ``widths[0]``).
        strides: strides of the four blocks.
        num_classes: outputs of the linear head.
    """

    def __init__(self, widths: Sequence[int] = (32, 64, 128, 256), strides: Sequence[int] = (1, 2, 2, 2),
                 num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn_relu(3, widths[0]))
        blocks, cin = [], widths[0]
        for c, s in zip(widths, strides):
            blocks.append(BasicBlock(cin, c, s))
            cin = c
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def magnitude_masks(model: nn.Module, sparsity: float, scope: str = "layer",
                    kinds: Tuple[type, ...] = (nn.Conv2d,)) -> Dict[str, torch.Tensor]:
    """Magnitude masks (``True`` = kept) over every ``Conv2d`` weight of ``model`` (every weight of the
    module types in ``kinds``).

    Args:
        model: the network.
        sparsity: fraction of the conv weights to drop, in ``[0, 1]``.
        scope: ``"layer"`` (default): every layer keeps its own largest ``1 - sparsity`` share;
            ``"global"``: one threshold across all layers. On untrained (initialised) weights the global
            rule empties the wide layers, whose weights scale as ``1/√fan_in``, so speed benchmarks use
            ``"layer"``.
        kinds: the module types whose weights are masked, e.g. ``(nn.Conv2d, nn.Linear)``.

    Returns:
        ``{layer name: bool mask shaped like its weight}``.

    Raises:
        ValueError: ``sparsity`` outside ``[0, 1]``, an unknown scope, or no layer of ``kinds`` in the model.
        TypeError: ``kinds`` is not a tuple of module classes.
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"magnitude_masks: sparsity must be in [0, 1], got {sparsity!r}")
    if scope not in ("layer", "global"):
        raise ValueError(f"magnitude_masks: scope must be 'layer' or 'global', got {scope!r}")
    if not (isinstance(kinds, tuple) and kinds
            and all(isinstance(k, type) and issubclass(k, nn.Module) for k in kinds)):
        raise TypeError(f"magnitude_masks: kinds must be a non-empty tuple of nn.Module classes, got {kinds!r}")
    convs = {n: m for n, m in model.named_modules() if isinstance(m, kinds)}
    if not convs:
        raise ValueError(f"magnitude_masks: the model has no {' or '.join(k.__name__ for k in kinds)} layer")
    groups = [list(convs)] if scope == "global" else [[n] for n in convs]
    masks: Dict[str, torch.Tensor] = {}
    for names in groups:
        scores = torch.cat([convs[n].weight.detach().abs().flatten() for n in names])
        drop = int(round(float(sparsity) * scores.numel()))
        threshold = torch.kthvalue(scores, drop).values if drop else None
        for n in names:
            w = convs[n].weight.detach().abs()
            masks[n] = torch.ones_like(w, dtype=torch.bool) if threshold is None else w > threshold
    return masks


def apply_masks(model: nn.Module, masks: Dict[str, torch.Tensor]) -> nn.Module:
    """Zero the weights outside ``masks`` in place (pruned weights become exact zeros); returns ``model``."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, mask in masks.items():
            modules[name].weight.mul_(mask.to(modules[name].weight.dtype))
    return model


def randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters (for tests and benchmarks)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(c, generator=generator))
                m.running_var.copy_(0.5 + torch.rand(c, generator=generator))
                m.weight.copy_(0.5 + torch.rand(c, generator=generator))
                m.bias.copy_(0.1 * torch.randn(c, generator=generator))
    return model

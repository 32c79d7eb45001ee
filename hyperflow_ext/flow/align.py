"""Channel alignment: a closed-form, gradient-free bias candidate for :func:`~hyperflow_ext.flow.fused_adapt`.

A capture shift (contrast, gamma, noise, ...) moves the mean of each channel after each
normalisation layer away from where the pretrained layers expect it. On a BatchNorm backbone,
re-estimating the statistics on the support set undoes much of that; GroupNorm, LayerNorm and
InstanceNorm have no running statistics to re-estimate. Their affine bias can still do it:
shifting a norm layer's bias by ``reference mean − support mean`` of each channel of its output
puts the support set's channel means back where they were on meta-training data.

* :func:`reference_means` records those per-channel output means at ``θ_0`` on meta-training
  images (:meth:`HyperFlow.fit` does this), as a ``(P,)`` vector in the flow's parameter layout.
* :func:`align_to_reference` runs one forward of the support set in which every norm layer's
  output is shifted as it is computed (so a later layer's mean is measured after the earlier
  shifts) and returns the shifted bias vector with the support features of that forward (the
  choice scores the candidate without a second pass).

Only norm layers whose ``bias`` is among the adapted parameters take part; the bias enters their
output additively, so the forward with the shifted output is the forward with the new bias.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

import torch
from torch import nn

from .._stateless import stateless_view
from .params import ParamSubset

__all__ = ["aligned_norms", "reference_means", "align_to_reference"]

_CHANNELS_FIRST = (nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def aligned_norms(backbone: nn.Module, subset: ParamSubset) -> Dict[str, Tuple[int, int, int]]:
    """``{module name: (offset in θ, channels, channel dim)}`` of the normalisation layers whose
    affine bias is adapted: GroupNorm, BatchNorm, InstanceNorm (channels at dim 1) and LayerNorm
    over one trailing dimension (channels last)."""
    offsets, start = {}, 0
    for name, n in subset.split_sizes():
        offsets[name] = start
        start += n
    out: Dict[str, Tuple[int, int, int]] = {}
    for name, module in backbone.named_modules():
        bias_name = f"{name}.bias" if name else "bias"
        if bias_name not in offsets or getattr(module, "bias", None) is None:
            continue
        if isinstance(module, _CHANNELS_FIRST):
            out[name] = (offsets[bias_name], module.bias.numel(), 1)
        elif isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
            out[name] = (offsets[bias_name], module.bias.numel(), -1)
    return out


def _hooked_forward(backbone: nn.Module, norms: Dict[str, Tuple[int, int, int]], x: torch.Tensor,
                    target: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Features of ``x`` and every aligned layer's channel means, as a ``(P,)`` float64 vector in its
    bias slots. With ``target`` ``(P,)``, each aligned layer's output is moved, as it is computed, by
    ``target − its mean`` (so a later layer is measured after the earlier moves): the returned
    vector then holds those moves, and the features are those of ``θ_0`` plus them."""
    out = torch.zeros(max(o + c for o, c, _ in norms.values()), dtype=torch.float64)
    ran = set()

    def hook_for(name: str):
        offset, channels, dim = norms[name]

        def hook(module, args, output):
            if name in ran:
                raise ValueError(f"channel alignment: norm layer {name!r} runs twice in one forward (a shared "
                                 f"module); its bias cannot be aligned")
            ran.add(name)
            if output.dim() < 2 or output.shape[dim] != channels:
                raise ValueError(f"channel alignment: norm layer {name!r} gave an output of shape "
                                 f"{tuple(output.shape)}, with no dimension {dim} of size {channels}")
            reduce = [d for d in range(output.dim()) if d != dim % output.dim()]
            mean = output.detach().mean(dim=reduce).double().cpu()  # in the output's dtype: no full-size copy
            if target is None:
                out[offset:offset + channels] = mean
                return output
            move = target[offset:offset + channels].double() - mean
            out[offset:offset + channels] = move
            view = [1] * output.dim()
            view[dim] = channels
            return output.add_(move.to(output).reshape(view))  # a norm layer's own fresh output; no autograd here
        hook.rewrites_output = True  # a fused norm kernel that skips the module must not skip this
        return hook

    view = stateless_view(backbone, None, {name: hook_for(name) for name in norms})
    with torch.no_grad():
        feats = view(x)
    missing = [n for n in norms if n not in ran]
    if missing:
        raise RuntimeError(f"channel alignment: norm layers {missing[:3]} did not run in the forward")
    return feats, out


def reference_means(backbone: nn.Module, subset: ParamSubset, images: Iterable[torch.Tensor]) -> Optional[torch.Tensor]:
    """Per-channel output means of every aligned norm layer at ``θ_0``, averaged over ``images``.

    Args:
        images: batches ``(n, C, H, W)`` of meta-training images (un-shifted: the reference is the
            domain the backbone was trained on).

    Returns:
        ``(P,)`` in ``subset``'s layout (the means in each aligned layer's bias slots, zero
        elsewhere), or ``None`` when no norm layer's bias is adapted.
    """
    norms = aligned_norms(backbone, subset)
    if not norms:
        return None
    total = torch.zeros(subset.numel, dtype=torch.float64)
    count = 0
    for batch in images:
        _, means = _hooked_forward(backbone, norms, batch, None)
        total[:means.numel()] += means * batch.shape[0]
        count += batch.shape[0]
    if count == 0:
        raise ValueError("reference_means: no images")
    return (total / count).to(subset.vector(backbone).dtype)


def align_to_reference(backbone: nn.Module, subset: ParamSubset, theta0: torch.Tensor, reference: torch.Tensor,
                       support_x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``θ_0`` with every aligned norm bias shifted so that the support set's channel means match
    ``reference``, and the support features at that ``θ``.

    One forward of the whole support set: a shift at one layer moves the means of the layers
    after it, so each layer's mean is taken after the earlier shifts, which needs the whole set at
    once (the activation memory of one full-batch forward; parts would need a pass per layer).

    Shape:
        - theta0, reference: ``(P,)``; support_x: ``(shots, C, H, W)``.
        - Returns: ``(θ (P,), features at θ (shots, d))``.
    """
    norms = aligned_norms(backbone, subset)
    if not norms:
        raise ValueError("align_to_reference: no norm layer's bias is among the adapted parameters")
    feats, moves = _hooked_forward(backbone, norms, support_x, reference.detach().cpu())
    shift = torch.zeros(subset.numel, dtype=torch.float64)
    shift[:moves.numel()] = moves
    return theta0 + shift.to(theta0), feats

"""Channel alignment: a closed-form, gradient-free bias candidate for :func:`~hyperflow_ext.flow.fused_adapt`.

A capture shift (contrast, gamma, noise, ...) moves the mean of each channel after each
normalisation layer away from where the pretrained layers expect it. On a BatchNorm backbone,
re-estimating the statistics on the support set undoes much of that; GroupNorm, LayerNorm and
InstanceNorm have no running statistics to re-estimate. Their affine bias can still do it:
shifting a norm layer's bias by ``reference mean − support mean`` of each channel of its output
puts the support set's channel means back where they were on meta-training data.

* :func:`reference_means` records those per-channel output means at ``θ_0`` on meta-training
  images (:meth:`HyperFlow.fit` does this), as a ``(P,)`` vector in the flow's parameter layout.
* :class:`NormMeanProbe` measures the same means on a support set at ``θ_0`` from inside any
  forward, in parts: :func:`fused_adapt` attaches it to the task encoder's own forward, so the
  candidate costs no forward to build. :meth:`NormMeanProbe.shifts` turns them into the bias shifts.

Every layer is measured at ``θ_0``, not after the shifts of the layers before it (which would need
the whole support set in one forward, or one pass per layer): on the GroupNorm Conv4 study both
gave the same share of bias tuning's gain (46 and 45 %). The means are computed from each norm
layer's *input*, in closed form, so fused norm kernels (Conv4's) keep running in place.

Only norm layers whose ``bias`` is among the adapted parameters take part; the bias enters their
output additively, so the shifted bias shifts the output mean by exactly the same amount.
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .._stateless import stateless_view
from .params import ParamSubset

__all__ = ["aligned_norms", "norm_output_means", "NormMeanProbe", "probe_shifts", "reference_means",
           "align_to_reference"]

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


def _moments(module: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """What :func:`_output_means` needs of ``module``'s input ``x``: per-image ``(n, C)`` tensors, cheap
    to take inside a forward (no full-size copy of ``x`` except for LayerNorm)."""
    if isinstance(module, nn.LayerNorm):  # over the last dim: per-token statistics, then the token mean
        xhat = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
        return (xhat.reshape(x.shape[0], -1, xhat.shape[-1]).mean(dim=1),)
    spatial = tuple(range(2, x.dim()))
    m = x.mean(dim=spatial) if spatial else x
    if isinstance(module, nn.GroupNorm):
        size = max(1, x[0, 0].numel())
        return m, (torch.linalg.vector_norm(x, dim=spatial) ** 2 / size if spatial else x * x)
    if _uses_running_stats(module):
        return (m,)
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):  # each image and channel normalised alone
        return (torch.zeros_like(m),)
    # BatchNorm on this very batch's statistics
    var = x.var(dim=(0,) + spatial, unbiased=False)
    return ((m - m.mean(dim=0, keepdim=True)) / (var + module.eps).sqrt(),)


def _uses_running_stats(module: nn.Module) -> bool:
    running = getattr(module, "running_mean", None) is not None
    return running and (not module.training or not module.track_running_stats)


def _output_means(module: nn.Module, moments: Tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Per-image channel means ``(n, C)`` float64 of ``module``'s output from :func:`_moments`."""
    if isinstance(module, nn.GroupNorm):
        m, sq = (t.double() for t in moments)
        n, c, g = m.shape[0], m.shape[1], module.num_groups
        mu = m.view(n, g, c // g).mean(dim=-1, keepdim=True)                            # per image and group
        var = (sq.view(n, g, c // g).mean(dim=-1, keepdim=True) - mu * mu).clamp_min(0)
        xhat = ((m.view(n, g, c // g) - mu) / (var + module.eps).sqrt()).view(n, c)
    elif not isinstance(module, nn.LayerNorm) and _uses_running_stats(module):
        xhat = ((moments[0].double() - module.running_mean.double())
                / (module.running_var.double() + module.eps).sqrt())
    else:
        xhat = moments[0].double()
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    out = xhat if weight is None else xhat * weight.detach().double()
    return out if bias is None else out + bias.detach().double()


def norm_output_means(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-image channel means ``(n, C)`` (float64) of what ``module`` outputs for input ``x``, in
    closed form from moments of ``x``: the output itself is never computed.

    Supports the norm layers :func:`aligned_norms` finds. For a BatchNorm in training mode the
    normalised mean is defined over the batch; the per-image rows then average to it.
    """
    return _output_means(module, _moments(module, x))


class NormMeanProbe:
    """Forward pre-hooks that record each aligned norm layer's per-image output means at whatever
    parameters the forward runs with, over any number of forwards (parts of a support set).

    Args:
        backbone, subset: as for :func:`aligned_norms`.
        skip_batchnorm: leave BatchNorm layers out.

    Use :attr:`hooks` as ``forward_pre_hooks`` of a :func:`~hyperflow_ext._stateless.stateless_view`
    (the task encoder's :meth:`~hyperflow_ext.flow.task.TaskEncoder.encode` takes them), then
    :meth:`means` per task. The hooks only read; they never raise inside the forward.
    """

    def __init__(self, backbone: nn.Module, subset: ParamSubset, skip_batchnorm: bool = False) -> None:
        self.norms = aligned_norms(backbone, subset)
        if skip_batchnorm:  # where support statistics are a candidate of their own, they re-normalise these
            kinds = dict(backbone.named_modules())
            self.norms = {n: v for n, v in self.norms.items()
                          if not isinstance(kinds[n], nn.modules.batchnorm._BatchNorm)}
        self.numel = subset.numel
        self._modules: Dict[str, nn.Module] = {}
        self._rows: Dict[str, List[Tuple[torch.Tensor, ...]]] = {n: [] for n in self.norms}
        self.hooks: Dict[str, Callable] = {n: self._hook(n) for n in self.norms}

    def _hook(self, name: str) -> Callable:
        def hook(module, args):
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and x.dim() >= 2:
                self._rows[name].append(_moments(module, x.detach()))  # the arithmetic waits for means()
                self._modules[name] = module  # the forward's own module: its affine map, at its θ
        hook.reads_only = True  # a fused norm kernel may run it and keep going in place
        return hook

    def means(self, images: int, tasks: int = 1) -> torch.Tensor:
        """``(tasks, P)`` float64 means of the recorded images, each task's consecutive
        ``images // tasks`` images averaged, in the aligned layers' bias slots (zero elsewhere).

        Raises:
            ValueError: a layer did not run once per image (a module called twice, or not at all).
        """
        out = torch.zeros(tasks, self.numel, dtype=torch.float64)
        for name, (offset, channels, _) in self.norms.items():
            parts = self._rows[name]
            rows = (_output_means(self._modules[name], tuple(torch.cat(t).cpu() for t in zip(*parts))) if parts
                    else torch.zeros(0, channels))
            if rows.shape != (images, channels):
                how = "runs twice in one forward (a shared module)" if rows.shape[0] > images else "did not run"
                raise ValueError(f"channel alignment: norm layer {name!r} {how}; its bias cannot be aligned")
            out[:, offset:offset + channels] = rows.view(tasks, images // tasks, channels).mean(dim=1)
        return out

    def shifts(self, reference: torch.Tensor, images: int, tasks: int = 1) -> torch.Tensor:
        """``(tasks, P)`` float64 bias shifts ``reference − means`` in the slots of the layers this probe
        read (zero elsewhere, whatever ``reference`` holds there). Raises like :meth:`means`."""
        mask = torch.zeros(self.numel, dtype=torch.float64)
        for offset, channels, _ in self.norms.values():
            mask[offset:offset + channels] = 1.0
        return (reference.double().cpu() - self.means(images, tasks)) * mask


def probe_shifts(probe: Optional[NormMeanProbe], reference: Optional[torch.Tensor], images: int,
                 tasks: int) -> List[Optional[torch.Tensor]]:
    """Per task the ``(P,)`` float64 bias shifts ``reference − means`` in the slots of the layers the
    probe read (zero elsewhere), or ``None`` each: no probe, or (with a warning) a backbone whose
    norm layers cannot be aligned."""
    if probe is None or reference is None or not probe.norms:
        return [None] * tasks
    try:
        return list(probe.shifts(reference, images, tasks))
    except ValueError as err:  # e.g. a norm module the forward calls twice: the other candidates remain
        warnings.warn(f"fused_adapt: no aligned candidate for this backbone ({err})", RuntimeWarning, stacklevel=4)
        return [None] * tasks


def _probe_forward(backbone: nn.Module, subset: ParamSubset, images: Iterable[torch.Tensor]) -> Tuple[NormMeanProbe, int]:
    """A probe that read every aligned layer in forwards of the ``images`` batches at ``θ_0``, and the
    image count."""
    probe = NormMeanProbe(backbone, subset)
    view = stateless_view(backbone, forward_pre_hooks=probe.hooks)
    count = 0
    with torch.no_grad():
        for batch in images:
            view(batch)
            count += batch.shape[0]
    if count == 0:
        raise ValueError("reference_means: no images")
    return probe, count


def reference_means(backbone: nn.Module, subset: ParamSubset, images: Iterable[torch.Tensor]) -> Optional[torch.Tensor]:
    """Per-channel output means of every aligned norm layer at ``θ_0``, averaged over ``images``.

    Args:
        images: batches ``(n, C, H, W)`` of meta-training images (un-shifted: the reference is the
            domain the backbone was trained on).

    Returns:
        ``(P,)`` in ``subset``'s layout (the means in each aligned layer's bias slots, zero
        elsewhere), or ``None`` when no norm layer's bias is adapted.
    """
    if not aligned_norms(backbone, subset):
        return None
    probe, count = _probe_forward(backbone, subset, images)
    return probe.means(count)[0].to(subset.vector(backbone).dtype)


def align_to_reference(backbone: nn.Module, subset: ParamSubset, theta0: torch.Tensor, reference: torch.Tensor,
                       support_x: torch.Tensor, parts: int = 5) -> torch.Tensor:
    """``θ_0`` with every aligned norm bias shifted so that the support set's channel means at ``θ_0``
    match ``reference`` (one forward of ``support_x`` in ``parts`` equal parts).

    Shape:
        - theta0, reference: ``(P,)``; support_x: ``(shots, C, H, W)``; returns ``(P,)``.

    Raises:
        ValueError: no norm layer's bias is adapted, or one runs twice per forward.
    """
    if not aligned_norms(backbone, subset):
        raise ValueError("align_to_reference: no norm layer's bias is among the adapted parameters")
    probe, count = _probe_forward(backbone, subset, support_x.tensor_split(max(1, min(parts, support_x.shape[0]))))
    return theta0 + probe.shifts(reference, count)[0].to(theta0)

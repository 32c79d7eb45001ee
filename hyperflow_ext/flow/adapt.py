"""Adaptation with a trained :class:`~hyperflow_ext.flow.HyperFlow`: integrate its drift, and by
default keep per task the candidate its support set prefers — no autograd, no backward pass.

:func:`fused_adapt` integrates the drift once per task (the fused native / Triton integrator,
segment by segment so the states at a few horizons come out of one integration) and scores a few
candidates by the support set's leave-one-out prototype loss (:func:`~hyperflow_ext.flow.select.loo_scores`):

* ``"none"`` — the pretrained parameters (so a task the drift would hurt is left as it was);
* ``"flow@h"`` — the drift's state at horizon ``h`` (the flow's tuned horizon and half of it);
* ``"mean@0.25"`` — a quarter of the mean meta-training displacement (robust where the
  task-specific part of the drift does not transfer), unless :meth:`HyperFlow.tune_horizon` found
  the drift's own state beating the unadapted model on held-out episodes (``flow.drift_pays``):
  then the drift's states cover it, and its forward is saved;
* ``"aligned"`` — every adapted norm layer's bias shifted so that the support set's channel means
  match those the flow recorded on meta-training data (:mod:`~hyperflow_ext.flow.align`; closed
  form, measured inside the task encoder's forward; BatchNorm layers are left to support
  statistics where those are a candidate);
* ``"support statistics"`` — on backbones with BatchNorm running statistics, those statistics
  re-estimated on the support set.

``select=False`` is the paper's method exactly: the state at the horizon, nothing else.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .adapted import AdaptedProtoNet
from .align import NormMeanProbe, align_to_reference, probe_shifts
from .batched import encode_tasks
from .checks import check_support
from .hyperflow import HyperFlow
from .integrate import drift_integrate, drift_integrate_reference
from .select import choose_candidate, has_batchnorm_stats, pseudo_shots, selection_horizons

__all__ = ["fused_adapt", "flow_path", "SupportSet"]

SupportSet = Union[torch.Tensor, Sequence[torch.Tensor]]


def fused_adapt(backbone: nn.Module, support_x: SupportSet, support_y: SupportSet, flow: HyperFlow,
                steps: int = 50, solver: str = "euler", horizon: Optional[float] = None, backend: Optional[str] = None,
                guard: float = 10.0, way: Optional[int] = None, ood_radius: float = math.inf,
                select: bool = True, low_memory: bool = False) -> Union[AdaptedProtoNet, List[AdaptedProtoNet]]:
    """Adapt ``backbone`` to a support set with the learned drift — no autograd.

    The drop-in replacement for a few-shot fine-tuning loop: same inputs, returns a model to call.
    The task encoder runs once per task; integration never runs the backbone. With ``select``
    (the default) each task then keeps the candidate (module docstring) whose support features
    classify the support set best by calibrated leave-one-out prototypes, if it beats the unadapted
    model by :data:`~hyperflow_ext.flow.select.SELECT_MARGIN`: one support forward per candidate,
    still no backward pass. A class with a single shot gets a second view of each support image
    (shifted by one pixel, :func:`~hyperflow_ext.flow.select.pseudo_shots`) for the criterion and a
    stricter margin (:data:`~hyperflow_ext.flow.select.PSEUDO_MARGIN`); inputs that are not images
    then get the drift's state at the horizon.

    Args:
        backbone: the backbone ``flow`` was trained for (left unmodified).
        support_x: ``(shots, C, H, W)``, a stacked batch ``(tasks, shots, C, H, W)``, or a list
            of per-task tensors (then a list of models is returned).
        support_y: labels ``0..way-1`` matching ``support_x``.
        flow: a fitted :class:`HyperFlow`.
        steps: integration steps up to ``horizon``.
        solver: ``"euler"`` (the paper), ``"heun"`` or ``"rk4"``.
        horizon: integration time; ``1.0`` is the length of a recorded trajectory. Default:
            ``flow.horizon`` (set by :meth:`HyperFlow.tune_horizon`).
        backend: ``"auto" | "triton" | "native" | "torch"``.
        guard: a task stops (with a warning) when a step's increment is non-finite or exceeds
            ``guard`` times the largest drift seen in training times ``dt``; ``math.inf`` disables it.
        way: number of classes (default: ``max(label) + 1``).
        ood_radius: opt-in distance guard (default off): a task whose embedding lies farther from
            the training tasks than the farthest of them has its drift shrunk toward ``θ_0``,
            linearly to nothing at ``ood_radius`` times that distance. It switches adaptation off
            exactly out of domain; the per-task choice protects without that cost.
        select: choose per task among the candidates (default); ``False`` returns the state at
            ``horizon``, the paper's method.
        low_memory: on a backbone with BatchNorm running statistics, run every support forward in
            parts (:data:`~hyperflow_ext.flow.select.SCORING_PARTS`) and re-estimate the statistics
            exactly from one forward of the parts per BatchNorm layer
            (:func:`~hyperflow_ext.flow.baselines.batch_statistics`). Same result, about a fifth
            of the peak activation memory, 2-3 times the time (Conv4, 5-shot: 8 % instead of 35 %
            of bias tuning's memory, 11-14 % instead of 4.5 % of its time). Other backbones run in
            parts either way.

    Returns:
        An :class:`AdaptedProtoNet` (batched when ``support_x`` is stacked) or a list of them. Each
        has a ``selection`` attribute: ``{"chosen": name, "scores": {name: (loss, accuracy,
        calibrated loss)}}`` (a list of those for a stacked batch), or ``None`` when ``select`` is off.
        A stacked batch chooses among parameter candidates only (one set of buffers per model).

    Raises:
        TypeError / ValueError: bad support sets (shapes, labels, empty classes, NaN, device) or settings.
    """
    op = "fused_adapt"
    if not isinstance(flow, HyperFlow):
        raise TypeError(f"{op}: flow must be a HyperFlow, got {type(flow).__name__}")
    if flow.interpolation is None:
        raise ValueError(f"{op}: the flow is not trained; call flow.fit(...) or HyperFlow.load(...)")
    flow.check_backbone(op, backbone)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{op}: steps must be a positive int, got {steps!r}")
    horizon = flow.horizon if horizon is None else horizon
    if not (isinstance(horizon, (int, float)) and math.isfinite(horizon) and horizon > 0):
        raise ValueError(f"{op}: horizon must be finite and > 0, got {horizon}")
    if not (isinstance(ood_radius, (int, float)) and ood_radius > 1):
        raise ValueError(f"{op}: ood_radius must be > 1 (math.inf, the default, disables the guard), got "
                         f"{ood_radius!r}")
    for name, value in (("select", select), ("low_memory", low_memory)):
        if not isinstance(value, bool):
            raise TypeError(f"{op}: {name} must be True or False, got {value!r}")
    times = selection_horizons(horizon) if select else (horizon,)
    stats = select and has_batchnorm_stats(backbone)  # support statistics are a candidate (one task at a time)
    if isinstance(support_x, (list, tuple)):
        if not isinstance(support_y, (list, tuple)) or len(support_x) != len(support_y) or not support_x:
            raise ValueError(f"{op}: support_x and support_y must be non-empty lists of the same length")
        checked = [check_support(op, backbone, sx, sy, way) for sx, sy in zip(support_x, support_y)]
        support_x, support_y, ways = ([c[i] for c in checked] for i in range(3))
        probe = (lambda: _probe(backbone, flow, stats)) if select else None
        # same-shaped tasks in one batch
        z, feats, shifts = encode_tasks(flow.encoder, support_x, support_y, ways, probe, flow.reference_means)
        states = _integrate(backbone, flow, z, steps, solver, horizon, times, backend, guard, ood_radius)
        return [_finish(backbone, flow, {h: s[i] for h, s in states.items()}, horizon, sx, sy, w, select, stats,
                        _theta0_features(backbone, flow, feats[i]), shifts[i], whole=stats and not low_memory)
                for i, (sx, sy, w) in enumerate(zip(support_x, support_y, ways))]
    support_x, support_y, way, batched = check_support(op, backbone, support_x, support_y, way)
    # support statistics (one task at a time) are fastest from one forward of the whole set: the
    # encoder then runs it whole as well (unless low_memory); the aligned biases leave the BatchNorm
    # layers to them
    whole = stats and not batched and not low_memory
    probe = _probe(backbone, flow, stats and not batched) if select else None
    z, feats = flow.encoder.encode(support_x, support_y, way, parts=1 if whole else None,
                                   pre_hooks=probe.hooks if probe is not None else None)
    shifts = probe_shifts(probe, flow.reference_means, support_y.numel(), z.shape[0])
    states = _integrate(backbone, flow, z, steps, solver, horizon, times, backend, guard, ood_radius)
    if not batched:
        return _finish(backbone, flow, {h: s[0] for h, s in states.items()}, horizon, support_x, support_y, way,
                       select, stats, _theta0_features(backbone, flow, feats[0]), shifts[0], whole=whole)
    if not select:
        model = AdaptedProtoNet(backbone, flow.subset, states[horizon], support_x, support_y, way, flow.metric,
                                flow.scale)
        model.selection = None
        return model
    chosen = [_finish(backbone, flow, {h: s[i] for h, s in states.items()}, horizon, support_x[i], support_y[i],
                      way, True, False, _theta0_features(backbone, flow, feats[i]), shifts[i])
              for i in range(support_x.shape[0])]
    model = AdaptedProtoNet(backbone, flow.subset, torch.stack([m.theta for m in chosen]), support_x, support_y,
                            way, flow.metric, flow.scale)
    model.selection = [m.selection for m in chosen]
    return model


def _theta0_features(backbone: nn.Module, flow: HyperFlow, feats: torch.Tensor) -> Optional[torch.Tensor]:
    """The task encoder's support features, which are the unadapted candidate's when the encoder
    is the backbone itself (so that candidate costs no forward of its own)."""
    return feats if flow.encoder.encoder is backbone else None


def _probe(backbone: nn.Module, flow: HyperFlow, skip_batchnorm: bool) -> Optional[NormMeanProbe]:
    """A probe of the aligned norm layers for the task encoder's forward, when that forward runs the
    backbone at ``θ_0`` and the flow has a reference to align to."""
    if flow.reference_means is None or flow.encoder.encoder is not backbone:
        return None
    return NormMeanProbe(backbone, flow.subset, skip_batchnorm)


def _finish(backbone: nn.Module, flow: HyperFlow, states: Dict[float, torch.Tensor], horizon: float,
            sx: torch.Tensor, sy: torch.Tensor, way: int, select: bool, support_stats: bool,
            theta0_features: Optional[torch.Tensor] = None,
            aligned_shift: Optional[torch.Tensor] = None, whole: bool = False) -> AdaptedProtoNet:
    """One task's model: the state at ``horizon``, or the candidate its support set prefers
    (``support_stats``: BatchNorm statistics re-estimated on the support set are a candidate;
    ``whole``: every support forward takes the whole set at once, else parts)."""
    if not select:
        model = AdaptedProtoNet(backbone, flow.subset, states[horizon], sx, sy, way, flow.metric, flow.scale)
        model.selection = None
        return model
    theta0 = flow.subset.vector(backbone)
    candidates: Dict[str, Tuple[torch.Tensor, Optional[dict]]] = {"none": (theta0, None)}
    for h, theta in states.items():
        candidates[f"flow@{h:g}"] = (theta, None)
    if flow.mean_delta is not None and flow.drift_pays is not True:  # the fallback of a drift that does not pay
        for s in MEAN_SCALES:
            candidates[f"mean@{s:g}"] = ((theta0 + s * flow.mean_delta.to(theta0)), None)
    features = {} if theta0_features is None else {"none": theta0_features}
    two_shots = bool((torch.bincount(sy, minlength=way) >= 2).all())
    pseudo = None if two_shots else pseudo_shots(sx)  # one shot: each image and a shifted view of it
    criterion = two_shots or pseudo is not None  # else the fallback is kept unscored
    if criterion and aligned_shift is not None:
        candidates["aligned"] = (theta0 + aligned_shift.to(theta0), None)
    elif criterion and flow.reference_means is not None and flow.encoder.encoder is not backbone:
        try:  # the encoder ran another network: one probing forward of the backbone's own
            candidates["aligned"] = (align_to_reference(backbone, flow.subset, theta0, flow.reference_means, sx),
                                     None)
        except ValueError as err:
            warnings.warn(f"fused_adapt: no aligned candidate for this backbone ({err})", RuntimeWarning, stacklevel=3)
    if support_stats:
        candidates["support statistics"] = (theta0, "support")
    return choose_candidate(backbone, flow.subset, candidates, sx, sy, way, flow.metric, flow.scale,
                            fallback=f"flow@{horizon:g}", features=features, whole_batch=whole, pseudo_x=pseudo)


MEAN_SCALES = (0.25,)  # multiples of the mean meta-training displacement offered as candidates


def flow_path(backbone: nn.Module, support_x: torch.Tensor, support_y: torch.Tensor, flow: HyperFlow,
              steps: int = 50, solver: str = "euler", horizon: Optional[float] = None,
              ood_radius: float = math.inf) -> torch.Tensor:
    """Every state of :func:`fused_adapt`'s integration, for plots and analysis (torch reference).

    Shape:
        - support_x: ``(shots, C, H, W)`` or ``(tasks, shots, C, H, W)``.
        - Returns: ``(tasks, steps + 1, P)`` adapted parameter vectors, ``θ_0`` first.
    """
    support_x, support_y, way, _ = check_support("flow_path", backbone, support_x, support_y, None)
    horizon = flow.horizon if horizon is None else horizon
    z = flow.encoder(support_x, support_y, way)
    with torch.inference_mode():
        theta_pre, w, task_bias = _task_inputs(backbone, flow, z)
        table, dt = flow.time_table(steps, horizon, solver, task_bias.dtype, task_bias.device), horizon / steps
        delta0 = torch.zeros(z.shape[0], flow.subset.numel, dtype=task_bias.dtype, device=task_bias.device)
        _, _, states = drift_integrate_reference(w, delta0, task_bias, table, dt, solver, return_path=True)
        trust = _trust(flow, z, ood_radius).to(task_bias)
        return theta_pre + (trust[:, None, None] * torch.stack(states, dim=1)).to(theta_pre.dtype)


def _trust(flow: HyperFlow, z: torch.Tensor, ood_radius: float) -> torch.Tensor:
    """``(tasks,)`` factors in ``[0, 1]`` for the update: 1 inside the training tasks' range, falling
    linearly to 0 at ``ood_radius`` times the farthest training task's distance."""
    if not (math.isfinite(ood_radius) and math.isfinite(flow.task_radius)):
        return torch.ones(z.shape[0], dtype=torch.float64)
    radius = flow.task_radius
    d = flow.net.task_distance(z.to(flow.net.task_mean.device)).double().cpu()
    return ((ood_radius * radius - d) / ((ood_radius - 1) * radius)).clamp(0.0, 1.0)


def _task_inputs(backbone: nn.Module, flow: HyperFlow, z: torch.Tensor):
    """``(θ_pre, packed weights, task term)`` in the backbone's float dtype (the time table depends on
    the schedule only: :meth:`HyperFlow.time_table`)."""
    theta_pre = flow.subset.vector(backbone)
    dtype, device = theta_pre.dtype, theta_pre.device
    if dtype not in (torch.float32, torch.float64):
        dtype = torch.float32
    net = flow.net_on(device)
    task_bias = net.task_bias(z.to(device, net.inp.weight.dtype)).to(dtype).contiguous()
    return theta_pre, flow.packed(dtype, device), task_bias


def _segments(horizon: float, steps: int, times: Sequence[float]) -> List[Tuple[float, float, int]]:
    """``[(start, end, steps)]``: ``steps`` equal steps up to ``horizon`` (so the state there is exactly
    the plain integration's), cut at every earlier time in ``times`` (each rounded to a whole step)."""
    dt = horizon / steps
    cuts = sorted({max(1, int(round(t / dt))) for t in times if t <= horizon} | {steps})
    out, n0 = [], 0
    for n in cuts:
        out.append((n0 * dt, n * dt, n - n0))
        n0 = n
    return out


def _integrate(backbone: nn.Module, flow: HyperFlow, z: torch.Tensor, steps: int, solver: str, horizon: float,
               times: Sequence[float], backend: Optional[str], guard: float,
               ood_radius: float) -> Dict[float, torch.Tensor]:
    """``{t: (tasks, P)}`` adapted vectors at every time in ``times`` (none past ``horizon``; see
    :func:`_segments`) from one integration, segment by segment on the fused integrator."""
    segments = _segments(horizon, steps, times)
    with torch.inference_mode():
        theta_pre, w, task_bias = _task_inputs(backbone, flow, z)
        dtype, device = task_bias.dtype, task_bias.device
        delta = torch.zeros(z.shape[0], flow.subset.numel, dtype=dtype, device=device)
        trust = _trust(flow, z, ood_radius).to(delta)[:, None]
        at: Dict[float, torch.Tensor] = {}
        done_all = torch.zeros(z.shape[0], dtype=torch.long)
        halted = torch.zeros(z.shape[0], dtype=torch.bool)
        for start, end, n in segments:
            dt = (end - start) / n
            limit = guard * flow.max_rate * dt if math.isfinite(guard) else math.inf
            table = flow.time_table(n, end - start, solver, dtype, device, start=start)
            moved, done = drift_integrate(w, delta, task_bias, table, dt, solver,
                                          limit if limit > 0 else math.inf, backend)
            done = done.cpu().long()
            # a task the guard stopped keeps its last good state for the rest of the path
            delta = torch.where(halted.to(device)[:, None], delta, moved)
            done_all += torch.where(halted, 0, done)
            halted |= done < n
            at[end] = (theta_pre.to(dtype) + trust * delta).to(theta_pre.dtype)
        total = sum(n for *_, n in segments)
        stopped = (done_all < total).nonzero().flatten()
        if stopped.numel():
            warnings.warn(f"fused_adapt: the divergence guard stopped {stopped.numel()} task(s) early "
                          f"(first: task {int(stopped[0])} after {int(done_all[stopped[0]])} of {total} steps); "
                          f"their last good state is returned", RuntimeWarning, stacklevel=3)
        ends = sorted(at)
        return {t: at[min(ends, key=lambda e: abs(e - t))] for t in times}

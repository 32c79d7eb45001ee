"""The fused per-step bookkeeping of pruning by flow.

One pass over a layer replaces this eager sequence (:func:`flow_step_reference`)::

    m          = scores >= 0                          # current mask
    grad_w     = G ⊙ m                                # masked weight gradient (returned)
    flow       = where(m, flow, decay·flow + (1-decay)·W⊙G)   # EMA over pruned weights
    g_t        = ste_scale · W⊙G + pressure           # score gradient with pressure γ/N
    Adam(scores, g_t)                                 # bias-corrected, weight_decay 0
    new_mask   = scores >= 0                          # returned

``G = grad_eff = ∂L/∂(W⊙m)`` is the dense gradient w.r.t. the effective weight. The flow of an
*active* weight is left unchanged (it keeps the EMA it had when it was last pruned, so a weight
that flaps in and out does not lose its history).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .. import native
from .._checks import FLOAT_CODES, check_tensor, memory_span, stream_handle

__all__ = ["flow_step", "flow_step_reference"]


def _adam_scalars(step: int, lr: float, betas: Tuple[float, float]) -> Tuple[float, float]:
    beta1, beta2 = betas
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    return lr / bc1, math.sqrt(bc2)


def flow_step_reference(weight: torch.Tensor, grad_eff: torch.Tensor, scores: torch.Tensor, flow: torch.Tensor,
                        exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *, step: int, pressure: float,
                        lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                        flow_decay: float = 0.9, ste_scale: float = 0.25
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The eager torch sequence :func:`flow_step` fuses (same in-place effects and returns).

    The Adam update is torch.optim.Adam's single-tensor math (``weight_decay=0``,
    ``amsgrad=False``, ``maximize=False``).
    """
    beta1, beta2 = betas
    mask = scores >= 0
    grad_weight = grad_eff * mask
    wg = weight * grad_eff
    flow.copy_(torch.where(mask, flow, flow.mul(flow_decay).add_(wg, alpha=1.0 - flow_decay)))
    g = wg.mul(ste_scale).add_(pressure)
    exp_avg.lerp_(g, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    step_size, bc2_sqrt = _adam_scalars(step, lr, betas)
    denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
    scores.addcdiv_(exp_avg, denom, value=-step_size)
    return grad_weight, scores >= 0


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    (a0, a1), (b0, b1) = memory_span(a), memory_span(b)  # strided spans: weight/grad_eff may be views
    return a0 < a1 and b0 < b1 and a0 < b1 and b0 < a1


def _check_scalars(op: str, step, pressure, lr, betas, eps, flow_decay, ste_scale) -> Tuple[int, float, float, float,
                                                                                           float, float, float, float]:
    if isinstance(step, bool) or not isinstance(step, int) and not (isinstance(step, torch.Tensor) and step.numel() == 1):
        raise TypeError(f"{op}: step must be an int, got {type(step).__name__}")
    step = int(step)
    if step < 1:
        raise ValueError(f"{op}: step must be >= 1 (the 1-based Adam step count), got {step}")
    vals = {"pressure": pressure, "lr": lr, "eps": eps, "flow_decay": flow_decay, "ste_scale": ste_scale}
    out = {}
    for name, v in vals.items():
        v = float(v)
        if not math.isfinite(v):
            raise ValueError(f"{op}: {name} must be finite, got {v}")
        out[name] = v
    if out["lr"] < 0 or out["eps"] < 0:
        raise ValueError(f"{op}: lr and eps must be >= 0, got lr={out['lr']}, eps={out['eps']}")
    if not 0.0 <= out["flow_decay"] <= 1.0:
        raise ValueError(f"{op}: flow_decay must lie in [0, 1], got {out['flow_decay']}")
    try:
        beta1, beta2 = (float(b) for b in betas)
    except (TypeError, ValueError):
        raise TypeError(f"{op}: betas must be a pair of floats, got {betas!r}") from None
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"{op}: betas must lie in [0, 1), got {(beta1, beta2)}")
    return step, out["pressure"], out["lr"], beta1, beta2, out["eps"], out["flow_decay"], out["ste_scale"]


def flow_step(weight: torch.Tensor, grad_eff: torch.Tensor, scores: torch.Tensor, flow: torch.Tensor,
              exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *, step: int, pressure: float, lr: float = 1e-3,
              betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, flow_decay: float = 0.9,
              ste_scale: float = 0.25, check_finite: bool = True, grad_weight_out: Optional[torch.Tensor] = None,
              mask_out: Optional[torch.Tensor] = None, backend: Optional[str] = None
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """One fused pruning-by-flow step over a layer (see the module docstring for the math).

    Reads ``weight`` and ``grad_eff``; updates ``scores``, ``flow``, ``exp_avg`` and
    ``exp_avg_sq`` in place; returns the masked weight gradient and the new mask. The Adam
    update matches ``torch.optim.Adam(lr=lr, betas=betas, eps=eps)`` (weight_decay 0) on the
    score gradient ``ste_scale · W⊙G + pressure``.

    Args:
        weight: the layer's weights, any shape, float32/float64.
        grad_eff: ``G = ∂L/∂(W⊙m)``, same shape/dtype/device (e.g. the ``grad_eff_sink`` of
            :func:`hyperflow_ext.prune.functional.masked_linear`).
        scores: the scores ``t`` (active iff ``t >= 0``), updated in place. Contiguous.
        flow: the flow EMA buffer, updated in place on pruned entries. Contiguous.
        exp_avg, exp_avg_sq: Adam moments of the scores, updated in place. Contiguous.
        step: the 1-based Adam step count of this update (``state['step']`` after incrementing).
        pressure: the per-score downward push ``γ / N`` added to every score gradient.
        lr, betas, eps: Adam hyper-parameters of the scores.
        flow_decay: EMA decay of the flow buffer.
        ste_scale: scale of the straight-through estimator (0.25 in the paper).
        check_finite: raise ``ValueError`` (before any state changes) when ``weight`` or
            ``grad_eff`` holds NaN/Inf. Costs one read of both; disable only if checked upstream.
        grad_weight_out: optional contiguous output for the masked weight gradient.
        mask_out: optional contiguous bool output for the new mask.
        backend: ``"auto" | "native" | "torch"``.

    Returns:
        ``(grad_weight, new_mask)``: ``G⊙m`` with the mask *before* the step, and
        ``scores >= 0`` *after* it (bool).

    Raises:
        TypeError / ValueError: wrong kinds, shapes, dtypes, devices, non-contiguous or
            overlapping state, invalid hyper-parameters, NaN/Inf in ``weight`` or ``grad_eff``.

    Example:
        >>> w, g = torch.randn(100), torch.randn(100)
        >>> t, f, m, v = torch.rand(100) - 0.5, torch.zeros(100), torch.zeros(100), torch.zeros(100)
        >>> grad_w, mask = flow_step(w, g, t, f, m, v, step=1, pressure=1e-4)
    """
    op = "flow_step"
    check_tensor(op, "weight", weight, dtypes=FLOAT_CODES)
    shape, dev, dt = tuple(weight.shape), weight.device, weight.dtype
    check_tensor(op, "grad_eff", grad_eff, dtypes=(dt,), shape=shape, device=dev)
    for name, t in (("scores", scores), ("flow", flow), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        check_tensor(op, name, t, dtypes=(dt,), shape=shape, device=dev, contiguous=True)
    step, pressure, lr, beta1, beta2, eps, flow_decay, ste_scale = _check_scalars(
        op, step, pressure, lr, betas, eps, flow_decay, ste_scale)
    if grad_weight_out is None:
        grad_weight_out = torch.empty(shape, dtype=dt, device=dev)
    else:
        check_tensor(op, "grad_weight_out", grad_weight_out, dtypes=(dt,), shape=shape, device=dev, contiguous=True)
    if mask_out is None:
        mask_out = torch.empty(shape, dtype=torch.bool, device=dev)
    else:
        check_tensor(op, "mask_out", mask_out, dtypes=(torch.bool,), shape=shape, device=dev, contiguous=True)
    written = {"scores": scores, "flow": flow, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq,
               "grad_weight_out": grad_weight_out, "mask_out": mask_out}
    every = dict(written, weight=weight, grad_eff=grad_eff)
    names = list(every)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if (a in written or b in written) and _overlaps(every[a], every[b]):
                raise ValueError(f"{op}: {a} and {b} share memory; the updated tensors must not overlap any other")
    chosen = native.resolve_backend(backend, dev, op, triton_ok=False)
    native_check = bool(check_finite) and chosen == "native" and dev.type == "cpu"
    if check_finite and not native_check:
        check_tensor(op, "weight", weight, finite=True)
        check_tensor(op, "grad_eff", grad_eff, finite=True)
    with torch.no_grad():
        if chosen == "torch":
            gw, mask = flow_step_reference(weight, grad_eff, scores, flow, exp_avg, exp_avg_sq, step=step,
                                           pressure=pressure, lr=lr, betas=(beta1, beta2), eps=eps,
                                           flow_decay=flow_decay, ste_scale=ste_scale)
            return grad_weight_out.copy_(gw), mask_out.copy_(mask)
        weight, grad_eff = weight.contiguous(), grad_eff.contiguous()  # inputs: copied once if strided
        step_size, bc2_sqrt = _adam_scalars(step, lr, (beta1, beta2))
        mod = native.cuda_module() if dev.type == "cuda" else native.cpu_module()
        mod.flow_step(weight=weight.data_ptr(), grad_eff=grad_eff.data_ptr(), scores=scores.data_ptr(),
                      flow=flow.data_ptr(), exp_avg=exp_avg.data_ptr(), exp_avg_sq=exp_avg_sq.data_ptr(),
                      grad_weight=grad_weight_out.data_ptr(), new_mask=mask_out.data_ptr(), n=weight.numel(),
                      flow_decay=flow_decay, ste_scale=ste_scale, pressure=pressure, beta1=beta1, beta2=beta2,
                      step_size=step_size, bc2_sqrt=bc2_sqrt, eps=eps, check_finite=native_check,
                      dtype=FLOAT_CODES[dt], stream=stream_handle(dev))
    return grad_weight_out, mask_out

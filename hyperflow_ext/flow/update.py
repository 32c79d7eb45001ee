"""The Euler update ``θ ← θ + dt · f`` on every back-end."""
from __future__ import annotations

from typing import Optional

import torch

from .. import native
from .._checks import FLOAT_CODES, check_no_overlap, check_tensor, same_dtype, stream_handle

__all__ = ["euler_update", "euler_update_reference"]


def euler_update_reference(theta: torch.Tensor, drift: torch.Tensor, dt: float) -> torch.Tensor:
    """Pure-torch reference: ``theta + dt * drift``."""
    return theta + dt * drift


def euler_update(theta: torch.Tensor, drift: torch.Tensor, dt: float,
                 out: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> torch.Tensor:
    """One forward-Euler step of ``dθ/dt = drift``: ``out = theta + dt * drift``.

    Args:
        theta: parameters, any shape, float32/float64, contiguous.
        drift: same shape, dtype and device as ``theta``.
        dt: step size (a finite float).
        out: optional output; may be ``theta`` (or ``drift``) itself for an in-place step, but must not
            overlap either otherwise (ValueError).
        backend: ``"auto" | "triton" | "native" | "torch"``.

    Returns:
        ``out`` (or a new tensor) holding the stepped parameters. No autograd graph.
    """
    op = "euler_update"
    check_tensor(op, "theta", theta, dtypes=FLOAT_CODES, contiguous=True)
    check_tensor(op, "drift", drift, shape=tuple(theta.shape), device=theta.device, contiguous=True)
    same_dtype(op, theta=theta, drift=drift)
    dt = float(dt)
    if dt != dt or dt in (float("inf"), float("-inf")):
        raise ValueError(f"{op}: dt must be finite, got {dt}")
    if out is None:
        out = torch.empty_like(theta)
    else:
        check_tensor(op, "out", out, dtypes=(theta.dtype,), shape=tuple(theta.shape), device=theta.device,
                     contiguous=True)
        check_no_overlap(op, "out", out, allow_same=("theta", "drift"), theta=theta, drift=drift)
    chosen = native.resolve_backend(backend, theta.device, op)
    with torch.inference_mode():
        if chosen == "torch":
            return out.copy_(euler_update_reference(theta, drift, dt))
        if chosen == "triton":
            from ..kernels.euler_update import euler_update as launch
            return launch(theta.view(-1), drift.view(-1), dt, out.view(-1)).view_as(theta)
        mod = native.cuda_module() if theta.device.type == "cuda" else native.cpu_module()
        mod.euler_axpy(theta=theta.data_ptr(), drift=drift.data_ptr(), out=out.data_ptr(), n=theta.numel(),
                       dt=dt, dtype=FLOAT_CODES[theta.dtype], stream=stream_handle(theta.device))
    return out

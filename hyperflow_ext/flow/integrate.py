"""Fused integration of a packed drift network: every step, every stage, every task in one call.

``drift_integrate`` is what :func:`hyperflow_ext.fused_adapt` runs. Back-ends:

* ``torch``  — the reference: :func:`hyperflow_ext.flow.solvers.odeint` over plain tensor ops.
* ``native`` — one call into ``csrc/`` (OpenMP on CPU; a CUDA twin when built).
* ``triton`` — one kernel launch (``kernels/fused_drift.py``); CPU tensors need ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .. import native
from .._checks import FLOAT_CODES, check_tensor, stream_handle
from .drift import PackedDrift
from .solvers import get_tableau, odeint

__all__ = ["drift_integrate", "drift_integrate_reference", "check_drift_inputs"]


def drift_eval_reference(w: PackedDrift, delta: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``W_out silu(W_mid silu(W_in δ + bias) + b_mid) + b_out`` for ``δ (tasks, P)``, ``bias (tasks, H)``."""
    h = F.silu(delta @ w.w_in.T + bias)
    h = F.silu(h @ w.w_mid.T + w.b_mid)
    return h @ w.w_out.T + w.b_out


def drift_integrate_reference(w: PackedDrift, delta0: torch.Tensor, task_bias: torch.Tensor,
                              time_table: torch.Tensor, dt: float, solver: str = "euler",
                              max_increment: float = math.inf, return_path: bool = False):
    """Pure-torch reference of :func:`drift_integrate` (optionally with the whole path)."""
    steps = time_table.shape[0]

    def f(y, t, n, s):
        return drift_eval_reference(w, y, task_bias + time_table[n, s])

    return odeint(f, delta0, 0.0, dt * steps, steps, solver, max_increment, return_path)


def check_drift_inputs(op: str, w: PackedDrift, delta0: torch.Tensor, task_bias: torch.Tensor,
                       time_table: torch.Tensor, solver: str) -> None:
    check_tensor(op, "delta0", delta0, dtypes=FLOAT_CODES, ndim=2, contiguous=True)
    dev, dt_ = delta0.device, delta0.dtype
    tasks, p = delta0.shape
    h = w.w_in.shape[0]
    stages = get_tableau(solver).stages
    for name, t, shape in (("w_in", w.w_in, (h, p)), ("w_mid", w.w_mid, (h, h)), ("b_mid", w.b_mid, (h,)),
                           ("w_out", w.w_out, (p, h)), ("b_out", w.b_out, (p,)),
                           ("task_bias", task_bias, (tasks, h)), ("time_table", time_table, (None, stages, h))):
        check_tensor(op, name, t, dtypes=(dt_,), shape=shape, device=dev, contiguous=True)
    if time_table.shape[0] < 1:
        raise ValueError(f"{op}: need at least one step, got time_table of shape {tuple(time_table.shape)}")


def drift_integrate(w: PackedDrift, delta0: torch.Tensor, task_bias: torch.Tensor, time_table: torch.Tensor,
                    dt: float, solver: str = "euler", max_increment: float = math.inf,
                    backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Integrate ``dδ/dt = h(δ, t)`` from ``delta0`` for ``time_table.shape[0]`` fixed steps.

    Args:
        w: packed drift weights (:meth:`DriftNetwork.packed`).
        delta0: initial displacement per task.
        task_bias: ``g(z)`` per task.
        time_table: ``W_t e(t)`` per step and stage (:meth:`DriftNetwork.time_table`).
        dt: step size.
        solver: ``"euler"``, ``"heun"`` or ``"rk4"``.
        max_increment: divergence guard; a task stops at the first step whose increment is
            non-finite or exceeds this in absolute value, keeping its last good state.
        backend: ``"auto" | "triton" | "native" | "torch"``.

    Shape:
        - delta0: ``(tasks, P)``; task_bias: ``(tasks, H)``; time_table: ``(steps, stages, H)``.
        - Returns: ``(delta, steps_done)``: ``(tasks, P)`` and ``(tasks,)`` int64.
    """
    op = "drift_integrate"
    check_drift_inputs(op, w, delta0, task_bias, time_table, solver)
    if not math.isfinite(dt):
        raise ValueError(f"{op}: dt must be finite, got {dt}")
    if not (max_increment > 0):
        raise ValueError(f"{op}: max_increment must be > 0, got {max_increment}")
    chosen = native.resolve_backend(backend, delta0.device, op)
    with torch.inference_mode():
        if chosen == "torch":
            y, done, _ = drift_integrate_reference(w, delta0, task_bias, time_table, dt, solver, max_increment)
            return y, done
        tab = get_tableau(solver)
        out = delta0.clone()
        done = torch.zeros(delta0.shape[0], dtype=torch.int64, device=delta0.device)
        if chosen == "triton":
            from ..kernels.fused_drift import fused_drift_integrate
            fused_drift_integrate(w, out, task_bias, time_table, dt, tab, max_increment, done)
            return out, done
        mod = native.cuda_module() if delta0.device.type == "cuda" else native.cpu_module()
        tasks, p = delta0.shape
        a = tab.a_matrix().reshape(-1).tolist()
        mod.drift_integrate(
            w_in=w.w_in.data_ptr(), w_mid=w.w_mid.data_ptr(), b_mid=w.b_mid.data_ptr(),
            w_out=w.w_out.data_ptr(), b_out=w.b_out.data_ptr(), task_bias=task_bias.data_ptr(),
            time_table=time_table.data_ptr(), state=out.data_ptr(), steps_done=done.data_ptr(),
            tasks=tasks, params=p, hidden=w.w_in.shape[0], steps=time_table.shape[0], stages=tab.stages,
            a=a, b=list(tab.b), dt=float(dt), max_increment=float(max_increment),
            dtype=FLOAT_CODES[delta0.dtype], stream=stream_handle(delta0.device))
        return out, done

"""Explicit Runge–Kutta solvers (Euler, Heun, RK4) with a divergence guard.

One Butcher tableau drives every back-end: the torch reference here, the native C++/CUDA loop
and the Triton kernel all read :data:`TABLEAUS`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

__all__ = ["Tableau", "TABLEAUS", "get_tableau", "odeint"]


@dataclass(frozen=True)
class Tableau:
    """Butcher tableau of an explicit method: stage ``s`` is evaluated at
    ``y + dt * Σ_j a[s][j] k_j`` and time ``t + c[s] dt``; the step is ``y + dt * Σ_s b[s] k_s``."""

    name: str
    a: Tuple[Tuple[float, ...], ...]
    b: Tuple[float, ...]
    c: Tuple[float, ...]
    order: int

    @property
    def stages(self) -> int:
        return len(self.b)

    def a_matrix(self) -> torch.Tensor:
        """``(stages, stages)`` float64, zero-padded strictly-lower-triangular ``a``."""
        m = torch.zeros(self.stages, self.stages, dtype=torch.float64)
        for s, row in enumerate(self.a):
            m[s, :len(row)] = torch.tensor(row, dtype=torch.float64)
        return m


TABLEAUS = {
    "euler": Tableau("euler", ((),), (1.0,), (0.0,), 1),
    "heun": Tableau("heun", ((), (1.0,)), (0.5, 0.5), (0.0, 1.0), 2),
    "rk4": Tableau("rk4", ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), (1 / 6, 1 / 3, 1 / 3, 1 / 6),
                   (0.0, 0.5, 0.5, 1.0), 4),
}


def get_tableau(solver: str) -> Tableau:
    if solver not in TABLEAUS:
        raise ValueError(f"solver must be one of {tuple(TABLEAUS)}, got {solver!r}")
    return TABLEAUS[solver]


def odeint(f: Callable[[torch.Tensor, float, int, int], torch.Tensor], y0: torch.Tensor, t0: float, t1: float,
           steps: int, solver: str = "euler", max_increment: float = math.inf,
           return_path: bool = False) -> Tuple[torch.Tensor, torch.Tensor, Optional[List[torch.Tensor]]]:
    """Integrate ``dy/dt = f(y, t)`` for a batch of independent rows with a fixed step.

    ``f`` is called as ``f(y, t, step, stage)``; the indices let callers use precomputed
    per-stage tables (the fused drift kernels do).

    Each row stops at the first step whose increment ``dt * Σ b_s k_s`` is non-finite or has an
    entry larger than ``max_increment`` in absolute value, and keeps its last good state.

    Shape:
        - y0: ``(batch, P)``; ``f`` maps ``(batch, P)`` to ``(batch, P)``.
        - Returns: ``(y, steps_done, path)``; ``y`` ``(batch, P)``, ``steps_done`` ``(batch,)`` int64,
          ``path`` a list of ``steps + 1`` states when ``return_path`` else ``None``.
    """
    tab = get_tableau(solver)
    if steps < 1:
        raise ValueError(f"odeint: steps must be >= 1, got {steps}")
    dt = (t1 - t0) / steps
    y = y0.clone()
    active = torch.ones(y.shape[0], dtype=torch.bool, device=y.device)
    done = torch.zeros(y.shape[0], dtype=torch.int64, device=y.device)
    path = [y.clone()] if return_path else None
    for n in range(steps):
        t = t0 + n * dt
        ks: List[torch.Tensor] = []
        for s in range(tab.stages):
            ys = y
            for j, a in enumerate(tab.a[s]):
                if a:
                    ys = ys + (dt * a) * ks[j]
            ks.append(f(ys, t + tab.c[s] * dt, n, s))
        inc = sum((dt * b) * k for b, k in zip(tab.b, ks))
        ok = torch.isfinite(inc).all(dim=1) & (inc.abs().amax(dim=1) <= max_increment)
        active &= ok
        y = torch.where(active[:, None], y + inc, y)
        done += active.long()
        if path is not None:
            path.append(y.clone())
        if not bool(active.any()):
            if path is not None:
                path.extend(y.clone() for _ in range(steps - n - 1))
            break
    return y, done, path

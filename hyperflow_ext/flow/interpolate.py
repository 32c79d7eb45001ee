"""Continuous paths through recorded fine-tuning trajectories, with exact time derivatives.

A trajectory ``θ_0 .. θ_K`` sampled at ``t_k = k / K`` becomes a path ``x(t)`` on ``[0, 1]``:

* ``"linear"`` (HyperFlow-L): the straight line from ``θ_0`` to ``θ_K``.
* ``"piecewise"`` (HyperFlow-PL): straight segments through every ``θ_k``.
* ``"cubic"`` (HyperFlow-C): the natural cubic spline through every ``θ_k``.

The drift network is regressed onto ``x'(t)``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["INTERPOLATIONS", "Interpolant"]

INTERPOLATIONS = ("linear", "piecewise", "cubic")


def _natural_spline_second_derivatives(points: torch.Tensor) -> torch.Tensor:
    """Second derivatives ``M`` (``(N, K+1, P)``) of the natural spline on uniform knots ``k/K``."""
    n, k1, p = points.shape
    k = k1 - 1
    m = points.new_zeros(points.shape)
    if k < 2:
        return m
    h = 1.0 / k
    rhs = 6.0 / h**2 * (points[:, 2:] - 2 * points[:, 1:-1] + points[:, :-2])  # (N, K-1, P)
    tri = 4 * torch.eye(k - 1, dtype=points.dtype, device=points.device)
    idx = torch.arange(k - 2, device=points.device)
    tri[idx, idx + 1] = 1
    tri[idx + 1, idx] = 1
    m[:, 1:-1] = torch.linalg.solve(tri, rhs)
    return m


class Interpolant:
    """A batch of interpolated trajectories.

    Args:
        points: ``(N, K+1, P)`` recorded states, ``K >= 1``.
        kind: one of :data:`INTERPOLATIONS`.

    Example:
        >>> path = Interpolant(torch.randn(4, 51, 10), "cubic")
        >>> x, dx = path(torch.rand(4))   # each (4, 10)
    """

    def __init__(self, points: torch.Tensor, kind: str = "cubic") -> None:
        if kind not in INTERPOLATIONS:
            raise ValueError(f"Interpolant: kind must be one of {INTERPOLATIONS}, got {kind!r}")
        if points.dim() != 3 or points.shape[1] < 2:
            raise ValueError(f"Interpolant: points must be (N, K+1, P) with K >= 1, got {tuple(points.shape)}")
        self.kind = kind
        self.points = points
        self.steps = points.shape[1] - 1
        if kind == "cubic":
            self.second = _natural_spline_second_derivatives(points)

    def __call__(self, t: torch.Tensor, rows: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Evaluate trajectory ``rows[i]`` at time ``t[i]``.

        Shape:
            - t: ``(B,)`` in ``[0, 1]``; rows: ``(B,)`` trajectory indices (default: all ``N``, ``B = N``).
            - Returns: ``(x, dx/dt)``, each ``(B, P)``.
        """
        y = self.points
        if rows is None:
            rows = torch.arange(y.shape[0], device=y.device)
        if t.shape != rows.shape or t.dim() != 1:
            raise ValueError(f"Interpolant: t must have shape {tuple(rows.shape)}, got {tuple(t.shape)}")
        k = self.steps
        if self.kind == "linear":
            slope = y[rows, -1] - y[rows, 0]
            return y[rows, 0] + t[:, None] * slope, slope
        seg = (t * k).floor().long().clamp(0, k - 1)
        y0, y1 = y[rows, seg], y[rows, seg + 1]
        h = 1.0 / k
        s = (t - seg.to(t.dtype) * h)[:, None]  # time since the segment start
        if self.kind == "piecewise":
            slope = (y1 - y0) / h
            return y0 + s * slope, slope
        m0, m1 = self.second[rows, seg], self.second[rows, seg + 1]
        b = (y1 - y0) / h - h * (2 * m0 + m1) / 6
        c = m0 / 2
        d = (m1 - m0) / (6 * h)
        x = y0 + s * (b + s * (c + s * d))
        dx = b + s * (2 * c + 3 * s * d)
        return x, dx

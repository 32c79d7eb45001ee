"""The pruning power law: remaining density as a function of a constant pressure.

``S(γ) = c · γ^-(α0 + α1·ln γ)``, i.e. ``ln S = ln c − α0·ln γ − α1·(ln γ)²``: a parabola in
log-log space, fitted by linear least squares on runs at constant γ. :meth:`PowerLaw.pressure_for`
inverts it by bisection on the decreasing branch that holds the fitted pressures.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

import torch

__all__ = ["PowerLaw", "fit_power_law"]


@dataclass(frozen=True)
class PowerLaw:
    """``S(γ) = c · γ^-(α0 + α1·ln γ)``: density remaining after pruning at constant pressure γ.

    Attributes:
        c, alpha0, alpha1: the law's parameters.
        gamma_range: ``(min, max)`` of the pressures it was fitted on (``None`` if built by hand).
        r2: coefficient of determination of the fit in log space (``nan`` if not fitted).
    """

    c: float
    alpha0: float
    alpha1: float = 0.0
    gamma_range: Optional[Tuple[float, float]] = None
    r2: float = field(default=float("nan"))

    def density(self, gamma: float) -> float:
        """Predicted remaining density ``S(γ)`` (may exceed 1 outside the fitted range)."""
        gamma = float(gamma)
        if not gamma > 0:
            raise ValueError(f"PowerLaw.density: gamma must be > 0, got {gamma}")
        x = math.log(gamma)
        return self.c * math.exp(-(self.alpha0 + self.alpha1 * x) * x)

    def sparsity(self, gamma: float) -> float:
        """Predicted sparsity ``1 − S(γ)``."""
        return 1.0 - self.density(gamma)

    __call__ = density

    def _branch(self) -> Tuple[float, float]:
        """Bracket of ``ln γ`` on which ``ln S`` is decreasing and which contains the fitted data."""
        lo, hi = -60.0, 60.0
        if self.alpha1 != 0.0:
            turn = -self.alpha0 / (2.0 * self.alpha1)  # d lnS / dx = -(alpha0 + 2 alpha1 x) = 0
            if self.alpha1 > 0:
                lo = max(lo, turn)   # decreasing for x > turn
            else:
                hi = min(hi, turn)   # decreasing for x < turn
        elif self.alpha0 <= 0:
            raise ValueError(f"PowerLaw.pressure_for: the law is not decreasing in gamma "
                             f"(alpha0={self.alpha0}, alpha1=0)")
        if lo >= hi:
            raise ValueError(f"PowerLaw.pressure_for: the law has no decreasing branch in a usable range "
                             f"(alpha0={self.alpha0}, alpha1={self.alpha1})")
        return lo, hi

    def pressure_for(self, target_sparsity: float) -> float:
        """The constant pressure γ predicted to reach ``target_sparsity``.

        Solves ``S(γ) = 1 − target_sparsity`` by bisection in ``ln γ`` on the decreasing branch.

        Raises:
            ValueError: ``target_sparsity`` outside ``[0, 1)``, or not reachable on that branch.

        Example:
            >>> law = PowerLaw(c=0.18, alpha0=0.63)
            >>> round(law.sparsity(law.pressure_for(0.99)), 6)
            0.99
        """
        if isinstance(target_sparsity, bool) or not isinstance(target_sparsity, (int, float)):
            raise TypeError(f"PowerLaw.pressure_for: target_sparsity must be a float, "
                            f"got {type(target_sparsity).__name__}")
        if not 0.0 <= float(target_sparsity) < 1.0:
            raise ValueError(f"PowerLaw.pressure_for: target_sparsity must lie in [0, 1), got {target_sparsity}")
        want = math.log(1.0 - float(target_sparsity))
        lo, hi = self._branch()

        def log_s(x: float) -> float:
            return math.log(self.c) - (self.alpha0 + self.alpha1 * x) * x

        if not log_s(hi) <= want <= log_s(lo):
            raise ValueError(f"PowerLaw.pressure_for: density {1 - target_sparsity:.6g} is not reachable on the "
                             f"law's decreasing branch (densities {math.exp(log_s(hi)):.3g} .. "
                             f"{math.exp(min(log_s(lo), 700.0)):.3g})")
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if log_s(mid) > want:
                lo = mid
            else:
                hi = mid
            if hi - lo < 1e-13:
                break
        return math.exp(0.5 * (lo + hi))

    def __str__(self) -> str:
        return f"S(γ) = {self.c:.4g}·γ^-({self.alpha0:.4g} + {self.alpha1:.4g}·ln γ)"


def fit_power_law(gammas: Sequence[float], densities: Sequence[float], quadratic: bool = True) -> PowerLaw:
    """Least-squares fit of ``ln S = ln c − α0·ln γ − α1·(ln γ)²`` over runs at constant γ.

    Args:
        gammas: the constant pressures (``> 0``).
        densities: the remaining density of each run, in ``(0, 1]`` (not sparsity).
        quadratic: fit ``α1`` too (needs ≥ 3 distinct γ); ``False`` fixes ``α1 = 0`` (pure
            power law, ≥ 2 distinct γ).

    Returns:
        A :class:`PowerLaw`.

    Raises:
        TypeError: non-numeric inputs.
        ValueError: mismatched lengths, too few distinct γ, γ ≤ 0, densities outside ``(0, 1]``
            or non-finite values.

    Example:
        >>> g = [1, 2, 4, 8, 16]
        >>> law = fit_power_law(g, [0.18 * x ** -0.63 for x in g])
        >>> round(law.alpha0, 3), round(law.c, 3)
        (0.63, 0.18)
    """
    op = "fit_power_law"
    try:
        g = torch.as_tensor([float(v) for v in gammas], dtype=torch.float64)
        s = torch.as_tensor([float(v) for v in densities], dtype=torch.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{op}: gammas and densities must be sequences of numbers") from None
    if g.numel() != s.numel():
        raise ValueError(f"{op}: gammas and densities must have the same length, got {g.numel()} and {s.numel()}")
    if not (torch.isfinite(g).all() and torch.isfinite(s).all()):
        raise ValueError(f"{op}: gammas and densities must be finite")
    if (g <= 0).any():
        raise ValueError(f"{op}: every gamma must be > 0, got {g.tolist()}")
    if ((s <= 0) | (s > 1)).any():
        raise ValueError(f"{op}: densities must lie in (0, 1] (pass remaining density, not sparsity), "
                         f"got {s.tolist()}")
    need = 3 if quadratic else 2
    if torch.unique(g).numel() < need:
        raise ValueError(f"{op}: need at least {need} distinct gammas for this fit, got {torch.unique(g).numel()}")
    x, y = g.log(), s.log()
    cols = [torch.ones_like(x), -x] + ([-x * x] if quadratic else [])
    a = torch.stack(cols, 1)
    coef = torch.linalg.lstsq(a, y.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    resid = y - a @ coef
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((resid ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan")
    alpha1 = float(coef[2]) if quadratic else 0.0
    return PowerLaw(c=math.exp(float(coef[0])), alpha0=float(coef[1]), alpha1=alpha1,
                    gamma_range=(float(g.min()), float(g.max())), r2=r2)

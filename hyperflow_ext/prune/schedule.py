"""The pressure scheduler that steers pruning by flow to a target density.

Two pieces:

* :func:`keep_trajectory` — the *target trajectory*: the density the network should have after
  each pruning epoch. Its per-epoch keep ratio follows a sigmoid from an aggressive start ``r0``
  up to ``0.999`` (front-loaded: most of the pruning happens early, the last epochs only polish),
  and ``r0`` is found by bisection so that the product over all epochs equals the target density.
* :class:`PressureScheduler` — an inertia controller on ``g`` with the applied pressure
  ``γ = g^exponent`` (1.5). After each epoch, while the density is above the trajectory ``g`` rises
  by ``step + inertia_up`` (``inertia_up`` growing by ``step/4`` per consecutive rise); otherwise it
  falls by ``step + inertia_down`` (same growth), never below 0.

  Optional addition (``damping < 1``): each change of direction multiplies the base step by
  ``damping`` (the inertia still grows by ``step/4``), so the controller settles instead of
  oscillating when the needed pressure is small compared with one step of ``g``. The default
  ``damping=1`` is the authors' controller.
"""
from __future__ import annotations

import math
from typing import Dict, List

from .._checks import check_int

__all__ = ["keep_trajectory", "PressureScheduler"]

_END_KEEP = 0.999


def _check_fraction(op: str, name: str, value, *, closed_low: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a float, got {type(value).__name__}")
    value = float(value)
    ok = (0.0 <= value < 1.0) if closed_low else (0.0 < value <= 1.0)
    if not ok:
        span = "[0, 1)" if closed_low else "(0, 1]"
        raise ValueError(f"{op}: {name} must lie in {span}, got {value}")
    return value


def _keep_ratios(start: float, epochs: int, aggressivity: float) -> List[float]:
    mid, slope = epochs / 2.0, aggressivity / epochs
    return [start + (_END_KEEP - start) / (1.0 + math.exp(-slope * (e - mid))) for e in range(1, epochs + 1)]


def keep_trajectory(target_density: float, epochs: int, aggressivity: float = 6.0) -> List[float]:
    """Target density after each of ``epochs`` pruning epochs, ending at ``target_density``.

    Args:
        target_density: final fraction of active weights, in ``(0, 1]``.
        epochs: number of pruning epochs.
        aggressivity: steepness of the sigmoid (``aggressivity / epochs`` per epoch, centred on
            the middle epoch). Larger = more front-loaded.

    Returns:
        ``epochs`` densities, non-increasing, the last equal to ``target_density`` (to 1e-9
        relative), unless even a zero start ratio cannot reach it (then as close as possible).

    Example:
        >>> traj = keep_trajectory(0.02, 30)
        >>> round(traj[-1], 6)
        0.02
    """
    op = "keep_trajectory"
    target = _check_fraction(op, "target_density", target_density, closed_low=False)
    epochs = check_int(op, "epochs", epochs)
    if not (isinstance(aggressivity, (int, float)) and math.isfinite(aggressivity) and aggressivity > 0):
        raise ValueError(f"{op}: aggressivity must be a positive finite number, got {aggressivity!r}")
    log_target = math.log(target)

    def log_final(start: float) -> float:
        return sum(math.log(max(r, 1e-300)) for r in _keep_ratios(start, epochs, aggressivity))

    lo, hi = 0.0, _END_KEEP  # log_final increases with the start ratio
    if log_final(hi) <= log_target:
        start = hi
    else:
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if log_final(mid) < log_target:
                lo = mid
            else:
                hi = mid
            if hi - lo < 1e-15:
                break
        start = 0.5 * (lo + hi)
    out, density = [], 1.0
    for r in _keep_ratios(start, epochs, aggressivity):
        density *= r
        out.append(density)
    return out


class PressureScheduler:
    """Inertia controller of the pressure toward a front-loaded density trajectory.

    Args:
        target_sparsity: final fraction of pruned weights, in ``[0, 1)``.
        epochs: pruning epochs (the controller is inactive afterwards and reports ``γ = 0`` only
            if told so by the caller — it simply stops changing ``g``).
        step: base change of ``g`` per epoch (0.2).
        exponent: applied pressure ``γ = g ** exponent`` (1.5).
        aggressivity: front-loading of :func:`keep_trajectory`.

    Example:
        >>> sched = PressureScheduler(0.9, epochs=10)
        >>> sched.step(density=1.0)   # after epoch 1: above the trajectory -> push harder
        >>> sched.gamma > 0
        True
    """

    def __init__(self, target_sparsity: float, epochs: int, step: float = 0.2, exponent: float = 1.5,
                 aggressivity: float = 6.0, damping: float = 1.0) -> None:
        op = "PressureScheduler"
        self.target_sparsity = _check_fraction(op, "target_sparsity", target_sparsity, closed_low=True)
        self.epochs = check_int(op, "epochs", epochs)
        for name, v in (("step", step), ("exponent", exponent)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{op}: {name} must be a positive finite number, got {v!r}")
        if not (isinstance(damping, (int, float)) and 0.0 < damping <= 1.0):
            raise ValueError(f"{op}: damping must lie in (0, 1], got {damping!r}")
        self.step_size, self.exponent, self.damping = float(step), float(exponent), float(damping)
        self.base_step = self.step_size
        self._direction = 0
        self.trajectory = keep_trajectory(1.0 - self.target_sparsity, self.epochs, aggressivity)
        self.g = 0.0
        self.inertia_up = self.inertia_down = 0.0
        self.epoch = 0
        self.history: List[Dict[str, float]] = []

    @property
    def gamma(self) -> float:
        """The applied pressure ``γ = g ** exponent``."""
        return self.g ** self.exponent

    def expected_density(self, epoch: int) -> float:
        """Trajectory density after pruning epoch ``epoch`` (1-based; clamped to the last)."""
        return self.trajectory[min(max(epoch, 1), self.epochs) - 1]

    def step(self, density: float) -> None:
        """Report the density at the end of an epoch and update ``g`` (no-op after the last epoch)."""
        if not (isinstance(density, (int, float)) and 0.0 <= float(density) <= 1.0):
            raise ValueError(f"PressureScheduler.step: density must lie in [0, 1], got {density!r}")
        if self.epoch >= self.epochs:
            return
        self.epoch += 1
        expected = self.expected_density(self.epoch)
        direction = 1 if density > expected else -1
        if self._direction and direction != self._direction:
            self.base_step *= self.damping
        self._direction = direction
        if direction > 0:
            self.g += self.base_step + self.inertia_up
            self.inertia_up += self.step_size / 4
            self.inertia_down = 0.0
        else:
            self.g = max(0.0, self.g - self.base_step - self.inertia_down)
            self.inertia_down += self.step_size / 4
            self.inertia_up = 0.0
        self.history.append({"epoch": self.epoch, "density": float(density), "expected": expected,
                             "g": self.g, "gamma": self.gamma})

    def state_dict(self) -> Dict[str, float]:
        return {"g": self.g, "inertia_up": self.inertia_up, "inertia_down": self.inertia_down,
                "epoch": self.epoch, "base_step": self.base_step, "direction": self._direction}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.g, self.epoch = float(state["g"]), int(state["epoch"])
        self.inertia_up, self.inertia_down = float(state["inertia_up"]), float(state["inertia_down"])
        self.base_step, self._direction = float(state["base_step"]), int(state["direction"])

    def __repr__(self) -> str:
        return (f"PressureScheduler(target_sparsity={self.target_sparsity}, epochs={self.epochs}, "
                f"step={self.step_size}, exponent={self.exponent}, g={self.g:.3f})")

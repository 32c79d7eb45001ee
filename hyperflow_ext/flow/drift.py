"""The drift network ``h_φ(θ − θ_0, t, z)`` and its packed, kernel-ready form.

Architecture (``P`` adapted parameters, ``H`` hidden units)::

    u  = (θ − θ_0) / state_scale                       # per-parameter input normalisation
                                                       # (z is standardised the same way)
    h1 = silu(W_in u + W_t e(t) + g(z))                # e(t): sinusoidal time features
    h2 = silu(W_mid h1 + b_mid)                        # g(z): small MLP on the task embedding
    f  = (W_out h2 + b_out) * drift_scale              # per-parameter output scale

The task term ``g(z)`` and the time term ``W_t e(t)`` do not depend on the state, so adaptation
computes them once per task and once per (step, stage) and the fused kernels only run the three
matrix-vector products per evaluation. ``W_in`` and ``W_out`` are ``H x P``/``P x H``, so the
network scales linearly in ``P`` (tens of thousands of parameters at ``H = 256`` is a few MB).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .solvers import Tableau

__all__ = ["DriftNetwork", "PackedDrift", "time_features"]


def time_features(t: torch.Tensor, num: int) -> torch.Tensor:
    """Sinusoidal features of ``t`` in ``[0, 1]``: ``(..., )`` → ``(..., num)``, ``num`` even."""
    freqs = math.pi * 2.0 ** torch.arange(num // 2, dtype=t.dtype, device=t.device)
    ang = t[..., None] * freqs
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)


class PackedDrift(NamedTuple):
    """The state-dependent part of a drift network with normalisation folded in.

    Shapes: ``w_in (H, P)``, ``w_mid (H, H)``, ``b_mid (H,)``, ``w_out (P, H)``, ``b_out (P,)``;
    all contiguous, one dtype and device.
    """

    w_in: torch.Tensor
    w_mid: torch.Tensor
    b_mid: torch.Tensor
    w_out: torch.Tensor
    b_out: torch.Tensor

    @property
    def num_params(self) -> int:
        return self.w_in.shape[1]

    @property
    def hidden(self) -> int:
        return self.w_in.shape[0]


class DriftNetwork(nn.Module):
    """Predicts ``dθ/dt`` of fine-tuning from the displacement, the time and the task.

    Args:
        num_params: ``P``, the number of adapted parameters.
        task_dim: size of the task embedding ``z``.
        hidden: ``H``, hidden width.
        time_dim: number of sinusoidal time features (even).
        task_hidden: width of the task MLP ``g``.

    Shape:
        - delta: ``(tasks, P)``; t: ``(tasks,)``; z: ``(tasks, task_dim)``.
        - Output: ``(tasks, P)``.
    """

    def __init__(self, num_params: int, task_dim: int, hidden: int = 256, time_dim: int = 16,
                 task_hidden: int = 128) -> None:
        super().__init__()
        if num_params < 1 or task_dim < 1 or hidden < 1 or time_dim < 2 or time_dim % 2:
            raise ValueError(f"DriftNetwork: sizes must be positive and time_dim even, got num_params={num_params}, "
                             f"task_dim={task_dim}, hidden={hidden}, time_dim={time_dim}")
        self.num_params, self.task_dim, self.hidden, self.time_dim = num_params, task_dim, hidden, time_dim
        self.task_hidden = task_hidden
        self.task_clip = 3.0
        self.inp = nn.Linear(num_params, hidden, bias=False)
        self.time = nn.Linear(time_dim, hidden, bias=False)
        self.task = nn.Sequential(nn.Linear(task_dim, task_hidden), nn.SiLU(), nn.Linear(task_hidden, hidden))
        self.mid = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, num_params)
        self.register_buffer("state_scale", torch.ones(num_params))
        self.register_buffer("drift_scale", torch.ones(num_params))
        self.register_buffer("task_mean", torch.zeros(task_dim))
        self.register_buffer("task_scale", torch.ones(task_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()
        nn.init.zeros_(self.out.weight)  # start from zero drift: identity flow
        nn.init.zeros_(self.out.bias)

    def task_bias(self, z: torch.Tensor) -> torch.Tensor:
        """``g(z)``: ``(tasks, task_dim)`` → ``(tasks, H)``.

        ``z`` is standardised with the training tasks' statistics and clipped to ``±task_clip``
        standard deviations: a task from a far domain then conditions the drift like the most
        extreme training task instead of extrapolating the MLP.
        """
        u = (z - self.task_mean) / self.task_scale
        return self.task(u.clamp(-self.task_clip, self.task_clip))

    def task_distance(self, z: torch.Tensor) -> torch.Tensor:
        """RMS of ``z`` standardised with the training tasks' statistics: ``(tasks, task_dim)`` → ``(tasks,)``.

        About 1 for a typical training task; much larger for a task unlike any seen in training.
        """
        u = (z.to(self.task_mean) - self.task_mean) / self.task_scale
        return u.pow(2).mean(dim=-1).sqrt()

    def time_bias(self, t: torch.Tensor) -> torch.Tensor:
        """``W_t e(t)``: ``(...)`` → ``(..., H)``."""
        return self.time(time_features(t, self.time_dim))

    def normalized(self, delta: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The drift divided by ``drift_scale`` (the quantity the training loss regresses)."""
        h = F.silu(self.inp(delta / self.state_scale) + self.time_bias(t) + self.task_bias(z))
        return self.out(F.silu(self.mid(h)))

    def forward(self, delta: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.normalized(delta, t, z) * self.drift_scale

    @torch.no_grad()
    def packed(self, dtype: torch.dtype = torch.float32) -> PackedDrift:
        """Kernel-ready weights with ``state_scale`` and ``drift_scale`` folded in."""
        f = lambda x: x.detach().to(dtype).contiguous()  # noqa: E731
        return PackedDrift(
            w_in=f(self.inp.weight / self.state_scale),
            w_mid=f(self.mid.weight), b_mid=f(self.mid.bias),
            w_out=f(self.out.weight * self.drift_scale[:, None]),
            b_out=f(self.out.bias * self.drift_scale))

    @torch.no_grad()
    def time_table(self, steps: int, horizon: float, tableau: Tableau,
                   dtype: torch.dtype = torch.float32, start: float = 0.0) -> torch.Tensor:
        """``W_t e(t)`` at every stage time of ``steps`` steps of ``horizon / steps`` from ``start``:
        ``(steps, stages, H)``.

        Raises:
            ValueError: ``steps`` is not a positive int, ``horizon`` not finite and > 0, or
                ``dtype`` not floating point.
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"DriftNetwork.time_table: steps must be a positive int, got {steps!r}")
        number = isinstance(horizon, (int, float)) and not isinstance(horizon, bool)
        if not (number and math.isfinite(horizon) and horizon > 0):
            raise ValueError(f"DriftNetwork.time_table: horizon must be finite and > 0, got {horizon!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"DriftNetwork.time_table: dtype must be floating point, got {dtype}")
        dt = horizon / steps
        n = torch.arange(steps, dtype=torch.float64)[:, None]
        c = torch.tensor(tableau.c, dtype=torch.float64)[None, :]
        t = (start + (n + c) * dt).to(self.time.weight.dtype).to(self.time.weight.device)
        return self.time_bias(t).to(dtype).contiguous()

    def extra_repr(self) -> str:
        return (f"num_params={self.num_params}, task_dim={self.task_dim}, hidden={self.hidden}, "
                f"time_dim={self.time_dim}, task_hidden={self.task_hidden}")

"""Flow-matching training of the drift network on interpolated trajectories."""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from tqdm.auto import tqdm

from .drift import DriftNetwork
from .interpolate import Interpolant
from .trajectories import TrajectorySet

__all__ = ["DriftTrainConfig", "fit_normalisation", "train_drift"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DriftTrainConfig:
    iters: int = 600
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-2
    eval_every: int = 50

    def __post_init__(self) -> None:
        if self.iters < 1 or self.batch_size < 1 or not self.lr > 0 or self.eval_every < 1:
            raise ValueError(f"DriftTrainConfig: iters, batch_size, eval_every >= 1 and lr > 0 required, got {self}")


def _flat(ts: TrajectorySet) -> torch.Tensor:
    return ts.deltas.reshape(-1, *ts.deltas.shape[2:])  # (episodes * runs, K+1, P)


@torch.no_grad()
def fit_normalisation(net: DriftNetwork, ts: TrajectorySet) -> float:
    """Set the input/output/task normalisation from the data; return the largest drift rate seen.

    Scales are per-parameter standard deviations (floored at 1% of their mean, so parameters
    that never move do not blow up the input).
    """
    pts = _flat(ts)
    k = pts.shape[1] - 1
    rates = (pts[:, 1:] - pts[:, :-1]) * k                 # piecewise-linear derivatives
    state = pts.reshape(-1, pts.shape[-1]).std(dim=0)
    drift = rates.reshape(-1, pts.shape[-1]).pow(2).mean(dim=0).sqrt()
    net.state_scale.copy_(state.clamp_min(0.01 * float(state.mean()) + 1e-12))
    net.drift_scale.copy_(drift.clamp_min(0.01 * float(drift.mean()) + 1e-12))
    z_std = ts.z.std(dim=0) if ts.episodes > 1 else torch.ones_like(ts.z[0])
    net.task_mean.copy_(ts.z.mean(dim=0))
    # A generous floor: task statistics that barely vary in training must not explode on new domains.
    net.task_scale.copy_(z_std.clamp_min(0.1 * float(z_std.mean()) + 1e-12))
    return float(rates.abs().max())


def _loss(net: DriftNetwork, path: Interpolant, z: torch.Tensor, runs: int, rows: torch.Tensor,
          t: torch.Tensor) -> torch.Tensor:
    x, dx = path(t, rows)
    pred = net.normalized(x, t, z[rows // runs])
    return (pred - dx / net.drift_scale).pow(2).mean()


def train_drift(net: DriftNetwork, train: TrajectorySet, interpolation: str,
                config: DriftTrainConfig = DriftTrainConfig(), val: Optional[TrajectorySet] = None,
                seed: int = 0, progress: bool = True) -> Dict[str, List[float]]:
    """Regress the drift onto the interpolant's time derivative at uniform random ``t``.

    AdamW with a cosine schedule; when ``val`` is given the weights with the lowest validation
    loss are kept. Deterministic given ``seed``. Returns the loss history.
    """
    gen = torch.Generator().manual_seed(seed)
    path = Interpolant(_flat(train), interpolation)
    n = path.points.shape[0]
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / config.iters)))
    history: Dict[str, List[float]] = {"train": [], "val": []}
    if val is not None:
        vpath = Interpolant(_flat(val), interpolation)
        vrows = torch.arange(vpath.points.shape[0]).repeat_interleave(8)
        vt = torch.rand(vrows.shape[0], generator=gen)
    best, best_state = math.inf, None
    bar = tqdm(range(config.iters), desc=f"drift ({interpolation})", disable=not progress, unit="it")
    net.train()
    for it in bar:
        rows = torch.randint(n, (config.batch_size,), generator=gen)
        t = torch.rand(config.batch_size, generator=gen)
        loss = _loss(net, path, train.z, train.runs, rows, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history["train"].append(float(loss.detach()))
        if val is not None and ((it + 1) % config.eval_every == 0 or it + 1 == config.iters):
            net.eval()
            with torch.no_grad():
                vloss = float(_loss(net, vpath, val.z, val.runs, vrows, vt))
            net.train()
            history["val"].append(vloss)
            if vloss < best:
                best, best_state = vloss, copy.deepcopy(net.state_dict())
            bar.set_postfix(loss=f"{history['train'][-1]:.4f}", val=f"{vloss:.4f}")
    net.eval()
    if best_state is not None:
        net.load_state_dict(best_state)
        logger.info("train_drift: kept the best validation loss %.4f", best)
    return history

"""Flow-matching training of the drift network on interpolated trajectories."""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from tqdm.auto import tqdm

from .. import distributed
from .._io import load_tensors, save_tensors, tensor_digest
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
                seed: int = 0, progress: bool = True, checkpoint: Optional[os.PathLike] = None,
                checkpoint_every: int = 100) -> Dict[str, List[float]]:
    """Regress the drift onto the interpolant's time derivative at uniform random ``t``.

    AdamW with a cosine schedule; when ``val`` is given the weights with the lowest validation
    loss are kept. Deterministic given ``seed``. Returns the loss history.

    Args:
        checkpoint: a file to save the whole training state to (weights, optimizer, random
            generator, history; safetensors, written atomically) every ``checkpoint_every``
            iterations and at the end. If it exists, training resumes from it and ends with
            exactly the weights an uninterrupted run gives; a finished checkpoint is simply loaded.
            Under ``torchrun`` rank 0 writes it and every rank resumes from it, on any world size
            (each global batch is split over the ranks, so the state does not depend on it).
        checkpoint_every: iterations between checkpoints.

    Raises:
        ValueError: ``checkpoint`` was written by another run (other settings, data or initial
            weights), or ``checkpoint_every`` is not an int >= 1.
        FloatingPointError: the training loss became NaN/Inf; raised before that step's update, with
            the checkpoint file left as it was (the last good state).
    """
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"train_drift: checkpoint_every must be an int >= 1, got {checkpoint_every!r}")
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
    ckpt = _Checkpoint(checkpoint, net, train, val, interpolation, config, seed) if checkpoint is not None else None
    start = 0
    if ckpt is not None and ckpt.exists():
        start, best, best_state = ckpt.restore(net, opt, sched, gen, history)
        logger.info("train_drift: resuming from %s at iteration %d of %d", ckpt.path, start, config.iters)
    saved = start  # the iteration the checkpoint file holds
    bar = tqdm(range(start, config.iters), desc=f"drift ({interpolation})", unit="it", initial=start,
               total=config.iters, disable=not distributed.show_progress(progress))
    # Under torchrun: DDP, each rank on its share of the same global batch (see DataParallelLoss).
    step_loss = distributed.DataParallelLoss(net, lambda m, rows, t: _loss(m, path, train.z, train.runs, rows, t))
    net.train()
    for it in bar:
        rows = torch.randint(n, (config.batch_size,), generator=gen)
        t = torch.rand(config.batch_size, generator=gen)
        loss, value = step_loss(rows, t)
        if not math.isfinite(value):  # stop before the update: the weights stay those of the last good step
            kept = (f"; the last good checkpoint {ckpt.path} (iteration {saved}) is kept"
                    if ckpt is not None and saved else "")
            raise FloatingPointError(f"train_drift: the loss became {value} at iteration {it + 1}; stopped before "
                                     f"updating, so the network holds the weights of iteration {it}{kept} (lower "
                                     f"the learning rate or check the trajectories for NaN/Inf)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history["train"].append(value)
        if val is not None and ((it + 1) % config.eval_every == 0 or it + 1 == config.iters):
            net.eval()
            with torch.no_grad():
                vloss = float(_loss(net, vpath, val.z, val.runs, vrows, vt))
            net.train()
            history["val"].append(vloss)
            if vloss < best:
                best, best_state = vloss, copy.deepcopy(net.state_dict())
            bar.set_postfix(loss=f"{history['train'][-1]:.4f}", val=f"{vloss:.4f}")
        if ckpt is not None and distributed.is_main() and ((it + 1) % checkpoint_every == 0
                                                         or it + 1 == config.iters):
            ckpt.save(it + 1, net, opt, sched, gen, history, best, best_state)
            saved = it + 1
    net.eval()
    if best_state is not None:
        net.load_state_dict(best_state)
        logger.info("train_drift: kept the best validation loss %.4f", best)
    distributed.agree_across_ranks(net.state_dict(), "train_drift: the trained drift network")  # under torchrun
    return history


class _Checkpoint:
    """The resumable state of :func:`train_drift` in one safetensors file (no pickled objects).

    Its key covers everything that determines the run: the settings, the seed, the
    interpolation, the trajectories and the network's weights and normalisation at the start.
    """

    def __init__(self, path: os.PathLike, net: DriftNetwork, train: TrajectorySet, val: Optional[TrajectorySet],
                 interpolation: str, config: DriftTrainConfig, seed: int) -> None:
        self.path = Path(path)
        data = [train.deltas, train.z] + ([val.deltas, val.z] if val is not None else [])
        settings = json.dumps({"config": asdict(config), "seed": seed, "interpolation": interpolation,
                               "net": net.extra_repr(), "val": val is not None}, sort_keys=True)
        start = list(net.state_dict().values())
        self.key = hashlib.sha256(settings.encode()).hexdigest()[:12] + tensor_digest(start + data)

    def exists(self) -> bool:
        return self.path.is_file()

    def save(self, done: int, net: DriftNetwork, opt: torch.optim.Optimizer, sched, gen: torch.Generator,
             history: Dict[str, List[float]], best: float, best_state: Optional[dict]) -> None:
        tensors = {f"net/{k}": v for k, v in net.state_dict().items()}
        tensors.update({f"best/{k}": v for k, v in (best_state or {}).items()})
        state = opt.state_dict()
        for i, slots in state["state"].items():
            tensors.update({f"opt/{i}/{k}": torch.as_tensor(v) for k, v in slots.items()})
        tensors["generator"] = gen.get_state()
        meta = {"key": self.key, "done": done, "history": history, "best": best if best_state else None,
                "param_groups": state["param_groups"], "scheduler": sched.state_dict()}
        save_tensors(self.path, tensors, meta)

    def restore(self, net: DriftNetwork, opt: torch.optim.Optimizer, sched, gen: torch.Generator,
                history: Dict[str, List[float]]) -> Tuple[int, float, Optional[dict]]:
        tensors, meta = load_tensors(self.path)
        if meta.get("key") != self.key:
            raise ValueError(f"train_drift: checkpoint {self.path} was written by another training run (other "
                             f"settings, trajectories or initial weights); delete it or pass another path")
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net/")})
        slots: Dict[int, dict] = {}
        for name, v in tensors.items():
            if name.startswith("opt/"):
                _, i, k = name.split("/")
                slots.setdefault(int(i), {})[k] = v
        opt.load_state_dict({"state": slots, "param_groups": meta["param_groups"]})
        sched.load_state_dict(meta["scheduler"])
        gen.set_state(tensors["generator"])
        history.update(meta["history"])
        best_state = {k[5:]: v for k, v in tensors.items() if k.startswith("best/")} or None
        best = meta["best"] if best_state is not None else math.inf
        return int(meta["done"]), best, best_state

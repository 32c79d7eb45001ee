"""Recording real fine-tuning trajectories, stored on disk in chunks so training can resume.

For each meta-training episode: the task embedding ``z`` (from the frozen encoder) and ``R`` runs
of support-set fine-tuning — one from the pretrained parameters, ``R - 1`` from random
perturbations of them — each recorded as ``θ_0 .. θ_K`` relative to the pretrained parameters.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from .._io import load_tensors, save_tensors, tensor_digest
from .functional import OBJECTIVES, OPTIMIZERS, finetune
from .params import ParamSubset
from .task import ENCODER_VERSION, TaskEncoder

__all__ = ["TrajectoryConfig", "TrajectorySet", "record_trajectories"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrajectoryConfig:
    """How trajectories are recorded. ``lr`` and ``optimizer`` are those of bias tuning.

    ``objective="support"`` fine-tunes on the support loss, exactly the bias-tuning baseline;
    ``"query"`` on the episode's query loss against the support prototypes, so the recorded paths
    lead where fine-tuning generalises (the drift is still conditioned on the support set only).
    """

    steps: int = 50
    perturbations: int = 3
    perturb_scale: float = 0.5
    optimizer: str = "adam"
    lr: float = 1e-2
    metric: str = "cosine"
    scale: float = 10.0
    objective: str = "support"

    def __post_init__(self) -> None:
        if self.steps < 1 or self.perturbations < 0:
            raise ValueError(f"TrajectoryConfig: steps >= 1 and perturbations >= 0 required, got {self}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"TrajectoryConfig: optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not self.lr > 0:
            raise ValueError(f"TrajectoryConfig: lr must be > 0, got {self.lr}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"TrajectoryConfig: objective must be one of {OBJECTIVES}, got {self.objective!r}")

    def digest(self, subset: ParamSubset, seed: int, backbone: nn.Module,
               encoder_version: str = ENCODER_VERSION) -> str:
        """Key of a trajectory store: the settings, the seed, what the task embedding holds and the
        backbone's exact weights (each chunk file adds the fingerprint of its own episodes)."""
        h = hashlib.sha256(json.dumps({**asdict(self), "names": subset.names, "seed": seed,
                                       "encoder": encoder_version}, sort_keys=True).encode())
        for name, tensor in backbone.state_dict().items():
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:12]


@dataclass
class TrajectorySet:
    """Recorded trajectories.

    Shape:
        - deltas: ``(episodes, runs, steps + 1, P)``, ``θ − θ_pretrained``.
        - z: ``(episodes, task_dim)``.
    """

    deltas: torch.Tensor
    z: torch.Tensor
    losses: Optional[torch.Tensor] = None  # (episodes, 2): fine-tuning loss (mean over runs) at its first and last step
    layout: Optional[dict] = None          # the encoder's sizes behind z: feature_dim, layers, layer_dims

    @property
    def episodes(self) -> int:
        return self.deltas.shape[0]

    @property
    def runs(self) -> int:
        return self.deltas.shape[1]

    def split(self, n_val: int) -> "tuple[TrajectorySet, TrajectorySet]":
        """The last ``n_val`` episodes as a validation set."""
        if not 0 < n_val < self.episodes:
            raise ValueError(f"TrajectorySet.split: need 0 < n_val < {self.episodes}, got {n_val}")
        losses = self.losses
        return (TrajectorySet(self.deltas[:-n_val], self.z[:-n_val], None if losses is None else losses[:-n_val],
                              self.layout),
                TrajectorySet(self.deltas[-n_val:], self.z[-n_val:], None if losses is None else losses[-n_val:],
                              self.layout))

    @staticmethod
    def cat(parts: List["TrajectorySet"]) -> "TrajectorySet":
        losses = None if any(p.losses is None for p in parts) else torch.cat([p.losses for p in parts])
        return TrajectorySet(torch.cat([p.deltas for p in parts]), torch.cat([p.z for p in parts]), losses,
                             parts[0].layout)

    def loss_drop(self) -> Optional[float]:
        """Median relative drop of the fine-tuning loss over the episodes (``None`` if not recorded)."""
        if self.losses is None or self.losses.numel() == 0:
            return None
        start, end = self.losses[:, 0], self.losses[:, 1]
        return float((1 - end / start.clamp_min(1e-12)).median())


def _episodes_key(block: Sequence[Sequence[torch.Tensor]]) -> str:
    """Fingerprint of a block of episodes (every tensor's bytes), part of its chunk file's name."""
    return tensor_digest(t for ep in block for t in ep if isinstance(t, torch.Tensor))


def record_trajectories(backbone: nn.Module, subset: ParamSubset, encoder: TaskEncoder,
                        episodes: Iterable, tasks: int, config: TrajectoryConfig = TrajectoryConfig(),
                        store: Optional[os.PathLike] = None, chunk_size: int = 32, seed: int = 0,
                        progress: bool = True) -> TrajectorySet:
    """Fine-tune on ``tasks`` episodes and record the paths.

    Args:
        backbone: the pretrained backbone (left unchanged).
        subset: which parameters fine-tune.
        encoder: frozen task encoder for ``z``.
        episodes: iterable of ``(support_x, support_y, ...)``; the first ``tasks`` are used.
        tasks: number of episodes.
        config: optimizer, steps, perturbations.
        store: folder for chunk files. A chunk already there is reused when its settings, seed,
            backbone weights and episodes all match, so an interrupted run resumes and a run on
            other episodes never picks up these trajectories.
        chunk_size: episodes per chunk file.
        seed: seeds the perturbations.
        progress: show a progress bar (rank 0 only under ``torchrun``).

    Under ``torch.distributed`` (``torchrun --nproc_per_node=N``) the chunks are shared out round
    robin (:func:`~hyperflow_ext.distributed.shard_blocks`): every rank reads the same episodes and
    draws every perturbation, fine-tunes only its own chunks and writes them to ``store`` under the
    names a single process would use, so the same seed gives the same episode set and the same
    files whatever the world size, and a restarted rank redoes only its own missing chunks. Every
    rank returns the whole set (the chunks are broadcast from their owners).
    """
    if tasks < 1:
        raise ValueError(f"record_trajectories: tasks must be >= 1, got {tasks}")
    if chunk_size < 1:
        raise ValueError(f"record_trajectories: chunk_size must be >= 1, got {chunk_size}")
    episodes = iter(episodes)
    digest = config.digest(subset, seed, backbone, encoder.version)
    store_path = Path(store) if store is not None else None
    theta_pre = subset.vector(backbone)
    gen = torch.Generator().manual_seed(seed)
    sigma = config.perturb_scale * config.lr * config.steps ** 0.5
    done: List[Optional[TrajectorySet]] = []
    owners: List[int] = []
    world = distributed.world_size()
    mine = set(distributed.shard_blocks(-(-tasks // chunk_size)))
    bar = tqdm(total=sum(min(chunk_size, tasks - b * chunk_size) for b in mine), desc="trajectories", unit="task",
               disable=not distributed.show_progress(progress))
    keys = []
    for start in range(0, tasks, chunk_size):
        block = list(itertools.islice(episodes, min(chunk_size, tasks - start)))
        if not block:
            break
        # Drawn for every episode, stored or not, so a resumed run perturbs exactly like a fresh one
        # (and every rank draws all of them, so a chunk's noise does not depend on the world size).
        noises = [torch.randn(config.perturbations, theta_pre.numel(), generator=gen) * sigma for _ in block]
        owners.append((start // chunk_size) % world)
        if world > 1:
            keys.append(torch.tensor(int(_episodes_key(block), 16), dtype=torch.int64))
            if start // chunk_size not in mine:
                done.append(None)
                continue
        # A chunk is reused only for the very same episodes (same settings, backbone and tensors).
        path = store_path / f"traj-{digest}-{start:06d}-{_episodes_key(block)}.safetensors" if store_path else None
        if path is not None and path.is_file():
            tensors, _ = load_tensors(path)
            done.append(TrajectorySet(tensors["deltas"], tensors["z"], tensors.get("losses")))
            logger.info("record_trajectories: reusing episodes %d-%d from %s", start, start + len(block) - 1, path)
            bar.update(len(block))
            continue
        deltas, zs, ends = [], [], []
        for i, (ep, noise) in enumerate(zip(block, noises), start):
            sx, sy = ep[0], ep[1]
            way = int(sy.max()) + 1
            query = None
            if config.objective == "query":
                if len(ep) < 4 or ep[2].numel() == 0:
                    raise ValueError(f"record_trajectories: objective='query' needs episodes with queries; episode "
                                     f"{i} has none (sample them with EpisodeSampler(query > 0))")
                query = (ep[2], ep[3])
            starts = torch.cat([theta_pre[None], theta_pre[None] + noise.to(theta_pre)])
            _, traj, losses = finetune(backbone, subset, sx, sy, starts, config.steps, way, config.metric,
                                       config.scale, config.optimizer, config.lr, record=True, query=query)
            deltas.append((traj - theta_pre).float())
            zs.append(encoder(sx, sy, way).float())
            ends.append((losses[0], losses[-1]))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[0]:.3f}->{losses[-1]:.3f}")
        chunk = TrajectorySet(torch.stack(deltas), torch.cat(zs), torch.tensor(ends, dtype=torch.float32))
        if path is not None:
            save_tensors(path, {"deltas": chunk.deltas, "z": chunk.z, "losses": chunk.losses},
                         {"config": asdict(config), "seed": seed})
        done.append(chunk)
    bar.close()
    if not done:
        raise ValueError("record_trajectories: the episode iterable is empty")
    if world > 1:
        done = _gather_chunks(done, owners, keys)
    result = TrajectorySet.cat(done)
    result.layout = {"feature_dim": encoder.feature_dim, "layers": list(encoder.layers),
                     "layer_dims": list(encoder.layer_dims or [])}
    if result.episodes < tasks:
        raise ValueError(f"record_trajectories: the episode iterable ran out after {result.episodes} of {tasks} tasks")
    return result


def _gather_chunks(done: List[Optional[TrajectorySet]], owners: List[int], keys: List[torch.Tensor]
                   ) -> List[TrajectorySet]:
    """Every rank's chunks on every rank, in episode order (each broadcast from the rank that owns it),
    after checking that all ranks read the same episodes."""
    distributed.agree_across_ranks(keys, "record_trajectories: the episodes each rank read (every rank must "
                                         "draw the same episodes: same data, sampler and seed)")
    out = []
    for chunk, owner in zip(done, owners):
        sent = None if chunk is None else [chunk.deltas, chunk.z] + ([] if chunk.losses is None else [chunk.losses])
        got = distributed.broadcast_tensors(sent, owner)
        out.append(TrajectorySet(got[0], got[1], got[2] if len(got) > 2 else None))
    return out

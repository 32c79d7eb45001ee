"""One rank of a tests/test_distributed.py job: ``python _dist_worker.py SCENARIO OUT [options]``.

Started by the tests with ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT`` set (or
none of them, for a single process) and ``cwd`` outside the checkout. Writes its results under OUT
as ``<scenario>-rank<r>.safetensors`` (tensors plus JSON metadata).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

import torch
from torch import nn

import hyperflow_ext.flow.train as train_module
import hyperflow_ext.flow.trajectories as traj_module
from hyperflow_ext import distributed
from hyperflow_ext._io import save_tensors
from hyperflow_ext.flow import DriftTrainConfig, TaskEncoder, TrajectoryConfig, TrajectorySet, record_trajectories
from hyperflow_ext.flow.drift import DriftNetwork
from hyperflow_ext.flow.params import ParamSubset
from hyperflow_ext.flow.train import fit_normalisation, train_drift
from hyperflow_ext.models import Conv4

from _toy_tasks import episodes  # noqa: E402  (tests/ is this script's folder)


def recording_setup():
    torch.manual_seed(0)
    backbone = Conv4(hidden=8, groups=2).eval()
    return backbone, ParamSubset(backbone, "bias"), TaskEncoder(backbone, backbone.feature_dim), \
        TrajectoryConfig(steps=3, perturbations=1)


def drift_setup():
    g = torch.Generator().manual_seed(0)
    ts = TrajectorySet(torch.randn(10, 2, 6, 12, generator=g).cumsum(2), torch.randn(10, 5, generator=g))
    train, val = ts.split(2)
    torch.manual_seed(1)
    net = DriftNetwork(12, 5, hidden=16)
    fit_normalisation(net, train)
    return net, train, val, DriftTrainConfig(iters=40, batch_size=15, eval_every=10)


def prune_setup(batchnorm=False):
    from hyperflow_ext.prune._loop import TensorLoader

    torch.manual_seed(0)
    x, y = torch.randn(90, 1, 8, 8), torch.randint(0, 4, (90,))
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6) if batchnorm else nn.Identity(),
                          nn.ReLU(), nn.Flatten(), nn.Linear(6 * 64, 4))
    return model, TensorLoader(x, y, 16, shuffle=True, seed=0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("scenario", choices=["record", "drift", "prune"])
    p.add_argument("out")
    p.add_argument("--tasks", type=int, default=7)
    p.add_argument("--die-after", type=int, default=0, help="record: rank 1 exits after writing this many chunks")
    p.add_argument("--batchnorm", action="store_true")
    args = p.parse_args()
    distributed.init_from_env("cpu", timeout_s=60)
    me = distributed.rank()
    meta: dict = {"world": distributed.world_size()}
    tensors: dict = {}
    if args.scenario == "record":
        wrote = []
        real_save = traj_module.save_tensors

        def save(path, *a, **k):
            real_save(path, *a, **k)
            wrote.append(os.path.basename(path))
            if me == 1 and len(wrote) == args.die_after:
                os._exit(3)  # killed: no clean-up, no collective

        traj_module.save_tensors = save
        backbone, subset, encoder, cfg = recording_setup()
        ts = record_trajectories(backbone, subset, encoder, episodes(args.tasks), args.tasks, cfg,
                                 store=os.path.join(args.out, "store"), chunk_size=2, progress=False)
        tensors, meta["wrote"] = {"deltas": ts.deltas, "z": ts.z, "losses": ts.losses}, wrote
    elif args.scenario == "drift":
        saves, real_save = [], train_module._Checkpoint.save

        def save(self, done, *a, **k):
            real_save(self, done, *a, **k)
            saves.append(done)
            if done == 20:
                shutil.copy(self.path, os.path.join(args.out, "drift-at-20.safetensors"))

        train_module._Checkpoint.save = save
        net, train, val, cfg = drift_setup()
        hist = train_drift(net, train, "cubic", cfg, val, progress=False,
                           checkpoint=os.path.join(args.out, "drift.ckpt.safetensors"), checkpoint_every=10)
        tensors, meta["history"], meta["saves"] = dict(net.state_dict()), hist, saves
    else:
        from hyperflow_ext.prune import Pruner
        from hyperflow_ext.prune.parallel import check_agreement

        model, loader = prune_setup(args.batchnorm)
        pruner = Pruner(model, target_sparsity=0.8)
        records = pruner.fit(loader, epochs=4, regrowth_epochs=2, progress=False)
        tensors = {k: v.clone() for k, v in model.state_dict().items()}
        tensors.update({f"mask/{k}": v for k, v in pruner.masks().items()})
        meta["records"] = records
        with torch.no_grad():  # a rank that drifts must be caught
            next(iter(pruner.layers.values())).scores[0].view(-1)[0] += 1e-3 * me
        try:
            check_agreement(pruner, "after a deliberate change on rank 1")
            meta["drift_error"] = None
        except distributed.RankDriftError as exc:
            meta["drift_error"] = str(exc)
    save_tensors(os.path.join(args.out, f"{args.scenario}-rank{me}.safetensors"), tensors, meta)
    distributed.barrier()


if __name__ == "__main__":
    sys.exit(main())

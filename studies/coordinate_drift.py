"""A coordinate-wise drift against today's drift network, on the trajectories ``fit`` records.

A study, not part of the package. The coordinate-wise drift is built the way learned optimizers
are: one small MLP shared by every adapted parameter ``i``, evaluated once per parameter, with

* the parameter's displacement ``(θ_i − θ_0,i) / state_scale_i``;
* the channel mean and class spread that the task encoder measured on the support set for the
  layer and channel the parameter belongs to, standardised by the training tasks' statistics (so
  "relative to the reference" recorded on meta-training data);
* the mean meta-training end displacement of the parameter (a prior);
* a learned embedding of the parameter tensor it belongs to;
* the time features and a 16-wide context computed from the whole task embedding ``z``.

Each recorded task then gives ``P`` training examples instead of one. Its output is scaled per
parameter by ``drift_scale``, like :class:`~hyperflow_ext.flow.DriftNetwork`.

Two modes:

* ``--mode offline``: record (or load from the cache) the trajectories ``fit`` trains on, train both
  drifts on the same split, and report on the held-out meta-training tasks the flow-matching loss and
  the R² of the integrated end point, against zero and against the mean training path. It also splits
  the spread of the recorded end points into across-task and across-run parts, and fits ridge maps
  from ``z`` to the end point.
* ``--mode targets``: ``studies/fewshot_study.py`` with the coordinate-wise drift in place of
  today's (the same fit, tune_horizon and targets; integration on the torch reference solver).

Usage::

    python studies/coordinate_drift.py --mode offline [--norm batch]
    python studies/coordinate_drift.py --mode targets [--norm batch] --tasks 200 --episodes 100 --out F.json
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path
from typing import Dict, Iterator, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import hyperflow_ext as hf
import hyperflow_ext.flow.adapt as adapt_module
import hyperflow_ext.flow.hyperflow as hyperflow_module
from hyperflow_ext.flow import DriftNetwork, HyperFlow, odeint, time_features
from hyperflow_ext.flow.train import DriftTrainConfig, fit_normalisation, train_drift

sys.path.insert(0, str(Path(__file__).parent))
import fewshot_study  # the target study this one reruns with another drift


def coordinate_layout(flow: HyperFlow) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(P, 2)`` indices into ``z`` of each parameter's channel mean and class spread (``-1``: its
    tensor has no per-channel statistics in ``z``) and ``(P,)`` the index of its tensor."""
    enc = flow.encoder
    offsets, start = {}, enc.final_dim(enc.feature_dim)
    for name, dim in zip(enc.layers, enc.layer_dims):
        offsets[name] = (start, dim)
        start += 2 * dim
    index, tensor = [], []
    for k, (name, n) in enumerate(flow.subset.split_sizes()):
        off = offsets.get(name.rsplit(".", 1)[0])
        for c in range(n):
            index.append([off[0] + c, off[0] + off[1] + c] if off is not None and off[1] == n else [-1, -1])
            tensor.append(k)
    return torch.tensor(index), torch.tensor(tensor)


class CoordinateDrift(nn.Module):
    """``dθ_i/dt = drift_scale_i · m(u_i, stats_i, prior_i, e_k(i), e(t), c(z))`` with one MLP ``m``.

    Has :class:`~hyperflow_ext.flow.DriftNetwork`'s normalisation buffers and its
    ``normalized(delta, t, z)`` interface, so :func:`~hyperflow_ext.flow.train_drift` trains it as is.

    Shape:
        - delta: ``(tasks, P)``; t: ``(tasks,)``; z: ``(tasks, task_dim)``. Output: ``(tasks, P)``.
    """

    def __init__(self, index: torch.Tensor, tensor: torch.Tensor, task_dim: int, hidden: int = 64,
                 time_dim: int = 16, context: int = 16, embed: int = 8, clip: float = 5.0) -> None:
        super().__init__()
        p = index.shape[0]
        self.num_params, self.task_dim, self.hidden, self.time_dim, self.clip = p, task_dim, hidden, time_dim, clip
        for name, value in (("index", index), ("tensor", tensor), ("state_scale", torch.ones(p)),
                            ("drift_scale", torch.ones(p)), ("task_mean", torch.zeros(task_dim)),
                            ("task_scale", torch.ones(task_dim)), ("prior", torch.zeros(p))):
            self.register_buffer(name, value.clone())
        self.embed = nn.Embedding(int(tensor.max()) + 1, embed)
        self.context = nn.Sequential(nn.Linear(task_dim, 64), nn.SiLU(), nn.Linear(64, context))
        self.inp = nn.Linear(1 + 4 + embed + context, hidden)  # u | mean, spread, has stats, prior | e_k | c(z)
        self.time = nn.Linear(time_dim, hidden, bias=False)
        self.mid = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 1)
        nn.init.zeros_(self.out.weight)  # start from zero drift, like DriftNetwork
        nn.init.zeros_(self.out.bias)

    task_distance = DriftNetwork.task_distance  # the same normalisation buffers (fused_adapt's distance guard)

    def task_term(self, z: torch.Tensor) -> torch.Tensor:
        """The state-free part of the first layer: ``(tasks, P, hidden)``."""
        zs = ((z - self.task_mean) / self.task_scale).clamp(-self.clip, self.clip)
        has = (self.index[:, 0] >= 0).to(z.dtype)
        stats = zs[:, self.index.clamp_min(0)] * has[None, :, None]                       # (tasks, P, 2)
        tasks = z.shape[0]
        per_param = torch.stack([has, (self.prior / self.state_scale).clamp(-self.clip, self.clip)], dim=-1)
        feats = torch.cat([stats, per_param[None].expand(tasks, -1, -1),
                           self.embed(self.tensor)[None].expand(tasks, -1, -1),
                           self.context(zs)[:, None].expand(-1, self.num_params, -1)], dim=-1)
        return feats @ self.inp.weight[:, 1:].T + self.inp.bias

    def evaluate(self, delta: torch.Tensor, task_term: torch.Tensor, time_term: torch.Tensor) -> torch.Tensor:
        """The normalised drift from the precomputed terms; ``time_term`` is ``(tasks or 1, hidden)``."""
        u = (delta / self.state_scale)[..., None] * self.inp.weight[:, 0]
        h = F.silu(u + task_term + time_term[:, None, :])
        return self.out(F.silu(self.mid(h)))[..., 0]

    def normalized(self, delta: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.evaluate(delta, self.task_term(z), self.time(time_features(t, self.time_dim)))

    def forward(self, delta: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.normalized(delta, t, z) * self.drift_scale

    def extra_repr(self) -> str:
        return f"coordinate-wise, num_params={self.num_params}, task_dim={self.task_dim}, hidden={self.hidden}"


def set_prior(net: nn.Module, trajectories) -> None:
    if isinstance(net, CoordinateDrift):
        net.prior.copy_(trajectories.deltas[:, 0, -1].mean(dim=0))


@contextlib.contextmanager
def coordinate_drift(hidden: int = 64) -> Iterator[None]:
    """Inside the block, every :class:`HyperFlow` built uses :class:`CoordinateDrift` and
    :func:`~hyperflow_ext.flow.fused_adapt` integrates it with the torch solver (restored on exit)."""
    def build(self: HyperFlow) -> None:
        torch.manual_seed(self.seed)
        self.net = CoordinateDrift(*coordinate_layout(self), self.encoder.dim, hidden=hidden)

    def normalise(net, trajectories):
        rate = fit_normalisation(net, trajectories)
        set_prior(net, trajectories)
        return rate

    def integrate(backbone, flow, z, steps, solver, horizon, times, backend, guard, ood_radius):
        net = flow.net
        with torch.inference_mode():
            theta0 = flow.subset.vector(backbone)
            task_term = net.task_term(z.to(net.task_mean))
            delta = torch.zeros(z.shape[0], flow.subset.numel, dtype=net.task_mean.dtype)
            trust = adapt_module._trust(flow, z, ood_radius).to(delta)[:, None]
            at: Dict[float, torch.Tensor] = {}
            for start, end, n in adapt_module._segments(horizon, steps, times):
                limit = guard * flow.max_rate * (end - start) / n if math.isfinite(guard) else math.inf

                def f(y, t, _n, _s):
                    tt = net.time(time_features(torch.tensor([t], dtype=y.dtype), net.time_dim))
                    return net.evaluate(y, task_term, tt) * net.drift_scale

                delta, _, _ = odeint(f, delta, start, end, n, solver, limit if limit > 0 else math.inf)
                at[end] = (theta0 + trust * delta.to(theta0)).to(theta0.dtype)
            return {t: at[min(at, key=lambda e: abs(e - t))] for t in times}

    saved = HyperFlow._build_net, hyperflow_module.fit_normalisation, adapt_module._integrate
    HyperFlow._build_net, hyperflow_module.fit_normalisation, adapt_module._integrate = build, normalise, integrate
    try:
        yield
    finally:
        HyperFlow._build_net, hyperflow_module.fit_normalisation, adapt_module._integrate = saved


def recorded_split(norm: str, tasks: int, seed: int):
    """The (train, val) trajectories ``fit`` trains on with fewshot_study's settings (from the cache)."""
    captured = {}

    def capture(net, train, interpolation, config, val, *args, **kwargs):
        captured.update(train=train, val=val)
        return {"train": [], "val": []}

    split = hf.data.fewshot_benchmark(progress=False)
    backbone = hf.models.load_pretrained("conv4-glyphs", progress=False,
                                         backbone_kw={"norm": norm} if norm != "group" else None)
    flow = HyperFlow(backbone, params="bias", seed=seed)
    hyperflow_module.train_drift = capture
    try:
        flow.fit(fewshot_study.meta_episodes(split.meta, seed), tasks=tasks,
                 store=Path(hf.cache_dir()) / "trajectories", recipe_episodes=fewshot_study.held_out(split.meta, seed),
                 progress=False)
    finally:
        hyperflow_module.train_drift = train_drift
    return flow, captured["train"], captured["val"]


def offline(args) -> None:
    flow, train, val = recorded_split(args.norm, args.tasks, args.seed)
    ends = train.deltas[:, :, -1]                                      # (tasks, runs, P)
    per_task = ends.mean(dim=1)
    print(f"end points on {train.episodes} tasks x {train.runs} runs: mean path^2 "
          f"{float(per_task.mean(0).pow(2).mean()):.3g}, across tasks {float(per_task.var(0).mean()):.3g}, "
          f"across runs of a task {float((ends - per_task[:, None]).pow(2).mean()):.3g}")
    steps = train.deltas.shape[2] - 1
    for lam in (10.0, 100.0, 1000.0):
        print(f"ridge z -> run-0 end point, lambda {lam:g}: held-out R² vs the mean path "
              f"{ridge_r2(train, val, lam, steps):+.3f}")
    for name in ("dense", "coordinate"):
        torch.manual_seed(args.seed)
        if name == "dense":
            net = DriftNetwork(flow.subset.numel, flow.encoder.dim)
        else:
            net = CoordinateDrift(*coordinate_layout(flow), flow.encoder.dim, hidden=args.hidden)
        fit_normalisation(net, train)
        set_prior(net, train)
        history = train_drift(net, train, "cubic", DriftTrainConfig(), val, args.seed, progress=False)
        r2 = end_point_r2(net, train, val, steps)
        print(f"{name}: best held-out flow-matching loss {min(history['val']):.4f}; R² of the integrated state "
              f"(vs zero / vs the mean path) " + ", ".join(f"t={t:g}: {a:+.3f} / {b:+.3f}" for t, (a, b) in r2.items()))


def ridge_r2(train, val, lam: float, steps: int) -> float:
    z, vz = train.z.double(), val.z.double()
    mu, sd = z.mean(0), z.std(0).clamp_min(0.1 * float(z.std(0).mean()))
    x, vx = (z - mu) / sd, (vz - mu) / sd
    y, vy = train.deltas[:, 0, steps].double(), val.deltas[:, 0, steps].double()
    w = torch.linalg.solve(x.T @ x + lam * torch.eye(x.shape[1], dtype=x.dtype), x.T @ (y - y.mean(0)))
    pred = vx @ w + y.mean(0)
    return float(1 - (pred - vy).pow(2).sum() / (vy - y.mean(0)).pow(2).sum())


@torch.no_grad()
def end_point_r2(net, train, val, steps: int) -> Dict[float, Tuple[float, float]]:
    out = {}
    for t in (0.125, 0.25, 0.5, 1.0):
        k = round(t * steps)
        state, _, _ = odeint(lambda y, s, n, st: net(y, torch.full((y.shape[0],), s), val.z),
                             torch.zeros_like(val.deltas[:, 0, 0]), 0.0, t, 50)
        target, mean_path = val.deltas[:, 0, k], train.deltas[:, 0, k].mean(0)
        sse = (state - target).pow(2).sum()
        out[t] = (float(1 - sse / target.pow(2).sum()), float(1 - sse / (target - mean_path).pow(2).sum()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=("offline", "targets"), required=True)
    ap.add_argument("--hidden", type=int, default=64, help="width of the shared per-parameter MLP")
    args, rest = ap.parse_known_args()
    if args.mode == "targets":
        sys.argv = [sys.argv[0]] + rest
        with coordinate_drift(args.hidden):
            fewshot_study.main()
        return
    more = argparse.ArgumentParser()
    more.add_argument("--norm", default="group")
    more.add_argument("--tasks", type=int, default=200)
    more.add_argument("--seed", type=int, default=0)
    more.add_argument("--threads", type=int, default=1)
    extra = more.parse_args(rest)
    torch.set_num_threads(extra.threads)
    args.norm, args.tasks, args.seed = extra.norm, extra.tasks, extra.seed
    offline(args)


if __name__ == "__main__":
    main()

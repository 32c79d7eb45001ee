"""HyperFlow against its baselines on :func:`hyperflow_ext.data.fewshot_benchmark` (a script, not a test).

What a user gets from the defaults: ``HyperFlow(backbone).fit(meta episodes)`` (which picks the
fine-tuning learning rate itself) and ``tune_horizon`` on held-out meta-training episodes, then
5-way episodes on every target. Bias tuning uses the learning rate ``fit`` chose, so the comparison
is tuned the same way on meta-training episodes only. Each ``--variants`` entry is a
``task_stats`` setting; all variants share one recording of the trajectories (only ``z`` differs).

Usage::

    python benchmarks/fewshot_study.py [--tasks 200] [--episodes 100] [--shots 5]
        [--variants final layers] [--norm batch] [--threads 1] [--out docs/fewshot-study/results.json]
    python benchmarks/fewshot_study.py --leave-out [FAMILY ...]   # leave-one-family-out folds

Prints per-target accuracy (mean ± 95 % interval) and the share of bias tuning's gain over direct
transfer that each HyperFlow variant recovers.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Dict, List

import torch

import hyperflow_ext as hf
from hyperflow_ext._io import atomic_path
from hyperflow_ext.data import EpisodeSampler, families, fewshot_benchmark, leave_one_out
from hyperflow_ext.flow import HyperFlow, TrajectorySet, fused_adapt
from hyperflow_ext.flow.baselines import direct_transfer, finetune_adapt, support_statistics
from hyperflow_ext.flow.evaluate import evaluate_few_shot


def meta_episodes(meta, seed: int, query: int = 5):
    """1- and 5-shot meta-training episodes, alternating (what ``fit`` records)."""
    samplers = [EpisodeSampler(meta, way=5, shot=s, query=query, seed=seed + s).episodes() for s in (1, 5)]
    while True:
        for it in samplers:
            yield next(it)


def held_out(meta, seed: int):
    return EpisodeSampler(meta, way=5, shot=5, query=15, seed=seed + 99).episodes()


def fit_flows(backbone, meta, args, log_prefix: str = "", t0: float = None):
    """Fit every ``args.variants`` flow on ``meta`` the way :func:`run` does; ``(flows, recipe)``."""
    t0 = time.perf_counter() if t0 is None else t0
    episodes = meta_episodes(meta, args.seed)
    eps = [next(episodes) for _ in range(args.tasks)]
    store = Path(hf.cache_dir()) / "trajectories"
    flows: Dict[str, HyperFlow] = {}
    shared: TrajectorySet = None
    extra = {"objective": args.objective} if args.objective else {}
    for variant in args.variants:
        flow = HyperFlow(backbone, params="bias", seed=args.seed, task_stats=variant)
        if shared is None:
            flow.fit(eps, store=store, recipe_episodes=held_out(meta, args.seed), progress=False, **extra)
            shared, recipe = flow.record(eps, store=store, progress=False, lr=flow.recipe["lr"], **extra), flow.recipe
        else:  # same fine-tuning runs, only the task embedding differs
            flow._prepare(eps[0][0])
            z = torch.cat([flow.encoder(ep[0], ep[1]) for ep in eps]).float()
            flow.fit(trajectories=TrajectorySet(shared.deltas, z, shared.losses), progress=False)
            flow.recipe = dict(recipe)
        flow.tune_horizon(held_out(meta, args.seed + 1), progress=False)
        flows[variant] = flow
        print(f"{log_prefix}[{time.perf_counter() - t0:.0f} s] {variant}: lr {flow.recipe['lr']:g}, "
              f"horizon {flow.horizon:g}", flush=True)
    return flows, recipe


def run(backbone, meta, targets, args, log_prefix: str = "") -> dict:
    """Fit every variant on ``meta``, evaluate it and the baselines on ``targets``; the results table."""
    t0 = time.perf_counter()
    flows, recipe = fit_flows(backbone, meta, args, log_prefix, t0)
    lr = recipe["lr"]
    methods = {"direct transfer": lambda sx, sy: direct_transfer(backbone, sx, sy),
               "bias tuning": lambda sx, sy: finetune_adapt(backbone, sx, sy, "bias", 50, lr)}
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in backbone.modules()):
        # gradient-free reference for BatchNorm backbones (reported, not part of the recovered share)
        methods["support statistics"] = lambda sx, sy: support_statistics(backbone, sx, sy)
    for variant, flow in flows.items():
        methods[f"HyperFlow[{variant}]"] = (lambda f: lambda sx, sy: fused_adapt(backbone, sx, sy, flow=f))(flow)
    results = evaluate_few_shot(methods, targets, shots=args.shots, episodes=args.episodes, seed=args.seed,
                                progress=False)
    table: Dict[str, Dict[str, dict]] = {}
    for r in results:
        table.setdefault(f"{r.domain} {r.shot}-shot", {})[r.method] = {"mean": r.mean, "ci95": r.ci95,
                                                                     "seconds": r.median_seconds}
    print_table(table, list(methods))
    print(f"{log_prefix}total {time.perf_counter() - t0:.0f} s", flush=True)
    return {"recipe": recipe, "table": table, "horizons": {v: f.horizon for v, f in flows.items()}}


def print_table(table: Dict[str, Dict[str, dict]], names: List[str]) -> None:
    print("| target | " + " | ".join(names) + " | " + " | ".join(f"{n} recovers" for n in names[2:]) + " |")
    print("|" + " --- |" * (1 + 2 * len(names) - 2))
    gains: Dict[str, List[float]] = {n: [] for n in names[2:]}
    for key, row in table.items():
        d, b = row["direct transfer"]["mean"], row["bias tuning"]["mean"]
        cells = [f"{100 * row[n]['mean']:.2f} ± {100 * row[n]['ci95']:.2f}" for n in names]
        rec = []
        for n in names[2:]:
            share = (row[n]["mean"] - d) / (b - d) if b != d else float("nan")
            gains[n].append(row[n]["mean"] - d)
            rec.append(f"{100 * share:.0f} %")
        print(f"| {key} | " + " | ".join(cells) + " | " + " | ".join(rec) + " |")
    mean_gain = sum(row["bias tuning"]["mean"] - row["direct transfer"]["mean"] for row in table.values()) / len(table)
    for n, g in gains.items():
        share = sum(g) / len(g) / mean_gain if mean_gain else float("nan")
        print(f"{n}: mean gain {100 * sum(g) / len(g):+.2f} points vs bias tuning's {100 * mean_gain:+.2f} "
              f"({100 * share:.0f} %)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=200)
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--shots", type=int, nargs="+", default=[5])
    ap.add_argument("--variants", nargs="+", default=["final", "layers"])
    ap.add_argument("--targets", nargs="*", default=None)
    ap.add_argument("--leave-out", nargs="*", default=None,
                    help="leave-one-family-out folds instead of the targets (no names: every family)")
    ap.add_argument("--objective", default=None, choices=["support", "query"],
                    help="trajectory objective (default: fit's)")
    ap.add_argument("--backbone", default="conv4-glyphs")
    ap.add_argument("--norm", default=None, help="backbone normalisation (e.g. batch: a BatchNorm Conv4)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    split = fewshot_benchmark(progress=False)
    backbone = hf.models.load_pretrained(args.backbone, progress=False,
                                         backbone_kw={"norm": args.norm} if args.norm else None)
    if args.leave_out is None:
        targets = {k: v for k, v in split.target.items() if not args.targets or k in args.targets}
        data = run(backbone, split.meta, targets, args)
    else:
        data = {}
        for family in args.leave_out or families(split):
            fold = leave_one_out(split, family)
            print(f"## held out: {family} ({', '.join(fold.target)})", flush=True)
            data[family] = run(backbone, fold.meta, fold.target, args, log_prefix=f"{family} ")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps({"args": vars(args), **data}, indent=2, default=str))


if __name__ == "__main__":
    main()

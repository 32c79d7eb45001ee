"""HyperFlow against its baselines on :func:`hyperflow_ext.data.fewshot_benchmark`, as a learning curve.

A study script (not a test, not a benchmark suite): it calls the shipped API only, the way the README
tells a user to. For each meta-training size in ``--tasks`` (trajectories are cached, so a larger size
records only the new tasks): ``HyperFlow(backbone).fit(meta episodes, tasks=N)`` at its defaults,
``tune_horizon`` on held-out meta-training episodes, then 5-way episodes on every target with

* direct transfer, and bias tuning at the learning rate ``fit`` chose on meta-training episodes;
* ``fused_adapt`` at its defaults (the per-task choice) and with ``select=False`` (the paper's method);
* support statistics on BatchNorm backbones (a gradient-free reference, not part of HyperFlow).

It prints per-target accuracy (mean ± 95 % interval), the share of bias tuning's mean gain over direct
transfer each method recovers, which candidates ``fused_adapt`` chose, the emulation fidelity
(:func:`~hyperflow_ext.flow.emulation_fidelity`) and each method's median time as a share of bias
tuning's, measured in the same run.

Usage::

    python studies/fewshot_study.py --norm batch --tasks 200 1000 [--episodes 100] [--shots 5]
        [--no-augment] [--perturbations 0] [--reach 1] [--rates 0.01 0.03 0.1 0.3] [--threads 1]
        [--out docs/fewshot-study/curve-batch.json]
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import time
from pathlib import Path
from typing import Dict

import torch

import hyperflow_ext as hf
from hyperflow_ext.data import EpisodeSampler, fewshot_benchmark
from hyperflow_ext.flow import HyperFlow, emulation_fidelity, fused_adapt
from hyperflow_ext.flow.baselines import direct_transfer, finetune_adapt, support_statistics
from hyperflow_ext.flow.evaluate import evaluate_few_shot
from hyperflow_ext.flow.select import has_batchnorm_stats


def meta_episodes(meta, seed: int, query: int = 5):
    """1- and 5-shot meta-training episodes, alternating (what ``fit`` records)."""
    samplers = [EpisodeSampler(meta, way=5, shot=s, query=query, seed=seed + s).episodes() for s in (1, 5)]
    while True:
        for it in samplers:
            yield next(it)


def held_out(meta, seed: int):
    return EpisodeSampler(meta, way=5, shot=5, query=15, seed=seed + 99).episodes()


def fit_flow(backbone, meta, tasks: int, args) -> HyperFlow:
    """The README's path: fit at its defaults (recipe, augmentation, reach), then tune_horizon."""
    flow = HyperFlow(backbone, params="bias", seed=args.seed)
    recording = {} if args.perturbations is None else {"perturbations": args.perturbations}
    if args.reach is not None:
        recording["reach"] = args.reach
    flow.fit(meta_episodes(meta, args.seed), tasks=tasks, store=Path(hf.cache_dir()) / "trajectories",
             recipe_episodes=held_out(meta, args.seed), augment=not args.no_augment, progress=args.progress,
             **recording)
    flow.tune_horizon(held_out(meta, args.seed + 1), augment=not args.no_augment, progress=False)
    return flow


def evaluate(backbone, flow: HyperFlow, targets, args) -> dict:
    lr = float(flow.recipe["lr"])
    chosen: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    def default(sx, sy):
        model = fused_adapt(backbone, sx, sy, flow=flow)
        chosen[f"{sx.shape[0] // (int(sy.max()) + 1)}-shot"][model.selection["chosen"]] += 1
        return model

    methods = {"direct transfer": lambda sx, sy: direct_transfer(backbone, sx, sy),
               "bias tuning": lambda sx, sy: finetune_adapt(backbone, sx, sy, "bias", 50, lr),
               "fused_adapt": default,
               "fused_adapt(select=False)": lambda sx, sy: fused_adapt(backbone, sx, sy, flow=flow, select=False)}
    if has_batchnorm_stats(backbone):
        methods["support statistics"] = lambda sx, sy: support_statistics(backbone, sx, sy)
    for rate in args.rates:  # bias tuning at other rates: the share against the best rate on the targets
        methods[f"bias tuning @{rate:g}"] = lambda sx, sy, rate=rate: finetune_adapt(backbone, sx, sy, "bias", 50, rate)
    results = evaluate_few_shot(methods, targets, shots=args.shots, episodes=args.episodes, seed=args.seed + 17,
                                progress=args.progress)
    table: Dict[str, Dict[str, dict]] = {}
    for r in results:
        table.setdefault(f"{r.domain} {r.shot}-shot", {})[r.method] = {
            "mean": r.mean, "ci95": r.ci95, "seconds": r.median_seconds, "peak_bytes": r.peak_bytes}
    fidelity = {}
    for name, ds in targets.items():
        eps = list(EpisodeSampler(ds, way=5, shot=5, query=0, seed=args.seed + 23).episodes(args.fidelity_episodes))
        fidelity[name] = emulation_fidelity(backbone, flow, eps)
    return {"table": table, "chosen": {k: dict(v) for k, v in chosen.items()}, "fidelity": fidelity,
            "methods": list(methods)}


def report(res: dict) -> dict:
    """Print the table; return the recovered shares per shot count."""
    table, names = res["table"], res["methods"]
    print("| target | " + " | ".join(names) + " |")
    print("|" + " --- |" * (1 + len(names)))
    for key, row in table.items():
        print(f"| {key} | " + " | ".join(f"{100 * row[n]['mean']:.1f} ± {100 * row[n]['ci95']:.1f}" for n in names)
              + " |")
    shares = {}
    for shot in sorted({k.rsplit(" ", 1)[1] for k in table}):
        rows = [row for k, row in table.items() if k.endswith(shot)]
        gain = sum(r["bias tuning"]["mean"] - r["direct transfer"]["mean"] for r in rows) / len(rows)
        bt_time = sum(r["bias tuning"]["seconds"] for r in rows) / len(rows)
        bt_mem = max(r["bias tuning"]["peak_bytes"] for r in rows) or float("nan")
        rated = [n for n in names if n.startswith("bias tuning @")]
        best = max(rated + ["bias tuning"], key=lambda n: sum(r[n]["mean"] for r in rows)) if rated else None
        best_gain = sum(r[best]["mean"] - r["direct transfer"]["mean"] for r in rows) / len(rows) if best else None
        for n in (n for n in names[2:] if n not in rated):
            g = sum(r[n]["mean"] - r["direct transfer"]["mean"] for r in rows) / len(rows)
            worst = min((r[n]["mean"] - r["direct transfer"]["mean"]) / max(r[n]["ci95"], 1e-9) for r in rows)
            cost = sum(r[n]["seconds"] for r in rows) / len(rows) / bt_time
            mem = max(r[n]["peak_bytes"] for r in rows) / bt_mem
            shares[f"{n} {shot}"] = {"gain": g, "share": g / gain if gain else float("nan"), "worst_in_ci": worst,
                                     "time_share": cost, "memory_share": mem}
            if best is not None:
                best_share = g / best_gain if best_gain else float("nan")
                shares[f"{n} {shot}"].update(best_rate=best, best_rate_share=best_share)
                print(f"{shot} {n}: {100 * best_share:.0f} % of the best rate's gain on the targets ({best}, "
                      f"{100 * best_gain:+.2f} points)")
            print(f"{shot} {n}: {100 * g:+.2f} points vs bias tuning's {100 * gain:+.2f} ({100 * g / gain:.0f} %); "
                  f"worst target {worst:+.2f} intervals; time {100 * cost:.1f} %, memory {100 * mem:.1f} % "
                  f"of bias tuning's")
    fid = res["fidelity"]
    mean_fid = sum(f["fidelity"] for f in fid.values()) / len(fid)
    per_target = ", ".join(f"{k} {v['fidelity']:.2f}" for k, v in fid.items())
    print(f"emulation fidelity: mean {mean_fid:.3f} ({per_target})")
    print(f"chosen: {res['chosen']}", flush=True)
    shares["fidelity"] = mean_fid
    return shares


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, nargs="+", default=[200])
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--fidelity-episodes", type=int, default=10)
    ap.add_argument("--shots", type=int, nargs="+", default=[5])
    ap.add_argument("--targets", nargs="*", default=None)
    ap.add_argument("--norm", default=None, help="backbone normalisation (batch: a BatchNorm Conv4; default GroupNorm)")
    ap.add_argument("--no-augment", action="store_true", help="fit and tune_horizon with augment=False")
    ap.add_argument("--perturbations", type=int, default=None,
                    help="perturbed runs recorded per task besides the plain one (default: fit's)")
    ap.add_argument("--reach", type=float, default=None,
                    help="record trajectories at this multiple of the chosen rate (default: fit's)")
    ap.add_argument("--rates", type=float, nargs="*", default=[],
                    help="bias tuning at these rates too; shares are then also reported against the best of them")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    split = fewshot_benchmark(progress=False)
    backbone = hf.models.load_pretrained("conv4-glyphs", progress=False,
                                         backbone_kw={"norm": args.norm} if args.norm else None)
    targets = {k: v for k, v in split.target.items() if not args.targets or k in args.targets}
    out: Dict[str, dict] = {}
    for tasks in args.tasks:
        t0 = time.perf_counter()
        flow = fit_flow(backbone, split.meta, tasks, args)
        fit_s = time.perf_counter() - t0
        print(f"## {tasks} tasks: fit + tune_horizon {fit_s:.0f} s, recipe lr {flow.recipe['lr']:g} (recorded at "
              f"{flow.recipe.get('recorded_lr', flow.recipe['lr']):g}), horizon {flow.horizon:g}", flush=True)
        res = evaluate(backbone, flow, targets, args)
        res["shares"] = report(res)
        res.update(fit_seconds=fit_s, recipe=flow.recipe, horizon=flow.horizon)
        out[str(tasks)] = res
        if args.out:
            path = Path(args.out)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")  # written whole, then renamed: never a torn file
            tmp.write_text(json.dumps({"args": vars(args), "cpu": _cpu(), "results": out}, indent=1, default=str))
            os.replace(tmp, path)


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()

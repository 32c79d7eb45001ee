"""Which targets of :func:`hyperflow_ext.data.fewshot_benchmark` show adaptation? (a script, not a test)

For each target domain, 5-way 5-shot episodes with 15 queries: accuracy of direct transfer (a
ProtoNet on the frozen pretrained backbone) and of bias tuning (50 Adam steps on the support
loss), the learning rate picked from a grid on meta-training episodes only. A target shows
adaptation when bias tuning gains >= 3 points and direct transfer is not saturated (<= ~93 %).

Usage::

    python benchmarks/fewshot_targets.py [--episodes 100] [--lr 0.03] [--targets digits Hebrew~inv]
        [--extra Lao~inv Hershey-Gothic~contrast] [--direct-only]

``--extra`` adds candidate targets built on the fly as ``<held-out base>[~<shift>...]`` (for
choosing targets); ``--targets`` restricts the benchmark's own targets (default: all);
``--lr`` skips the learning-rate search; ``--direct-only`` measures direct transfer alone (to spot
saturated candidates cheaply). One thread per process is much faster on a busy machine.
"""
from __future__ import annotations

import argparse
import math
import time
from typing import Dict, List, Sequence

import torch

import hyperflow_ext as hf
from hyperflow_ext.data import EpisodeSampler, ImageDataset, apply_shift, fewshot_benchmark, stroke_domains

LR_GRID = (1e-2, 3e-2, 1e-1)


def accuracy(model, episode) -> float:
    return float((model(episode.query_x).argmax(-1) == episode.query_y).float().mean())


def evaluate(backbone, episodes: Sequence, lr: float, direct: bool = True, bias: bool = True
             ) -> Dict[str, List[float]]:
    out: Dict[str, List[float]] = {"direct": [], "bias": []}
    for ep in episodes:
        if direct:
            out["direct"].append(accuracy(hf.flow.baselines.direct_transfer(backbone, ep.support_x, ep.support_y), ep))
        if bias:
            out["bias"].append(accuracy(hf.flow.baselines.finetune_adapt(
            backbone, ep.support_x, ep.support_y, params="bias", steps=50, lr=lr), ep))
    return out


def mean_ci(values: Sequence[float]) -> str:
    t = torch.tensor(values, dtype=torch.float64) * 100
    half = 1.96 * float(t.std()) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return f"{float(t.mean()):5.1f} ± {half:3.1f}"


def extra_domain(name: str, split) -> ImageDataset:
    base, *shifts = name.split("~")
    pool = {**split.target, **stroke_domains(progress=False)}
    if base not in pool:
        pool.update(hf.data.glyph_domains([base], augmentations=hf.data.BENCHMARK_AUGMENTATIONS, progress=False))
    ds = pool[base]
    return apply_shift(ds, shifts) if shifts else ds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--tune-episodes", type=int, default=30)
    parser.add_argument("--extra", nargs="*", default=[])
    parser.add_argument("--targets", nargs="*", default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--direct-only", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    split = fewshot_benchmark(progress=False)
    backbone = hf.models.load_pretrained("conv4-glyphs")
    lr = args.lr
    if lr is None and not args.direct_only:
        meta_eps = list(EpisodeSampler(split.meta, 5, 5, 15, seed=1).episodes(args.tune_episodes))
        scores = {lr: sum(evaluate(backbone, meta_eps, lr, direct=False)["bias"]) / len(meta_eps) for lr in LR_GRID}
        lr = max(scores, key=scores.get)
        print(f"bias-tuning lr on {len(meta_eps)} meta episodes:", {k: round(v * 100, 1) for k, v in scores.items()},
              "->", lr, flush=True)
    targets = {k: v for k, v in split.target.items() if args.targets is None or k in args.targets}
    targets.update({name: extra_domain(name, split) for name in args.extra})
    print(f"| target | direct | bias (lr {lr or 0:g}) | gain | shows adaptation |")
    print("| --- | --- | --- | --- | --- |")
    for name, ds in targets.items():
        start = time.time()
        eps = list(EpisodeSampler({name: ds}, 5, 5, 15, seed=2).episodes(args.episodes))
        if args.direct_only:
            res = evaluate(backbone, eps, 0.0, bias=False)
            print(f"| {name} | {mean_ci(res['direct'])} |", flush=True)
            continue
        res = evaluate(backbone, eps, lr)
        gain = [b - d for b, d in zip(res["bias"], res["direct"])]
        direct = sum(res["direct"]) / len(eps)
        ok = sum(gain) / len(eps) >= 0.03 and direct <= 0.93
        print(f"| {name} | {mean_ci(res['direct'])} | {mean_ci(res['bias'])} | {mean_ci(gain)} | "
              f"{'yes' if ok else 'no'} |  ({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()

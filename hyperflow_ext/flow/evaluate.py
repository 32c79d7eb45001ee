"""The cross-domain few-shot benchmark: accuracy with 95% intervals, adaptation time and memory.

Every method sees the same episodes (one seeded sampler per domain and shot count).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional

import torch
from tqdm.auto import tqdm

from ..data import EpisodeSampler
from ..measure import peak_memory, wall_time
from .checks import as_episode

__all__ = ["Adapter", "FewShotResult", "evaluate_few_shot", "summarise", "emulation_fidelity"]

Adapter = Callable[[torch.Tensor, torch.Tensor], torch.nn.Module]


@dataclass
class FewShotResult:
    """Per-episode accuracies and times of one method on one domain and shot count."""

    method: str
    domain: str
    shot: int
    accuracies: List[float] = field(default_factory=list)
    seconds: List[float] = field(default_factory=list)
    peak_bytes: int = 0

    @property
    def mean(self) -> float:
        return sum(self.accuracies) / max(1, len(self.accuracies))

    @property
    def ci95(self) -> float:
        n = len(self.accuracies)
        if n < 2:
            return float("nan")
        m = self.mean
        var = sum((a - m) ** 2 for a in self.accuracies) / (n - 1)
        return 1.96 * math.sqrt(var / n)

    @property
    def median_seconds(self) -> float:
        s = sorted(self.seconds)
        return s[len(s) // 2] if s else float("nan")


def evaluate_few_shot(methods: Mapping[str, Adapter], domains: Mapping[str, object], shots: Iterable[int] = (1, 5),
                      way: int = 5, query: int = 15, episodes: int = 600, seed: int = 0,
                      memory_episodes: int = 2, progress: bool = True) -> List[FewShotResult]:
    """Evaluate every adapter on ``episodes`` episodes per domain and shot count.

    Args:
        methods: ``name -> adapter(support_x, support_y) -> model``; ``model(query_x)`` gives logits.
        domains: ``name -> ImageDataset``.
        shots: shot counts to run.
        memory_episodes: episodes per (method, shot, support shape) whose adaptation runs under the
            memory profiler (kept out of the timings). Peak memory depends on the shapes, not on the
            domain, so domains with the same image size share these runs.

    Returns:
        One :class:`FewShotResult` per (method, domain, shot).
    """
    results: Dict[tuple, FewShotResult] = {}
    profiled: Dict[tuple, List[int]] = {}  # (method, shot, support shape) -> [profiled runs, peak bytes]
    total = len(list(shots)) * len(domains) * episodes
    bar = tqdm(total=total, desc="few-shot benchmark", disable=not progress, unit="episode")
    for shot in shots:
        for d_index, (dname, ds) in enumerate(domains.items()):
            sampler = EpisodeSampler(ds, way=way, shot=shot, query=query, seed=seed + 1000 * d_index + shot)
            for i, ep in enumerate(sampler.episodes(episodes)):
                for mname, adapt in methods.items():
                    res = results.setdefault((mname, dname, shot), FewShotResult(mname, dname, shot))
                    seen = profiled.setdefault((mname, shot, tuple(ep.support_x.shape)), [0, 0])
                    if seen[0] < memory_episodes:
                        _, peak = peak_memory(lambda: adapt(ep.support_x, ep.support_y))
                        seen[0], seen[1] = seen[0] + 1, max(seen[1], peak)
                    res.peak_bytes = max(res.peak_bytes, seen[1])
                    model, secs = wall_time(lambda: adapt(ep.support_x, ep.support_y))
                    with torch.no_grad():
                        pred = model(ep.query_x).argmax(-1)
                    res.accuracies.append(float((pred == ep.query_y).float().mean()))
                    res.seconds.append(secs)
                bar.update(1)
    bar.close()
    return list(results.values())


def summarise(results: List[FewShotResult], domains: Iterable[str]) -> Dict[tuple, FewShotResult]:
    """Pool per-episode results over ``domains`` into ``(method, "mean", shot)`` entries."""
    domains = set(domains)
    pooled: Dict[tuple, FewShotResult] = {}
    for r in results:
        if r.domain in domains:
            p = pooled.setdefault((r.method, r.shot), FewShotResult(r.method, "mean", r.shot))
            p.accuracies += r.accuracies
            p.seconds += r.seconds
            p.peak_bytes = max(p.peak_bytes, r.peak_bytes)
    return pooled


def emulation_fidelity(backbone: torch.nn.Module, flow, episodes: Iterable, lr: Optional[float] = None,
                       steps: int = 50, adapt_steps: int = 50) -> Dict[str, float]:
    """How much of bias tuning's support-loss drop integrating the drift reproduces, on held-out tasks.

    For each episode: the support loss ``L_0`` at the pretrained parameters, ``L_flow`` at the
    state :func:`~hyperflow_ext.flow.fused_adapt` reaches with ``select=False`` (the flow's
    horizon) and ``L_ft`` after fine-tuning the same parameters (``steps`` Adam steps at ``lr``,
    default the rate in ``flow.recipe``). Fidelity is ``mean(L_0 - L_flow) / mean(L_0 - L_ft)``:
    1.0 is perfect emulation, 0 a flow that stands still, negative one that raises the loss.

    Args:
        episodes: ``(support_x, support_y, ...)`` tuples from the tasks to measure on.

    Returns:
        ``{"fidelity", "loss_start", "loss_flow", "loss_finetune", "episodes"}`` (mean losses).
    """
    from .adapt import fused_adapt
    from .functional import features_with, finetune, support_loss

    lr = float(flow.recipe.get("lr", 1e-2)) if lr is None else float(lr)
    theta0 = flow.subset.vector(backbone)
    sums = {"loss_start": 0.0, "loss_flow": 0.0, "loss_finetune": 0.0}
    n = 0
    for ep in episodes:
        sx, sy = as_episode(backbone, ep)[:2]
        way = int(sy.max()) + 1
        flowed = fused_adapt(backbone, sx, sy, flow=flow, steps=adapt_steps, select=False).theta
        tuned, _, _ = finetune(backbone, flow.subset, sx, sy, theta0, steps, way, flow.metric, flow.scale, "adam", lr)
        with torch.no_grad():
            for key, theta in (("loss_start", theta0), ("loss_flow", flowed), ("loss_finetune", tuned)):
                feats = features_with(backbone, flow.subset, theta, sx)
                sums[key] += float(support_loss(feats, sy, way, flow.metric, flow.scale))
        n += 1
    if n == 0:
        raise ValueError("emulation_fidelity: no episodes")
    out = {k: v / n for k, v in sums.items()}
    drop_ft = out["loss_start"] - out["loss_finetune"]
    out["fidelity"] = (out["loss_start"] - out["loss_flow"]) / drop_ft if drop_ft > 0 else float("nan")
    out["episodes"] = n
    return out

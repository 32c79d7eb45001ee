"""The cross-domain few-shot benchmark: accuracy with 95% intervals, adaptation time and memory.

Every method sees the same episodes (one seeded sampler per domain and shot count).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping

import torch
from tqdm.auto import tqdm

from ..data import EpisodeSampler
from ..measure import peak_memory, wall_time

__all__ = ["Adapter", "FewShotResult", "evaluate_few_shot", "summarise"]

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
        memory_episodes: episodes per (method, domain, shot) whose adaptation runs under the memory
            profiler (kept out of the timings).

    Returns:
        One :class:`FewShotResult` per (method, domain, shot).
    """
    results: Dict[tuple, FewShotResult] = {}
    total = len(list(shots)) * len(domains) * episodes
    bar = tqdm(total=total, desc="few-shot benchmark", disable=not progress, unit="episode")
    for shot in shots:
        for d_index, (dname, ds) in enumerate(domains.items()):
            sampler = EpisodeSampler(ds, way=way, shot=shot, query=query, seed=seed + 1000 * d_index + shot)
            for i, ep in enumerate(sampler.episodes(episodes)):
                for mname, adapt in methods.items():
                    res = results.setdefault((mname, dname, shot), FewShotResult(mname, dname, shot))
                    if i < memory_episodes:
                        _, peak = peak_memory(lambda: adapt(ep.support_x, ep.support_y))
                        res.peak_bytes = max(res.peak_bytes, peak)
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

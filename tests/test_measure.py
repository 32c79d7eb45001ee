"""The timing helper the benchmarks report ratios with, and the few-shot benchmark's memory runs."""
from collections import Counter

import torch

from hyperflow_ext.measure import interleaved_medians, interleaved_times


def test_interleaved_rounds_rotate_so_each_callable_follows_every_other_equally():
    calls = []
    fns = [lambda i=i: calls.append(i) for i in range(3)]
    times, rounds = interleaved_times(fns, budget_s=0.0, min_rounds=6, max_rounds=6)
    assert rounds == 6 and [len(t) for t in times] == [6, 6, 6]
    timed = calls[6:]  # after one warm-up call each and the sizing round
    assert Counter(timed) == {0: 6, 1: 6, 2: 6}
    followers = Counter(zip(timed, timed[1:]))
    assert {pair for pair in followers if pair[0] != pair[1]} == {(a, b) for a in range(3) for b in range(3) if a != b}
    # within a round the order is a rotation of 0, 1, 2
    assert [timed[3 * r:3 * r + 3] for r in range(3)] == [[0, 1, 2], [1, 2, 0], [2, 0, 1]]


def test_interleaved_medians_runs_exactly_the_rounds_asked():
    calls = []
    medians = interleaved_medians([lambda: calls.append(0), lambda: calls.append(1)], rounds=5)
    assert len(medians) == 2 and all(m >= 0 for m in medians)
    assert len(calls) == 2 + 2 + 5 * 2


def test_few_shot_benchmark_profiles_memory_once_per_method_shot_and_shape(monkeypatch):
    from hyperflow_ext.data import ImageDataset
    from hyperflow_ext.flow import evaluate as ev

    def dataset(size, name):
        labels = torch.arange(3).repeat_interleave(4)
        return ImageDataset(torch.rand(12, 1, size, size), labels, ["a", "b", "c"], name)

    calls = []

    def fake_peak(fn):  # counts the profiled runs; the adapter's own forward still runs
        calls.append(1)
        return fn(), 1000 * len(calls)

    monkeypatch.setattr(ev, "peak_memory", fake_peak)
    head = torch.nn.Flatten()
    adapter = lambda sx, sy: (lambda q: head(q)[:, :3])  # noqa: E731
    domains = {"one": dataset(8, "one"), "two": dataset(8, "two"), "big": dataset(12, "big")}
    out = ev.evaluate_few_shot({"m": adapter}, domains, shots=[2], way=3, query=1, episodes=3,
                               memory_episodes=2, progress=False)
    assert len(calls) == 4  # 2 runs for the 8x8 shape (shared by two domains) + 2 for 12x12
    peaks = {r.domain: r.peak_bytes for r in out}
    assert peaks["one"] == peaks["two"] == 2000 and peaks["big"] == 4000
    assert all(len(r.accuracies) == 3 for r in out)

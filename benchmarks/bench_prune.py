"""Pruning by flow end to end: the pruner's training epoch and the exported model's inference.

Run: ``python -m pytest benchmarks/bench_prune.py --benchmark-enable -q``

Each test times the measured path and its baseline(s) interleaved on the same inputs, stores
``speedup_vs_<baseline>`` (baseline median / measured median) in ``benchmark.extra_info``
(summarised by conftest.py), then lets pytest-benchmark time the measured path.

Groups:
* ``prune_epoch``: one :meth:`Pruner.fit` epoch (masked forward/backward, the fused native
  ``flow_step`` on every layer, SGD) vs the same epoch with ``backend="torch"`` (eager flow step)
  and vs a plain dense training epoch of the same network (the price of pruning).
* ``export``: the model from :meth:`Pruner.export` at 98% sparsity vs the dense model, for the
  experiment's digits CNN and for a 1024-wide MLP, batch 1 and a full batch.
"""
import copy
import statistics

import pytest
import torch
from torch import nn

from hyperflow_ext.measure import interleaved_times
from hyperflow_ext.prune import Pruner
from hyperflow_ext.prune._loop import TensorLoader, train_epoch
from hyperflow_ext.prune.experiment import DigitsCNN


def compare(benchmark, measured, baselines, budget_s=1.0, min_rounds=5, pedantic_rounds=None, **info):
    names = list(baselines)
    times, _ = interleaved_times([measured] + [baselines[n] for n in names], budget_s, min_rounds=min_rounds,
                                 max_rounds=100)
    med = [statistics.median(t) for t in times]
    benchmark.extra_info.update(info, kernel_median_ms=1e3 * med[0])
    for name, m, ts in zip(names, med[1:], times[1:]):
        benchmark.extra_info[f"speedup_vs_{name}"] = m / med[0]
        benchmark.extra_info[f"min_speedup_vs_{name}"] = min(ts) / min(times[0])
    if pedantic_rounds:
        benchmark.pedantic(measured, rounds=pedantic_rounds, iterations=1)
    else:
        benchmark(measured)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _digits_like(n=256):
    return torch.rand(n, 1, 8, 8), torch.randint(0, 10, (n,))


@pytest.mark.benchmark(group="prune_epoch")
def test_prune_epoch(benchmark):
    x, y = _digits_like()
    loader = TensorLoader(x, y, 32, shuffle=True)
    model = DigitsCNN()
    fused = Pruner(copy.deepcopy(model), pressure=1.0, score_lr=1e-2)
    eager = Pruner(copy.deepcopy(model), pressure=1.0, score_lr=1e-2, backend="torch")
    dense = copy.deepcopy(model)
    opt = torch.optim.SGD(dense.parameters(), lr=0.01, momentum=0.9)
    compare(benchmark, lambda: fused.fit(loader, epochs=1, progress=False),
            {"eager_flow_step": lambda: eager.fit(loader, epochs=1, progress=False),
             "dense_training": lambda: train_epoch(dense, loader, opt, label_smoothing=0.1)},
            budget_s=1.0, min_rounds=3, pedantic_rounds=3, steps=len(loader), batch=32)


def _pruned_98(model):
    pruner = Pruner(model, target_sparsity=0.98)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a random 2% of every layer stays active (export cost depends on nnz, not on which)
        for layer in pruner.layers.values():
            layer.scores.copy_(torch.rand(layer.scores.shape, generator=g) - 0.98)
    return pruner


def _mlp():
    return nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


@pytest.mark.benchmark(group="export")
@pytest.mark.parametrize("net,batch", [("digits_cnn", 1), ("digits_cnn", 450), ("mlp1024", 1), ("mlp1024", 256)])
def test_export_inference(benchmark, net, batch):
    model = DigitsCNN() if net == "digits_cnn" else _mlp()
    x = torch.rand(batch, 1, 8, 8) if net == "digits_cnn" else torch.randn(batch, 1024)
    dense = copy.deepcopy(model).eval()
    pruner = _pruned_98(model)
    sparse = pruner.export()
    with torch.inference_mode():
        compare(benchmark, lambda: sparse(x), {"dense": lambda: dense(x)}, budget_s=1.0,
                sparsity=pruner.sparsity()["overall"], batch=batch)

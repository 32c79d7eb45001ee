"""Few-shot adaptation: HyperFlow's fused_adapt vs autograd fine-tuning, time and peak memory.

A 5-way 1-shot and a 5-way 5-shot task on a Conv4 backbone with GroupNorm and with BatchNorm
(28x28 inputs), 50 steps for every method (``fused_adapt_low_memory``: ``low_memory=True``, which
changes only the BatchNorm case; ``fused_adapt_drift_pays``: a flow whose ``tune_horizon`` found the
drift paying, so without the mean-displacement candidate). The drift network is fitted on a handful of
synthetic trajectories: its speed does not depend on how well it was trained. Each test records, from the same run:

* ``speedup_vs_bias_tuning`` — median time of bias tuning / median time of this method, timed
  interleaved (``hyperflow_ext.measure.interleaved_medians``);
* ``peak_kib`` and ``memory_ratio_vs_bias_tuning`` — peak tensor memory allocated during one
  adaptation (``hyperflow_ext.measure.peak_memory``), relative to bias tuning's.

Run: ``python -m pytest benchmarks/bench_adapt.py --benchmark-enable -q``
"""
import copy

import pytest
import torch

from hyperflow_ext.flow import fused_adapt
from hyperflow_ext.flow.baselines import finetune_adapt
from hyperflow_ext.measure import interleaved_medians, peak_memory

STEPS, SHOTS = 50, (1, 5)
WAY = 5  # as in conftest.trained


@pytest.fixture(params=[(shot, norm) for norm in ("group", "batch") for shot in SHOTS],
                ids=lambda p: f"{p[0]}shot-{p[1]}norm")
def setup(request):
    shot, norm = request.param
    backbone, flow = request.getfixturevalue("trained" if norm == "group" else "trained_batchnorm")
    gen = torch.Generator().manual_seed(shot)
    sx = torch.rand(WAY * shot, 1, 28, 28, generator=gen)
    sy = torch.arange(WAY).repeat_interleave(shot)
    return backbone, sx, sy, flow


METHODS = {
    "bias_tuning": lambda b, sx, sy, f: finetune_adapt(b, sx, sy, "bias", STEPS, 1e-2),
    "full_finetuning": lambda b, sx, sy, f: finetune_adapt(b, sx, sy, "all", STEPS, 1e-3),
    "fused_adapt_native": lambda b, sx, sy, f: fused_adapt(b, sx, sy, flow=f, steps=STEPS, backend="native"),
    "fused_adapt_torch": lambda b, sx, sy, f: fused_adapt(b, sx, sy, flow=f, steps=STEPS, backend="torch"),
    "fused_adapt_low_memory": lambda b, sx, sy, f: fused_adapt(b, sx, sy, flow=f, steps=STEPS, low_memory=True),
    "fused_adapt_drift_pays": lambda b, sx, sy, f: fused_adapt(b, sx, sy, flow=_paying(f), steps=STEPS),
}


def _paying(flow):
    """The fixture's flow as ``tune_horizon`` leaves a drift that beats no adaptation
    (``drift_pays``): no mean-displacement candidate. The fixtures never run ``tune_horizon``."""
    paying = copy.copy(flow)
    paying.drift_pays = True
    return paying


@pytest.mark.parametrize("method", list(METHODS))
def test_adaptation(benchmark, setup, method):
    backbone, sx, sy, flow = setup
    run = lambda m: (lambda: METHODS[m](backbone, sx, sy, flow))  # noqa: E731
    benchmark.group = f"adaptation (5-way {sy.shape[0] // WAY}-shot, 50 steps)"
    model = benchmark.pedantic(run(method), rounds=3, warmup_rounds=1)
    assert model(sx).shape == (sy.shape[0], WAY)
    if getattr(benchmark, "disabled", False):
        return
    _, peak = peak_memory(run(method))
    _, base_peak = peak_memory(run("bias_tuning"))
    t_base, t_method = interleaved_medians([run("bias_tuning"), run(method)], rounds=5)
    benchmark.extra_info.update(steps=STEPS, peak_kib=peak / 1024, bias_tuning_peak_kib=base_peak / 1024,
                                memory_ratio_vs_bias_tuning=peak / max(1, base_peak),
                                time_ratio_vs_bias_tuning=t_method / t_base,
                                speedup_vs_bias_tuning=t_base / t_method, kernel_median_ms=1e3 * t_method)

"""Shared benchmark plumbing: the adaptation benchmarks' ``trained`` fixture, and a terminal summary of the speedups that benchmarks record.

A benchmark that compares a kernel with a baseline stores ``benchmark.extra_info["speedup_vs_<name>"]``
(baseline median / kernel median, both timed interleaved in the same run) and optionally
``min_speedup_vs_<name>`` (the same from the fastest rounds); this prints them per group with
the median and minimum over the group.

Every benchmark also records where it ran (``extra_info``): the native CPU kernels' ISA path
(``hyperflow_ext.native.isa``; force one with ``HYPERFLOW_ISA``), the CPU model, ``ONEDNN_MAX_CPU_ISA``
(the cap on dense torch's ISA, if set), so no ratio is quoted without its ISA. (Thread counts are the
benchmarks' own ``threads`` entries where they set them.)
"""
import os
import statistics

import pytest
import torch

from hyperflow_ext import native
from hyperflow_ext.flow import DriftTrainConfig, HyperFlow
from hyperflow_ext.models import Conv4

WAY = 5  # classes per task of the adaptation benchmarks


@pytest.fixture(scope="module")
def trained():
    """A Conv4 backbone (random weights) and a HyperFlow fitted on four tiny 5-way tasks: timing
    fixtures for the adaptation benchmarks (the drift's accuracy is not what they measure)."""
    return fitted_flow("group")


@pytest.fixture(scope="module")
def trained_batchnorm():
    """:func:`trained` on a BatchNorm Conv4 (support statistics are then a candidate)."""
    return fitted_flow("batch")


def fitted_flow(norm: str):
    """``(backbone, flow)``: a Conv4 with ``norm`` and a flow fitted on four tiny 5-way tasks."""
    torch.manual_seed(0)
    backbone = Conv4(norm=norm).eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    sx = torch.rand(WAY * 5, 1, 28, 28)
    sy = torch.arange(WAY).repeat_interleave(5)
    flow = HyperFlow(backbone, params="bias")
    eps = [(sx + 0.05 * torch.randn_like(sx), sy) for _ in range(4)]
    flow.fit(eps, tasks=4, trajectory_steps=5, progress=False, perturbations=0, lr=1e-2,
             train_config=DriftTrainConfig(iters=10, eval_every=5))
    return backbone, flow


def platform_info() -> dict:
    """The ISA path, CPU model and dense torch's ISA cap of this run."""
    info = {"cpu_model": native.cpu_model(), "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "")}
    try:
        info["isa"] = native.isa() if native.available() else "none (extension missing)"
    except (ValueError, RuntimeError) as exc:  # a bad HYPERFLOW_ISA, or a build from before ISA dispatch
        info["isa"] = f"error: {exc}"
    return info


@pytest.fixture(autouse=True)
def _record_platform(request):
    """Stores platform_info() in every benchmark's extra_info."""
    bench = request.getfixturevalue("benchmark") if "benchmark" in request.fixturenames else None
    yield
    if bench is not None:
        for k, v in platform_info().items():
            bench.extra_info.setdefault(k, v)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not getattr(session, "benchmarks", None):
        return
    groups = {}
    for bench in session.benchmarks:
        ratios = {}
        for k, v in bench.extra_info.items():
            if k.startswith("speedup_vs_"):
                ratios[k[len("speedup_vs_"):]] = v
            elif k.startswith("min_speedup_vs_"):
                ratios[k[len("min_speedup_vs_"):] + " (min)"] = v
        if ratios:
            groups.setdefault(bench.group or "(no group)", []).append((bench.name, bench.extra_info, ratios))
    if not groups:
        return
    tr = terminalreporter
    tr.write_sep("=", "speedups (baseline median / kernel median, timed interleaved)")
    where = platform_info()
    tr.write_line(f"ISA path {where['isa']} | CPU {where['cpu_model']} | "
                  f"ONEDNN_MAX_CPU_ISA={where['onednn_max_cpu_isa'] or '(unset)'}")
    for group, rows in groups.items():
        tr.write_line(f"[{group}]")
        for name, info, ratios in rows:
            kernel = info.get("kernel_median_ms")
            cols = "  ".join(f"vs {k}: {v:6.2f}x" for k, v in sorted(ratios.items()))
            tr.write_line(f"  {name:<60} kernel {kernel:9.4f} ms  {cols}" if kernel is not None else f"  {name:<60} {cols}")
        for key in sorted({k for _, _, r in rows for k in r}):
            vals = [r[key] for _, _, r in rows if key in r]
            tr.write_line(f"  -> vs {key}: median {statistics.median(vals):.2f}x, min {min(vals):.2f}x, "
                          f"max {max(vals):.2f}x over {len(vals)} cases")

"""Sparse kernels against their baselines, side by side in the same run.

Run: ``python -m pytest benchmarks/bench_sparse.py --benchmark-enable -q``

Each test times the native kernel and its baseline(s) *interleaved* (kernel, baseline, kernel,
… so drift on a shared machine hits both), records the medians and the ratios in
``benchmark.extra_info`` (``speedup_vs_<baseline>``; printed at the end by conftest.py), and
lets pytest-benchmark time the kernel itself for its table.

Groups:
* ``csr_linear``: ``csr_linear(x, W_csr)`` vs ``torch.sparse`` CSR matmul (the faster of
  ``torch.sparse.mm(W, x.T)`` and ``torch.sparse.mm(W, x.T.contiguous())``, both returning the
  transposed view, measured each case) and vs dense ``x @ W.T``; 1024² and 4096², sparsity
  90/95/98/99%, batch 1/32/256.
* ``masked_matmul``: forward ``x @ (W⊙m)ᵀ`` and input gradient ``g @ (W⊙m)`` vs eager torch
  ``(W * m)`` then matmul, sparsity ≥ 95%, training-sized batches.
* ``flow_step``: the fused step vs the eager torch sequence it replaces (``flow_step_reference``).
"""
import warnings

import pytest
import torch

from hyperflow_ext.measure import interleaved_times
from hyperflow_ext.prune.flow_ops import flow_step, flow_step_reference
from hyperflow_ext.prune.masked_ops import masked_matmul, masked_matmul_grad_input
from hyperflow_ext.sparse import CSRMatrix, csr_linear

warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")


def _median(ts):
    return sorted(ts)[len(ts) // 2]


def compare(benchmark, kernel, baselines, budget_s=1.0, **info):
    """Time `kernel` and every baseline interleaved; record medians, minimums and speedups
    (``speedup_vs_<name>`` from medians, ``min_speedup_vs_<name>`` from minimums — on a loaded
    machine noise only adds time, so the minimum is the steadier estimate); then time the
    kernel with pytest-benchmark."""
    names = list(baselines)
    times, rounds = interleaved_times([kernel] + [baselines[n] for n in names], budget_s, min_rounds=7)
    k_med, k_min = _median(times[0]), min(times[0])
    benchmark.extra_info.update(info)
    benchmark.extra_info["rounds"] = rounds
    benchmark.extra_info["kernel_median_ms"] = k_med * 1e3
    benchmark.extra_info["kernel_min_ms"] = k_min * 1e3
    for name, ts in zip(names, times[1:]):
        benchmark.extra_info[f"{name}_median_ms"] = _median(ts) * 1e3
        benchmark.extra_info[f"{name}_min_ms"] = min(ts) * 1e3
        benchmark.extra_info[f"speedup_vs_{name}"] = _median(ts) / k_med
        benchmark.extra_info[f"min_speedup_vs_{name}"] = min(ts) / k_min
    benchmark.pedantic(kernel, rounds=max(3, min(rounds, 50)), iterations=1, warmup_rounds=1)


def _fastest(benchmark_fns):
    """The faster of several equivalent torch formulations (timed once, interleaved)."""
    times, _ = interleaved_times(list(benchmark_fns.values()), budget_s=0.3, min_rounds=3)
    meds = [_median(ts) for ts in times]
    best = min(range(len(meds)), key=meds.__getitem__)
    return list(benchmark_fns)[best], list(benchmark_fns.values())[best]


# ---- CSR linear (inference) ------------------------------------------------------------------

@pytest.mark.parametrize("batch", [1, 32, 256])
@pytest.mark.parametrize("sparsity", [0.90, 0.95, 0.98, 0.99])
@pytest.mark.parametrize("n", [1024, 4096])
def test_csr_linear(benchmark, n, sparsity, batch):
    benchmark.group = "csr_linear"
    gen = torch.Generator().manual_seed(0)
    dense = torch.randn(n, n, generator=gen) * (torch.rand(n, n, generator=gen) >= sparsity)
    w = CSRMatrix.from_dense(dense, index_dtype=torch.int32)
    w_torch = dense.to_sparse_csr()
    x = torch.randn(batch, n, generator=gen)
    with torch.inference_mode():
        torch.testing.assert_close(csr_linear(x, w), x @ dense.T, rtol=1e-4, atol=1e-3)
        which, torch_sparse = _fastest({
            "sparse.mm(W, x.T).T": lambda: torch.sparse.mm(w_torch, x.T).T,
            "sparse.mm(W, x.T.contiguous()).T": lambda: torch.sparse.mm(w_torch, x.T.contiguous()).T,
        })
        compare(benchmark, lambda: csr_linear(x, w),
                {"torch_sparse": torch_sparse, "dense": lambda: torch.matmul(x, dense.T)},
                budget_s=1.5 if n == 4096 else 0.8, torch_sparse_form=which, nnz=w.nnz)


# ---- masked matmul (training) -----------------------------------------------------------------

@pytest.mark.parametrize("batch", [64, 256])
@pytest.mark.parametrize("sparsity", [0.95, 0.98])
@pytest.mark.parametrize("out_f,in_f", [(1024, 1024), (512, 784)])
@pytest.mark.parametrize("op", ["masked_matmul", "masked_matmul_grad_input"])
def test_masked_matmul(benchmark, op, out_f, in_f, sparsity, batch):
    """Forward ``X·(W⊙m)ᵀ`` and input gradient ``G·(W⊙m)`` against the eager product with ``W*m``."""
    benchmark.group = op
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, in_f, generator=gen)
    mask = torch.rand(out_f, in_f, generator=gen) >= sparsity
    if op == "masked_matmul":
        x = torch.randn(batch, in_f, generator=gen)
        compare(benchmark, lambda: masked_matmul(x, w, mask), {"eager": lambda: x @ (w * mask).T})
    else:
        g = torch.randn(batch, out_f, generator=gen)
        compare(benchmark, lambda: masked_matmul_grad_input(g, w, mask), {"eager": lambda: g @ (w * mask)})


# ---- fused flow step --------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1024, 1024), (512, 784), (2048, 1024)])
def test_flow_step(benchmark, shape):
    benchmark.group = "flow_step"
    gen = torch.Generator().manual_seed(0)
    w, g = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)

    def state():
        return [torch.rand(shape, generator=gen) - 0.5, torch.zeros(shape), torch.zeros(shape), torch.zeros(shape)]

    fused, eager = state(), state()
    compare(benchmark, lambda: flow_step(w, g, *fused, step=10, pressure=1e-4),
            {"eager": lambda: flow_step_reference(w, g, *eager, step=10, pressure=1e-4)}, numel=w.numel())

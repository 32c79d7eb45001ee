"""Pruned CNNs end to end: the sparse export against dense torch, interleaved in one run.

Run: ``python -m pytest benchmarks/bench_conv.py --benchmark-enable -q``
(``-k "vgg and b32"`` etc. to select; the whole grid takes a few minutes on 2 cores).

Models:

* the project's (:mod:`hyperflow_ext.prune.cnns`): ``vgg`` = ``VGGStyle`` (five 3x3 conv-BN-ReLU, 64-512
  channels, 32x32 input) and ``resnet`` = ``ResNetStyle`` (stem + four basic blocks, 32-256 channels), at
  90/95/98/99 % sparsity;
* held-out-style referees written here as a user would, with no project class: ``seqvgg``, a plain
  ``nn.Sequential`` VGG for 32x32 inputs (five 3x3 convolutions 64-512 channels with ReLU and max-pool, no
  BatchNorm, a Linear-ReLU-Linear head), and ``seqresnet``, a small BatchNorm ResNet (``nn.Sequential`` of a
  stem and four residual blocks, stride-2 stages with 1x1 projection shortcuts), at 50/80/90/95/98 %
  sparsity (at 50 and 80 % the never-slower guard is what is measured).

Every conv and linear weight is pruned by a per-layer magnitude mask (the project models' linear head is
left dense, as ``magnitude_masks`` does); eval mode with random BatchNorm statistics.

Each case times, round-robin on the same input (``interleaved_times``), at 1 or 2 threads for both
torch and the native kernels, each comparison in its own interleaved run (the sparse model against the
dense ones; against the layer-by-layer export; against the folded dense ones):

* ``sparse``: :func:`~hyperflow_ext.sparse.sparsify` with ``example_input`` (BatchNorm folded, ReLU fused,
  a layer kept dense where that measured faster, the leading chain run depth-first where that measured
  faster), default NCHW layout;
* ``dense`` / ``dense_cl``: the same masked model run by torch (BatchNorm as is) in the default layout
  and channels-last; ``speedup_vs_dense_best`` divides the faster of the two by the sparse median;
* ``dense_folded_best``: the dense model with the same BatchNorm folding and ReLU fusion (the stricter
  baseline), faster layout;
* ``layered``: the same sparse export without depth-first execution (one native call per layer);
  ``speedup_vs_layer_by_layer`` is what the depth-first program gains.

``extra_info`` also holds the dense GFLOP/s and the sparse path's effective GFLOP/s (its nonzero
multiply-adds over its time) and the per-layer report (sparse/dense ms per layer, as the export timed
it). No timing threshold is asserted; the test checks that the outputs agree.
"""
import copy
import statistics

import pytest
import torch
from torch import nn

from hyperflow_ext import native
from hyperflow_ext.measure import interleaved_times
from hyperflow_ext.prune.cnns import ResNetStyle, VGGStyle, apply_masks, magnitude_masks, randomize_batchnorm
from hyperflow_ext.sparse import SparseConv2d, sparsify



def seq_vgg() -> nn.Sequential:
    """A plain VGG for ``(N, 3, 32, 32)`` inputs: five 3x3 conv-ReLU-maxpool stages (64-512 channels, no
    BatchNorm) down to 1x1, then Linear-ReLU-Linear."""
    layers, cin = [], 3
    for cout in (64, 128, 256, 512, 512):
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        cin = cout
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Linear(512, 10))


class _Residual(nn.Module):
    """``relu(body(x) + shortcut(x))``: conv-BN-ReLU-conv-BN, a 1x1 conv-BN projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                                  nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(cout))
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def seq_resnet() -> nn.Sequential:
    """A small BatchNorm ResNet for ``(N, 3, 32, 32)`` inputs: a 3x3 stem, residual stages of 32, 64, 128 and
    256 channels (strides 1, 2, 2, 2), global average pool, linear head."""
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
                         _Residual(32, 32, 1), _Residual(32, 64, 2), _Residual(64, 128, 2), _Residual(128, 256, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10))


MODELS = {"vgg": VGGStyle, "resnet": ResNetStyle, "seqvgg": seq_vgg, "seqresnet": seq_resnet}
PROJECT_SPARSITIES = (0.90, 0.95, 0.98, 0.99)
REFEREE_SPARSITIES = (0.50, 0.80, 0.90, 0.95, 0.98)
CASES = [pytest.param(arch, s, id=f"{arch}-s{int(round(100 * s))}")
         for archs, sparsities in ((("vgg", "resnet"), PROJECT_SPARSITIES), (("seqvgg", "seqresnet"), REFEREE_SPARSITIES))
         for arch in archs for s in sparsities]


def _prune(model: nn.Module, sparsity: float, linear: bool) -> None:
    """Per-layer magnitude masks on every conv (and, when ``linear``, every linear) weight, as exact zeros."""
    apply_masks(model, magnitude_masks(model, sparsity, kinds=(nn.Conv2d, nn.Linear) if linear else (nn.Conv2d,)))


def _set_threads(n: int) -> None:
    torch.set_num_threads(n)
    if native.available():
        native.cpu_module().omp_set_num_threads(n)


def _conv_flops(model: nn.Module, x: torch.Tensor, dense: bool) -> float:
    """Multiply-adds x 2 of every conv / linear on input x (dense: all weights; else: the nonzeros)."""
    total = [0.0]

    def hook(m, inp, out):
        if isinstance(m, SparseConv2d):
            per_out = m.csr().nnz / max(1, m.out_channels)
        elif isinstance(m, nn.Conv2d):
            w = m.weight
            per_out = (w.numel() if dense else int((w != 0).sum())) / w.shape[0]
        elif isinstance(m, nn.Linear):
            per_out = m.in_features
        else:
            return
        total[0] += 2.0 * per_out * out.numel()
    hooks = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.inference_mode():
        model(x)
    for h in hooks:
        h.remove()
    return total[0]


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    yield
    _set_threads(before)


@pytest.mark.skipif(not native.available(), reason="native extension not built")
@pytest.mark.parametrize("threads", [2, 1], ids=lambda t: f"t{t}")
@pytest.mark.parametrize("batch", [1, 32], ids=lambda b: f"b{b}")
@pytest.mark.parametrize("arch,sparsity", CASES)
def test_pruned_cnn_end_to_end(benchmark, arch, sparsity, batch, threads):
    benchmark.group = f"cnn_{arch}"
    _set_threads(threads)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = MODELS[arch]()
    randomize_batchnorm(model, gen)
    _prune(model, sparsity, linear=arch.startswith("seq"))
    model.eval()
    x = torch.randn(batch, 3, 32, 32, generator=gen)
    sparse, report = sparsify(model, x, time_budget_s=0.2)
    folded, _ = sparsify(model, layers=[])  # same folding and fusion, every layer dense
    layered, _ = sparsify(model, x, time_budget_s=0.2, depth_first=False)  # one call per layer
    dense_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    folded_cl = copy.deepcopy(folded).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    fns = {"sparse": lambda: sparse(x), "layered": lambda: layered(x), "dense": lambda: model(x),
           "dense_cl": lambda: dense_cl(x_cl), "folded": lambda: folded(x), "folded_cl": lambda: folded_cl(x_cl)}
    # Each ratio from an interleaved run of exactly the models it compares: with more models in the
    # rotation each one runs with colder caches (a small sparse model loses more to that than dense).
    groups = {"dense": ["sparse", "dense", "dense_cl"], "layered": ["sparse", "layered"],
              "folded": ["sparse", "folded", "folded_cl"]}
    med, mins, rounds = {}, {}, {}
    with torch.inference_mode():
        torch.testing.assert_close(sparse(x), model(x), atol=1e-3, rtol=1e-3)
        for group, names in groups.items():
            times, rounds[group] = interleaved_times([fns[k] for k in names], budget_s=2.0, min_rounds=9,
                                                     max_rounds=300)
            for k, t in zip(names, times):
                med[(group, k)], mins[(group, k)] = statistics.median(t), min(t)
    best_dense = min(med[("dense", "dense")], med[("dense", "dense_cl")])
    best_folded = min(med[("folded", "folded")], med[("folded", "folded_cl")])
    sparse_ms = med[("dense", "sparse")]
    # the depth-first program calls no module hooks: count the nonzeros on the layer-by-layer export
    flops_dense, flops_sparse = _conv_flops(model, x, True), _conv_flops(layered, x, False)
    info = benchmark.extra_info
    info.update(arch=arch, sparsity=sparsity, batch=batch, threads=threads, rounds=rounds,
                kernel_median_ms=1e3 * sparse_ms, dense_median_ms=1e3 * med[("dense", "dense")],
                dense_cl_median_ms=1e3 * med[("dense", "dense_cl")], folded_best_median_ms=1e3 * best_folded,
                speedup_vs_dense_best=best_dense / sparse_ms,
                min_speedup_vs_dense_best=min(mins[("dense", "dense")], mins[("dense", "dense_cl")])
                / mins[("dense", "sparse")],
                speedup_vs_dense_folded_best=best_folded / med[("folded", "sparse")],
                speedup_vs_layer_by_layer=med[("layered", "layered")] / med[("layered", "sparse")],
                dense_gflops=flops_dense / best_dense / 1e9, sparse_effective_gflops=flops_sparse / sparse_ms / 1e9,
                dense_layers=sum(r["kind"] == "dense" for r in report),
                depth_first_layers=sum(bool(r.get("depth_first")) for r in report),
                layers="; ".join(f"{r['name']}:{r['kind']}:{r['density']:.3f}:"
                                 f"{(r['speedup'] or float('nan')):.2f}x" for r in report))
    benchmark.pedantic(fns["sparse"], rounds=5, iterations=1, warmup_rounds=1)

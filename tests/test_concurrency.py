"""Shared objects under concurrent calls: a user's backbone, a flow, baselines and exported models.

Every test runs the same calls serially first, then from 16 threads at once (released together by
a barrier), and checks that (a) each threaded result equals its serial counterpart and (b) the
user's module holds the same parameter objects with the same values afterwards.
"""
import threading

import pytest
import torch
from torch import nn

import hyperflow_ext as hf
from hyperflow_ext._stateless import call_with, stateless_view
from hyperflow_ext.flow import DriftTrainConfig, HyperFlow, fused_adapt
from hyperflow_ext.flow.baselines import direct_transfer, finetune_adapt

from _threads import run_threaded  # tests/ is on sys.path under pytest

THREADS = 16


def _backbone(norm: str = "group") -> nn.Sequential:
    norm_layer = (lambda c: nn.GroupNorm(4, c)) if norm == "group" else nn.BatchNorm2d
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), norm_layer(8), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 16, 3, padding=1), norm_layer(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(16, 32))
    net.feature_dim = 32
    return net.eval()


def _episode(gen: torch.Generator, way: int = 3, shot: int = 2, query: int = 4):
    protos = torch.randn(way, 1, 12, 12, generator=gen)
    sy = torch.arange(way).repeat_interleave(shot)
    qy = torch.arange(way).repeat_interleave(query)
    sx = protos[sy] + 0.3 * torch.randn(len(sy), 1, 12, 12, generator=gen)
    qx = protos[qy] + 0.3 * torch.randn(len(qy), 1, 12, 12, generator=gen)
    return sx, sy, qx, qy


def _snapshot(module: nn.Module):
    return ({n: p for n, p in module.named_parameters()},
            {n: t.detach().clone() for n, t in module.state_dict().items()})


def _assert_untouched(module: nn.Module, snapshot) -> None:
    objects, values = snapshot
    now = dict(module.named_parameters())
    assert set(now) == set(objects)
    for name, p in now.items():
        assert p is objects[name], f"parameter {name} was replaced"
        assert isinstance(p, nn.Parameter), f"{name} is no longer an nn.Parameter"
        assert p.grad is None, f"{name} received a gradient"
    for name, t in module.state_dict().items():
        assert torch.equal(t, values[name]), f"{name} changed"


def _run_threaded(fn, args_list):
    """``fn(*args)`` for every args, from THREADS threads released at once: ``(jobs, results)``."""
    return run_threaded(fn, args_list, THREADS, timeout=30)


@pytest.fixture(scope="module")
def served():
    torch.manual_seed(0)
    backbone = _backbone()
    gen = torch.Generator().manual_seed(1)
    episodes = [_episode(gen) for _ in range(6)]
    flow = HyperFlow(backbone, params="bias", hidden=32)
    flow.fit(episodes, tasks=6, trajectory_steps=8, interpolation="linear",
             train_config=DriftTrainConfig(iters=30), progress=False)
    tasks = [_episode(gen) for _ in range(THREADS)]
    return backbone, flow, tasks


@pytest.fixture(params=["native", "torch"])
def backend(request):
    """The integrator back-ends served from threads (native skipped where the extension is missing)."""
    if request.param == "native" and not hf.native.available():
        pytest.skip("native extension not built")
    return request.param


def test_fused_adapt_from_16_threads_matches_serial_and_leaves_the_backbone(served, backend):
    backbone, flow, tasks = served
    snap = _snapshot(backbone)

    def adapt_and_classify(sx, sy, qx, _qy):
        model = fused_adapt(backbone, sx, sy, flow=flow, steps=10, backend=backend)
        return model.theta.clone(), model(qx)

    serial = [adapt_and_classify(*t) for t in tasks]
    _assert_untouched(backbone, snap)
    jobs, threaded = _run_threaded(adapt_and_classify, tasks)
    for i, (theta, logits) in enumerate(threaded):
        torch.testing.assert_close(theta, serial[i % len(tasks)][0], atol=1e-6, rtol=0)
        torch.testing.assert_close(logits, serial[i % len(tasks)][1], atol=1e-6, rtol=0)
    _assert_untouched(backbone, snap)


def test_batched_fused_adapt_from_16_threads(served, backend):
    backbone, flow, tasks = served
    snap = _snapshot(backbone)
    batches = [tuple(torch.stack([tasks[(b + k) % len(tasks)][i] for k in range(4)]) for i in range(4))
               for b in range(4)]

    def adapt_batch(sx, sy, qx, _qy):
        return fused_adapt(backbone, sx, sy, flow=flow, steps=10, backend=backend)(qx)

    serial = [adapt_batch(*b) for b in batches]
    _, threaded = _run_threaded(adapt_batch, batches)
    for i, logits in enumerate(threaded):
        assert logits.shape == (4, 12, 3)
        torch.testing.assert_close(logits, serial[i % len(batches)], atol=1e-6, rtol=0)
    _assert_untouched(backbone, snap)


def test_adapted_forward_interleaved_with_plain_backbone_forward(served):
    backbone, flow, tasks = served
    sx, sy, qx, _ = tasks[0]
    model = fused_adapt(backbone, sx, sy, flow=flow, steps=10, select=False)  # the drift's state, never θ_0
    assert not torch.equal(model.theta, flow.subset.vector(backbone))  # the views really differ
    with torch.no_grad():
        plain_serial, adapted_serial = backbone(qx), model(qx)
    plain_out, adapted_out = [], []
    barrier = threading.Barrier(2)

    def loop(fn, sink):
        barrier.wait(timeout=30)
        with torch.no_grad():
            for _ in range(50):
                sink.append(fn(qx))

    threads = [threading.Thread(target=loop, args=(backbone, plain_out)),
               threading.Thread(target=loop, args=(model, adapted_out))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(plain_out) == len(adapted_out) == 50
    for p, a in zip(plain_out, adapted_out):
        torch.testing.assert_close(p, plain_serial, atol=1e-6, rtol=0)
        torch.testing.assert_close(a, adapted_serial, atol=1e-6, rtol=0)


def test_baselines_and_tune_horizon_from_threads(served):
    backbone, flow, tasks = served
    snap = _snapshot(backbone)

    def baselines(sx, sy, qx, _qy):
        return direct_transfer(backbone, sx, sy)(qx), finetune_adapt(backbone, sx, sy, steps=3, lr=1e-2)(qx)

    serial = [baselines(*t) for t in tasks[:4]]
    _, threaded = _run_threaded(baselines, tasks[:4])
    for i, (direct, tuned) in enumerate(threaded):
        torch.testing.assert_close(direct, serial[i % 4][0], atol=1e-6, rtol=0)
        torch.testing.assert_close(tuned, serial[i % 4][1], atol=1e-6, rtol=0)
    _assert_untouched(backbone, snap)

    # tune_horizon on a private copy of the flow, concurrently with serving on the shared one
    scores = flow.tune_horizon(tasks[:4], tasks=4, horizons=(0.5, 1.0), steps=5, progress=False)
    _, threaded = _run_threaded(lambda *ep: flow.tune_horizon(tasks[:4], tasks=4, horizons=(0.5, 1.0), steps=5,
                                                              progress=False), [()])
    assert all(s == scores for s in threaded)
    _assert_untouched(backbone, snap)


def test_training_mode_batchnorm_statistics_stay_private():
    backbone = _backbone("batch").train()
    snap = _snapshot(backbone)
    x = torch.randn(6, 1, 12, 12)
    bias = {"0.bias": torch.randn(8)}
    out = call_with(backbone, bias, x)
    assert out.shape == (6, 32)
    _assert_untouched(backbone, snap)
    assert int(backbone[1].num_batches_tracked) == 0
    # the view computed with the substituted bias: a hand-made copy agrees
    ref = _backbone("batch").train()
    ref.load_state_dict(backbone.state_dict())
    with torch.no_grad():
        ref[0].bias.copy_(bias["0.bias"])
    torch.testing.assert_close(out, ref(x))


def test_stateless_view_replaces_tied_parameters_everywhere_and_rejects_unknown_names():
    shared = nn.Linear(4, 4)
    net = nn.Sequential(shared, nn.ReLU(), shared)
    w = torch.randn(4, 4)
    view = stateless_view(net, {"0.weight": w})
    assert view[0] is view[2] and view[0].weight is w
    assert net[0].weight is not w and isinstance(net[0].weight, nn.Parameter)
    x = torch.randn(2, 4)
    torch.testing.assert_close(view(x), torch.relu(x @ w.T + shared.bias) @ w.T + shared.bias)
    with pytest.raises(ValueError, match="no parameter or buffer"):
        stateless_view(net, {"9.weight": w})
    seen = []
    hooked = stateless_view(net, forward_pre_hooks={"1": lambda m, args: seen.append(args[0].shape)})
    hooked(x)
    assert seen == [(2, 4)] and not net[1]._forward_pre_hooks  # the hook ran in the view only
    with pytest.raises(ValueError, match="no submodule"):
        stateless_view(net, forward_pre_hooks={"7": lambda m, args: None})


def test_exported_sparse_model_from_16_threads():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 10 * 10, 10))
    pruner = hf.Pruner(model, pressure=0.0)
    snap = _snapshot(model)
    _, exported_many = _run_threaded(lambda: pruner.export(), [()])
    exported = exported_many[0]
    xs = [(torch.randn(3, 1, 12, 12),) for _ in range(4)]
    with torch.inference_mode():
        serial = [exported(x) for (x,) in xs]
        _, threaded = _run_threaded(lambda x: exported(x), xs)
        for i, out in enumerate(threaded):
            torch.testing.assert_close(out, serial[i % 4], atol=1e-6, rtol=0)
        for other in exported_many[1:]:
            torch.testing.assert_close(other(xs[0][0]), serial[0], atol=1e-6, rtol=0)
    _assert_untouched(model, snap)

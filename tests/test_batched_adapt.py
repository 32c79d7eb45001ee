"""Batched serving: fused_adapt over many tasks is one encoder forward per group of same-shaped
support sets and one native integration call for all tasks, with the per-task results."""
import pytest
import torch

import hyperflow_ext.native as native
from hyperflow_ext.flow import DriftTrainConfig, HyperFlow, fused_adapt
from hyperflow_ext.flow.batched import encode_tasks
from hyperflow_ext.models import Conv4


def _support(way, shot, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(way * shot, 1, 16, 16, generator=g), torch.arange(way).repeat_interleave(shot)


@pytest.fixture(scope="module")
def flow():
    torch.manual_seed(0)
    backbone = Conv4(hidden=8, groups=2).eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    f = HyperFlow(backbone, params="bias", hidden=16)
    eps = [_support(3, 2, s) for s in range(4)]
    f.fit(eps, tasks=4, trajectory_steps=4, progress=False, perturbations=0, lr=5e-2,
          train_config=DriftTrainConfig(iters=10, eval_every=5))
    return backbone, f


# (way, shot) per task: three groups of same-shaped support sets, interleaved
SHAPES = [(3, 2), (3, 3), (3, 2), (2, 2), (3, 3), (3, 2)]


def test_a_list_of_tasks_is_one_encoder_forward_per_shape_and_one_native_call(flow, monkeypatch):
    if not native.available():
        pytest.skip("native extension not built")
    backbone, f = flow
    tasks = [_support(w, s, 10 + i) for i, (w, s) in enumerate(SHAPES)]
    singles = [fused_adapt(backbone, x, y, flow=f, steps=6, backend="native", select=False) for x, y in tasks]

    encodes, integrations = [], []
    real_encode, real_module = f.encoder._encode, native.cpu_module()

    class Counting:  # the native module, counting its drift integrations
        def __getattr__(self, name):
            return getattr(real_module, name)

        def drift_integrate(self, **kw):
            integrations.append(kw["tasks"])
            return real_module.drift_integrate(**kw)

    monkeypatch.setattr(f.encoder, "_encode", lambda chunks, **kw: encodes.append(
        sum(c.shape[0] for c in chunks)) or real_encode(chunks, **kw))
    monkeypatch.setattr(native, "cpu_module", lambda: Counting())
    models = fused_adapt(backbone, [x for x, _ in tasks], [y for _, y in tasks], flow=f, steps=6, backend="native", select=False)
    assert integrations == [len(tasks)]                      # one call integrates every task
    assert sorted(encodes) == sorted([3 * 6, 2 * 2, 3 * 3 * 2])  # one forward per group, all its images
    assert len(models) == len(tasks)
    for model, single, (x, _), (way, _) in zip(models, singles, tasks, SHAPES):  # order kept, same results
        torch.testing.assert_close(model.theta, single.theta, rtol=1e-4, atol=1e-5)
        assert model(x).shape == (x.shape[0], way)


def test_encode_tasks_matches_one_task_at_a_time(flow):
    _, f = flow
    tasks = [_support(w, s, 20 + i) for i, (w, s) in enumerate(SHAPES)]
    ways = [w for w, _ in SHAPES]
    z, feats, _ = encode_tasks(f.encoder, [x for x, _ in tasks], [y for _, y in tasks], ways)
    ref = [f.encoder.encode(x, y, w) for (x, y), w in zip(tasks, ways)]
    assert z.shape == (len(tasks), f.encoder.dim)
    torch.testing.assert_close(z, torch.cat([r[0] for r in ref]), rtol=1e-4, atol=1e-5)
    for got, (_, want) in zip(feats, ref):  # each task's own support features, in the order given
        torch.testing.assert_close(got, want[0], rtol=1e-4, atol=1e-5)

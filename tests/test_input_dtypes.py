"""Inputs in the dtypes users bring (NumPy's float64 images and int32 labels) give exactly what the
backbone's own dtypes give, and a backbone left in training mode is flagged, not switched."""
import copy
import warnings

import pytest
import torch
from _toy_tasks import episodes, tiny_flow

from hyperflow_ext.flow import HyperFlow, emulation_fidelity, fused_adapt
from hyperflow_ext.flow.baselines import direct_transfer, finetune_adapt, support_statistics, tune_lr
from hyperflow_ext.models import Conv4


@pytest.fixture(scope="module")
def tiny():
    return tiny_flow()


def _numpy_like(ep):
    """Float64 images and int32 labels, as ``torch.from_numpy`` hands them over."""
    return tuple(t.double() if t.dtype.is_floating_point else t.int() for t in ep)


def _query_episodes(n, seed=3):
    return list(episodes(n, seed=seed, query=4))


def test_fused_adapt_accepts_float64_images_and_int32_labels(tiny):
    backbone, flow, _ = tiny
    sx, sy = next(episodes(1, seed=5))
    want = fused_adapt(backbone, sx, sy, flow=flow, steps=8)
    got = fused_adapt(backbone, *_numpy_like((sx, sy)), flow=flow, steps=8)
    assert got.selection["chosen"] == want.selection["chosen"]
    torch.testing.assert_close(got.theta, want.theta, rtol=0, atol=0)
    torch.testing.assert_close(got(sx.double()), want(sx), rtol=0, atol=0)
    # a list of tasks and a stacked batch take the same route
    for a, b in zip(fused_adapt(backbone, [sx.double()], [sy.int()], flow=flow, steps=8), [want]):
        torch.testing.assert_close(a.theta, b.theta, rtol=0, atol=0)
    stacked = fused_adapt(backbone, sx.double()[None], sy.int()[None], flow=flow, steps=8, select=False)
    plain = fused_adapt(backbone, sx[None], sy[None], flow=flow, steps=8, select=False)
    torch.testing.assert_close(stacked.theta, plain.theta, rtol=0, atol=0)


def test_queries_must_be_floating_point(tiny):
    backbone, flow, _ = tiny
    sx, sy = next(episodes(1, seed=5))
    model = fused_adapt(backbone, sx, sy, flow=flow, steps=8)
    with pytest.raises(ValueError, match="queries must be floating point"):
        model((sx * 255).to(torch.uint8))


def test_baselines_accept_numpy_dtypes():
    torch.manual_seed(0)
    backbone = Conv4(hidden=8, norm="batch").eval()
    sx, sy = next(episodes(1, seed=6))
    for adapt in (direct_transfer, support_statistics, lambda b, x, y: finetune_adapt(b, x, y, steps=3)):
        want, got = adapt(backbone, sx, sy), adapt(backbone, *_numpy_like((sx, sy)))
        torch.testing.assert_close(got(sx.double()), want(sx), rtol=0, atol=0)


def test_meta_training_and_tuning_accept_numpy_dtypes(tiny):
    backbone, flow, _ = tiny
    eps = _query_episodes(3)
    cast = [_numpy_like(ep) for ep in eps]
    a = HyperFlow(backbone, params="bias", hidden=8).record(eps, trajectory_steps=3, progress=False, lr=5e-2)
    b = HyperFlow(backbone, params="bias", hidden=8).record(cast, trajectory_steps=3, progress=False, lr=5e-2)
    torch.testing.assert_close(b.deltas, a.deltas, rtol=0, atol=0)
    torch.testing.assert_close(b.z, a.z, rtol=0, atol=0)
    assert tune_lr(backbone, cast, grid=(1e-2, 1e-1), steps=3).accuracy == \
        tune_lr(backbone, eps, grid=(1e-2, 1e-1), steps=3).accuracy
    assert emulation_fidelity(backbone, flow, cast, steps=3, adapt_steps=4) == \
        emulation_fidelity(backbone, flow, eps, steps=3, adapt_steps=4)


def test_tune_horizon_accepts_numpy_dtypes(tiny):
    _, flow, _ = tiny
    eps = _query_episodes(3, seed=4)
    horizon, pays = flow.horizon, flow.drift_pays
    try:
        want = flow.tune_horizon(eps, tasks=3, progress=False)
        got = flow.tune_horizon([_numpy_like(ep) for ep in eps], tasks=3, progress=False)
    finally:
        flow.horizon, flow.drift_pays = horizon, pays
    assert got == want


def test_training_mode_backbone_is_flagged_and_left_in_it(tiny):
    backbone, flow, _ = tiny
    sx, sy = next(episodes(1, seed=5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused_adapt(backbone, sx, sy, flow=flow, steps=8)  # eval mode: silent
    bn = Conv4(hidden=8, norm="batch").train()
    with pytest.warns(RuntimeWarning, match="BatchNorm2d layers in training mode"):
        direct_transfer(bn, sx, sy)
    assert all(m.training for m in bn.modules())


def test_a_float64_copy_of_the_backbone_adapts_with_the_float32_flow(tiny):
    backbone, flow, _ = tiny  # the flow's task encoder still runs the float32 original
    wide = copy.deepcopy(backbone).double()
    sx, sy = next(episodes(1, seed=5))
    plain = fused_adapt(backbone, sx, sy, flow=flow, steps=8, select=False)
    got = fused_adapt(wide, sx, sy, flow=flow, steps=8, select=False)
    assert got.theta.dtype == torch.float64
    torch.testing.assert_close(got.theta.float(), plain.theta, rtol=1e-5, atol=1e-6)
    chosen = fused_adapt(wide, sx, sy, flow=flow, steps=8)
    assert chosen(sx).dtype == torch.float64 and chosen.selection["chosen"] in chosen.selection["scores"]


def test_pruning_accepts_numpy_dtypes():
    from torch import nn

    from hyperflow_ext.prune import Pruner
    from hyperflow_ext.prune._loop import TensorLoader

    def run(x_dtype, y_dtype):
        torch.manual_seed(0)
        x, y = torch.randn(48, 1, 8, 8), torch.randint(0, 3, (48,))
        model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                              nn.Linear(4 * 64, 3))
        loader = TensorLoader(x.to(x_dtype), y.to(y_dtype), 16, shuffle=True, seed=0)
        records = Pruner(model, target_sparsity=0.5).fit(loader, epochs=2, regrowth_epochs=1, val_loader=loader,
                                                         progress=False)
        return records, model.state_dict()

    (want, want_state), (got, got_state) = run(torch.float32, torch.int64), run(torch.float64, torch.int32)
    assert got == want
    for name, value in want_state.items():
        assert torch.equal(got_state[name], value), name

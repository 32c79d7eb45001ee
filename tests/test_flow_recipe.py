"""HyperFlow on any nn.Module: inferred feature size, the chosen fine-tuning recipe, the OOD guard."""
import math
import warnings

import pytest
import torch
from torch import nn

from hyperflow_ext.flow import DriftTrainConfig, HyperFlow, features_with, flow_path, fused_adapt, loo_scores
from hyperflow_ext.flow.baselines import direct_transfer, finetune_adapt, split_support, support_statistics, tune_lr
from hyperflow_ext.flow.hyperflow import DEFAULT_REACH, recorded_rate
from hyperflow_ext.flow.select import SELECT_MARGIN


def _bn_backbone() -> nn.Sequential:
    """A plain Sequential with BatchNorm and no feature_dim attribute, in eval mode."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 24))
    with torch.no_grad():  # non-trivial running statistics, as after pretraining
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _episodes(n: int, seed: int = 0, way: int = 3, shot: int = 2, query: int = 3):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        protos = torch.randn(way, 1, 10, 10, generator=gen)
        sy = torch.arange(way).repeat_interleave(shot)
        qy = torch.arange(way).repeat_interleave(query)
        out.append((protos[sy] + 0.5 * torch.randn(len(sy), 1, 10, 10, generator=gen), sy,
                    protos[qy] + 0.5 * torch.randn(len(qy), 1, 10, 10, generator=gen), qy))
    return out


@pytest.fixture(scope="module")
def fitted():
    backbone = _bn_backbone()
    eps = _episodes(6)
    flow = HyperFlow(backbone, params="bias", hidden=32)
    assert flow.net is None  # no feature_dim yet: the drift network waits for the first support set
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        # unshifted, so that the guard tests below have training tasks to be in range of
        flow.fit(eps, tasks=len(eps), trajectory_steps=6, interpolation="linear",
                 train_config=DriftTrainConfig(iters=20), progress=False, augment=False)
    return backbone, eps, flow


def test_fit_on_a_short_list_of_a_plain_batchnorm_sequential(fitted):
    backbone, eps, flow = fitted
    assert flow.encoder.feature_dim == 24 and flow.task_stats == "layers"
    assert flow.net.task_dim == 5 * 24 + 1 + 2 * (8 + 8 + 16 + 16 + 24)
    # recorded at up to DEFAULT_REACH times the chosen rate; the per-task choice decides how far each task goes
    recorded = recorded_rate(flow.recipe, DEFAULT_REACH)
    assert flow.trajectory_config.lr == pytest.approx(recorded) == flow.recipe["recorded_lr"]
    assert flow.recipe["lr"] <= recorded <= DEFAULT_REACH * flow.recipe["lr"]
    assert "augment" not in flow.recipe
    sx, sy, qx, qy = eps[0]
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = fused_adapt(backbone, sx, sy, flow=flow, steps=5)
    logits = model(qx)
    assert logits.shape == (9, 3) and torch.isfinite(logits).all()
    assert all(torch.equal(v, state[k]) for k, v in backbone.state_dict().items())


def test_recorded_rate_reaches_past_the_chosen_rate_but_not_into_rates_that_hurt():
    # the grid scores of the BatchNorm Conv4's recipe: 0.01 still beats no adaptation, so 3x 0.003 stands
    bn = {"lr": 0.003, "accuracy": {"0.001": .901, "0.003": .914, "0.01": .886, "0.03": .834}, "unadapted": .869}
    assert recorded_rate(bn, 3.0) == pytest.approx(0.009)
    # the GroupNorm Conv4's: 0.1 scores below no adaptation, so the chosen rate is the cap (0.3 lies past the gap)
    gn = {"lr": 0.03, "accuracy": {"0.01": .915, "0.03": .925, "0.1": .852, "0.3": .95}, "unadapted": .895}
    assert recorded_rate(gn, 3.0) == pytest.approx(0.03)
    helps = {"lr": 0.03, "accuracy": {"0.1": .9}, "unadapted": .895}
    assert recorded_rate(helps, 3.0) == pytest.approx(0.09)
    assert recorded_rate(helps, 10.0) == pytest.approx(0.3)  # no rate seen to hurt: as asked
    assert recorded_rate({**helps, "accuracy": {"0.1": .9, "0.3": .5}}, 10.0) == pytest.approx(0.1)
    assert recorded_rate({"lr": 0.03}, 3.0) == pytest.approx(0.09)  # nothing scored: as asked
    assert recorded_rate(gn, 0.5) == pytest.approx(0.015)  # a reach below 1 is taken as asked
    for reach in (0.0, -1.0, math.inf, math.nan, "3"):
        with pytest.raises(ValueError, match="reach must be finite and > 0"):
            recorded_rate(gn, reach)
    for recipe in ({}, {"lr": 0.0}, {"lr": math.nan}, {"lr": "0.03"}, None):
        with pytest.raises(ValueError, match="learning rate 'lr' > 0"):
            recorded_rate(recipe, 3.0)


def test_record_takes_every_episode_and_fit_draws_more_tasks_from_few(fitted, caplog):
    backbone, eps, _ = fitted
    flow = HyperFlow(backbone, params="bias", hidden=32)
    ts = flow.record(eps[:4], trajectory_steps=3, progress=False, lr=1e-2)
    assert ts.episodes == 4 and ts.losses.shape == (4, 2)
    with caplog.at_level("WARNING", logger="hyperflow_ext.flow.hyperflow"):
        more = flow.record(eps[:4], tasks=6, trajectory_steps=3, progress=False, lr=1e-2)
    assert more.episodes == 6 and "drawing the other 2 as new support/query splits" in caplog.text
    torch.testing.assert_close(more.deltas[:4], ts.deltas)  # the given episodes first, unchanged
    assert not torch.allclose(more.z[4], ts.z[0])           # a new split of episode 0: another support set
    with pytest.raises(ValueError, match="tasks must be a positive int"):
        flow.record(eps, tasks=0, trajectory_steps=3, progress=False)


def test_a_backbone_without_flat_features_gets_a_clear_error():
    conv = nn.Sequential(nn.Conv2d(1, 4, 3))
    flow = HyperFlow(conv, params="bias")
    with pytest.raises(ValueError, match=r"\(n, d\) features"):
        flow.fit(_episodes(2), tasks=2, trajectory_steps=2, progress=False, lr=1e-2)


def test_tune_lr_matches_a_hand_made_grid_search(fitted):
    backbone, eps, _ = fitted
    grid = (1e-4, 3e-2, 3e-1)
    choice = tune_lr(backbone, eps, "bias", grid, tasks=4, steps=5)
    for lr in grid:
        hits = [float((finetune_adapt(backbone, sx, sy, "bias", 5, lr)(qx).argmax(-1) == qy).float().mean())
                for sx, sy, qx, qy in eps[:4]]
        assert choice.accuracy[lr] == pytest.approx(sum(hits) / 4, abs=1e-6)
    best = max(choice.accuracy.values())
    assert choice.accuracy[choice.lr] == best
    assert choice.lr == min(lr for lr in grid if choice.accuracy[lr] == best)
    assert 0.0 <= choice.unadapted <= 1.0 and math.isfinite(choice.loss_drop)
    with pytest.raises(ValueError, match="grid must hold"):
        tune_lr(backbone, eps, grid=(0.0,))
    with pytest.raises(ValueError, match="2 shots per class"):
        tune_lr(backbone, [ep[:2] for ep in _episodes(2, shot=1)])


def test_tune_lr_without_queries_leaves_shots_out(fitted):
    backbone, _, _ = fitted
    eps = _episodes(3, seed=4, shot=4)
    grid = (1e-3, 1e-1)
    without = tune_lr(backbone, [ep[:2] for ep in eps], "bias", grid, tasks=3, steps=4)
    split = [split_support(ep) for ep in eps]
    for sx, sy, qx, qy in split:  # half of each class's shots fine-tune, the rest score
        assert len(sy) == len(qy) == 6 and torch.equal(torch.bincount(sy), torch.bincount(qy))
    assert without.accuracy == tune_lr(backbone, split, "bias", grid, tasks=3, steps=4).accuracy


def test_the_chosen_recipe_is_saved_and_loaded(fitted, tmp_path):
    backbone, eps, flow = fitted
    assert flow.recipe["chosen_by"] == "tune_lr" and set(flow.recipe["accuracy"]) == {
        f"{lr:g}" for lr in (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)}
    path = tmp_path / "drift.safetensors"
    flow.save(path)
    loaded = HyperFlow.load(path, backbone)
    assert loaded.recipe == flow.recipe and loaded.task_radius == flow.task_radius
    sx, sy, qx, _ = eps[1]
    torch.testing.assert_close(fused_adapt(backbone, sx, sy, flow=loaded, steps=4)(qx),
                               fused_adapt(backbone, sx, sy, flow=flow, steps=4)(qx))


def test_fit_warns_when_fine_tuning_barely_moves_the_loss(fitted):
    backbone, eps, _ = fitted
    flow = HyperFlow(backbone, params="bias", hidden=32)
    with pytest.warns(RuntimeWarning, match="barely move"):
        flow.fit(eps, tasks=len(eps), trajectory_steps=3, interpolation="linear",
                 train_config=DriftTrainConfig(iters=2), progress=False, lr=1e-7)
    assert flow.recipe["chosen_by"] == "user" and flow.recipe["loss_drop"] < 0.05
    assert flow.recipe["augment"]["probability"] == 0.75  # capture shifts by default


def test_fit_warns_toward_a_smaller_rate_when_fine_tuning_raises_the_loss(fitted):
    backbone, eps, _ = fitted
    flow = HyperFlow(backbone, params="bias", hidden=32)
    with pytest.warns(RuntimeWarning, match=r"raises its loss by .* Pass a smaller lr="):
        flow.fit(eps, tasks=len(eps), trajectory_steps=3, interpolation="linear",
                 train_config=DriftTrainConfig(iters=2), progress=False, lr=30.0)
    assert flow.recipe["loss_drop"] < 0


def test_ood_guard_keeps_an_uninformed_task_at_theta0(fitted):
    backbone, eps, flow = fitted
    theta0 = flow.subset.vector(backbone)
    sx, sy, _, _ = eps[0]
    far = sx * 50.0 + 20.0  # a support set unlike any training task
    z_far, z_in = flow.encoder(far, sy), flow.encoder(sx, sy)
    assert float(flow.net.task_distance(z_far)) > 2 * flow.task_radius
    assert float(flow.net.task_distance(z_in)) <= flow.task_radius
    guarded = fused_adapt(backbone, far, sy, flow=flow, steps=5, ood_radius=2.0, select=False).theta
    torch.testing.assert_close(guarded, theta0, atol=0, rtol=0)
    free = fused_adapt(backbone, far, sy, flow=flow, steps=5, ood_radius=math.inf, select=False).theta
    assert not torch.equal(free, theta0)
    # in range: the guard changes nothing
    torch.testing.assert_close(
        fused_adapt(backbone, sx, sy, flow=flow, steps=5, ood_radius=2.0, select=False).theta,
        fused_adapt(backbone, sx, sy, flow=flow, steps=5, ood_radius=math.inf, select=False).theta)
    # flow_path applies the same factor; its end point is fused_adapt's
    path = flow_path(backbone, far, sy, flow, steps=5, ood_radius=2.0)
    torch.testing.assert_close(path[0, -1], theta0)
    with pytest.raises(ValueError, match="ood_radius must be > 1"):
        fused_adapt(backbone, sx, sy, flow=flow, ood_radius=1.0)


def test_a_far_task_is_adapted_by_default_and_the_criterion_decides(fitted):
    backbone, eps, flow = fitted
    theta0 = flow.subset.vector(backbone)
    sx, sy, _, _ = eps[0]
    far = sx * 50.0 + 20.0
    assert float(flow.net.task_distance(flow.encoder(far, sy))) > 2 * flow.task_radius
    plain = fused_adapt(backbone, far, sy, flow=flow, steps=5, select=False).theta  # no guard by default
    torch.testing.assert_close(plain, fused_adapt(backbone, far, sy, flow=flow, steps=5, select=False,
                                                  ood_radius=math.inf).theta)
    assert not torch.equal(plain, theta0)
    chosen = fused_adapt(backbone, far, sy, flow=flow, steps=5)
    sel = chosen.selection
    best = min(sel["scores"], key=lambda k: sel["scores"][k][2])
    clear = sel["scores"][best][2] <= sel["scores"]["none"][2] - SELECT_MARGIN
    assert sel["chosen"] == (best if clear else "none")
    with torch.no_grad():  # the unshrunk state is what the criterion scored
        want = loo_scores(features_with(backbone, flow.subset, plain, far), sy, metric=flow.metric, scale=flow.scale)
    assert max(abs(a - b) for a, b in zip(sel["scores"][f"flow@{flow.horizon:g}"], want)) < 1e-5
    if sel["chosen"].startswith(("flow@", "mean@")):
        assert not torch.equal(chosen.theta, theta0)


def test_ood_guard_shrinks_linearly_between_one_and_ood_radius(fitted):
    backbone, eps, flow = fitted
    sx, sy, _, _ = eps[0]
    theta0 = flow.subset.vector(backbone)
    free = fused_adapt(backbone, sx, sy, flow=flow, steps=5, ood_radius=math.inf, select=False).theta
    d = float(flow.net.task_distance(flow.encoder(sx, sy)))
    radius = flow.task_radius
    try:
        flow.task_radius = d / 1.5  # the task sits halfway between the radius and 2x the radius
        half = fused_adapt(backbone, sx, sy, flow=flow, steps=5, ood_radius=2.0, select=False).theta
    finally:
        flow.task_radius = radius
    torch.testing.assert_close(half - theta0, 0.5 * (free - theta0), atol=1e-6, rtol=1e-5)


def test_layer_statistics_match_a_hand_computed_reference_and_leave_no_hook(fitted):
    backbone, eps, _ = fitted
    flow = HyperFlow(backbone, params="bias", hidden=32, task_stats="layers")
    sx, sy, qx, qy = eps[0]
    flow._prepare(sx)
    assert flow.encoder.layers == ["0", "1", "4", "5", "9"]  # every module owning an adapted bias
    assert flow.encoder.layer_dims == [8, 8, 16, 16, 24]
    z = flow.encoder(sx, sy)
    assert z.shape == (1, flow.net.task_dim) and flow.net.task_dim == 5 * 24 + 1 + 2 * (8 + 8 + 16 + 16 + 24)
    final = HyperFlow(backbone, params="bias", hidden=32, task_stats="final")
    final._prepare(sx)
    torch.testing.assert_close(z[:, :final.net.task_dim], final.encoder(sx, sy))
    # reference: run the layers one by one and take channel means by hand
    acts, h = {}, sx
    with torch.no_grad():
        for name, mod in backbone.named_children():
            h = mod(h)
            acts[name] = h.mean(dim=(2, 3)) if h.dim() == 4 else h
    parts = []
    for name in flow.encoder.layers:
        m = acts[name]
        protos = torch.stack([m[sy == c].mean(0) for c in range(3)])
        parts += [m.mean(0), protos.std(0, unbiased=False)]
    torch.testing.assert_close(z[0, final.net.task_dim:], torch.cat(parts), atol=1e-5, rtol=1e-5)
    assert all(not m._forward_hooks for m in backbone.modules())


@pytest.mark.filterwarnings("ignore:HyperFlow.fit.*barely move")
def test_layer_statistics_flow_fits_adapts_and_round_trips(fitted, tmp_path):
    backbone, eps, _ = fitted
    flow = HyperFlow(backbone, params="bias", hidden=32, task_stats="layers")
    flow.fit(eps, tasks=len(eps), trajectory_steps=4, interpolation="linear", train_config=DriftTrainConfig(iters=10),
             progress=False, lr=3e-2)
    sx, sy, qx, _ = eps[2]
    out = fused_adapt(backbone, sx, sy, flow=flow, steps=4)(qx)
    flow.save(tmp_path / "layers.safetensors")
    loaded = HyperFlow.load(tmp_path / "layers.safetensors", backbone)
    assert loaded.task_stats == "layers" and loaded.encoder.layers == flow.encoder.layers
    torch.testing.assert_close(fused_adapt(backbone, sx, sy, flow=loaded, steps=4)(qx), out)
    with pytest.raises(ValueError, match="task_stats must be one of"):
        HyperFlow(backbone, task_stats="everything")


def test_support_statistics_baseline_matches_batchnorm_in_training_mode_and_keeps_the_buffers():
    backbone = _bn_backbone()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    sx, sy, qx, _ = _episodes(1)[0]
    model = support_statistics(backbone, sx, sy)
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())
    # reference: a copy whose BatchNorm layers took the support set's statistics (momentum 1)
    import copy
    ref = copy.deepcopy(backbone)
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = 1.0
    ref.train()
    sizes = {}  # values per channel behind each layer's statistics
    for name, m in ref.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_hook(lambda mod, a, out, name=name: sizes.__setitem__(name, a[0].numel() // a[0].shape[1]))
    with torch.no_grad():
        ref(sx)
    ref.eval()
    for name, m in ref.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            torch.testing.assert_close(model.buffers[f"{name}.running_mean"], m.running_mean)
            # the variance BatchNorm normalised with in training mode (biased), not the running update's
            n = sizes[name]
            torch.testing.assert_close(model.buffers[f"{name}.running_var"], m.running_var * (n - 1) / n)
            m.running_var.mul_((n - 1) / n)
    with torch.no_grad():
        feats_q, feats_s = ref(qx), ref(sx)
    protos = torch.stack([feats_s[sy == c].mean(0) for c in range(3)])
    expected = 10.0 * torch.nn.functional.normalize(feats_q, dim=-1) @ torch.nn.functional.normalize(protos, dim=-1).T
    torch.testing.assert_close(model(qx), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model(qx), direct_transfer(backbone, sx, sy)(qx))
    with pytest.raises(ValueError, match="no BatchNorm"):
        support_statistics(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten()), sx, sy)


def test_fit_refuses_a_bad_reach_or_augment_setting():
    backbone = _bn_backbone()
    for reach in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="reach must be finite and > 0"):
            HyperFlow(backbone, hidden=8).fit(_episodes(2), tasks=2, trajectory_steps=2, progress=False, reach=reach)
    with pytest.raises(ValueError, match="shifts must be names"):
        HyperFlow(backbone, hidden=8).fit(_episodes(2), tasks=2, trajectory_steps=2, progress=False, augment=["sepia"])

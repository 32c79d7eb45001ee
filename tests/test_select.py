"""fused_adapt's per-task choice: the leave-one-out criterion and the candidates it scores."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from _toy_tasks import episodes, tiny_flow
from hyperflow_ext.flow import DriftTrainConfig, HyperFlow, features_with, fused_adapt
from hyperflow_ext.flow.baselines import batch_statistics, support_statistics
from hyperflow_ext.flow.params import ParamSubset
from hyperflow_ext.flow.select import (CALIBRATION_SCALES, PSEUDO_MARGIN, SELECT_MARGIN, pseudo_shots, choose_candidate, loo_scores,
                                      loo_scores_many, select_adapt,
                                      selection_horizons)
from hyperflow_ext.flow.adapt import MEAN_SCALES
from hyperflow_ext.models import Conv4, proto_logits, prototypes


def _episodes(n, way=3, shot=3, seed=0):
    return episodes(n, way=way, shot=shot, seed=seed)


def _loo_reference(feats, labels, metric, scale):
    """Remove sample i, rebuild every prototype from what is left, classify sample i; the
    calibrated loss re-runs that at every calibration scale."""
    way = int(labels.max()) + 1

    def run(s):
        losses, hits = [], []
        for i in range(len(labels)):
            keep = torch.ones(len(labels), dtype=torch.bool)
            keep[i] = False
            protos = torch.stack([feats[keep & (labels == c)].mean(0) for c in range(way)])
            logits = proto_logits(feats[i:i + 1], protos, metric, s)
            losses.append(F.cross_entropy(logits, labels[i:i + 1]))
            hits.append(float(logits.argmax() == labels[i]))
        return float(torch.stack(losses).mean()), sum(hits) / len(hits)

    loss, acc = run(scale)
    scales = CALIBRATION_SCALES if metric == "cosine" else [scale * s / 10 for s in CALIBRATION_SCALES]
    return loss, acc, min(run(s)[0] for s in scales)


@pytest.mark.parametrize("metric,scale", [("cosine", 10.0), ("euclidean", 0.3)])
def test_loo_scores_match_a_reference(metric, scale):
    torch.manual_seed(0)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3])  # unequal shots
    feats = torch.randn(len(labels), 7, dtype=torch.float64) + labels[:, None].double() * 0.5
    loss, acc, cal = loo_scores(feats, labels, metric=metric, scale=scale)
    ref_loss, ref_acc, ref_cal = _loo_reference(feats, labels, metric, scale)
    assert abs(loss - ref_loss) < 1e-10 and abs(acc - ref_acc) < 1e-6 and abs(cal - ref_cal) < 1e-10
    assert cal <= loss + 1e-12  # the flow's own scale is among the calibration scales
    with pytest.raises(ValueError, match="at least 2"):
        loo_scores(feats[:-1], labels[:-1], metric=metric, scale=scale)


@pytest.mark.parametrize("metric,scale", [("cosine", 10.0), ("euclidean", 0.3)])
def test_batched_candidate_scores_equal_a_loop_over_candidates(metric, scale):
    torch.manual_seed(4)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    feats = torch.randn(5, len(labels), 6, dtype=torch.float64) + labels[:, None].double()
    feats[3] *= 40.0  # a candidate that spreads the features far apart: scored on its own terms
    batched = loo_scores_many(feats, labels, metric=metric, scale=scale)
    assert len(batched) == 5
    for k in range(5):
        ref_loss, ref_acc, ref_cal = _loo_reference(feats[k], labels, metric, scale)
        loss, acc, cal = batched[k]
        assert abs(loss - ref_loss) < 1e-10 and abs(acc - ref_acc) < 1e-9 and abs(cal - ref_cal) < 1e-10, k
        single = loo_scores(feats[k], labels, metric=metric, scale=scale)
        assert all(abs(a - b) < 1e-12 for a, b in zip(batched[k], single)), k


@pytest.fixture(scope="module")
def tiny():
    backbone, flow, _ = tiny_flow(shot=3)
    flow.horizon = 0.5
    return backbone, flow


def _candidate_thetas(backbone, flow, sx, sy):
    """Every candidate's parameters, each computed on its own (the oracle of the choice)."""
    theta0 = flow.subset.vector(backbone)
    out = {"none": theta0}
    for h in selection_horizons(flow.horizon):
        out[f"flow@{h:g}"] = fused_adapt(backbone, sx, sy, flow=flow, horizon=h, steps=int(round(50 * h / 0.5)),
                                         select=False).theta
    for s in MEAN_SCALES:
        out[f"mean@{s:g}"] = theta0 + s * flow.mean_delta
    return out


def expected_choice(scores):
    """The rule: the lowest calibrated loss, if it beats no adaptation by SELECT_MARGIN."""
    best = min(scores, key=lambda k: scores[k][2])
    return best if best == "none" or scores[best][2] <= scores["none"][2] - SELECT_MARGIN else "none"


def test_fused_adapt_scores_every_candidate_and_keeps_the_best(tiny):
    backbone, flow = tiny
    sx, sy = next(_episodes(1, seed=5))
    model = fused_adapt(backbone, sx, sy, flow=flow)
    sel = model.selection
    thetas = _candidate_thetas(backbone, flow, sx, sy)
    assert set(sel["scores"]) == set(thetas) == {"none", "flow@0.25", "flow@0.5", "mean@0.25"}
    for name, theta in thetas.items():  # each score is loo_scores of that candidate's own support features
        f = features_with(backbone, flow.subset, theta, sx)
        for got, want in zip(loo_scores(f, sy, metric=flow.metric, scale=flow.scale), sel["scores"][name]):
            assert abs(got - want) < 1e-5, name
    assert sel["chosen"] == expected_choice(sel["scores"])
    torch.testing.assert_close(model.theta, thetas[sel["chosen"]], rtol=1e-5, atol=1e-6)
    # without the margin the lowest loss wins outright; with a huge one nothing beats no adaptation
    cands = {k: (v, None) for k, v in thetas.items()}
    loose = choose_candidate(backbone, flow.subset, cands, sx, sy, 3, flow.metric, flow.scale, margin=0.0)
    assert loose.selection["chosen"] == min(sel["scores"], key=lambda k: sel["scores"][k][2])
    strict = choose_candidate(backbone, flow.subset, cands, sx, sy, 3, flow.metric, flow.scale, margin=1e9)
    assert strict.selection["chosen"] == "none"
    assert model(sx).shape == (len(sy), 3) and not model.theta.requires_grad


def test_a_stacked_batch_chooses_like_one_task_at_a_time(tiny):
    backbone, flow = tiny
    eps = list(_episodes(4, seed=11))
    sx, sy = torch.stack([e[0] for e in eps]), torch.stack([e[1] for e in eps])
    batched = fused_adapt(backbone, sx, sy, flow=flow)
    singles = [fused_adapt(backbone, x, y, flow=flow) for x, y, *_ in eps]
    assert [s["chosen"] for s in batched.selection] == [m.selection["chosen"] for m in singles]
    torch.testing.assert_close(batched.theta, torch.stack([m.theta for m in singles]), rtol=1e-5, atol=1e-6)
    as_list = fused_adapt(backbone, [e[0] for e in eps], [e[1] for e in eps], flow=flow)
    assert [m.selection["chosen"] for m in as_list] == [m.selection["chosen"] for m in singles]


def test_fused_adapt_keeps_theta0_when_the_drift_is_uninformed(tiny):
    backbone, flow = tiny
    wild = copy.deepcopy(flow)
    wild.net.drift_scale.mul_(1e4)   # a drift that throws the biases far off
    wild.mean_delta = flow.mean_delta * 1e4
    wild._clear_caches()
    theta0 = flow.subset.vector(backbone)
    for sx, sy, *_ in _episodes(4, seed=9):
        model = fused_adapt(backbone, sx, sy, flow=wild, guard=math.inf)  # the criterion alone must catch it
        assert model.selection["chosen"] == "none", model.selection
        best = model.selection["scores"]["none"]
        assert all(s[2] > best[2] for k, s in model.selection["scores"].items() if k != "none")
        torch.testing.assert_close(model.theta, theta0)


def test_one_shot_scores_the_candidates_on_the_support_set_and_its_shifted_views(tiny):
    backbone, flow = tiny
    sx, sy = next(_episodes(1, shot=1, seed=3))
    model = fused_adapt(backbone, sx, sy, flow=flow)
    sel = model.selection
    thetas = _candidate_thetas(backbone, flow, sx, sy)
    assert set(sel["scores"]) == set(thetas)
    views, labels = torch.cat([sx, torch.roll(sx, (1, 1), (2, 3))]), torch.cat([sy, sy])
    for name, theta in thetas.items():  # scored on the images and their one-pixel shifts, two shots per class
        f = features_with(backbone, flow.subset, theta, views)
        for got, want in zip(loo_scores(f, labels, metric=flow.metric, scale=flow.scale), sel["scores"][name]):
            assert abs(got - want) < 1e-5, name
    best = min(sel["scores"], key=lambda k: sel["scores"][k][2])
    keep = best == "none" or sel["scores"][best][2] <= sel["scores"]["none"][2] - PSEUDO_MARGIN
    assert sel["chosen"] == (best if keep else "none")
    torch.testing.assert_close(model.theta, thetas[sel["chosen"]], rtol=1e-5, atol=1e-6)
    # prototypes come from the real support set only
    torch.testing.assert_close(model.prototypes(), prototypes(features_with(backbone, flow.subset, model.theta, sx),
                                                              sy, 3))
    with pytest.raises(TypeError, match="select"):
        fused_adapt(backbone, sx, sy, flow=flow, select="yes")


def test_one_shot_without_images_to_shift_keeps_the_state_at_the_horizon(tiny):
    backbone, flow = tiny
    sx, sy = next(_episodes(1, shot=1, seed=3))
    assert pseudo_shots(sx[..., :3, :3]) is None and pseudo_shots(sx.flatten(1)) is None
    cands = {"none": (flow.subset.vector(backbone), None), "flow@0.5": (flow.subset.vector(backbone) + 0.1, None)}
    chosen = choose_candidate(backbone, flow.subset, cands, sx, sy, 3, flow.metric, flow.scale, fallback="flow@0.5")
    assert chosen.selection == {"chosen": "flow@0.5", "scores": {}}
    with pytest.raises(ValueError, match="pseudo_x must have"):
        choose_candidate(backbone, flow.subset, cands, sx, sy, 3, pseudo_x=sx[:-1])


def test_select_adapt_is_a_deprecated_alias(tiny):
    backbone, flow = tiny
    sx, sy = next(_episodes(1, seed=5))
    with pytest.warns(DeprecationWarning, match="fused_adapt"):
        model = select_adapt(backbone, sx, sy, flow)
    torch.testing.assert_close(model.theta, fused_adapt(backbone, sx, sy, flow=flow).theta)


def test_support_statistics_are_a_candidate_on_batchnorm():
    torch.manual_seed(0)
    backbone = Conv4(hidden=8, norm="batch").eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    flow = HyperFlow(backbone, params="bias", hidden=16)
    ts = flow.record(_episodes(6), tasks=6, trajectory_steps=4, progress=False, lr=5e-2)
    flow.fit(trajectories=ts, train_config=DriftTrainConfig(iters=10, eval_every=5), progress=False)
    sx, sy = next(_episodes(1, seed=4))
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = fused_adapt(backbone, sx, sy, flow=flow)
    stats = support_statistics(backbone, sx, sy, flow.metric, flow.scale)
    f = features_with(backbone, flow.subset, stats.theta, sx, buffers=stats.buffers)
    want = loo_scores(f, sy, metric=flow.metric, scale=flow.scale)
    assert max(abs(a - b) for a, b in zip(model.selection["scores"]["support statistics"], want)) < 1e-5
    assert "aligned" not in model.selection["scores"]  # no reference recorded: no aligned candidate
    # a stacked batch holds one set of buffers: parameter candidates only
    stacked = fused_adapt(backbone, sx[None], sy[None], flow=flow)
    assert "support statistics" not in stacked.selection[0]["scores"]
    # with a reference, the BatchNorm biases are aligned only where support statistics are not offered
    flow.record_reference(_episodes(4, seed=6))
    single = fused_adapt(backbone, sx, sy, flow=flow).selection["scores"]
    assert "support statistics" in single and "aligned" not in single
    stacked = fused_adapt(backbone, sx[None], sy[None], flow=flow).selection[0]["scores"]
    assert "aligned" in stacked and "support statistics" not in stacked
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_batch_statistics_give_the_features_of_their_own_forward():
    torch.manual_seed(2)
    backbone = Conv4(hidden=8, norm="batch").eval()
    x = 0.5 * torch.rand(9, 1, 16, 16) + 0.3
    stats, feats = batch_statistics(backbone, x)
    subset = ParamSubset(backbone, "bias")
    again = features_with(backbone, subset, subset.vector(backbone), x, buffers=stats)
    torch.testing.assert_close(again, feats, atol=1e-5, rtol=1e-5)  # eval mode with them = that forward
    first = next(m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not torch.equal(stats["features.1.running_mean"], first.running_mean)


class _Residual(torch.nn.Module):
    """BatchNorm in a residual branch and after the sum; one BatchNorm layer never runs."""

    def __init__(self, shared: bool = False, running: bool = True):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(1, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.ReLU())
        self.branch = torch.nn.Sequential(torch.nn.Conv2d(6, 6, 3, padding=1),
                                          torch.nn.BatchNorm2d(6, track_running_stats=running))
        self.post = self.stem[1] if shared else torch.nn.BatchNorm2d(6)
        self.unused = torch.nn.BatchNorm2d(6)
        self.head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(24, 10),
                                        torch.nn.BatchNorm1d(10))

    def forward(self, x):
        h = self.stem(x)
        return self.head(torch.relu(self.post(h + self.branch(h))))


def _randomised(backbone):
    for m in backbone.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    return backbone.eval()


@pytest.mark.parametrize("make", [lambda: Conv4(hidden=8, norm="batch"), _Residual],
                         ids=["conv4", "residual"])
@pytest.mark.parametrize("parts", [2, 5, 9])
def test_batch_statistics_in_parts_are_those_of_the_whole_batch(make, parts):
    torch.manual_seed(3)
    backbone = _randomised(make())
    x = torch.rand(9, 1, 16, 16) * 2 + 0.5  # means far from zero: the pooled variance must not cancel
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    whole, feats = batch_statistics(backbone, x)
    split, split_feats = batch_statistics(backbone, x, parts=parts)
    assert split.keys() == whole.keys()
    for k in whole:
        torch.testing.assert_close(split[k], whole[k], atol=1e-5, rtol=1e-5, msg=k)
    torch.testing.assert_close(split_feats, feats, atol=1e-4, rtol=1e-4)
    if make is _Residual:  # a layer the forward never reaches keeps the fresh buffers, as in one forward
        assert torch.equal(split["unused.running_mean"], torch.zeros(6))
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("kind", ["shared", "no running statistics"])
def test_batch_statistics_in_parts_fall_back_to_one_forward(kind):
    """A BatchNorm called twice, or one normalising each batch by itself, has no exact statistics
    from parts: the whole batch runs instead, with the same result."""
    torch.manual_seed(4)
    backbone = _randomised(_Residual(shared=kind == "shared", running=kind != "shared"))
    x = torch.rand(8, 1, 8, 8) + 0.5
    whole, feats = batch_statistics(backbone, x)
    split, split_feats = batch_statistics(backbone, x, parts=4)
    for k in whole:
        torch.testing.assert_close(split[k], whole[k], msg=k)
    torch.testing.assert_close(split_feats, feats)


@pytest.mark.parametrize("parts", [0, -1, 1.5, True])
def test_batch_statistics_reject_bad_parts(parts):
    with pytest.raises(ValueError, match="parts"):
        batch_statistics(Conv4(hidden=4, norm="batch").eval(), torch.rand(4, 1, 8, 8), parts=parts)


def test_low_memory_adaptation_chooses_and_scores_like_the_default():
    torch.manual_seed(0)
    backbone = Conv4(hidden=8, norm="batch").eval()
    flow = HyperFlow(backbone, params="bias", hidden=16)
    ts = flow.record(_episodes(6), tasks=6, trajectory_steps=4, progress=False, lr=5e-2)
    flow.fit(trajectories=ts, train_config=DriftTrainConfig(iters=10, eval_every=5), progress=False)
    flow.record_reference(_episodes(4, seed=6))
    for sx, sy in _episodes(3, seed=7):
        fast = fused_adapt(backbone, sx, sy, flow=flow)
        lean = fused_adapt(backbone, sx, sy, flow=flow, low_memory=True)
        assert lean.selection["chosen"] == fast.selection["chosen"]
        assert lean.selection["scores"].keys() == fast.selection["scores"].keys()
        for name, score in fast.selection["scores"].items():
            assert max(abs(a - b) for a, b in zip(lean.selection["scores"][name], score)) < 1e-4, name
        torch.testing.assert_close(lean(sx), fast(sx), atol=1e-4, rtol=1e-4)
    with pytest.raises(TypeError, match="low_memory"):
        fused_adapt(backbone, sx, sy, flow=flow, low_memory="yes")


@pytest.mark.parametrize("shape", [(9, 6, 5, 5), (3, 4, 7), (2, 5), (1, 3, 4, 4)])
def test_channel_moments_match_a_float64_reference(shape):
    from hyperflow_ext.flow.baselines import _channel_moments

    torch.manual_seed(6)
    x = torch.randn(shape) * 0.1 + 3.0  # a mean far from zero: the deviations must not cancel
    count, mean, m2 = _channel_moments(x)
    dims = [d for d in range(x.dim()) if d != 1]
    var, ref_mean = torch.var_mean(x.double(), dim=dims, unbiased=False)
    assert count == x.numel() // x.shape[1]
    assert mean.dtype == m2.dtype == torch.float64
    torch.testing.assert_close(mean, ref_mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(m2 / count, var, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("drift_pays", [None, False, True])
def test_the_mean_displacement_is_a_candidate_unless_the_drift_pays(tiny, drift_pays):
    """The mean meta-training displacement is the fallback of a drift whose state did not beat the
    unadapted model in tune_horizon (or was never measured): offered then, left out when it did."""
    backbone, flow = tiny
    sx, sy = next(_episodes(1, seed=5))
    before = flow.drift_pays
    try:
        flow.drift_pays = None
        everything = fused_adapt(backbone, sx, sy, flow=flow).selection["scores"]
        flow.drift_pays = drift_pays
        scores = fused_adapt(backbone, sx, sy, flow=flow).selection["scores"]
    finally:
        flow.drift_pays = before
    means = {f"mean@{s:g}" for s in MEAN_SCALES}
    assert means and means <= set(everything)
    assert set(scores) == (set(everything) - means if drift_pays else set(everything))
    for name in scores:  # the other candidates are scored exactly as before
        assert scores[name] == everything[name]


class _Guarded(torch.nn.Module):
    """A backbone that wraps its forward in ``except Exception`` (it must not swallow the stop of a
    round in parts) and ends in a BatchNorm1d."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.BatchNorm1d(4))

    def forward(self, x):
        try:
            return self.body(x)
        except Exception:  # noqa: BLE001 - the pattern under test
            return torch.zeros(x.shape[0], 4)


def test_batch_statistics_in_parts_stay_exact_on_a_backbone_that_catches_exceptions():
    torch.manual_seed(7)
    backbone = _randomised(_Guarded())
    x = torch.rand(8, 1, 6, 6) + 0.5
    whole, feats = batch_statistics(backbone, x)
    split, split_feats = batch_statistics(backbone, x, parts=4)
    for k in whole:
        torch.testing.assert_close(split[k], whole[k], atol=1e-5, rtol=1e-5, msg=k)
    torch.testing.assert_close(split_feats, feats, atol=1e-4, rtol=1e-4)
    assert feats.abs().sum() > 0


def test_batch_statistics_refuse_one_value_per_channel():
    backbone = _randomised(_Guarded()).body  # no guard: the error must reach the caller
    with pytest.raises(ValueError, match="one value per channel"):
        batch_statistics(backbone, torch.rand(1, 1, 6, 6))

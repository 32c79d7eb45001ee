"""select_adapt: the leave-one-out criterion and the per-task choice among adapted candidates."""
import copy

import pytest
import torch
import torch.nn.functional as F

from _toy_tasks import episodes
from hyperflow_ext.flow import DriftTrainConfig, HyperFlow, features_with, flow_path, fused_adapt
from hyperflow_ext.flow.select import CALIBRATION_SCALES, loo_scores, select_adapt
from hyperflow_ext.models import Conv4, proto_logits


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


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    backbone = Conv4(hidden=8, groups=2).eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    flow = HyperFlow(backbone, params="bias", hidden=32)
    ts = flow.record(_episodes(12), tasks=12, trajectory_steps=8, progress=False, lr=5e-2)
    flow.fit(trajectories=ts, interpolation="cubic", train_config=DriftTrainConfig(iters=60, eval_every=20),
             progress=False)
    flow.horizon = 0.5
    return backbone, flow


def test_select_adapt_scores_every_candidate_and_keeps_the_best(tiny):
    backbone, flow = tiny
    sx, sy = next(_episodes(1, seed=5))
    model = select_adapt(backbone, sx, sy, flow, horizons=(0.0, 0.5, 1.0))
    sel = model.selection
    assert set(sel["scores"]) == {"h=0", "h=0.25", "h=0.5"}  # relative to the tuned horizon 0.5
    assert sel["scores"][sel["chosen"]][2] == min(s[2] for s in sel["scores"].values())
    # each score is loo_scores of that candidate's support features; the states are flow_path's
    path = flow_path(backbone, sx, sy, flow, steps=50, horizon=0.5)[0]
    for name, k in (("h=0", 0), ("h=0.25", 25), ("h=0.5", 50)):
        f = features_with(backbone, flow.subset, path[k], sx)
        for got, want in zip(loo_scores(f, sy, metric=flow.metric, scale=flow.scale), sel["scores"][name]):
            assert abs(got - want) < 1e-5
    torch.testing.assert_close(model.theta, path[{"h=0": 0, "h=0.25": 25, "h=0.5": 50}[sel["chosen"]]])
    assert model(sx).shape == (len(sy), 3) and not model.theta.requires_grad
    for criterion, key in (("loss", lambda s: s[0]), ("accuracy", lambda s: (-s[1], s[0]))):
        sel = select_adapt(backbone, sx, sy, flow, criterion=criterion).selection
        assert sel["chosen"] == min(sel["scores"], key=lambda k: key(sel["scores"][k]))


def test_select_adapt_keeps_theta0_when_the_drift_is_uninformed(tiny):
    backbone, flow = tiny
    wild = copy.deepcopy(flow)
    wild.net.drift_scale.mul_(1e4)   # a drift that throws the biases far off
    wild._clear_caches()
    wild.task_radius = float("inf")  # no out-of-range shrinking: the criterion alone must catch it
    theta0 = flow.subset.vector(backbone)
    for sx, sy in _episodes(4, seed=9):
        model = select_adapt(backbone, sx, sy, wild, horizons=(0.0, 0.5, 1.0, 1.5))
        assert model.selection["chosen"] == "h=0", model.selection
        theta0_score = model.selection["scores"]["h=0"]
        assert all(s[2] > theta0_score[2] and s[1] < theta0_score[1]   # clearly worse, not a tie
                   for k, s in model.selection["scores"].items() if k != "h=0")
        torch.testing.assert_close(model.theta, theta0)
        for criterion in ("accuracy", "loss", "calibrated"):
            assert select_adapt(backbone, sx, sy, wild, criterion=criterion).selection["chosen"] == "h=0"


def test_select_adapt_falls_back_at_one_shot_and_checks_arguments(tiny):
    backbone, flow = tiny
    sx, sy = next(_episodes(1, shot=1, seed=3))
    model = select_adapt(backbone, sx, sy, flow)
    assert model.selection == {"chosen": "h=0.5", "scores": {}}
    torch.testing.assert_close(model.theta, fused_adapt(backbone, sx, sy, flow=flow).theta)
    sx, sy = next(_episodes(1, seed=3))
    with pytest.raises(ValueError, match="criterion"):
        select_adapt(backbone, sx, sy, flow, criterion="queries")
    with pytest.raises(ValueError, match="horizons"):
        select_adapt(backbone, sx, sy, flow, horizons=(0.0,))
    with pytest.raises(NotImplementedError):
        select_adapt(backbone, sx[None], sy[None], flow)


def test_select_adapt_offers_support_statistics_on_batchnorm():
    torch.manual_seed(0)
    backbone = Conv4(hidden=8, norm="batch").eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    flow = HyperFlow(backbone, params="bias", hidden=16)
    ts = flow.record(_episodes(6), tasks=6, trajectory_steps=4, progress=False, lr=5e-2)
    flow.fit(trajectories=ts, train_config=DriftTrainConfig(iters=10, eval_every=5), progress=False)
    sx, sy = next(_episodes(1, seed=4))
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = select_adapt(backbone, sx, sy, flow)
    assert "support statistics" in model.selection["scores"]
    assert "support statistics" not in select_adapt(backbone, sx, sy, flow, support_stats=False).selection["scores"]
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, before[k]), k

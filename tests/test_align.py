"""Channel alignment (hyperflow_ext.flow.align) and its place among fused_adapt's candidates."""
import copy

import pytest
import torch
from torch import nn

from _toy_tasks import episodes, tiny_flow
from hyperflow_ext.flow import DriftTrainConfig, HyperFlow, fused_adapt, loo_scores
from hyperflow_ext._stateless import stateless_view
from hyperflow_ext.flow.align import NormMeanProbe, align_to_reference, aligned_norms, norm_output_means, reference_means
from hyperflow_ext.flow.params import ParamSubset
from hyperflow_ext.flow.select import support_features
from hyperflow_ext.models import Conv4


def _norm_means(model, subset, theta, x):
    """Each aligned norm layer's channel means in a plain forward with ``theta`` substituted (the oracle)."""
    norms = aligned_norms(model, subset)
    got = {}
    trial = copy.deepcopy(model)  # the hooks and the substituted θ live on a copy, never on the user's model
    for name, module in trial.named_modules():
        if name in norms:
            dim = norms[name][2]
            module.register_forward_hook(lambda m, a, out, name=name, dim=dim: got.__setitem__(
                name, out.movedim(dim, -1).reshape(-1, out.shape[dim]).double().mean(0)))
    named = dict(trial.named_parameters())
    with torch.no_grad():
        for n, v in subset.unflatten(theta).items():
            named[n].copy_(v)
    trial.requires_grad_(True)
    trial(x)  # with autograd on, so Conv4 runs its norm modules (and these hooks) instead of a fused kernel
    return got


class TokenMixer(nn.Module):
    """A transformer-ish backbone: LayerNorm over the last dim of (n, tokens, C) maps."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(16, 12)
        self.norm1 = nn.LayerNorm(12)
        self.mix = nn.Linear(12, 12)
        self.norm2 = nn.LayerNorm(12)

    def forward(self, x):
        t = self.embed(x.flatten(1, 2))                # (n, 1, 16, 16) -> (n, 16 rows, 12)
        t = torch.relu(self.norm1(t))
        return self.norm2(self.mix(t)).mean(dim=1)


MODELS = [lambda: Conv4(hidden=8, groups=2), lambda: Conv4(hidden=8, norm="batch"), TokenMixer]
MODEL_IDS = ["groupnorm", "batchnorm", "layernorm"]


@pytest.mark.parametrize("make", MODELS, ids=MODEL_IDS)
def test_alignment_moves_each_norm_bias_by_reference_minus_its_mean_at_theta0(make):
    torch.manual_seed(0)
    model = make().eval()
    subset = ParamSubset(model, "bias")
    norms = aligned_norms(model, subset)
    assert norms and all(f"{n}.bias" in subset.names for n in norms)
    before = copy.deepcopy(model.state_dict())
    meta = [torch.rand(6, 1, 16, 16) for _ in range(3)]
    ref = reference_means(model, subset, meta)
    support = 0.3 * torch.rand(6, 1, 16, 16) + 0.6  # a contrast shift away from the reference images
    theta0 = subset.vector(model)
    theta = align_to_reference(model, subset, theta0, ref, support, parts=3)
    at0 = _norm_means(model, subset, theta0, support)
    got = _norm_means(model, subset, theta, support)
    first = next(iter(norms))  # nothing before it moves: its mean lands exactly on the reference
    for name, (offset, channels, _) in norms.items():
        shift = (theta - theta0)[offset:offset + channels].double()
        torch.testing.assert_close(shift, ref[offset:offset + channels].double() - at0[name], atol=2e-5, rtol=0)
        if name == first:
            torch.testing.assert_close(got[name], ref[offset:offset + channels].double(), atol=2e-5, rtol=0)
    other = torch.ones(subset.numel, dtype=torch.bool)
    for offset, channels, _ in norms.values():
        other[offset:offset + channels] = False
    assert torch.equal(theta[other], theta0[other]) and not torch.equal(theta, theta0)
    for k, v in model.state_dict().items():  # the user's model is read, never written
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("norm", [nn.GroupNorm(2, 6), nn.GroupNorm(3, 6).train(), nn.BatchNorm2d(6).eval(),
                                  nn.BatchNorm2d(6).train(), nn.BatchNorm1d(6).eval(),
                                  nn.InstanceNorm2d(6, affine=True), nn.LayerNorm(6)],
                         ids=["gn", "gn-train", "bn-eval", "bn-train", "bn1d-eval", "instancenorm", "layernorm"])
def test_norm_output_means_match_the_output_without_computing_it(norm):
    torch.manual_seed(2)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.normal_()
        if getattr(norm, "running_mean", None) is not None:
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 2.0)
    shape = (5, 7, 6) if isinstance(norm, nn.LayerNorm) else (5, 6) if isinstance(norm, nn.BatchNorm1d) else (5, 6, 4, 3)
    x = 3 * torch.randn(shape) + 1
    x = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
    with torch.no_grad():
        out = norm(x).double()
    want = out.mean(dim=1) if isinstance(norm, nn.LayerNorm) else out.flatten(2).mean(-1) if out.dim() > 2 else out
    torch.testing.assert_close(norm_output_means(norm, x), want, atol=1e-5, rtol=1e-5)


def test_the_probe_reads_conv4s_fused_groupnorm_kernel_as_the_module_would():
    torch.manual_seed(3)
    model = Conv4(hidden=8, groups=2).eval()
    subset = ParamSubset(model, "bias")
    x = torch.rand(6, 1, 16, 16)
    fused, plain = NormMeanProbe(model, subset), NormMeanProbe(model, subset)
    with torch.no_grad():  # no autograd: Conv4 normalises in place with its native kernel
        stateless_view(model, forward_pre_hooks=fused.hooks)(x)
    with torch.enable_grad():  # autograd on: the GroupNorm modules run
        stateless_view(model, forward_pre_hooks=plain.hooks)(x)
    torch.testing.assert_close(fused.means(6, tasks=2), plain.means(6, tasks=2), atol=1e-6, rtol=0)
    assert not any(m._forward_pre_hooks for m in model.modules())  # the hooks lived in the views only
    assert fused.means(6).abs().sum() > 0


def test_reference_means_are_the_channel_means_at_theta0():
    torch.manual_seed(1)
    model = Conv4(hidden=8, groups=2).eval()
    subset = ParamSubset(model, "bias")
    meta = [torch.rand(4, 1, 16, 16), torch.rand(8, 1, 16, 16)]
    ref = reference_means(model, subset, meta)
    want = _norm_means(model, subset, subset.vector(model), torch.cat(meta))
    for name, (offset, channels, _) in aligned_norms(model, subset).items():
        torch.testing.assert_close(ref[offset:offset + channels].double(), want[name], atol=1e-5, rtol=0)
    # aligning the reference images themselves leaves θ_0 where it is
    theta = align_to_reference(model, subset, subset.vector(model), ref, torch.cat(meta))
    torch.testing.assert_close(theta, subset.vector(model), atol=1e-5, rtol=0)


def test_no_adapted_norm_bias_means_no_reference_and_a_shared_norm_is_refused():
    model = Conv4(hidden=8, groups=2).eval()
    convs_only = ParamSubset(model, [n for n, _ in model.named_parameters() if n.endswith("0.bias")])
    assert aligned_norms(model, convs_only) == {}
    assert reference_means(model, convs_only, [torch.rand(2, 1, 16, 16)]) is None

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(16)

        def forward(self, x):
            return self.norm(self.norm(x.flatten(1, 2))).mean(1)

    twice = Twice()
    subset = ParamSubset(twice, "bias")
    with pytest.raises(ValueError, match="runs twice"):
        reference_means(twice, subset, [torch.rand(2, 1, 16, 16)])
    with pytest.raises(ValueError, match="no images"):
        reference_means(model, ParamSubset(model, "bias"), [])
    with pytest.raises(ValueError, match="no norm layer"):
        align_to_reference(model, convs_only, convs_only.vector(model), torch.zeros(convs_only.numel),
                           torch.rand(2, 1, 16, 16))


def test_fused_adapt_offers_the_aligned_candidate_and_the_checkpoint_keeps_its_reference(tmp_path):
    backbone, flow, _ = tiny_flow(shot=3)
    assert flow.reference_means is None  # fit from trajectories alone: no images to take a reference from
    flow.record_reference(episodes(8, shot=3, seed=3))
    sx, sy = next(episodes(1, shot=3, seed=9))
    sx = 0.5 * sx + 0.4  # a contrast shift
    model = fused_adapt(backbone, sx, sy, flow=flow)
    scores = model.selection["scores"]
    theta = align_to_reference(backbone, flow.subset, flow.subset.vector(backbone), flow.reference_means, sx)
    want = loo_scores(support_features(backbone, flow.subset, theta, sx), sy, 3, flow.metric, flow.scale)
    assert "aligned" in scores
    for got, exp in zip(scores["aligned"], want):
        assert abs(got - exp) < 1e-4
    if model.selection["chosen"] == "aligned":
        torch.testing.assert_close(model.theta, theta)
    path = tmp_path / "flow.safetensors"
    flow.save(path)
    loaded = HyperFlow.load(path, backbone)
    torch.testing.assert_close(loaded.reference_means, flow.reference_means, rtol=0, atol=0)
    tensors, meta = flow.state()
    tensors["reference_means"] = tensors["reference_means"][:-1]
    from hyperflow_ext._io import save_tensors
    save_tensors(tmp_path / "bad.safetensors", tensors, meta)
    with pytest.raises(ValueError, match="reference_means of shape"):
        HyperFlow.load(tmp_path / "bad.safetensors", backbone)
    again = fused_adapt(backbone, sx, sy, flow=loaded)
    assert again.selection["chosen"] == model.selection["chosen"]


def test_fused_adapt_skips_alignment_it_cannot_do_and_keeps_the_other_candidates():
    class SharedNorm(nn.Module):  # one GroupNorm applied twice: its bias cannot take one shift per use
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.norm = nn.GroupNorm(2, 4)

        def forward(self, x):
            return torch.relu(self.norm(torch.relu(self.norm(self.conv(x))))).mean(dim=(2, 3))

    torch.manual_seed(0)
    backbone = SharedNorm().eval()
    flow = HyperFlow(backbone, params="bias", hidden=16)
    ts = flow.record(episodes(6, shot=3), tasks=6, trajectory_steps=4, progress=False, lr=5e-2)
    flow.fit(trajectories=ts, train_config=DriftTrainConfig(iters=10, eval_every=5), progress=False)
    flow.reference_means = torch.zeros(flow.subset.numel)
    sx, sy = next(episodes(1, shot=3, seed=9))
    with pytest.warns(RuntimeWarning, match="no aligned candidate.*runs twice"):
        model = fused_adapt(backbone, sx, sy, flow=flow)
    assert "aligned" not in model.selection["scores"] and "none" in model.selection["scores"]

"""Hyperflows pruning: masked layers, STE gradients, pruner training, scheduler, power law, export."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hyperflow_ext.prune import (MaskedConv2d, MaskedLinear, PowerLaw, PressureScheduler, Pruner, fit_power_law,
                                 keep_trajectory, magnitude_prune)
from hyperflow_ext.prune._loop import TensorLoader, evaluate, predict
from hyperflow_ext.prune.cnns import magnitude_masks
from hyperflow_ext.sparse import SparseConv2d, SparseLinear


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def blobs(n=512, d=16, k=8, noise=2.0, seed=0):
    """Overlapping Gaussian blobs: hard enough that the network needs its weights."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * 2
    y = torch.randint(0, k, (n,), generator=g)
    return centers[y] + noise * torch.randn(n, d, generator=g), y


def mlp(d=16, h=64, k=8):
    return nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, k))


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def image_data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.rand(n, 1, 8, 8, generator=g) * 0.3
    for c in range(3):
        x[y == c, :, 2 * c:2 * c + 3, :] += 0.7
    return x, y


def randomise_scores(layer, p_active=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.scores.copy_(torch.rand(layer.scores.shape, generator=g) - (1 - p_active))


# --------------------------------------------------------------------------- masked layers
def test_masked_linear_forward_equals_dense_with_masked_weight():
    lin = nn.Linear(20, 7)
    m = MaskedLinear.from_linear(lin)
    assert m.weight is lin.weight and m.bias is lin.bias
    assert m.density() == 1.0 and ((m.scores >= 0.2) & (m.scores <= 0.5)).all()
    randomise_scores(m, 0.4)
    x = torch.randn(5, 3, 20)
    ref = F.linear(x, lin.weight * m.mask(), lin.bias)
    torch.testing.assert_close(m(x), ref)
    assert 0.0 < m.density() < 1.0
    assert "density=" in repr(m) and "in_features=20" in repr(m)


def test_masked_conv2d_forward_equals_dense_with_masked_weight():
    conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
    m = MaskedConv2d.from_conv2d(conv)
    randomise_scores(m, 0.3)
    x = torch.randn(2, 3, 9, 9)
    ref = F.conv2d(x, conv.weight * m.mask(), conv.bias, 2, 1)
    torch.testing.assert_close(m(x), ref)
    assert "kernel_size=(3, 3)" in repr(m)


def test_masked_layers_construct_like_torch_nn():
    m = MaskedLinear(8, 4, bias=False)
    assert m.bias is None and m.weight.shape == (4, 8) and m.flow.shape == (4, 8)
    c = MaskedConv2d(2, 4, 3, padding=1, groups=2)
    assert c.weight.shape == (4, 1, 3, 3)
    assert c(torch.randn(1, 2, 5, 5)).shape == (1, 4, 5, 5)
    names = {n for n, _ in m.named_parameters()}
    assert names == {"weight", "scores"}
    assert "flow" in m.state_dict() and "grad_eff" not in m.state_dict()


@pytest.mark.parametrize("shape", [(2, 4), (3, 2, 4)])
def test_masked_linear_output_supports_inplace_activation(shape):
    model = nn.Sequential(MaskedLinear(4, 3), nn.ReLU(inplace=True))
    model(torch.randn(*shape)).sum().backward()
    assert model[0].scores.grad is not None


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_ste_gradients_reach_pruned_scores(kind):
    if kind == "linear":
        dense = nn.Linear(12, 5)
        layer = MaskedLinear.from_linear(dense)
        x = torch.randn(6, 12)
        fn = lambda w: F.linear(x, w, dense.bias)  # noqa: E731
    else:
        dense = nn.Conv2d(2, 3, 3, padding=1)
        layer = MaskedConv2d.from_conv2d(dense)
        x = torch.randn(2, 2, 6, 6)
        fn = lambda w: F.conv2d(x, w, dense.bias, 1, 1)  # noqa: E731
    randomise_scores(layer, 0.5)
    mask = layer.mask()
    assert mask.any() and (~mask).any()
    target = torch.randn_like(layer(x))
    # reference: G = dL/d(W⊙m) from plain autograd on the effective weight
    w_eff = (dense.weight.detach() * mask).requires_grad_(True)
    ((fn(w_eff) - target) ** 2).sum().backward()
    G = w_eff.grad
    layer.track_grad_eff(True)
    ((layer(x) - target) ** 2).sum().backward()
    torch.testing.assert_close(layer.weight.grad, G * mask)
    torch.testing.assert_close(layer.scores.grad, 0.25 * dense.weight.detach() * G)
    torch.testing.assert_close(layer.grad_eff, G)
    pruned = ~mask
    assert (layer.scores.grad[pruned] != 0).any()   # pruned weights still receive their flow
    assert (layer.weight.grad[pruned] == 0).all()


# --------------------------------------------------------------------------- pruner: validation
def test_bad_inputs_raise_clear_errors():
    with pytest.raises(TypeError, match="nn.Module"):
        Pruner("not a model", target_sparsity=0.5)
    for bad in (1.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="target_sparsity"):
            Pruner(mlp(), target_sparsity=bad)
    with pytest.raises(TypeError, match="target_sparsity"):
        Pruner(mlp(), target_sparsity="0.9")
    with pytest.raises(ValueError, match="nothing to prune"):
        Pruner(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), target_sparsity=0.5)
    with pytest.raises(ValueError, match="nothing to prune"):
        Pruner(mlp(), target_sparsity=0.5, exclude=nn.Linear)
    with pytest.raises(ValueError, match="exactly one"):
        Pruner(mlp())
    with pytest.raises(ValueError, match="exactly one"):
        Pruner(mlp(), target_sparsity=0.5, pressure=1.0)
    with pytest.raises(ValueError, match="pressure"):
        Pruner(mlp(), pressure=-1.0)


def test_fit_argument_errors_and_default_score_lr():
    x, y = blobs(n=64)
    p = Pruner(mlp(), pressure=0.5)
    loader = TensorLoader(x, y, 16)
    with pytest.raises(ValueError, match="epochs"):
        p.fit(loader, epochs=-1)
    with pytest.raises(ValueError, match=">= 1"):
        p.fit(loader, epochs=0, regrowth_epochs=0)
    with pytest.raises(TypeError, match="int"):
        p.fit(loader, epochs=1.5)
    with pytest.raises(TypeError, match="pairs"):
        p.fit([torch.randn(4, 16)], epochs=1, progress=False)
    hist = p.fit(loader, epochs=1, progress=False)
    assert hist[0]["score_lr"] == pytest.approx(0.4 / 4)  # short epochs: ~0.4 of score travel per epoch


def test_nan_weights_raise_and_leave_model_untouched():
    model = mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"2\.weight contains NaN"):
        Pruner(model, target_sparsity=0.9)
    assert all(type(m) in (nn.Linear, nn.ReLU) for m in model)


def test_failed_wrapping_is_rolled_back(monkeypatch):
    model = TinyCNN()
    originals = [model.features[0], model.features[3], model.head]

    def boom(*a, **k):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(MaskedLinear, "from_linear", boom)  # convs are wrapped first, then this fails
    with pytest.raises(RuntimeError, match="simulated"):
        Pruner(model, target_sparsity=0.5)
    assert [model.features[0], model.features[3], model.head] == originals


def test_include_exclude_by_name_and_type():
    model = TinyCNN()
    assert set(Pruner(copy.deepcopy(model), target_sparsity=0.5, include=nn.Conv2d).layers) == {
        "features.0", "features.3"}
    assert set(Pruner(copy.deepcopy(model), target_sparsity=0.5, exclude="features").layers) == {"head"}
    assert set(Pruner(copy.deepcopy(model), target_sparsity=0.5, include="features.*", exclude=["features.3"]).layers
               ) == {"features.0"}
    only = Pruner(copy.deepcopy(model), target_sparsity=0.5, include=lambda name, m: name == "head")
    assert set(only.layers) == {"head"}


def test_shared_module_is_wrapped_everywhere():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    pruner = Pruner(model, target_sparsity=0.5)
    assert isinstance(model[0], MaskedLinear) and model[0] is model[2]
    pruner.remove()
    assert model[0] is shared and model[2] is shared


# --------------------------------------------------------------------------- pruner: training
def test_score_update_matches_adam_on_the_pressure_loss():
    """One step of the fused path == torch.optim.Adam on CE(ls=0.1) + γ·mean(all scores)."""
    torch.manual_seed(0)
    x, y = blobs(n=32)
    model = mlp()
    gamma, lr = 3.0, 1e-2
    pruner = Pruner(model, pressure=gamma, score_lr=lr, lr=0.1)
    with torch.no_grad():  # a mix of active and pruned weights
        for layer in pruner.layers.values():
            layer.scores.sub_(0.35)
    ref = copy.deepcopy(model)
    ref_layers = [m for m in ref.modules() if isinstance(m, MaskedLinear)]
    scores = [m.scores for m in ref_layers]
    masks_before = [m.mask() for m in ref_layers]
    assert any(m.any() for m in masks_before) and any((~m).any() for m in masks_before)
    opt = torch.optim.Adam(scores, lr=lr)
    loss = F.cross_entropy(ref(x), y, label_smoothing=0.1) + gamma * torch.cat([s.reshape(-1) for s in scores]).mean()
    loss.backward()
    # scores.grad = 0.25·W⊙G + γ/N, so the flow EMA after one step is 0.1·W⊙G on pruned weights
    wg = [(s.grad - gamma / pruner.num_scores) / 0.25 for s in scores]
    opt.step()
    pruner.fit(TensorLoader(x, y, 32), epochs=1, progress=False)
    for (name, layer), ref_scores, ref_wg, mask in zip(pruner.layers.items(), scores, wg, masks_before):
        torch.testing.assert_close(layer.scores.detach(), ref_scores.detach(), rtol=1e-5, atol=1e-6)
        flow = pruner.flow(name + ".weight")
        assert flow.shape == layer.weight.shape
        torch.testing.assert_close(flow, torch.where(mask, torch.zeros_like(flow), 0.1 * ref_wg),
                                   rtol=1e-4, atol=1e-7)
        assert torch.equal(flow, pruner.flow(name))


def test_fused_and_torch_backends_agree():
    x, y = blobs(n=128)
    torch.manual_seed(0)
    model = mlp()
    runs = []
    for backend in ("native", "torch"):
        m = copy.deepcopy(model)
        torch.manual_seed(1)  # same score initialisation
        p = Pruner(m, pressure=2.0, score_lr=1e-2, backend=backend)
        p.fit(TensorLoader(x, y, 32, shuffle=True), epochs=2, progress=False)
        runs.append(p)
    for name in runs[0].layers:
        torch.testing.assert_close(runs[0].scores(name), runs[1].scores(name), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(runs[0].flow(name), runs[1].flow(name), rtol=1e-4, atol=1e-6)


def test_pressure_drives_density_down_and_more_pressure_prunes_more():
    x, y = blobs()
    loader = TensorLoader(x, y, 16, shuffle=True)
    densities = {}
    for gamma in (0.3, 3.0):
        torch.manual_seed(0)
        p = Pruner(mlp(), pressure=gamma, score_lr=1e-2)
        hist = p.fit(loader, epochs=6, progress=False)
        densities[gamma] = p.density()
        assert hist[-1]["density"] < hist[0]["density"] <= 1.0
        assert all(r["gamma"] == gamma for r in hist)
    assert densities[3.0] < densities[0.3] < 0.9


def test_flow_tracks_pruned_weights_only():
    x, y = blobs(n=64)
    torch.manual_seed(0)
    model = mlp()
    p = Pruner(model, pressure=1.0, score_lr=1e-2)
    layer = p.layers["2"]
    pruned = torch.rand(layer.weight.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    with torch.no_grad():
        layer.scores[pruned] = -1.0  # prune half of layer 2 for good
    p.fit(TensorLoader(x, y, 32), epochs=1, progress=False)
    flow = p.flow("2.weight")
    assert flow.shape == layer.weight.shape
    assert (flow[~pruned] == 0).all()           # never pruned (2 steps cannot bring 0.2 to 0): no flow
    assert (flow[pruned] != 0).float().mean() > 0.3
    assert torch.equal(layer.mask(), ~pruned)
    with pytest.raises(KeyError, match="no pruned weight"):
        p.flow("nope.weight")


def test_scheduler_reaches_target_within_half_a_point():
    x, y = blobs(seed=1)
    loader = TensorLoader(x, y, 16, shuffle=True)
    torch.manual_seed(0)
    p = Pruner(mlp(), target_sparsity=0.9, score_lr=1e-2)
    hist = p.fit(loader, epochs=12, regrowth_epochs=3, progress=False)
    s = p.sparsity()
    assert abs(s["overall"] - 0.9) <= 0.005, s
    assert set(s) == {"0.weight", "2.weight", "4.weight", "overall"}
    # the controller alone (before the landing shift) already gets close on this tiny problem
    assert abs((1 - p.landings[0]["density_before"]) - 0.9) <= 0.05
    assert [r["phase"] for r in hist] == ["prune"] * 12 + ["regrow"] * 3
    assert all(r["gamma"] == 0.0 for r in hist[12:])
    assert max(r["gamma"] for r in hist) > 0


def test_regrowth_freezes_the_mask():
    x, y = blobs(seed=2)
    loader = TensorLoader(x, y, 16, shuffle=True)
    torch.manual_seed(0)
    p = Pruner(mlp(), pressure=2.0, score_lr=1e-2)
    p.fit(loader, epochs=5, progress=False)
    masks = []
    p.fit(loader, epochs=0, regrowth_epochs=4, progress=False,
          callback=lambda rec: masks.append(torch.cat([m.reshape(-1) for m in p.masks().values()])))
    flips = [int((a != b).sum()) for a, b in zip(masks, masks[1:])]
    assert flips[-1] == 0, flips
    assert p.history[-1]["score_lr"] < 1e-4


def test_trajectory_is_front_loaded_and_ends_at_target():
    traj = keep_trajectory(0.02, 20)
    assert len(traj) == 20 and math.isclose(traj[-1], 0.02, rel_tol=1e-6)
    assert all(a >= b for a, b in zip(traj, traj[1:]))
    assert (1 - traj[9]) > 0.8 * (1 - traj[-1])  # most of the pruning in the first half
    with pytest.raises(ValueError):
        keep_trajectory(0.0, 10)


def test_pressure_scheduler_inertia_controller():
    s = PressureScheduler(0.9, epochs=10)
    s.step(1.0)
    s.step(1.0)
    s.step(1.0)
    # rises by 0.2, then 0.2 + 0.05, then 0.2 + 0.1 (growing inertia)
    assert math.isclose(s.g, 0.2 + 0.25 + 0.3)
    assert math.isclose(s.gamma, s.g ** 1.5)
    s.step(0.0)
    assert math.isclose(s.g, 0.75 - 0.2)  # falls; upward inertia reset
    for _ in range(6):
        s.step(0.0)
    assert s.g == 0.0  # never negative
    g = s.g
    s.step(1.0)  # past the horizon: no change
    assert s.g == g and s.epoch == 10


# --------------------------------------------------------------------------- export / remove
def test_export_matches_masked_model_and_remove_restores():
    x, y = image_data()
    torch.manual_seed(0)
    model = TinyCNN()
    originals = {"features.0": model.features[0], "features.3": model.features[3], "head": model.head}
    p = Pruner(model, target_sparsity=0.8, score_lr=2e-2)
    p.fit(TensorLoader(x, y, 16, shuffle=True), epochs=4, regrowth_epochs=1, progress=False)
    assert 0.7 < p.sparsity()["overall"] < 0.9
    sparse = p.export(dense_above=None)  # every layer sparse (the default keeps ~20 %-dense layers dense)
    assert isinstance(sparse.features[0], SparseConv2d) and isinstance(sparse.head, SparseLinear)
    assert isinstance(model.features[0], MaskedConv2d)  # the pruner's model is untouched
    loader = TensorLoader(x, y, 32)
    masked_out, sparse_out = predict(model, loader), predict(sparse, loader)
    assert (masked_out.argmax(1) == sparse_out.argmax(1)).all()
    torch.testing.assert_close(sparse_out, masked_out, rtol=1e-4, atol=1e-5)
    masks = p.masks()
    model.eval()
    with torch.no_grad():
        before = model(x)
    restored = p.remove()
    assert restored is model
    for name, module in originals.items():
        assert restored.get_submodule(name) is module
        assert (module.weight[~masks[name + ".weight"]] == 0).all()
    with torch.no_grad():
        torch.testing.assert_close(restored(x), before)
    with pytest.raises(RuntimeError, match="removed"):
        p.export()


def test_magnitude_baseline_prunes_globally_and_fine_tunes():
    x, y = blobs(n=256)
    torch.manual_seed(0)
    model = mlp()
    out = magnitude_prune(model, 0.9, TensorLoader(x, y, 32, shuffle=True), epochs=2, progress=False)
    assert abs(out["sparsity"] - 0.9) < 1e-3 and len(out["history"]) == 2
    assert all(type(m) in (nn.Linear, nn.ReLU) for m in model)  # pruning made permanent
    with pytest.raises(ValueError):
        magnitude_prune(mlp(), 1.0, TensorLoader(x, y, 32), epochs=1)


# --------------------------------------------------------------------------- power law
def test_power_law_fit_recovers_parameters_and_inverts():
    gammas = [0.05, 0.1, 0.3, 1.0, 3.0, 10.0]
    true = PowerLaw(c=0.03, alpha0=0.7, alpha1=0.04)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(len(gammas), generator=g, dtype=torch.float64) * 1e-3
    dens = [true.density(x) * math.exp(float(n)) for x, n in zip(gammas, noise)]
    law = fit_power_law(gammas, dens)
    assert law.c == pytest.approx(0.03, rel=0.02)
    assert law.alpha0 == pytest.approx(0.7, abs=0.01)
    assert law.alpha1 == pytest.approx(0.04, abs=0.005)
    assert law.r2 > 0.999 and law.gamma_range == (0.05, 10.0)
    for target in (0.9, 0.95, 0.98, 0.99):
        gamma = law.pressure_for(target)
        assert law.sparsity(gamma) == pytest.approx(target, abs=1e-9)
        assert gamma == pytest.approx(true.pressure_for(target), rel=0.05)
    exact = fit_power_law([1, 2, 4, 8, 16], [0.18 * x ** -0.63 for x in [1, 2, 4, 8, 16]], quadratic=False)
    assert (exact.c, exact.alpha0, exact.alpha1) == (pytest.approx(0.18), pytest.approx(0.63), 0.0)


def test_power_law_bad_input():
    with pytest.raises(ValueError, match="same length"):
        fit_power_law([1, 2, 3], [0.1, 0.2])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        fit_power_law([1, 2, 3], [0.5, 0.9, 1.5])
    with pytest.raises(ValueError, match="gamma must be > 0|every gamma"):
        fit_power_law([0, 2, 3], [0.5, 0.4, 0.3])
    with pytest.raises(ValueError, match="distinct"):
        fit_power_law([1, 1, 2], [0.5, 0.5, 0.4])
    law = PowerLaw(c=0.18, alpha0=0.63)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        law.pressure_for(1.0)
    with pytest.raises(ValueError, match="not decreasing"):
        PowerLaw(c=0.1, alpha0=-0.5).pressure_for(0.9)


# --------------------------------------------------------------------------- end to end (tiny)
def test_hyperflows_end_to_end_on_images_keeps_accuracy():
    x, y = image_data(n=192)
    loader = TensorLoader(x, y, 16, shuffle=True)
    torch.manual_seed(0)
    model = TinyCNN()
    p = Pruner(model, target_sparsity=0.7, score_lr=2e-2)
    p.fit(loader, epochs=6, regrowth_epochs=2, progress=False)
    assert evaluate(model, TensorLoader(x, y, 64)) > 0.9
    assert abs(p.sparsity()["overall"] - 0.7) <= 0.05


def test_magnitude_masks_cover_the_layer_kinds_asked_for():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    convs = magnitude_masks(model, 0.75)
    both = magnitude_masks(model, 0.75, kinds=(nn.Conv2d, nn.Linear))
    assert set(convs) == {"0"} and set(both) == {"0", "2"}
    assert torch.equal(both["0"], convs["0"])
    w = model[2].weight.detach().abs()  # each layer keeps its own largest quarter
    assert int(both["2"].sum()) == w.numel() - int(round(0.75 * w.numel()))
    assert bool((w[both["2"]].min() > w[~both["2"]].max()))
    with pytest.raises(ValueError, match="no Linear layer"):
        magnitude_masks(nn.Sequential(nn.Conv2d(1, 2, 3)), 0.5, kinds=(nn.Linear,))
    with pytest.raises(TypeError, match="kinds must be"):
        magnitude_masks(model, 0.5, kinds=nn.Linear)

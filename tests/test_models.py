"""Tests for hyperflow_ext.models: backbones, ProtoNet helpers, pretraining and cached backbones."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hyperflow_ext._io import load_tensors, save_tensors
from hyperflow_ext.models import (BACKBONES, Conv4, ProtoNet, ResNet8, TinyViT,
                                  available_backbones, available_pretrained, build_backbone,
                                  load_pretrained, merge_datasets, pretrain, pretrained_path,
                                  proto_logits, prototypes, random_shift)
from hyperflow_ext.models import pretrained as pretrained_mod

from _helpers import FAST_PRETRAIN, DuckDataset, quadrant_dataset, two_domains

ARCHS = ["conv4", "resnet8", "vit_tiny"]
FEATURE_DIMS = {"conv4": 32, "resnet8": 64, "vit_tiny": 64}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest single-threaded, and 2 OpenMP threads on a shared, busy 2-core
    machine can be 50x slower (spin-waiting); restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------- backbones


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("batch", [1, 5])
def test_backbone_output_shape(arch, batch):
    torch.manual_seed(0)
    net = build_backbone(arch)
    out = net(torch.rand(batch, 1, 28, 28))
    assert net.feature_dim == FEATURE_DIMS[arch]
    assert out.shape == (batch, net.feature_dim)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_backbone_in_channels(arch):
    net = build_backbone(arch, in_channels=3)
    assert net(torch.rand(2, 3, 28, 28)).shape == (2, net.feature_dim)
    with pytest.raises(ValueError, match="3 channels"):
        net(torch.rand(2, 1, 28, 28))
    with pytest.raises(ValueError, match="shape"):
        net(torch.rand(3, 28, 28))


@pytest.mark.parametrize("arch", ARCHS)
def test_backbone_has_biases_everywhere(arch):
    net = build_backbone(arch)
    layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert layers
    for layer in layers:
        assert layer.bias is not None, f"{arch}: {layer} has no bias"
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    biases = [n for n, p in net.named_parameters() if n.endswith("bias")]
    assert len(biases) >= len(layers)


@pytest.mark.parametrize("arch", ARCHS)
def test_backbone_size_and_determinism(arch):
    torch.manual_seed(0)
    net = build_backbone(arch)
    assert 10_000 < sum(p.numel() for p in net.parameters()) < 200_000
    # No batch statistics: train and eval agree, and each example is processed independently.
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        out_train = net.train()(x)
        out_eval = net.eval()(x)
        out_single = net(x[1:2])
    torch.testing.assert_close(out_train, out_eval)
    torch.testing.assert_close(out_single, out_eval[1:2], rtol=1e-5, atol=1e-5)
    # Biases matter: changing them changes the features.
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("bias"):
                p.add_(0.1)
        assert not torch.allclose(net(x), out_eval)


@pytest.mark.parametrize("arch", ["conv4", "resnet8"])
def test_conv_backbones_keep_channels_last_weights(arch, tmp_path):
    """Channels-last weights are a speed choice only: same features as the NCHW layout, and
    checkpoints (contiguous on disk) load back into the channels-last model exactly."""
    torch.manual_seed(0)
    net = build_backbone(arch)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    nchw = copy.deepcopy(net).to(memory_format=torch.contiguous_format)
    assert not convs[1].weight.is_contiguous() or convs[1].weight.shape[1] == 1
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(net(x), nchw(x), rtol=1e-5, atol=1e-5)
    save_tensors(tmp_path / "w.safetensors", net.state_dict())
    tensors, _ = load_tensors(tmp_path / "w.safetensors")
    fresh = build_backbone(arch)
    fresh.load_state_dict(tensors)
    assert _state_equal(fresh, net)
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last)
               for m in fresh.modules() if isinstance(m, nn.Conv2d))


def test_backbone_constructor_errors():
    with pytest.raises(ValueError, match="unknown backbone 'nope'.*conv4.*resnet8.*vit_tiny"):
        build_backbone("nope")
    with pytest.raises(TypeError, match="build_backbone: name"):
        build_backbone(3)
    with pytest.raises(ValueError, match="TinyViT: patch_size"):
        TinyViT(image_size=30, patch_size=4)
    with pytest.raises(ValueError, match="TinyViT.forward: x must be 28x28"):
        TinyViT()(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="Conv4: norm"):
        Conv4(norm="layer")
    with pytest.raises(TypeError, match="Conv4: hidden"):
        Conv4(hidden=3.5)
    with pytest.raises(ValueError, match="ResNet8: widths"):
        ResNet8(widths=(8, 16))
    assert available_backbones() == sorted(BACKBONES) == sorted(ARCHS)


def test_conv4_without_norm():
    net = Conv4(norm="none", hidden=8)
    assert not any(isinstance(m, nn.GroupNorm) for m in net.modules())
    assert net(torch.rand(2, 1, 28, 28)).shape == (2, 8)
    assert "hidden=8" in repr(net) and "norm='none'" in repr(net)


# --------------------------------------------------------------------------- prototypes / logits


def _manual_prototypes(feats, labels, way):
    out = torch.zeros(way, feats.shape[-1], dtype=torch.float64)
    for c in range(way):
        rows = [feats[i] for i in range(len(labels)) if int(labels[i]) == c]
        out[c] = torch.stack(rows).double().sum(0) / len(rows)
    return out


def test_prototypes_match_manual_loop():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(11, 6, generator=g)
    labels = torch.tensor([2, 0, 1, 3, 3, 0, 2, 1, 1, 0, 3])
    got = prototypes(feats, labels, 4)
    torch.testing.assert_close(got.double(), _manual_prototypes(feats, labels, 4))
    torch.testing.assert_close(prototypes(feats, labels), got)  # way inferred


def test_prototypes_batched_tasks():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(3, 10, 4, generator=g)
    labels = torch.stack([torch.randperm(10, generator=g) % 5 for _ in range(3)])
    got = prototypes(feats, labels, 5)
    assert got.shape == (3, 5, 4)
    for t in range(3):
        torch.testing.assert_close(got[t].double(), _manual_prototypes(feats[t], labels[t], 5))


def test_prototypes_errors():
    feats = torch.randn(6, 3)
    with pytest.raises(ValueError, match=r"classes \[2\] have none"):
        prototypes(feats, torch.tensor([0, 1, 3, 0, 1, 3]), 4)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        prototypes(feats, torch.tensor([0, 1, 2, 3, 0, 1]), 3)
    with pytest.raises(ValueError, match=r"labels must lie in"):
        prototypes(feats, torch.tensor([0, -1, 2, 2, 0, 1]), 3)
    with pytest.raises(ValueError, match="labels must have shape"):
        prototypes(feats, torch.tensor([0, 1, 2]), 3)
    with pytest.raises(ValueError, match="features must have shape"):
        prototypes(torch.randn(6), torch.zeros(6, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="integer"):
        prototypes(feats, torch.zeros(6), 1)
    with pytest.raises(TypeError, match="prototypes: way must be an int"):
        prototypes(feats, torch.zeros(6, dtype=torch.long), 1.0)
    with pytest.raises(TypeError, match="prototypes: features"):
        prototypes(feats.numpy(), torch.zeros(6, dtype=torch.long), 1)
    # batched: a class missing in one task only
    labels = torch.tensor([[0, 1, 0, 1, 0, 1], [0, 0, 0, 0, 0, 0]])
    with pytest.raises(ValueError, match=r"classes \[1\]"):
        prototypes(torch.randn(2, 6, 3), labels, 2)


def test_proto_logits_match_manual_formulas():
    g = torch.Generator().manual_seed(2)
    q, p = torch.randn(7, 5, generator=g), torch.randn(3, 5, generator=g)
    cos = torch.empty(7, 3)
    sq = torch.empty(7, 3)
    for i in range(7):
        for j in range(3):
            cos[i, j] = torch.dot(q[i], p[j]) / (q[i].norm() * p[j].norm())
            sq[i, j] = ((q[i] - p[j]) ** 2).sum()
    torch.testing.assert_close(proto_logits(q, p, "cosine", 10.0), 10.0 * cos)
    torch.testing.assert_close(proto_logits(q, p), 10.0 * cos)  # defaults
    torch.testing.assert_close(proto_logits(q, p, "cosine", 3.0), 3.0 * cos)
    torch.testing.assert_close(proto_logits(q, p, "euclidean"), -sq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(proto_logits(q, p, "euclidean", 0.5), -0.5 * sq,
                               rtol=1e-5, atol=1e-5)
    # batched tasks agree with per-task calls
    qb, pb = torch.randn(2, 4, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    for metric in ("cosine", "euclidean"):
        got = proto_logits(qb, pb, metric)
        for t in range(2):
            torch.testing.assert_close(got[t], proto_logits(qb[t], pb[t], metric))


def test_proto_logits_errors():
    q, p = torch.randn(4, 5), torch.randn(3, 5)
    with pytest.raises(ValueError, match="metric must be one of"):
        proto_logits(q, p, "manhattan")
    with pytest.raises(ValueError, match="same feature size"):
        proto_logits(q, torch.randn(3, 6))
    with pytest.raises(ValueError, match="same number of tasks"):
        proto_logits(torch.randn(2, 4, 5), torch.randn(3, 3, 5))
    with pytest.raises(ValueError, match="both be 2-D"):
        proto_logits(torch.randn(2, 4, 5), p)
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        proto_logits(q, p, scale=0.0)


# --------------------------------------------------------------------------- ProtoNet


def test_protonet_nearest_prototype_semantics():
    # Identity "backbone" on 1x1 images: features are the pixel vectors themselves.
    net = ProtoNet(nn.Flatten(), metric="euclidean")
    support = torch.tensor([[0.0, 0.0], [0.2, 0.0], [5.0, 5.0], [5.2, 5.0]]).view(4, 2, 1, 1)
    support_y = torch.tensor([0, 0, 1, 1])
    query = torch.tensor([[0.1, 0.1], [4.9, 5.1]]).view(2, 2, 1, 1)
    logits = net(support, support_y, query)
    assert logits.shape == (2, 2)
    assert logits.argmax(-1).tolist() == [0, 1]
    torch.testing.assert_close(logits[0, 0], torch.tensor(-0.01 - 0.0), rtol=1e-4, atol=1e-5)


def test_protonet_forward_and_batched_tasks():
    torch.manual_seed(0)
    net = ProtoNet(Conv4(hidden=8))
    sx, sy = torch.rand(2, 6, 1, 28, 28), torch.tensor([[0, 1, 2, 0, 1, 2], [2, 2, 1, 1, 0, 0]])
    qx = torch.rand(2, 4, 1, 28, 28)
    logits = net(sx, sy, qx)
    assert logits.shape == (2, 4, 3)
    for t in range(2):
        torch.testing.assert_close(logits[t], net(sx[t], sy[t], qx[t]), rtol=1e-5, atol=1e-5)
    assert "metric='cosine', scale=10.0" in repr(net)
    with pytest.raises(ValueError, match="metric"):
        ProtoNet(Conv4(), metric="dot")
    with pytest.raises(TypeError, match="ProtoNet: backbone"):
        ProtoNet(lambda x: x)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_support_loss_finite_differentiable(metric):
    torch.manual_seed(0)
    backbone = Conv4(hidden=8)
    net = ProtoNet(backbone, metric=metric)
    sx, sy = torch.rand(5, 1, 28, 28), torch.arange(5)  # 5-way 1-shot
    loss = net.support_loss(sx, sy)
    assert loss.dim() == 0 and torch.isfinite(loss)
    # matches the definition: CE of support examples against their own prototypes
    feats = backbone(sx)
    expected = F.cross_entropy(proto_logits(feats, prototypes(feats, sy, 5), metric), sy)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    bias_grads = [p.grad for n, p in backbone.named_parameters() if n.endswith("bias")]
    assert all(g is not None and torch.isfinite(g).all() for g in bias_grads)
    assert sum(float(g.abs().sum()) for g in bias_grads) > 0


def test_support_loss_one_shot_informative():
    # 1-shot cosine: loss depends on how well the support images are separated.
    net = ProtoNet(nn.Flatten())
    separated = torch.eye(3).view(3, 3, 1, 1)
    similar = (torch.ones(3, 3) + 0.01 * torch.eye(3)).view(3, 3, 1, 1)
    y = torch.arange(3)
    assert net.support_loss(separated, y) < 0.01 < math.log(3) - 0.01 < net.support_loss(similar, y)


# --------------------------------------------------------------------------- pretraining


def test_random_shift_is_a_translation():
    x = torch.zeros(6, 1, 12, 12)
    x[:, :, 5, 6] = 1.0
    g = torch.Generator().manual_seed(0)
    out = random_shift(x, 2, g)
    assert out.shape == x.shape
    assert torch.equal(random_shift(x, 0, g), x)
    for i in range(6):
        r, c = (out[i, 0] == 1).nonzero()[0].tolist()
        assert abs(r - 5) <= 2 and abs(c - 6) <= 2
        assert float(out[i].sum()) == 1.0
    assert len({tuple((out[i, 0] == 1).nonzero()[0].tolist()) for i in range(6)}) > 1


def test_merge_offsets_labels():
    images, labels, k = merge_datasets(two_domains(per_class=3))
    assert k == 4 and images.shape == (12, 1, 28, 28)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    mapping = {"a": two_domains(3)[0], "b": two_domains(3)[1]}
    assert torch.equal(merge_datasets(mapping)[1], labels)


def test_pretrain_learns_and_is_deterministic():
    torch.manual_seed(0)
    init = Conv4(hidden=8)
    kw = dict(epochs=8, batch_size=16, lr=5e-3, seed=3, progress=False)
    hist_a, hist_b = [], []
    a = pretrain(copy.deepcopy(init), two_domains(), history=hist_a, **kw)
    b = pretrain(copy.deepcopy(init), two_domains(), history=hist_b, **kw)
    assert len(hist_a) == 8
    assert hist_a[-1]["acc"] >= 0.9  # chance is 0.25 (4 classes over two domains)
    assert hist_a[-1]["acc"] > hist_a[0]["acc"] + 0.2
    assert hist_a[-1]["loss"] < hist_a[0]["loss"]
    assert _state_equal(a, b) and hist_a == hist_b
    assert not _state_equal(a, init)
    assert not a.training
    c = pretrain(copy.deepcopy(init), two_domains(), **{**kw, "seed": 4})
    assert not _state_equal(a, c)


def test_pretrain_features_help_one_shot_protonet():
    torch.manual_seed(0)
    init = Conv4(hidden=8)
    trained = pretrain(copy.deepcopy(init), two_domains(), epochs=8, batch_size=16, lr=5e-3,
                       progress=False)
    # fresh, noisier samples of the same four classes; 1 support image per class
    fresh = [quadrant_dataset([0, 1], 25, 11, noise=0.6),
             quadrant_dataset([2, 3], 25, 12, noise=0.6)]
    x = torch.cat([d.images for d in fresh])
    y = torch.cat([fresh[0].labels, fresh[1].labels + 2])
    sx, sy = x[::25], y[::25]
    assert sy.tolist() == [0, 1, 2, 3]
    with torch.no_grad():
        acc_init = (ProtoNet(init)(sx, sy, x).argmax(-1) == y).float().mean()
        acc = (ProtoNet(trained)(sx, sy, x).argmax(-1) == y).float().mean()
    assert acc >= 0.95 and acc > acc_init


def test_pretrain_cosine_head_runs():
    torch.manual_seed(0)
    hist = []
    pretrain(Conv4(hidden=8), two_domains(8), epochs=2, batch_size=16, head="cosine",
             progress=False, history=hist)
    assert len(hist) == 2 and all(math.isfinite(h["loss"]) for h in hist)


def test_pretrain_errors():
    ds = two_domains(4)
    net = Conv4(hidden=8)
    with pytest.raises(ValueError, match="pretrain: datasets is empty"):
        pretrain(net, [], progress=False)
    bad = DuckDataset(ds[0].images, ds[0].labels + 5, 2)
    with pytest.raises(ValueError, match=r"datasets\[0\].labels must lie in \[0, 2\)"):
        pretrain(net, [bad], progress=False)
    small = DuckDataset(torch.rand(4, 1, 14, 14), torch.zeros(4, dtype=torch.long), 1)
    with pytest.raises(ValueError, match=r"datasets\[1\].images must have shape"):
        pretrain(net, [ds[0], small], progress=False)
    with pytest.raises(TypeError, match="num_classes"):
        pretrain(net, [object()], progress=False)
    with pytest.raises(ValueError, match="head must be one of"):
        pretrain(net, ds, head="mlp", progress=False)
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        pretrain(net, ds, epochs=0, progress=False)
    frozen = Conv4(hidden=8).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters with requires_grad"):
        pretrain(frozen, ds, progress=False)


# --------------------------------------------------------------------------- load_pretrained


def test_load_pretrained_writes_then_loads(tmp_path, monkeypatch):
    data = two_domains(8)
    net = load_pretrained("conv4-glyphs", cache_dir=tmp_path, progress=False, datasets=data,
                          **FAST_PRETRAIN)
    files = list((tmp_path / "backbones").glob("*.safetensors"))
    assert len(files) == 1 and files[0].name.startswith("conv4-glyphs-")
    assert files[0] == pretrained_path("conv4-glyphs", tmp_path, datasets=data, **FAST_PRETRAIN)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert isinstance(net, Conv4) and net.feature_dim == 8

    tensors, meta = load_tensors(files[0])
    assert meta["arch"] == "conv4" and meta["epochs"] == 2 and meta["seed"] == 0
    assert 0.0 <= meta["final_train_acc"] <= 1.0
    assert meta["config"]["backbone_kw"] == {"hidden": 8}
    assert tensors.keys() == net.state_dict().keys()

    def boom(*args, **kwargs):
        raise AssertionError("pretrain must not run when the checkpoint exists")

    monkeypatch.setattr(pretrained_mod, "pretrain", boom)
    again = load_pretrained("conv4-glyphs", cache_dir=tmp_path, progress=False, datasets=data,
                            **FAST_PRETRAIN)
    assert _state_equal(net, again)
    assert not any(p.requires_grad for p in again.parameters())
    # a different configuration is a different checkpoint, so it would train
    with pytest.raises(AssertionError, match="must not run"):
        load_pretrained("conv4-glyphs", cache_dir=tmp_path, progress=False, datasets=data,
                        **{**FAST_PRETRAIN, "epochs": 3})


def test_load_pretrained_corrupt_checkpoint(tmp_path):
    data = two_domains(4)
    path = pretrained_path("conv4-glyphs", tmp_path, datasets=data, **FAST_PRETRAIN)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"definitely not a safetensors file")
    with pytest.raises(ValueError, match="corrupt checkpoint"):
        load_pretrained("conv4-glyphs", cache_dir=tmp_path, progress=False, datasets=data,
                        **FAST_PRETRAIN)
    save_tensors(path, {"foo.weight": torch.zeros(3)}, {"arch": "conv4"})
    with pytest.raises(ValueError, match="does not match architecture 'conv4'"):
        load_pretrained("conv4-glyphs", cache_dir=tmp_path, progress=False, datasets=data,
                        **FAST_PRETRAIN)
    wrong = {k: torch.zeros(1) for k in Conv4(hidden=8).state_dict()}
    save_tensors(path, wrong, {"arch": "conv4"})
    with pytest.raises(ValueError, match="has shape"):
        load_pretrained("conv4-glyphs", cache_dir=tmp_path, progress=False, datasets=data,
                        **FAST_PRETRAIN)


def test_load_pretrained_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown pretrained backbone 'resnet50-glyphs'.*"
                                         "conv4-glyphs"):
        load_pretrained("resnet50-glyphs", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown pretrained backbone"):
        load_pretrained("conv4", cache_dir=tmp_path)
    with pytest.raises(TypeError, match="unexpected training keyword"):
        load_pretrained("conv4-glyphs", cache_dir=tmp_path, datasets=two_domains(2), epoch=3)
    assert available_pretrained() == ["conv4-glyphs", "resnet8-glyphs", "vit_tiny-glyphs"]


def test_load_pretrained_builds_source_domains_lazily(tmp_path, monkeypatch):
    import sys
    import types

    calls = []

    def benchmark_domains(cache_dir=None, progress=True):
        calls.append((cache_dir, progress))
        source = dict(zip(["A", "B"], two_domains(6)))
        return types.SimpleNamespace(source=source, meta={}, target={"T": two_domains(2)[0]})

    fake = types.ModuleType("hyperflow_ext.data")
    fake.benchmark_domains = benchmark_domains
    monkeypatch.setitem(sys.modules, "hyperflow_ext.data", fake)
    net = load_pretrained("conv4-glyphs", cache_dir=tmp_path, progress=False, **FAST_PRETRAIN)
    assert calls == [(tmp_path, False)]
    _, meta = load_tensors(pretrained_path("conv4-glyphs", tmp_path, **FAST_PRETRAIN))
    assert meta["num_classes"] == 4 and meta["num_images"] == 24
    from hyperflow_ext.data.benchmark import SOURCE_SCRIPTS

    assert meta["config"]["data"] == "benchmark_domains:" + ",".join(SOURCE_SCRIPTS)
    again = load_pretrained("conv4-glyphs", cache_dir=tmp_path, progress=False, **FAST_PRETRAIN)
    assert calls == [(tmp_path, False)]  # the cached file is used; no data is built
    assert _state_equal(net, again)


def test_default_pretrained_key_follows_the_source_scripts(tmp_path, monkeypatch):
    from hyperflow_ext.data import benchmark
    from hyperflow_ext.models.pretrained import pretrained_path

    before = pretrained_path("conv4-glyphs", cache_dir=tmp_path)
    monkeypatch.setattr(benchmark, "SOURCE_SCRIPTS", ("Latin", "Greek"))
    # Another default split must not load the backbone cached for the old one.
    assert pretrained_path("conv4-glyphs", cache_dir=tmp_path) != before


def test_batchnorm_conv4_and_resnet8_run_in_eval_mode():
    for net in (Conv4(norm="batch", hidden=8), ResNet8(norm="batch", widths=(8, 8, 8))):
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
        net.eval()
        x = torch.rand(3, 1, 28, 28)
        with torch.no_grad():
            one, full = net(x[:1]), net(x)
        torch.testing.assert_close(one, full[:1])  # eval mode: running statistics, no batch coupling


def test_conv4_runs_forward_hooks_on_its_norms_without_autograd():
    """The in-place GroupNorm kernel path must not skip a user's hooks: a norm with a forward hook (on the
    module or global) runs through the module, with the same output."""
    torch.manual_seed(0)
    net = build_backbone("conv4").eval()
    norm = next(m for m in net.modules() if isinstance(m, nn.GroupNorm))
    x = torch.randn(2, net.in_channels, 32, 32)
    with torch.no_grad():
        plain = net(x)
    seen = []
    handle = norm.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    try:
        with torch.no_grad():
            hooked = net(x)
    finally:
        handle.remove()
    assert len(seen) == 1
    torch.testing.assert_close(hooked, plain)
    handle = nn.modules.module.register_module_forward_hook(
        lambda m, args, out: seen.append(type(m)) if m is norm else None)
    try:
        with torch.no_grad():
            net(x)
    finally:
        handle.remove()
    assert seen[-1] is nn.GroupNorm


def test_conv4_fused_norm_runs_output_readers_before_the_relu(monkeypatch):
    """A forward hook marked ``reads_output`` keeps the in-place GroupNorm kernel path and sees the
    norm's output (before the ReLU), as the module call would show it."""
    import hyperflow_ext.models.conv as conv

    torch.manual_seed(1)
    net = build_backbone("conv4").eval()
    norm = next(m for m in net.modules() if isinstance(m, nn.GroupNorm))
    x = torch.randn(3, net.in_channels, 32, 32)
    seen = {}

    def reader(_module, _args, out):
        seen.setdefault("out", []).append(out.clone())

    reader.reads_output = True
    with torch.no_grad():
        handle = norm.register_forward_hook(lambda m, args, out: seen.setdefault("want", []).append(out.clone()))
        plain = net(x)  # an unmarked hook: the module path
        handle.remove()
        calls = []
        fused = conv.launch_group_norm_
        monkeypatch.setattr(conv, "launch_group_norm_", lambda *a: calls.append(a[-1]) or fused(*a))
        handle = norm.register_forward_hook(reader)
        hooked = net(x)
        handle.remove()
    assert calls and calls[0] is False  # the kernel ran, with the ReLU left until after the hook
    assert len(seen["out"]) == 1 and seen["out"][0].min() < 0  # before the ReLU
    torch.testing.assert_close(seen["out"][0], seen["want"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hooked, plain, atol=1e-5, rtol=1e-5)


def test_conv4_batchnorm_without_autograd_normalises_in_place_like_the_module():
    """Without autograd an eval-mode BatchNorm block is normalised in place (one map, not two):
    same output as the module path, and statistics a read-only pre-hook sets are the ones used."""
    from hyperflow_ext.measure import peak_memory

    torch.manual_seed(5)
    net = Conv4(hidden=8, norm="batch").eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_()
    x = torch.rand(6, 1, 32, 32)
    with torch.enable_grad():
        module_path = net(x).detach()  # autograd on: the modules run as usual
    with torch.no_grad():
        _, fused_peak = peak_memory(lambda: net(x))
        fused = net(x)
        norm = next(m for m in net.modules() if isinstance(m, nn.BatchNorm2d))
        handle = norm.register_forward_hook(lambda m, a, out: None)  # unmarked: the module path
        _, module_peak = peak_memory(lambda: net(x))
        handle.remove()
    torch.testing.assert_close(fused, module_path, atol=1e-5, rtol=1e-5)
    assert fused_peak < 0.75 * module_peak  # the first block holds one full-size map instead of two

    twin = copy.deepcopy(net)
    first = next(m for m in twin.modules() if isinstance(m, nn.BatchNorm2d))
    new_mean, new_var = torch.randn(8), torch.rand(8) + 0.5

    def set_stats(module, args):
        module.running_mean.copy_(new_mean)
        module.running_var.copy_(new_var)
    set_stats.reads_only = True
    first.register_forward_pre_hook(set_stats)
    with torch.no_grad():
        hooked = twin(x)
    ref = copy.deepcopy(net)
    ref_first = next(m for m in ref.modules() if isinstance(m, nn.BatchNorm2d))
    ref_first.running_mean.copy_(new_mean)
    ref_first.running_var.copy_(new_var)
    with torch.enable_grad():
        torch.testing.assert_close(hooked, ref(x).detach(), atol=1e-5, rtol=1e-5)

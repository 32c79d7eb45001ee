"""Stand-alone export: BatchNorm folding, ReLU fusion, dense-or-sparse choice, safetensors save / load."""
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from hyperflow_ext import native
from hyperflow_ext.prune import Pruner
from hyperflow_ext.prune.cnns import ResNetStyle, VGGStyle, randomize_batchnorm
from hyperflow_ext.sparse import DenseConv2d, SparseConv2d, SparseLinear, fold_batchnorm, load, save, sparsify

from _helpers import pruned_cnn

pytestmark = pytest.mark.skipif(not native.available(), reason="native extension not built")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_fold_batchnorm_matches_conv_then_bn(dtype, tol):
    gen = torch.Generator().manual_seed(3)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=True).to(dtype)
    bn = randomize_batchnorm(nn.Sequential(nn.BatchNorm2d(6)), gen)[0].to(dtype).eval()
    with torch.no_grad():
        conv.weight[:, :2] = 0.0
    fused = fold_batchnorm(conv, bn)
    x = torch.randn(3, 4, 7, 7, dtype=dtype, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), bn(conv(x)), atol=tol, rtol=tol)
    assert bool((fused.weight[:, :2] == 0).all())  # pruned weights stay exactly zero


@pytest.mark.parametrize("cls", [VGGStyle, ResNetStyle])
def test_sparsify_folds_fuses_and_matches(cls):
    model = pruned_cnn(cls)
    x = torch.randn(2, 3, 32, 32)
    sparse, report = sparsify(model, x, time_budget_s=0.01, never_slower=False)  # the export itself
    with torch.inference_mode():
        torch.testing.assert_close(sparse(x), model(x), atol=1e-4, rtol=1e-4)
    bns = [m for m in sparse.modules() if isinstance(m, nn.BatchNorm2d)]
    assert not bns  # every norm follows a convolution: all folded
    convs = {r["name"]: r for r in report if r["layer"] == "Conv2d"}
    assert convs and all(r["bn"] for r in convs.values())
    first = "features.0" if cls is VGGStyle else "stem.0"
    assert convs[first]["relu"]
    if cls is ResNetStyle:  # relu(bn2(conv2(.)) + shortcut): conv2 takes the residual and the ReLU
        assert convs["blocks.0.conv2"]["residual"] and convs["blocks.0.conv2"]["relu"]
        assert convs["blocks.0.conv1"]["relu"] and not convs["blocks.0.conv1"]["residual"]
        assert isinstance(sparse, torch.fx.GraphModule)
        called = [str(n.target) for n in sparse.graph.nodes if n.op == "call_module"]
        assert not any(isinstance(sparse.get_submodule(t), nn.Identity) for t in called)  # skipped in the graph
        assert isinstance(sparse.get_submodule("blocks.0.bn1"), nn.Identity)  # but still a module (manifest)
    for r in report:
        assert r["kind"] in ("sparse", "dense") and r["sparse_ms"] > 0 and r["dense_ms"] > 0
        mod = sparse.get_submodule(r["name"])
        sparse_kind = isinstance(mod, (SparseConv2d, SparseLinear))
        assert sparse_kind == (r["kind"] == "sparse")
        # the documented rule: the faster alone, except a layer kept sparse for the depth-first program
        kept_for_program = r["kind"] == "sparse" and r["depth_first"] and "kept sparse" in r["reason"]
        assert (r["kind"] == "dense") == (r["dense_ms"] < r["sparse_ms"]) or kept_for_program, r


def test_sparsify_without_example_input_makes_everything_sparse_and_keeps_the_original():
    model = pruned_cnn(VGGStyle, 0.95)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sparse, report = sparsify(model, dense_above=None)
    assert all(r["kind"] == "sparse" and r["sparse_ms"] is None for r in report)
    assert isinstance(sparse.features[0], SparseConv2d) and isinstance(sparse.features[1], nn.Identity)
    assert isinstance(sparse.features[2], nn.Identity) and sparse.features[0].relu
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])  # a copy was rewritten


def test_residual_fusion_takes_only_single_use_convolutions():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.other = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            return torch.relu(y + self.other(y))  # conv's output has two users: only `other` fuses (r = y)

    model = Block().eval()
    sparse, report = sparsify(model, dense_above=None)
    assert {r["name"]: r["residual"] for r in report} == {"conv": False, "other": True}
    x = torch.randn(2, 4, 5, 5)
    with torch.inference_mode():
        torch.testing.assert_close(sparse(x), model(x), atol=1e-5, rtol=1e-5)


def test_fusion_without_folding_is_refused_when_the_relu_follows_the_norm():
    model = pruned_cnn(VGGStyle)
    sparse, report = sparsify(model, fold_bn=False, dense_above=None)
    assert not any(r["relu"] for r in report) and isinstance(sparse.features[1], nn.BatchNorm2d)
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(sparse(x), model(x), atol=1e-4, rtol=1e-4)


def test_dense_kept_layers_round_trip_with_relu():
    model = pruned_cnn(VGGStyle)
    sparse, _ = sparsify(model, dense_above=None)
    sparse.features[4] = DenseConv2d.from_conv2d(nn.Conv2d(64, 128, 3, padding=1), relu=True)
    with torch.inference_mode():
        x = torch.randn(1, 3, 32, 32)
        want = sparse(x)
    path_model = sparse
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        save(path_model, f"{tmp}/m.safetensors")
        back = load(f"{tmp}/m.safetensors", VGGStyle)
    assert isinstance(back.features[4], DenseConv2d) and back.features[4].relu
    with torch.inference_mode():
        torch.testing.assert_close(back(x), want)


@pytest.mark.parametrize("whole_model_faster", [True, False])
def test_a_layer_faster_dense_alone_is_retried_sparse_inside_the_program(monkeypatch, whole_model_faster):
    """A convolution that times faster dense on its own ends the depth-first chain; sparsify also builds
    the model with it sparse inside the program and keeps whichever whole model times faster."""
    from hyperflow_ext.sparse import export

    def time_pair(sparse, dense, x, budget_s):  # the third convolution (128 -> 256 channels) "is faster dense"
        return (2.0, 1.0) if getattr(sparse, "in_channels", 0) == 128 else (1.0, 2.0)
    faster = []
    monkeypatch.setattr(export, "_time_pair", time_pair)
    monkeypatch.setattr(export, "_faster", lambda a, b, x, budget_s: faster.append((a, b)) or whole_model_faster)
    model = pruned_cnn(VGGStyle, 0.95)
    x = torch.randn(1, 3, 32, 32)
    out, report = sparsify(model, x, time_budget_s=0.01, never_slower=False)
    middle = next(r for r in report if r["name"] == "features.8")
    assert len(faster) == 1 and middle["speedup"] == 0.5  # the alternative was timed against the first choice
    if whole_model_faster:
        assert out is faster[0][0] and middle["kind"] == "sparse"
        assert all(r["depth_first"] for r in report if r["layer"] == "Conv2d")
    else:
        assert out is faster[0][1] and middle["kind"] == "dense"
        assert not middle["depth_first"]
    with torch.inference_mode():
        torch.testing.assert_close(out(x), model(x), atol=1e-4, rtol=1e-4)


def test_one_trace_serves_every_pass_of_sparsify_and_load(monkeypatch, tmp_path):
    """sparsify reads the model's graph once for all its conversions (first choice, the retry with dense layers
    made sparse, the all-dense referee) and all their passes (norm chains, residuals, depth-first chain);
    load reads it once for the residuals and the chain."""
    from hyperflow_ext.sparse import SparseConvNet, export, fx_passes

    traced, trace = [], fx_passes.Tracer.trace
    monkeypatch.setattr(fx_passes.Tracer, "trace",
                        lambda self, root, *a, **k: traced.append(type(root).__name__) or trace(self, root, *a, **k))
    model = pruned_cnn(ResNetStyle, 0.95)
    sparse, report = sparsify(model, dense_above=None)
    assert any(r["residual"] for r in report) and any(isinstance(m, SparseConvNet) for m in sparse.modules())
    assert traced == ["ResNetStyle"]
    save(sparse, tmp_path / "m.safetensors")
    traced.clear()
    back = load(tmp_path / "m.safetensors", ResNetStyle)
    assert any(isinstance(m, SparseConvNet) for m in back.modules()) and traced == ["ResNetStyle"]
    traced.clear()
    monkeypatch.setattr(export, "_time_pair", lambda sparse, dense, x, budget_s, **k: (2.0, 1.0))  # all dense alone
    conversions = []
    convert = export._convert
    monkeypatch.setattr(export, "_convert", lambda *a, **k: conversions.append(1) or convert(*a, **k))
    sparsify(model, torch.randn(1, 3, 32, 32), time_budget_s=0.01)
    assert len(conversions) == 3 and traced == ["ResNetStyle"]


_CHILD = """
import sys, torch
from hyperflow_ext.prune.cnns import {cls}
from hyperflow_ext.sparse import load, SparseConv2d
model = load(sys.argv[1], {cls})
assert any(isinstance(m, SparseConv2d) for m in model.modules())
x = torch.load(sys.argv[2], weights_only=True)
with torch.inference_mode():
    torch.save(model(x), sys.argv[3])
"""


@pytest.mark.parametrize("cls", [VGGStyle, ResNetStyle])
def test_saved_export_reloads_in_a_fresh_process(tmp_path, cls):
    model = pruned_cnn(cls, 0.95)
    sparse, _ = sparsify(model, dense_above=None)
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        want = sparse(x)
    path = tmp_path / "export.safetensors"
    save(sparse, path, metadata={"sparsity": 0.95})
    assert not [p for p in tmp_path.iterdir() if p.name != "export.safetensors"]  # atomic: no temp files left
    torch.save(x, tmp_path / "x.pt")
    res = subprocess.run([sys.executable, "-c", _CHILD.format(cls=cls.__name__), str(path), str(tmp_path / "x.pt"),
                          str(tmp_path / "y.pt")], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)  # not the checkout: the installed package, with its native build
    assert res.returncode == 0, res.stderr
    got = torch.load(tmp_path / "y.pt", weights_only=True)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_load_rejects_foreign_and_corrupt_files(tmp_path):
    from hyperflow_ext._io import save_tensors
    model = pruned_cnn(VGGStyle, 0.95)
    sparse, _ = sparsify(model, dense_above=None)
    path = tmp_path / "m.safetensors"
    save(sparse, path)
    with pytest.raises(ValueError, match="not match the factory's architecture|has no module"):
        load(path, ResNetStyle)
    save_tensors(tmp_path / "plain.safetensors", {"a": torch.zeros(2)})
    with pytest.raises(ValueError, match="not a hyperflow sparse export"):
        load(tmp_path / "plain.safetensors", VGGStyle)
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.safetensors", VGGStyle)
    # a column index out of range is caught by the CSR validation, before any kernel runs
    from hyperflow_ext._io import load_tensors
    tensors, meta = load_tensors(path)
    tensors["features.0.col_indices"] = tensors["features.0.col_indices"].clone()
    tensors["features.0.col_indices"][0] = 10_000
    save_tensors(tmp_path / "bad.safetensors", tensors, meta)
    with pytest.raises(ValueError, match="col_indices must lie in"):
        load(tmp_path / "bad.safetensors", VGGStyle)
    assert json.loads(json.dumps(meta))["manifest"]["format"] == "hyperflow-sparse/1"


def test_pruner_export_folds_batchnorm_and_reports():
    torch.manual_seed(0)
    model = VGGStyle(widths=(8, 16, 16, 16, 32))
    randomize_batchnorm(model, torch.Generator().manual_seed(1))
    pruner = Pruner(model, target_sparsity=0.9)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    exported = pruner.export(x, time_budget_s=0.01)
    pruner.remove()
    with torch.inference_mode():
        torch.testing.assert_close(exported(x), model(x), atol=1e-4, rtol=1e-4)
    assert {r["name"] for r in pruner.export_report} >= {"features.0", "head"}
    assert all(r["bn"] for r in pruner.export_report if r["layer"] == "Conv2d")

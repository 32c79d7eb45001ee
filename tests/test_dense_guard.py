"""Never slower than dense (hyperflow_ext/sparse/_dense_guard.py): the whole-model check with an example
input, and the per-ISA density threshold without one. Timing is replaced where a test needs a given
winner: no test depends on which one the machine happens to make faster."""
import pytest
import torch
from torch import nn

from hyperflow_ext import native
from hyperflow_ext.prune.cnns import VGGStyle, apply_masks, magnitude_masks, randomize_batchnorm
from hyperflow_ext.sparse import DenseConv2d, SparseConv2d, sparsify
from hyperflow_ext.sparse import _dense_guard

pytestmark = pytest.mark.skipif(not native.available() or not native.isa_paths(),
                                reason="native extension not built (or built before ISA dispatch)")


def _model(sparsity):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = VGGStyle()
    randomize_batchnorm(model, gen)
    apply_masks(model, magnitude_masks(model, sparsity))
    return model.eval()


def _fake_times(winner):
    """An interleaved_times stand-in under which candidate `winner` (index; 0 is the export) is fastest
    and the export slowest unless it wins."""
    def fake(fns, *args, **kwargs):
        for f in fns:
            f()
        return [[1.0 if i == winner else 3.0 if i == 0 else 2.0] * 3 for i in range(len(fns))], 3
    return fake


def _guarded(monkeypatch, sparsity, winner):
    """sparsify with an example input under timings that make candidate `winner` fastest; the model, input,
    export and report, after checking the export computes what the model does."""
    model, x = _model(sparsity), torch.randn(2, 3, 32, 32)
    monkeypatch.setattr(_dense_guard, "interleaved_times", _fake_times(winner))
    out, report = sparsify(model, x, time_budget_s=0.01)
    with torch.inference_mode():
        torch.testing.assert_close(out(x), model(x), atol=1e-4, rtol=1e-4)
    return model, out, report


def test_whole_model_kept_dense_when_dense_is_faster(monkeypatch):
    _, out, report = _guarded(monkeypatch, 0.5, winner=4)  # "folded", NCHW
    assert not any(isinstance(m, SparseConv2d) for m in out.modules())
    assert any(isinstance(m, DenseConv2d) for m in out.modules())  # folded and fused, every layer dense
    assert all(r["kind"] == "dense" and r["reason"].startswith("whole model faster dense") for r in report)


def test_dense_original_in_channels_last_when_that_wins(monkeypatch):
    model, out, report = _guarded(monkeypatch, 0.5, winner=2)  # "dense_channels_last"
    assert out is not model and out.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert "kept dense_channels_last" in report[0]["reason"]


def test_export_kept_when_it_is_faster(monkeypatch):
    _, out, report = _guarded(monkeypatch, 0.95, winner=0)  # "export"
    assert any(isinstance(m, SparseConv2d) for m in out.modules()) or any(
        "depth_first" in r and r["depth_first"] for r in report)
    assert all(r["reason"].startswith(("timed alone", "faster dense alone")) for r in report)


def test_untimed_threshold_per_isa_path():
    model = _model(0.9)
    path = native.isa()
    limit = _dense_guard.DENSITY_THRESHOLDS[path]
    out, report = sparsify(model)  # dense_above="auto"
    for r in report:
        mod = out.get_submodule(r["name"])
        assert (r["kind"] == "dense") == (r["density"] > limit), r
        assert isinstance(mod, SparseConv2d) == (r["kind"] == "sparse" and r["layer"] == "Conv2d")
        assert path in r["reason"]
    _, report_all = sparsify(model, dense_above=None)
    assert all(r["kind"] == "sparse" for r in report_all)
    _, report_none = sparsify(model, dense_above=0.0)
    assert all(r["kind"] == "dense" for r in report_none if r["density"] > 0)


@pytest.mark.parametrize("bad", [1.5, -0.1, "fast", True])
def test_bad_dense_above_is_refused(bad):
    with pytest.raises(ValueError, match="dense_above"):
        sparsify(_model(0.9), dense_above=bad)


def test_thresholds_follow_the_forced_path():
    for path, ok in native.isa_paths().items():
        if ok:
            with native.use_isa(path):
                assert _dense_guard.dense_above("auto") == _dense_guard.DENSITY_THRESHOLDS[path]
    assert _dense_guard.dense_above(None) is None and _dense_guard.dense_above(0.25) == 0.25

"""The demo's sparsity-pays stage: a wider digits CNN pruned by Hyperflows, exported and timed (no timing asserted)."""
import pytest
import torch

from hyperflow_ext import native
from hyperflow_ext.prune.pays import end_to_end_speed, run_sparsity_pays
from hyperflow_ext.report import sparsity_pays_section

TINY = {"channels": (4, 8, 8), "hidden": 8, "pretrain_epochs": 1, "epochs": 1, "regrowth_epochs": 1}


@pytest.mark.skipif(not native.available(), reason="native extension not built")
def test_sparsity_pays_prunes_exports_and_times_each_batch():
    out = run_sparsity_pays(0.9, quick=True, progress=False, batches=(1, 5), overrides=TINY, budget_s=0.05)
    assert out["sparsity"] == pytest.approx(0.9, abs=5e-3)
    assert 0.0 <= out["pruned_acc"] <= 1.0 and 0.0 <= out["dense_acc"] <= 1.0
    assert out["agreement"] >= 0.99 and out["max_abs_diff"] < 1e-3  # the export computes the pruned model
    assert [r["batch"] for r in out["speed"]] == [1, 5]
    for r in out["speed"]:
        assert r["rounds"] >= 15 and r["sparse_ms"] > 0
        assert r["speedup"] == pytest.approx(min(r["dense_ms"], r["dense_cl_ms"]) / r["sparse_ms"])
        assert isinstance(r["dense_layers"], list)
    assert out["config"]["channels"] == (4, 8, 8) and out["config"]["target"] == 0.9
    text = sparsity_pays_section(out)
    assert "Where sparsity pays" in text and "4/8/8 channels" in text and text.count("\n| ") >= 3


def test_end_to_end_speed_reports_both_dense_layouts():
    dense = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU())
    r = end_to_end_speed(dense, dense, torch.randn(2, 1, 8, 8), budget_s=0.01)
    assert r["batch"] == 2 and r["threads"] == torch.get_num_threads()
    assert r["speedup"] == pytest.approx(min(r["dense_ms"], r["dense_cl_ms"]) / r["sparse_ms"])


def test_sparsity_pays_rejects_bad_arguments():
    with pytest.raises(ValueError, match="sparsity must lie in"):
        run_sparsity_pays(1.0)
    with pytest.raises(ValueError, match="unknown settings"):
        run_sparsity_pays(0.9, overrides={"width": 3})
    with pytest.raises(ValueError, match="batch sizes must lie in"):
        run_sparsity_pays(0.9, quick=True, progress=False, batches=(0,), overrides=TINY)
    assert sparsity_pays_section(None).startswith("(the sparsity-pays stage")

"""Gradual magnitude pruning (Zhu & Gupta cubic schedule) as a baseline."""
import pytest
import torch
from torch import nn

from hyperflow_ext.prune import cubic_sparsity, gradual_magnitude_prune
from hyperflow_ext.prune._loop import TensorLoader, evaluate


def test_cubic_schedule_matches_the_formula():
    assert cubic_sparsity(0, 0, 100, 0.9) == 0.0 and cubic_sparsity(100, 0, 100, 0.9) == 0.9
    assert cubic_sparsity(150, 0, 100, 0.9) == 0.9 and cubic_sparsity(-5, 0, 100, 0.9, 0.1) == 0.1
    assert cubic_sparsity(50, 0, 100, 0.9) == pytest.approx(0.9 * (1 - 0.5 ** 3))
    values = [cubic_sparsity(t, 10, 90, 0.95, 0.2) for t in range(0, 101)]
    assert all(b >= a for a, b in zip(values, values[1:]))  # never decreases
    assert values[11] - values[10] > values[89] - values[88]  # fast early, slow late


def test_gradual_pruning_reaches_the_target_and_still_learns():
    torch.manual_seed(0)
    x = torch.randn(512, 20)
    y = (x[:, :3].sum(1) > 0).long()
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 2))
    loader = TensorLoader(x, y, 32, shuffle=True)
    out = gradual_magnitude_prune(model, 0.9, loader, epochs=4, progress=False, val_loader=TensorLoader(x, y, 128))
    assert out["sparsity"] == pytest.approx(0.9, abs=2e-3)
    targets = [s for _, s in out["schedule"]]
    assert targets[0] == 0.0 and targets[-1] == pytest.approx(0.9) and targets == sorted(targets)
    steps = [t for t, _ in out["schedule"]]
    assert max(steps) == round(0.75 * 4 * len(loader))  # pruning ends at prune_fraction of training
    assert [r["epoch"] for r in out["history"]] == [1, 2, 3, 4]
    assert evaluate(model, TensorLoader(x, y, 128)) > 0.8  # a 90 %-sparse net still separates the classes
    for layer in (model[0], model[2]):
        assert isinstance(layer, nn.Linear)  # plain layers, pruned weights exactly zero
    zeros = sum(int((m.weight == 0).sum()) for m in (model[0], model[2]))
    assert zeros == pytest.approx(0.9 * (20 * 64 + 64 * 2), abs=3)


def test_gradual_pruning_rejects_bad_arguments():
    model = nn.Linear(4, 2)
    loader = TensorLoader(torch.randn(8, 4), torch.zeros(8, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="sparsity must be"):
        gradual_magnitude_prune(model, 1.0, loader, 1)
    with pytest.raises(ValueError, match="exceeds sparsity"):
        gradual_magnitude_prune(model, 0.5, loader, 1, initial_sparsity=0.6)
    with pytest.raises(ValueError, match="epochs"):
        gradual_magnitude_prune(model, 0.5, loader, 0)
    with pytest.raises(ValueError, match="len"):
        gradual_magnitude_prune(model, 0.5, iter(loader), 1)
    with pytest.raises(ValueError, match="nothing to prune"):
        gradual_magnitude_prune(nn.ReLU(), 0.5, loader, 1)
    with pytest.raises(TypeError):
        gradual_magnitude_prune("model", 0.5, loader, 1)


def test_pruning_experiment_reports_gradual_magnitude_beside_the_other_methods():
    from hyperflow_ext.prune.experiment import run_pruning_experiment

    out = run_pruning_experiment(sparsities=(0.9,), quick=True, progress=False, speed_at=None)
    (row,) = out["rows"]
    assert set(row) >= {"hyperflows", "magnitude", "gradual", "gap", "gap_gradual"}
    assert row["gradual"]["sparsity"] == pytest.approx(0.9, abs=5e-3)
    assert row["gradual"]["sparsity"] == pytest.approx(row["hyperflows"]["sparsity"], abs=1e-3)
    assert 0.0 <= row["gradual"]["acc"] <= 1.0
    assert row["gap_gradual"] == pytest.approx(row["hyperflows"]["acc"] - row["gradual"]["acc"])
    assert out["config"]["gradual"] is True
    no_gradual = run_pruning_experiment(sparsities=(0.9,), quick=True, progress=False, speed_at=None, gradual=False,
                                        overrides={"pretrain_epochs": 1, "epochs": 1, "regrowth_epochs": 1})
    assert "gradual" not in no_gradual["rows"][0]

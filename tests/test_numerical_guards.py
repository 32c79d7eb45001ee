"""Numerical guards: training loops stop cleanly on a NaN/Inf loss and keep the last good state; a
layer pruned to zero weights is reported on export instead of shipping a dead network silently."""
import warnings

import pytest
import torch
from torch import nn

import hyperflow_ext as hf
import hyperflow_ext.flow.train as train_module
from hyperflow_ext._io import load_tensors
from hyperflow_ext.flow import DriftTrainConfig
from hyperflow_ext.flow.drift import DriftNetwork
from hyperflow_ext.flow.train import fit_normalisation, train_drift
from hyperflow_ext.flow.trajectories import TrajectorySet
from hyperflow_ext.prune._loop import TensorLoader
from hyperflow_ext.sparse import CollapsedLayerWarning


def _drift_setup():
    g = torch.Generator().manual_seed(0)
    ts = TrajectorySet(torch.randn(8, 2, 5, 12, generator=g).cumsum(2), torch.randn(8, 5, generator=g))

    def fresh():
        torch.manual_seed(1)
        net = DriftNetwork(12, 5, hidden=16)
        fit_normalisation(net, ts)
        return net

    return ts, fresh, DriftTrainConfig(iters=12, batch_size=8)


def test_drift_training_stops_on_nan_loss_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    ts, fresh, cfg = _drift_setup()
    whole = fresh()
    train_drift(whole, ts, "linear", cfg, progress=False)  # the uninterrupted run
    ckpt = tmp_path / "drift.ckpt.safetensors"
    real_loss, calls = train_module._loss, [0]

    def loss_nan_at_7(*args):
        calls[0] += 1
        loss = real_loss(*args)
        return loss * float("nan") if calls[0] == 7 else loss

    monkeypatch.setattr(train_module, "_loss", loss_nan_at_7)
    net = fresh()
    with pytest.raises(FloatingPointError, match=r"loss became nan at iteration 7.*weights of iteration 6.*"
                                                 r"checkpoint .*drift\.ckpt\.safetensors \(iteration 6\) is kept"):
        train_drift(net, ts, "linear", cfg, progress=False, checkpoint=ckpt, checkpoint_every=3)
    tensors, meta = load_tensors(ckpt)
    assert meta["done"] == 6  # the last good checkpoint, untouched by the failed step
    for k, v in net.state_dict().items():  # no NaN update reached the weights: they are iteration 6's
        assert torch.isfinite(v).all()
        assert torch.equal(v, tensors[f"net/{k}"]), k
    monkeypatch.undo()
    resumed = fresh()  # a rerun resumes from iteration 6 and ends where the uninterrupted run ends
    train_drift(resumed, ts, "linear", cfg, progress=False, checkpoint=ckpt, checkpoint_every=3)
    for k, v in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k


def test_drift_training_without_checkpoint_names_no_file(monkeypatch):
    ts, fresh, cfg = _drift_setup()
    monkeypatch.setattr(train_module, "_loss", lambda *a: torch.tensor(float("inf"), requires_grad=True))
    net = fresh()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(FloatingPointError, match="loss became inf at iteration 1") as info:
        train_drift(net, ts, "linear", cfg, progress=False)
    assert "checkpoint" not in str(info.value)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())


def _classifier():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def _loader(nan_batch=None):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 1, 6, 6, generator=g), torch.arange(48) % 3
    if nan_batch is not None:
        x[nan_batch * 8] = float("nan")  # one sample of that batch
    return TensorLoader(x, y, batch_size=8)


def test_pruning_stops_on_nan_loss_with_finite_state():
    model = _classifier()
    pruner = hf.Pruner(model, target_sparsity=0.5)
    pruner.fit(_loader(), epochs=1, progress=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    scores = {n: m.scores.detach().clone() for n, m in pruner._layers.items()}
    with pytest.raises(FloatingPointError, match="loss is nan"):
        pruner.fit(_loader(nan_batch=0), epochs=1, progress=False)  # the first batch: nothing stepped yet
    for k, v in model.state_dict().items():
        assert torch.isfinite(v).all(), k
        assert torch.equal(v, state[k]), f"{k} changed by the step that saw the NaN loss"
    for n, m in pruner._layers.items():
        assert torch.equal(m.scores.detach(), scores[n])
    pruner.export()  # still a working pruner


def test_pruning_stops_on_nan_loss_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import hyperflow_ext.prune._loop as loop

    def run(checkpoint=None):
        pruner = hf.Pruner(_classifier(), target_sparsity=0.5)
        pruner.fit(_loader(), epochs=4, progress=False, checkpoint=checkpoint)
        return pruner

    whole = run()  # the uninterrupted run
    ckpt = tmp_path / "prune.ckpt.safetensors"
    real_ce, calls = loop.F.cross_entropy, [0]
    batches = len(_loader())

    def ce_nan_in_epoch_3(*args, **kwargs):
        calls[0] += 1
        loss = real_ce(*args, **kwargs)
        return loss * float("nan") if calls[0] == 2 * batches + 2 else loss

    monkeypatch.setattr(loop.F, "cross_entropy", ce_nan_in_epoch_3)
    with pytest.raises(FloatingPointError, match="loss is nan"):
        run(ckpt)
    monkeypatch.undo()
    _, meta = load_tensors(ckpt)
    assert meta["epoch"] == 2  # the checkpoint of the last finished epoch, untouched
    resumed = run(ckpt)  # a rerun resumes after epoch 2 and ends where the uninterrupted run ends
    for k, v in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k


def test_export_warns_about_a_layer_pruned_to_zero():
    model = _classifier()
    pruner = hf.Pruner(model, target_sparsity=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CollapsedLayerWarning)  # a healthy model exports silently
        pruner.export()
    with torch.no_grad():
        pruner._layers["3"].scores.fill_(-1.0)  # every weight of the head pruned
    with pytest.warns(CollapsedLayerWarning, match=r"layer\(s\) 3 have no nonzero weight"):
        exported = pruner.export()
    assert [r["collapsed"] for r in pruner.export_report] == [False, True]
    # what the warning is about: the exported network's output no longer depends on its input
    x = torch.randn(4, 1, 6, 6)
    with torch.inference_mode():
        out = exported(x)
    assert torch.equal(out, out[:1].expand_as(out))


def test_sparsify_warns_about_a_zero_layer_directly():
    model = _classifier().eval()
    with torch.no_grad():
        model[0].weight.zero_()
    with pytest.warns(CollapsedLayerWarning, match=r"layer\(s\) 0 have"):
        _, report = hf.sparse.sparsify(model, dense_above=None)
    assert report[0]["collapsed"] and not report[1]["collapsed"]

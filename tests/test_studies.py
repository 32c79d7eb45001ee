"""The study scripts' own code (``studies/``): the coordinate-wise drift that docs/measurements.md reports."""
import math
import sys
from pathlib import Path

import torch
from _toy_tasks import episodes, tiny_flow

from hyperflow_ext.flow import DriftNetwork, HyperFlow, fused_adapt
from hyperflow_ext.models import Conv4

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "studies"))
import coordinate_drift as study


def test_coordinate_layout_points_each_bias_at_its_layers_channel_statistics():
    flow = HyperFlow(Conv4(hidden=8, groups=2).eval(), params="bias")
    flow.probe(torch.rand(1, 1, 16, 16))
    index, tensor = study.coordinate_layout(flow)
    final = flow.encoder.final_dim(8)
    assert index.shape == (flow.subset.numel, 2) and tensor.shape == (flow.subset.numel,)
    # one (mean, spread) block of 2 x 8 entries of z per adapted layer, in the subset's order
    for k in range(len(flow.subset.names)):
        block = final + 16 * k
        assert torch.equal(index[8 * k:8 * (k + 1), 0], torch.arange(block, block + 8))
        assert torch.equal(index[8 * k:8 * (k + 1), 1], torch.arange(block + 8, block + 16))
        assert bool((tensor[8 * k:8 * (k + 1)] == k).all())
    assert int(index.max()) < flow.encoder.dim


def test_coordinate_drift_trains_and_integrates_as_its_network_says():
    with study.coordinate_drift(hidden=16):
        backbone, flow, _ = tiny_flow()
        net = flow.net
        assert isinstance(net, study.CoordinateDrift)
        assert bool(net.prior.abs().sum() > 0) and bool(torch.isfinite(net.prior).all())
        sx, sy = next(episodes(1, shot=2, seed=5))
        model = fused_adapt(backbone, sx, sy, flow=flow, select=False, steps=10, horizon=0.5)
        with torch.no_grad():  # explicit Euler on the network's own forward
            z = flow.encoder(sx, sy)
            delta = torch.zeros(1, flow.subset.numel)
            for n in range(10):
                delta = delta + 0.05 * net(delta, torch.full((1,), 0.05 * n), z)
        theta0 = flow.subset.vector(backbone)
        torch.testing.assert_close(model.theta, theta0 + delta[0], rtol=1e-4, atol=1e-6)
        assert float((model.theta - theta0).abs().max()) > 0  # the trained drift moves
    fresh = HyperFlow(backbone, params="bias")
    fresh.probe(sx)
    assert isinstance(fresh.net, DriftNetwork)  # the block restored the package's drift
    assert math.isfinite(float(model.theta.sum()))

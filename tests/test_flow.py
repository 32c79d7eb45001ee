"""HyperFlow: interpolants, solvers, the fused integrator, fit/save/load and fused_adapt."""
import copy
import math

import pytest
import torch

from _toy_tasks import episodes, tiny_flow
from hyperflow_ext.flow import (INTERPOLATIONS, DriftNetwork, DriftTrainConfig, HyperFlow, Interpolant,
                                ParamSubset, TaskEncoder, TrajectorySet, drift_integrate,
                                drift_integrate_reference, fused_adapt, get_tableau, odeint, train_drift)
from hyperflow_ext._io import load_tensors
from hyperflow_ext.flow.baselines import direct_transfer, finetune_adapt
from hyperflow_ext.models import Conv4
from hyperflow_ext.measure import peak_memory


# -- interpolation --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", INTERPOLATIONS)
def test_interpolant_derivative_matches_finite_differences(kind):
    pts = torch.randn(4, 11, 6, dtype=torch.float64).cumsum(1)
    path = Interpolant(pts, kind)
    t = torch.tensor([0.013, 0.31, 0.55, 0.97], dtype=torch.float64)  # away from knots
    _, dx = path(t)
    eps = 1e-6
    fd = (path(t + eps)[0] - path(t - eps)[0]) / (2 * eps)
    torch.testing.assert_close(dx, fd, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["piecewise", "cubic"])
def test_interpolant_passes_through_every_point(kind):
    pts = torch.randn(2, 6, 3, dtype=torch.float64)
    path = Interpolant(pts, kind)
    for k in range(6):
        x, _ = path(torch.full((2,), k / 5, dtype=torch.float64))
        torch.testing.assert_close(x, pts[:, k])


def test_linear_interpolant_and_cubic_is_natural():
    pts = torch.randn(3, 8, 2, dtype=torch.float64)
    x, dx = Interpolant(pts, "linear")(torch.full((3,), 0.25, dtype=torch.float64))
    torch.testing.assert_close(dx, pts[:, -1] - pts[:, 0])
    torch.testing.assert_close(x, pts[:, 0] + 0.25 * (pts[:, -1] - pts[:, 0]))
    cubic = Interpolant(pts, "cubic")
    assert cubic.second[:, 0].abs().max() == 0 and cubic.second[:, -1].abs().max() == 0
    with pytest.raises(ValueError, match="kind must be one of"):
        Interpolant(pts, "quadratic")


# -- solvers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", ["euler", "heun", "rk4"])
def test_solver_order_of_accuracy(solver):
    # dy/dt = y cos t, y(0) = 1; exact y = exp(sin t).
    f = lambda y, t, *_: y * math.cos(t)  # noqa: E731
    exact = math.exp(math.sin(2.0))
    errs = []
    for steps in (8, 16, 32):
        y, done, _ = odeint(f, torch.ones(1, 1, dtype=torch.float64), 0.0, 2.0, steps, solver)
        assert int(done) == steps
        errs.append(abs(float(y) - exact))
    orders = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    want = get_tableau(solver).order
    assert all(abs(o - want) < 0.1 for o in orders), (solver, orders)


def test_odeint_guard_keeps_last_good_state():
    f = lambda y, t, n, s: torch.where(torch.tensor(n >= 3), torch.full_like(y, float("nan")), torch.ones_like(y))  # noqa: E731
    y, done, _ = odeint(f, torch.zeros(2, 3), 0.0, 1.0, 10, "euler")
    assert done.tolist() == [3, 3]
    torch.testing.assert_close(y, torch.full((2, 3), 0.3))


# -- fused integrator -------------------------------------------------------------------------
def _random_drift(p=37, h=24, task_dim=5, tasks=3, steps=6, solver="euler", dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    net = DriftNetwork(p, task_dim, hidden=h).to(dtype)
    torch.nn.init.normal_(net.out.weight, std=0.3)
    z = torch.randn(tasks, task_dim, dtype=dtype)
    tab = get_tableau(solver)
    return (net.packed(dtype), torch.zeros(tasks, p, dtype=dtype), net.task_bias(z).detach().contiguous(),
            net.time_table(steps, 1.0, tab, dtype), 1.0 / steps)


@pytest.mark.parametrize("solver", ["euler", "heun", "rk4"])
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_drift_integrate_matches_network(solver, backend):
    w, d0, tb, table, dt = _random_drift(solver=solver)
    got, done = drift_integrate(w, d0, tb, table, dt, solver, backend=backend)
    ref, rdone, _ = drift_integrate_reference(w, d0, tb, table, dt, solver)
    torch.testing.assert_close(got, ref)
    assert done.tolist() == rdone.tolist() == [6, 6, 6]
    assert not got.requires_grad


def test_drift_integrate_triton_matches_reference():
    w, d0, tb, table, dt = _random_drift(p=40, h=16, tasks=2, steps=3, dtype=torch.float32)
    got, done = drift_integrate(w, d0, tb, table, dt, "euler", backend="triton")
    ref, _, _ = drift_integrate_reference(w, d0, tb, table, dt, "euler")
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert done.tolist() == [3, 3]


# -- end to end on a tiny backbone ------------------------------------------------------------
_episodes = episodes


@pytest.fixture(scope="module")
def tiny():
    return tiny_flow()


def test_fit_learns_and_keeps_best(tiny, tmp_path):
    _, flow, ts = tiny
    hist = flow.history
    assert len(hist["val"]) == 3
    assert sum(hist["train"][-10:]) < sum(hist["train"][:10])
    assert ts.deltas.shape == (12, 4, 9, flow.subset.numel)
    # a run that overshoots (a large learning rate): the weights kept are the best evaluation's, not the last
    net = copy.deepcopy(flow.net)
    train, val = ts.split(3)
    ckpt = tmp_path / "drift.ckpt.safetensors"
    hist = train_drift(net, train, "linear", DriftTrainConfig(iters=40, eval_every=5, lr=0.3), val, seed=0,
                       progress=False, checkpoint=ckpt)
    best = min(range(len(hist["val"])), key=hist["val"].__getitem__)
    assert best < len(hist["val"]) - 1
    tensors, _ = load_tensors(ckpt)
    for name, value in net.state_dict().items():
        assert torch.equal(value, tensors[f"best/{name}"]), name


def _drift_setup():
    from hyperflow_ext.flow.train import fit_normalisation

    g = torch.Generator().manual_seed(0)
    ts = TrajectorySet(torch.randn(10, 2, 6, 12, generator=g).cumsum(2), torch.randn(10, 5, generator=g))
    train, val = ts.split(2)

    def fresh(seed=1):
        torch.manual_seed(seed)
        net = DriftNetwork(12, 5, hidden=16)
        fit_normalisation(net, train)
        return net

    return train, val, fresh, DriftTrainConfig(iters=40, batch_size=16, eval_every=10)


def test_drift_training_resumes_from_its_checkpoint_exactly(tmp_path, monkeypatch):
    import hyperflow_ext.flow.train as train_module
    from hyperflow_ext._io import load_tensors
    from hyperflow_ext.flow.train import train_drift

    train, val, fresh, cfg = _drift_setup()
    whole = fresh()
    hist = train_drift(whole, train, "cubic", cfg, val, progress=False)

    calls, loss = [0], train_module._loss

    def interrupted(*args):
        calls[0] += 1
        if calls[0] == 26:  # iteration 24: 25 training calls and 2 validation passes in
            raise KeyboardInterrupt
        return loss(*args)

    ckpt = tmp_path / "drift.ckpt.safetensors"
    monkeypatch.setattr(train_module, "_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_drift(fresh(), train, "cubic", cfg, val, progress=False, checkpoint=ckpt, checkpoint_every=10)
    tensors, meta = load_tensors(ckpt)  # plain tensors and JSON: nothing is unpickled
    assert meta["done"] == 20 and len(meta["history"]["train"]) == 20
    monkeypatch.setattr(train_module, "_loss", loss)

    resumed = fresh()
    assert train_drift(resumed, train, "cubic", cfg, val, progress=False, checkpoint=ckpt, checkpoint_every=10) == hist
    for name, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    assert load_tensors(ckpt)[1]["done"] == 40

    def no_training(*args):
        raise AssertionError("a finished checkpoint must not train again")

    monkeypatch.setattr(train_module, "_loss", no_training)
    again = fresh()
    assert train_drift(again, train, "cubic", cfg, val, progress=False, checkpoint=ckpt) == hist
    assert all(torch.equal(again.state_dict()[k], v) for k, v in whole.state_dict().items())


def test_drift_checkpoint_of_another_run_is_refused(tmp_path):
    from hyperflow_ext.flow.train import train_drift

    train, val, fresh, cfg = _drift_setup()
    ckpt = tmp_path / "ck.safetensors"
    train_drift(fresh(), train, "linear", cfg, val, progress=False, checkpoint=ckpt)
    for kwargs in ({"interpolation": "cubic"}, {"config": DriftTrainConfig(iters=41, batch_size=16, eval_every=10)},
                   {"net": fresh(seed=2)}, {"seed": 3}):
        args = {"net": fresh(), "train": train, "interpolation": "linear", "config": cfg, "val": val, **kwargs}
        with pytest.raises(ValueError, match="was written by another training run"):
            train_drift(progress=False, checkpoint=ckpt, **args)
    for every in (0, 2.5, True):
        with pytest.raises(ValueError, match="checkpoint_every must be an int >= 1"):
            train_drift(fresh(), train, "linear", cfg, val, progress=False, checkpoint=ckpt, checkpoint_every=every)


def test_fit_passes_its_checkpoint_on(tiny, tmp_path):
    backbone, _, ts = tiny
    ckpt = tmp_path / "fit.ckpt.safetensors"
    cfg = DriftTrainConfig(iters=12, eval_every=4)
    a = HyperFlow(backbone, params="bias", hidden=32, seed=5).fit(trajectories=ts, train_config=cfg, progress=False,
                                                                 checkpoint=ckpt)
    assert ckpt.is_file()
    b = HyperFlow(backbone, params="bias", hidden=32, seed=5).fit(trajectories=ts, train_config=cfg, progress=False,
                                                                 checkpoint=ckpt)
    assert a.history == b.history
    assert all(torch.equal(b.net.state_dict()[k], v) for k, v in a.net.state_dict().items())


def test_time_table_is_cached_per_schedule_and_cleared_by_fit(tiny):
    backbone, _, ts = tiny
    flow = HyperFlow(backbone, params="bias", hidden=32)
    flow.fit(trajectories=ts, interpolation="linear", train_config=DriftTrainConfig(iters=5), progress=False)
    table = flow.time_table(8, 0.5, "heun", torch.float32)
    assert table.shape == (8, 2, 32)
    assert flow.time_table(8, 0.5, "heun", torch.float32) is table
    torch.testing.assert_close(table, flow.net.time_table(8, 0.5, get_tableau("heun")))
    assert not torch.equal(flow.time_table(8, 1.0, "heun", torch.float32), table)
    flow.fit(trajectories=ts, interpolation="linear", train_config=DriftTrainConfig(iters=5, lr=1e-2), progress=False)
    refreshed = flow.time_table(8, 0.5, "heun", torch.float32)
    assert refreshed is not table
    torch.testing.assert_close(refreshed, flow.net.time_table(8, 0.5, get_tableau("heun")))
    for steps, horizon in ((0, 0.5), (2.5, 0.5), (True, 0.5), (8, 0.0), (8, math.inf), (8, -1.0), (8, "1")):
        with pytest.raises(ValueError, match="steps must be a positive int|horizon must be finite and > 0"):
            flow.time_table(steps, horizon, "euler", torch.float32)
    with pytest.raises(ValueError, match="dtype must be floating point"):
        flow.time_table(8, 0.5, "euler", torch.int64)
    with pytest.raises(ValueError, match="solver must be one of"):
        flow.time_table(8, 0.5, "midpoint", torch.float32)


def test_fused_adapt_no_graph_no_mutation(tiny):
    backbone, flow, _ = tiny
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    sx, sy = next(_episodes(1, seed=5))
    model = fused_adapt(backbone, sx, sy, flow=flow, steps=8, backend="native", select=False)
    logits = model(sx)
    assert logits.shape == (6, 3) and not logits.requires_grad and model.theta.grad_fn is None
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, before[k]), k
    # shares frozen tensors, owns only the adapted subset
    assert not any(True for _ in model.parameters())
    assert model.theta.shape == (flow.subset.numel,)
    assert not torch.equal(model.theta, flow.subset.vector(backbone))


def test_fused_adapt_backends_agree_and_batch(tiny):
    backbone, flow, _ = tiny
    eps = list(_episodes(3, seed=7))
    sx = torch.stack([e[0] for e in eps]); sy = torch.stack([e[1] for e in eps])
    ref = fused_adapt(backbone, sx, sy, flow=flow, steps=8, backend="torch", select=False)
    nat = fused_adapt(backbone, sx, sy, flow=flow, steps=8, backend="native", select=False)
    torch.testing.assert_close(nat.theta, ref.theta, atol=1e-5, rtol=1e-5)
    singles = [fused_adapt(backbone, x, y, flow=flow, steps=8, backend="torch", select=False) for x, y in eps]
    for i, m in enumerate(singles):
        torch.testing.assert_close(m.theta, ref.theta[i], atol=1e-5, rtol=1e-5)
    assert ref(sx).shape == (3, 6, 3)
    as_list = fused_adapt(backbone, [e[0] for e in eps], [e[1] for e in eps], flow=flow, steps=8, select=False)
    assert len(as_list) == 3


def test_task_embedding_is_order_invariant(tiny):
    backbone, flow, _ = tiny
    sx, sy = next(_episodes(1, seed=3))
    z = flow.encoder(sx, sy)
    perm = torch.randperm(sy.shape[0])
    relabel = torch.tensor([2, 0, 1])
    torch.testing.assert_close(flow.encoder(sx[perm], relabel[sy[perm]]), z, atol=1e-6, rtol=1e-6)


def test_task_encoder_parts_change_memory_not_values(tiny):
    backbone, _, _ = tiny
    sx, sy = next(_episodes(1, seed=4))
    whole = TaskEncoder(backbone, backbone.feature_dim, parts=1)
    z = whole(sx, sy)
    for parts in (2, 5, 1000):    # more parts than images: one image per call
        torch.testing.assert_close(TaskEncoder(backbone, backbone.feature_dim, parts=parts)(sx, sy), z,
                                   atol=1e-6, rtol=1e-5)
    x = torch.rand(20, 1, 28, 28)
    y = torch.arange(4).repeat_interleave(5)
    conv = Conv4()
    _, one = peak_memory(lambda: TaskEncoder(conv, conv.feature_dim, parts=1)(x, y))
    _, five = peak_memory(lambda: TaskEncoder(conv, conv.feature_dim, parts=5)(x, y))
    assert five < one / 2, (five, one)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="parts must be a positive int"):
            TaskEncoder(backbone, backbone.feature_dim, parts=bad)


def test_save_load_roundtrip(tiny, tmp_path):
    backbone, flow, _ = tiny
    path = tmp_path / "drift.safetensors"
    flow.save(path)
    loaded = HyperFlow.load(path, backbone)
    sx, sy = next(_episodes(1, seed=9))
    a = fused_adapt(backbone, sx, sy, flow=flow, steps=4, backend="torch", select=False)
    b = fused_adapt(backbone, sx, sy, flow=loaded, steps=4, backend="torch", select=False)
    torch.testing.assert_close(a.theta, b.theta)
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a valid safetensors"):
        HyperFlow.load(tmp_path / "bad.safetensors", backbone)
    with pytest.raises(ValueError, match="was trained for|lacks adapted"):
        HyperFlow.load(path, Conv4(hidden=16, groups=2))


def test_guard_warns_and_returns_last_good_state(tiny):
    backbone, flow, _ = tiny
    sx, sy = next(_episodes(1, seed=2))
    with pytest.warns(RuntimeWarning, match="divergence guard"):
        model = fused_adapt(backbone, sx, sy, flow=flow, steps=8, guard=1e-9, backend="native", select=False)
    torch.testing.assert_close(model.theta, flow.subset.vector(backbone))


def test_fused_adapt_bad_input(tiny):
    backbone, flow, _ = tiny
    sx, sy = next(_episodes(1))
    with pytest.raises(ValueError, match="support_y must have shape"):
        fused_adapt(backbone, sx, sy[:-1], flow=flow)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        fused_adapt(backbone, sx, sy.clone().fill_(0).index_fill_(0, torch.tensor([0]), 5), flow=flow, way=3)
    with pytest.raises(ValueError, match="class 1 has no support example"):
        fused_adapt(backbone, sx, torch.tensor([0, 0, 2, 2, 0, 2]), flow=flow)
    bad = sx.clone(); bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fused_adapt(backbone, bad, sy, flow=flow)
    with pytest.raises(ValueError, match="integer labels"):
        fused_adapt(backbone, sx, sy.float(), flow=flow)
    with pytest.raises(ValueError, match="is on meta"):
        fused_adapt(backbone, sx.to("meta"), sy, flow=flow)
    with pytest.raises(ValueError, match="steps must be"):
        fused_adapt(backbone, sx, sy, flow=flow, steps=0)
    with pytest.raises(ValueError, match="solver must be one of"):
        fused_adapt(backbone, sx, sy, flow=flow, solver="midpoint")
    with pytest.raises(TypeError, match="flow must be a HyperFlow"):
        fused_adapt(backbone, sx, sy, flow="drift.safetensors")
    with pytest.raises(ValueError, match="was trained for"):
        fused_adapt(Conv4(hidden=16, groups=2), sx, sy, flow=flow)
    with pytest.raises(ValueError, match="the flow is not trained"):
        fused_adapt(backbone, sx, sy, flow=HyperFlow(backbone, hidden=8))


def test_baselines_run_and_finetuning_lowers_support_loss(tiny):
    backbone, flow, _ = tiny
    sx, sy = next(_episodes(1, seed=4))
    base = direct_transfer(backbone, sx, sy)
    tuned = finetune_adapt(backbone, sx, sy, params="bias", steps=10, lr=5e-2)
    ce = lambda m: torch.nn.functional.cross_entropy(m(sx), sy)  # noqa: E731
    assert ce(tuned) < ce(base)
    assert finetune_adapt(backbone, sx, sy, params="all", steps=2).theta.numel() == ParamSubset(backbone, "all").numel


def test_param_subset_selection():
    m = Conv4(hidden=8, groups=2)
    assert all(n.endswith("bias") for n in ParamSubset(m, "bias").names)
    head = ParamSubset(m, "head")
    assert all(n.startswith(head.names[0].rsplit(".", 1)[0]) for n in head.names)
    assert ParamSubset(m, lambda n, p: "features.0" in n).numel == sum(p.numel() for n, p in m.named_parameters() if "features.0" in n)
    with pytest.raises(ValueError, match="unknown parameter names"):
        ParamSubset(m, ["nope"])
    with pytest.raises(ValueError, match="matches no parameter"):
        ParamSubset(m, lambda n, p: False)
    vec = torch.arange(ParamSubset(m, "bias").numel, dtype=torch.float32)
    parts = ParamSubset(m, "bias").unflatten(vec)
    assert torch.equal(torch.cat([v.reshape(-1) for v in parts.values()]), vec)


def test_trajectory_store_resumes_and_is_keyed_by_backbone(tmp_path, monkeypatch):
    from hyperflow_ext.flow import TrajectoryConfig, record_trajectories
    from hyperflow_ext.flow import trajectories as traj_mod

    torch.manual_seed(0)
    backbone = Conv4(hidden=8, groups=2).eval()
    subset = ParamSubset(backbone, "bias")
    enc = TaskEncoder(backbone, backbone.feature_dim)
    cfg = TrajectoryConfig(steps=3, perturbations=1)
    first = record_trajectories(backbone, subset, enc, _episodes(5), 5, cfg, store=tmp_path, chunk_size=2,
                                progress=False)
    assert len(list(tmp_path.glob("traj-*.safetensors"))) == 3

    real_finetune = traj_mod.finetune
    with monkeypatch.context() as m:  # everything is stored: nothing may be fine-tuned again
        m.setattr(traj_mod, "finetune", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
        again = record_trajectories(backbone, subset, enc, _episodes(5), 5, cfg, store=tmp_path, chunk_size=2,
                                    progress=False)
    assert traj_mod.finetune is real_finetune
    torch.testing.assert_close(again.deltas, first.deltas)
    more = record_trajectories(backbone, subset, enc, _episodes(7), 7, cfg, store=tmp_path, chunk_size=2,
                               progress=False)
    torch.testing.assert_close(more.deltas[:5], first.deltas)
    assert more.episodes == 7
    other = Conv4(hidden=8, groups=2).eval()  # other weights: a different store key
    record_trajectories(other, ParamSubset(other, "bias"), TaskEncoder(other, 8), _episodes(2), 2, cfg,
                        store=tmp_path, progress=False)
    assert len({p.name.split("-")[1] for p in tmp_path.glob("traj-*.safetensors")}) == 2


def test_separate_task_encoder_is_used_for_z_and_backbone_for_finetuning():
    torch.manual_seed(0)
    backbone = Conv4(hidden=8, groups=2).eval()
    encoder = Conv4(hidden=16, groups=2).eval()
    flow = HyperFlow(backbone, params="bias", hidden=16, encoder=encoder)
    assert flow.backbone is backbone and flow.encoder.encoder is encoder
    ts = flow.record(_episodes(2), tasks=2, trajectory_steps=2, perturbations=0, progress=False)
    assert flow.encoder.layers and flow.encoder.layer_dims == [16] * len(flow.encoder.layers)  # the encoder's
    assert flow.encoder.dim == 5 * 16 + 1 + 2 * 16 * len(flow.encoder.layers)                  # own widths
    assert ts.deltas.shape[-1] == ParamSubset(backbone, "bias").numel and ts.z.shape == (2, flow.encoder.dim)


def test_features_with_runs_match_one_run_at_a_time_and_carry_gradients():
    from hyperflow_ext.flow.functional import features_with

    torch.manual_seed(0)
    backbone = Conv4(hidden=8, groups=2).eval()
    subset = ParamSubset(backbone, "bias")
    thetas = (subset.vector(backbone) + 0.1 * torch.randn(3, subset.numel)).requires_grad_(True)
    x = torch.rand(3, 4, 1, 28, 28)
    shared = features_with(backbone, subset, thetas, x[0], shared_x=True)
    per_run = features_with(backbone, subset, thetas, x)
    assert shared.shape == per_run.shape == (3, 4, 8)
    for r in range(3):
        torch.testing.assert_close(shared[r], features_with(backbone, subset, thetas[r], x[0]))
        torch.testing.assert_close(per_run[r], features_with(backbone, subset, thetas[r], x[r]))
    per_run[1].sum().backward()
    assert thetas.grad[1].abs().sum() > 0 and thetas.grad[0].abs().sum() == 0 == thetas.grad[2].abs().sum()


# -- query objective, horizon tuning, task clipping, store keys ------------------------------
def test_query_objective_follows_the_query_loss_and_needs_queries():
    from hyperflow_ext.flow.functional import finetune, query_loss, features_with

    torch.manual_seed(0)
    backbone = Conv4(hidden=8, groups=2).eval()
    subset = ParamSubset(backbone, "bias")
    sx, sy, qx, qy = next(_episodes(1, query=4, seed=3))
    theta0 = subset.vector(backbone)

    def qloss(theta):
        with torch.no_grad():
            return float(query_loss(features_with(backbone, subset, theta, sx), sy,
                                    features_with(backbone, subset, theta, qx), qy, 3, "cosine", 10.0))

    on_query, _, losses = finetune(backbone, subset, sx, sy, theta0, 15, 3, lr=2e-2, query=(qx, qy))
    on_support, _, _ = finetune(backbone, subset, sx, sy, theta0, 15, 3, lr=2e-2)
    assert losses[-1] < losses[0] and qloss(on_query) < qloss(theta0)
    assert not torch.equal(on_query, on_support)  # a different objective moves the parameters elsewhere
    flow = HyperFlow(backbone, params="bias", hidden=16)
    ts = flow.record(_episodes(2, query=3), tasks=2, trajectory_steps=3, perturbations=0, progress=False,
                     objective="query")
    assert ts.deltas.shape == (2, 1, 4, subset.numel)
    with pytest.raises(ValueError, match="objective='query' needs episodes with queries"):
        flow.record(_episodes(1), tasks=1, trajectory_steps=2, progress=False, objective="query")
    with pytest.raises(ValueError, match="objective must be one of"):
        flow.record(_episodes(1), tasks=1, trajectory_steps=2, progress=False, objective="loss")


def test_tune_horizon_picks_the_most_accurate_and_is_saved(tiny, tmp_path):
    backbone, flow, _ = tiny
    eps = list(_episodes(6, query=3, seed=11))
    scores = flow.tune_horizon(iter(eps), tasks=6, horizons=(0.25, 1.0), steps=4, progress=False)
    assert set(scores) == {"none", "h=0.25", "h=1"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert scores[f"h={flow.horizon:g}"] == max(scores["h=0.25"], scores["h=1"])
    # each score is the query accuracy of fused_adapt at that horizon
    models = fused_adapt(backbone, [e[0] for e in eps], [e[1] for e in eps], flow=flow, steps=4, horizon=0.25, select=False)
    acc = torch.stack([(m(e[2]).argmax(-1) == e[3]).float().mean() for m, e in zip(models, eps)]).mean()
    assert abs(float(acc) - scores["h=0.25"]) < 1e-6
    # fused_adapt's default horizon is the tuned one, and it survives save/load
    flow.horizon = 0.5
    sx, sy = eps[0][0], eps[0][1]
    torch.testing.assert_close(fused_adapt(backbone, sx, sy, flow=flow, steps=4, select=False).theta,
                               fused_adapt(backbone, sx, sy, flow=flow, steps=4, horizon=0.5, select=False).theta)
    flow.save(tmp_path / "f.safetensors")
    assert HyperFlow.load(tmp_path / "f.safetensors", backbone).horizon == 0.5
    flow.horizon = 1.0
    with pytest.raises(ValueError, match="needs episodes with query sets"):
        flow.tune_horizon(_episodes(2), tasks=2, progress=False)
    with pytest.raises(ValueError, match="horizons must be finite and > 0"):
        flow.tune_horizon(iter(eps), horizons=(0.0, 1.0), progress=False)
    with pytest.raises(ValueError, match="fit the flow first"):
        HyperFlow(backbone, params="bias", hidden=8).tune_horizon(iter(eps), progress=False)


def test_task_embedding_is_clipped_to_the_training_range():
    net = DriftNetwork(5, 3, hidden=8)
    net.task_mean.copy_(torch.tensor([1.0, 0.0, -1.0]))
    net.task_scale.copy_(torch.tensor([2.0, 1.0, 0.5]))
    far = torch.tensor([[1.0 + 2.0 * 50, 0.0, -1.0 - 0.5 * 9]])   # +50 and -9 standard deviations
    edge = torch.tensor([[1.0 + 2.0 * 3, 0.0, -1.0 - 0.5 * 3]])   # clipped to +3 and -3
    torch.testing.assert_close(net.task_bias(far), net.task_bias(edge))
    inside = torch.tensor([[1.5, 0.2, -1.1]])
    assert not torch.allclose(net.task_bias(inside), net.task_bias(edge))


def test_trajectory_store_is_keyed_by_the_episodes(tmp_path):
    from hyperflow_ext.flow import TrajectoryConfig, record_trajectories

    torch.manual_seed(0)
    backbone = Conv4(hidden=8, groups=2).eval()
    subset, enc = ParamSubset(backbone, "bias"), TaskEncoder(backbone, backbone.feature_dim)
    cfg = TrajectoryConfig(steps=2, perturbations=0)
    a = record_trajectories(backbone, subset, enc, _episodes(2, seed=0), 2, cfg, store=tmp_path, progress=False)
    b = record_trajectories(backbone, subset, enc, _episodes(2, seed=1), 2, cfg, store=tmp_path, progress=False)
    assert len(list(tmp_path.glob("traj-*.safetensors"))) == 2
    assert not torch.equal(a.z, b.z)  # other episodes were recorded, not resumed from the first store
    # Same first episode, different second one: the shared chunk must not be reused.
    first, second = list(_episodes(2, seed=0)), list(_episodes(2, seed=5))
    c = record_trajectories(backbone, subset, enc, [first[0], second[1]], 2, cfg, store=tmp_path, progress=False)
    torch.testing.assert_close(c.z[0], a.z[0])
    assert not torch.allclose(c.z[1], a.z[1])
    with pytest.raises(ValueError, match="episode iterable is empty"):
        record_trajectories(backbone, subset, enc, iter([]), 1, cfg, progress=False)


def test_flow_path_ends_where_fused_adapt_does(tiny):
    from hyperflow_ext.flow import flow_path

    backbone, flow, _ = tiny
    sx, sy = next(_episodes(1, seed=21))
    path = flow_path(backbone, sx, sy, flow, steps=6, solver="heun", horizon=0.7)
    theta_pre = flow.subset.vector(backbone)
    assert path.shape == (1, 7, flow.subset.numel) and not path.requires_grad
    torch.testing.assert_close(path[0, 0], theta_pre)
    end = fused_adapt(backbone, sx, sy, flow=flow, steps=6, solver="heun", horizon=0.7, backend="torch", select=False).theta
    torch.testing.assert_close(path[0, -1], end)
    assert not torch.equal(path[0, 3], theta_pre)


def test_flow_path_rejects_bad_support(tiny):
    from hyperflow_ext.flow import flow_path

    backbone, flow, _ = tiny
    sx, sy = next(_episodes(1, seed=22))
    with pytest.raises(ValueError, match="flow_path"):
        flow_path(backbone, sx, sy[:-1], flow)
    bad = sx.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="flow_path.*NaN"):
        flow_path(backbone, bad, sy, flow)


def test_drift_pays_is_what_tune_horizon_measured_and_is_saved(tiny, tmp_path):
    from hyperflow_ext._io import save_tensors

    backbone, flow, _ = tiny
    eps = list(_episodes(6, query=3, seed=12))
    horizon, before = flow.horizon, flow.drift_pays
    try:
        scores = flow.tune_horizon(iter(eps), tasks=6, horizons=(0.25, 1.0), steps=4, progress=False)
        assert flow.drift_pays is (scores[f"h={flow.horizon:g}"] > scores["none"])
        for value in (True, False, None):
            flow.drift_pays = value
            flow.save(tmp_path / "f.safetensors")
            assert HyperFlow.load(tmp_path / "f.safetensors", backbone).drift_pays is value
        tensors, meta = load_tensors(tmp_path / "f.safetensors")
        del meta["drift_pays"]  # a checkpoint from before the attribute: not measured
        save_tensors(tmp_path / "old.safetensors", tensors, meta)
        assert HyperFlow.load(tmp_path / "old.safetensors", backbone).drift_pays is None
        save_tensors(tmp_path / "bad.safetensors", tensors, {**meta, "drift_pays": "yes"})
        with pytest.raises(ValueError, match="drift_pays"):
            HyperFlow.load(tmp_path / "bad.safetensors", backbone)
    finally:
        flow.horizon, flow.drift_pays = horizon, before

"""Depth-first network execution (hyperflow_ext.sparse.network): the fused chain against the
layer-by-layer model and the dense reference, its fallbacks, invalidation, copies and threads."""
import copy
import itertools
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from _helpers import TOL, pruned_cnn
from _threads import run_threaded
from hyperflow_ext import native
from hyperflow_ext.prune.cnns import ResNetStyle, VGGStyle
from hyperflow_ext.sparse import export, load, save, sparsify
from hyperflow_ext.sparse.fx_passes import fuse_network
from hyperflow_ext.sparse import SparseConv2d
from hyperflow_ext.sparse.network import CONV, STEP_COLUMN, STEP_FIELDS, SparseConvNet

pytestmark = pytest.mark.skipif(not native.available(), reason="native extension not built")


@pytest.fixture
def native_threads():
    """Set the native thread count for a test, restoring it afterwards."""
    before = native.cpu_module().omp_max_threads()
    yield native.cpu_module().omp_set_num_threads
    native.cpu_module().omp_set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cls", [VGGStyle, ResNetStyle])
def test_fused_chain_matches_dense_and_layer_by_layer(cls, dtype, threads, native_threads):
    native_threads(threads)
    model = pruned_cnn(cls, 0.9, dtype=dtype)
    layered, _ = sparsify(model, depth_first=False, dense_above=None)
    fused, report = sparsify(model, dense_above=None)
    assert isinstance(fused.sparse_net, SparseConvNet) and not hasattr(layered, "sparse_net")
    assert all(r["depth_first"] for r in report if r["layer"] == "Conv2d")
    for batch, channels_last in itertools.product([1, 5], [False, True]):
        x = torch.randn(batch, 3, 32, 32, dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            want = model(x)
            got = fused(x)
            torch.testing.assert_close(got, want, **TOL[dtype])
            torch.testing.assert_close(got, layered(x), **TOL[dtype])
    prog = next(iter(fused.sparse_net._programs.values()))
    if cls is ResNetStyle:  # each 1x1 stride-2 shortcut reads what its block's first convolution packed
        assert int((prog.steps[:, STEP_COLUMN["prepacked"]] == 2).sum()) == 3
    # every convolution writes rows whose pitch is its packed row width (whole-register stores): the
    # stride-2 ones through a lane pitch one past their natural width
    border = prog.slot_size[1].tolist()
    steps = [dict(zip(STEP_FIELDS, row)) for row in prog.steps.tolist()]
    widened = 0
    for t, st in enumerate(steps):
        if st["kind"] != CONV:
            continue
        natural = (st["w"] + 2 * st["pw"] + st["sw"] - 1) // st["sw"]
        assert st["lane_pitch"] == 0 or st["lane_pitch"] > natural
        widened += st["lane_pitch"] > 0
        if t < len(steps) - 1:
            assert st["ow"] + 2 * border[st["out"]] == (st["lane_pitch"] or natural), st
    assert widened == (6 if cls is ResNetStyle else 0)  # 3 stride-2 convolutions and their shortcuts


class _Odd(nn.Module):
    """Geometries the benchmark CNNs do not have: stride 2 with dilation, 5x5 and 1x1 kernels, an odd
    map under a max pool (floor), a 3x3 stride-1 pool, a residual two steps back, an average pool."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 6, 3, stride=2, padding=2, dilation=2)
        self.b = nn.Conv2d(6, 6, 5, padding=2)
        self.pool = nn.MaxPool2d(2)
        self.c = nn.Conv2d(6, 8, 1)
        self.pool3 = nn.MaxPool2d(3, stride=1)
        self.d = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        y = torch.relu(self.b(self.a(x)))
        y = self.pool3(self.c(self.pool(y)))
        y = torch.relu(self.d(y) + y)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


@pytest.mark.parametrize("hw", [(19, 23), (13, 13)])
def test_odd_geometries_match_the_dense_model(hw):
    torch.manual_seed(1)
    model = _Odd().double().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_((torch.rand_like(m.weight) < 0.5).double())
    fused, chain = fuse_network(sparsify(model, depth_first=False, dense_above=None)[0])
    assert chain == ["a", "b", "c", "d", "head"]  # the (sparse) head is a 1x1 convolution of the pooled map
    x = torch.randn(3, 2, *hw, dtype=torch.float64)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), model(x), **TOL[torch.float64])


def test_max_pool_propagates_nan_like_torch():
    model = pruned_cnn(VGGStyle, 0.5)
    fused, _ = sparsify(model, dense_above=None)
    x = torch.randn(2, 3, 32, 32)
    x[0, :, 5, 7] = float("nan")
    with torch.inference_mode():
        got, want = fused(x), model(x)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(got[0]).all()
    torch.testing.assert_close(got[1], want[1], **TOL[torch.float32])


def test_weight_edit_after_a_call_is_seen():
    model = pruned_cnn(ResNetStyle, 0.9)
    fused, _ = sparsify(model, dense_above=None)
    x = torch.randn(2, 3, 32, 32)
    layered, _ = sparsify(model, depth_first=False, dense_above=None)
    with torch.inference_mode():
        before = fused(x)
    with torch.no_grad():
        for m in (fused, layered):  # in place: same tensor, new version
            m.get_submodule("blocks.1.conv1").values.mul_(-1.0)
    with torch.inference_mode():
        after = fused(x)
        torch.testing.assert_close(after, layered(x), **TOL[torch.float32])
    assert not torch.allclose(before, after)


def test_inputs_the_program_does_not_cover_take_the_module_path():
    model = pruned_cnn(VGGStyle, 0.9)
    fused, _ = sparsify(model, dense_above=None)
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(NotImplementedError, match="inference-only"):
        fused(x.requires_grad_())
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), **TOL[torch.float32])
        with pytest.raises((TypeError, ValueError, RuntimeError), match="dtype|float"):
            fused(x.double())
        with pytest.raises((TypeError, ValueError, RuntimeError), match="channel|shape"):
            fused(torch.randn(2, 4, 32, 32))
        assert fused(torch.randn(0, 3, 32, 32)).shape == (0, 10)


def test_a_layer_swapped_after_export_runs_through_the_modules():
    model = pruned_cnn(VGGStyle, 0.9)
    fused, _ = sparsify(model, dense_above=None)
    fused.features[4] = nn.Conv2d(64, 128, 3, padding=1)
    with torch.inference_mode():
        y = fused(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 10) and torch.isfinite(y).all()


def test_deepcopy_and_save_load_keep_the_chain(tmp_path):
    model = pruned_cnn(ResNetStyle, 0.95)
    fused, _ = sparsify(model, dense_above=None)
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        want = fused(x)
        twin = copy.deepcopy(fused)
        assert twin.sparse_net is not fused.sparse_net and not twin.sparse_net._programs
        torch.testing.assert_close(twin(x), want, atol=0, rtol=0)
        assert set(twin.state_dict()) == set(fused.state_dict())
    save(fused, tmp_path / "m.safetensors")
    back = load(tmp_path / "m.safetensors", ResNetStyle)
    assert isinstance(back.sparse_net, SparseConvNet)
    with torch.inference_mode():
        torch.testing.assert_close(back(x), want, atol=0, rtol=0)


def test_single_sample_team_choice_is_timed_kept_and_exact(tmp_path, native_threads, monkeypatch):
    native_threads(2)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    model = pruned_cnn(VGGStyle, 0.95)
    x = torch.randn(1, 3, 32, 32)
    layered, _ = sparsify(model, dense_above=None, depth_first=False)  # untimed: every layer sparse
    try:
        # The timing itself is replaced (its outcome on a shared machine is noise): the fastest of
        # (team, calling thread, layer by layer) must be what is kept, whichever it is.
        for medians, team in (([2.0, 1.0, 3.0], False), ([1.0, 2.0, 3.0], True)):
            monkeypatch.setattr(export, "interleaved_times",
                                lambda fns, *a, m=medians, **k: ([[t] * 9 for t in m], 9))
            fused, chain = export._pick_depth_first(copy.deepcopy(layered), x, 0.02)
            assert chain and fused.sparse_net.single_sample_team is team
        monkeypatch.setattr(export, "interleaved_times", lambda fns, *a, **k: ([[2.0] * 9, [3.0] * 9, [1.0] * 9], 9))
        slower, chain = export._pick_depth_first(copy.deepcopy(layered), x, 0.02)
        assert not chain and not isinstance(getattr(slower, "sparse_net", None), SparseConvNet)
        monkeypatch.undo()
        fused, _ = sparsify(model, x, time_budget_s=0.02)  # the real timing runs end to end
        if isinstance(getattr(fused, "sparse_net", None), SparseConvNet):
            assert fused.sparse_net.single_sample_team in (True, False)
        fused, _ = export._pick_depth_first(copy.deepcopy(layered), x, 0.02)
    finally:
        torch.set_num_threads(before)
    if not isinstance(getattr(fused, "sparse_net", None), SparseConvNet):
        fused, _ = sparsify(model, dense_above=None)
    net = fused.sparse_net
    with torch.inference_mode():
        want = model(x)
        outputs = {}
        for team in (True, False, None):
            net.single_sample_team = team
            outputs[team] = fused(x)
            torch.testing.assert_close(outputs[team], want, **TOL[torch.float32])
        # the team splits output channels: every sum is still one thread's, in the same order
        assert torch.equal(outputs[True], outputs[False])
    for bad in ("yes", 1, 0.0):
        with pytest.raises(TypeError, match="single_sample_team must be True, False or None"):
            net.single_sample_team = bad
    net.single_sample_team = False
    save(fused, tmp_path / "m.safetensors")
    assert load(tmp_path / "m.safetensors", VGGStyle).sparse_net.single_sample_team is False


def test_concurrent_calls_are_bit_exact(native_threads):
    native_threads(2)
    model = pruned_cnn(ResNetStyle, 0.9)
    fused, _ = sparsify(model, dense_above=None)
    inputs = [(torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(b)),) for b in (1, 3, 4)]
    with torch.inference_mode():
        serial = {id(x): fused(x) for (x,) in inputs}

        def call(x):
            with torch.inference_mode():
                return fused(x)
        jobs, results = run_threaded(call, inputs, threads=8)
    for (x,), y in zip(jobs, results):
        assert torch.equal(y, serial[id(x)])


HEADER = Path(__file__).resolve().parents[1] / "csrc" / "include" / "hf_conv_net.h"


def test_step_fields_mirror_the_native_struct():
    assert len(STEP_FIELDS) == native.cpu_module().conv_net_step_fields == 27
    if not HEADER.exists():
        pytest.skip("no csrc/ beside the tests")
    body = re.search(r"struct ConvNetStep \{(.*?)\};", HEADER.read_text(encoding="utf-8"), re.S).group(1)
    declared = [name.strip() for line in re.findall(r"std::int64_t ([^;]*);", body) for name in line.split(",")]
    assert tuple(declared) == STEP_FIELDS


def test_native_program_checks():
    mod = native.cpu_module()
    steps = torch.zeros(1, len(STEP_FIELDS), dtype=torch.int64)
    avg_pool = {"kind": 2, "in": 0, "res": -1, "out": 5, "c": 4, "h": 2, "w": 2, "oc": 4, "oh": 1, "ow": 1}
    for name, value in avg_pool.items():  # writing slot 5 of 2
        steps[0, STEP_COLUMN[name]] = value
    sizes = torch.tensor([[0, 4], [0, 0]], dtype=torch.int64)  # bordered sizes, borders
    x, y = torch.randn(1, 4, 2, 2), torch.empty(1, 4)
    args = (steps.data_ptr(), 1, sizes.data_ptr(), 2, x.data_ptr(), 1, *x.stride(), y.data_ptr(), 0, 0)
    with pytest.raises(ValueError, match="slot out of range"):
        mod.sparse_conv_net(*args)
    steps[0, STEP_COLUMN["out"]] = 1
    with pytest.raises(ValueError, match="threads"):
        mod.sparse_conv_net(*args, -1)
    for threads in (0, 1, 2):
        y.fill_(float("nan"))
        mod.sparse_conv_net(*args, threads)
        torch.testing.assert_close(y, x.mean((2, 3)))
    steps[0, STEP_COLUMN["kind"]] = 7
    with pytest.raises(ValueError, match="unknown step kind"):
        mod.sparse_conv_net(*args)


def test_lane_pitch_is_checked():
    mod = native.cpu_module()
    conv = SparseConv2d.from_conv2d(nn.Conv2d(4, 8, 3, stride=2, padding=1))
    csr = conv.csr()
    off = torch.empty(csr.nnz, dtype=torch.int32)
    geometry = dict(rowptr=csr.crow_indices.data_ptr(), col=csr.col_indices.data_ptr(), val=csr.values.data_ptr(),
                    x=1, bias=0, y=1, n=1, in_c=4, h=10, w=10, out_c=8, ho=5, wo=5, kh=3, kw=3, sh=2, sw=2, ph=1,
                    pw=1, dh=1, dw=1, nnz=csr.nnz, xs_n=0, xs_c=100, xs_h=10, xs_w=1, ys_n=0, ys_c=25, ys_h=5,
                    ys_w=1, res=0, rs_n=0, rs_c=0, rs_h=0, rs_w=0, batch_block=1, off=off.data_ptr(), algo=0,
                    relu=False, dtype=0, itype=0, stream=0)
    assert mod.sparse_conv2d_offsets(**geometry, lane_pitch=7)  # natural width 6
    for bad in (5, 1000, -1):
        with pytest.raises(ValueError, match="lane_pitch"):
            mod.sparse_conv2d_offsets(**geometry, lane_pitch=bad)


def test_dense_and_sparse_heads_run_inside_the_program():
    model = pruned_cnn(VGGStyle, 0.9, dtype=torch.float64)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    dense_head, _ = sparsify(model, layers=convs, dense_above=None)  # the head stays nn.Linear
    sparse_head, _ = sparsify(model, dense_above=None)
    assert type(dense_head.head) is nn.Linear and dense_head.sparse_net.layer_names[-1] == "head"
    assert sparse_head.sparse_net.layer_names[-1] == "head"
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.inference_mode():
        for fused in (dense_head, sparse_head):
            torch.testing.assert_close(fused(x), model(x), **TOL[torch.float64])
            torch.testing.assert_close(fused(x[:1]), model(x[:1]), **TOL[torch.float64])
    with torch.no_grad():
        dense_head.head.weight.mul_(2.0)
        model.head.weight.mul_(2.0)
    with torch.inference_mode():
        torch.testing.assert_close(dense_head(x), model(x), **TOL[torch.float64])


class _FlattenHead(nn.Module):
    """A user's plain CNN: conv-BN-ReLU blocks in nn.Sequential, a pool, one of three flatten spellings, a head."""

    def __init__(self, flatten: str):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1))
        self.flatten, self.how = nn.Flatten(), flatten
        self.head = nn.Linear(24, 7)

    def forward(self, x):
        x = self.features(x)
        x = self.flatten(x) if self.how == "module" else x.flatten(1) if self.how == "method" else torch.flatten(x, 1)
        return self.head(x)


@pytest.mark.parametrize("how", ["module", "method", "function"])
def test_every_flatten_spelling_before_the_head_is_folded(how):
    model = pruned_cnn(_FlattenHead, 0.7, flatten=how)
    fused, _ = sparsify(model, dense_above=None)
    assert fused.sparse_net.layer_names[-1] == "head"
    x = torch.randn(2, 3, 12, 10)
    with torch.inference_mode():
        y = fused(x)
        assert y.shape == (2, 7)
        torch.testing.assert_close(y, model(x), **TOL[torch.float32])


def test_a_detached_program_or_an_empty_one_is_refused_clearly():
    with pytest.raises(ValueError, match="at least one step"):
        SparseConvNet([])
    model = pruned_cnn(VGGStyle, 0.9)
    fused, _ = sparsify(model, dense_above=None)
    detached = SparseConvNet(fused.sparse_net.steps, fused.sparse_net.layer_names)
    with pytest.raises(RuntimeError, match="attach"):
        detached(torch.randn(1, 3, 32, 32))
    mods = [fused.get_submodule(n) for n in detached.layer_names]
    with torch.inference_mode():  # with its modules passed explicitly it runs
        torch.testing.assert_close(detached(torch.ones(1, 3, 32, 32), *mods), model(torch.ones(1, 3, 32, 32)),
                                   **TOL[torch.float32])

"""Files that cannot lie: every file kind the project writes, truncated or with a flipped byte, is
refused with an error naming the file (never loaded as a wrong model); a process killed in the middle
of writing one leaves the previous complete file (or none), and a rerun resumes.

File kinds: drift checkpoints (HyperFlow.save), training checkpoints (train_drift(checkpoint=),
Pruner.fit(checkpoint=)),
trajectory chunks (record_trajectories(store=)), pretrained backbones (load_pretrained's cache),
pruned models (`hyperflow prune`'s state dict) and exported sparse models (hf.sparse.save). All are
written by hyperflow_ext._io.save_tensors, whose content checksum catches the flipped bytes that
safetensors' own structure checks cannot.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import hyperflow_ext as hf
from hyperflow_ext._io import load_tensors, save_tensors
from hyperflow_ext.flow import DriftTrainConfig, HyperFlow, ParamSubset, TaskEncoder, TrajectoryConfig
from hyperflow_ext.flow import record_trajectories
from hyperflow_ext.flow.drift import DriftNetwork
from hyperflow_ext.flow.train import fit_normalisation, train_drift
from hyperflow_ext.flow.trajectories import TrajectorySet

from _toy_tasks import episodes as _episodes  # tests/ is on sys.path (pytest, and the child below)
from hyperflow_ext.models import Conv4
from hyperflow_ext.models.pretrained import load_pretrained, pretrained_path


# ---- damage -----------------------------------------------------------------------------------

def damaged_copies(data: bytes):
    """``(label, bytes)``: truncations and single-bit flips spread over header and tensor data."""
    n = len(data)
    for cut in sorted({0, 1, 7, 8, 9, n // 4, n // 2, n - 8, n - 1}):
        yield f"truncated to {cut} of {n} bytes", data[:cut]
    header = 8 + int.from_bytes(data[:8], "little")
    spots = {0, 3, 8, 9, header // 2, header - 2, header - 1, header, (header + n) // 2, n - 1}
    spots |= set(range(8, header, max(1, header // 24)))      # through the JSON header
    spots |= set(range(header, n, max(1, (n - header) // 12)))  # through the tensor bytes
    for pos in sorted(p for p in spots if 0 <= p < n):
        for bit in (0x01, 0x80):
            flipped = bytearray(data)
            flipped[pos] ^= bit
            yield f"bit {bit:#x} flipped at byte {pos} of {n}", bytes(flipped)


def assert_every_damage_is_refused(path: Path, load) -> int:
    """Damage ``path`` every way, call ``load()`` each time, require a ValueError naming the file."""
    original = path.read_bytes()
    load()  # the intact file loads
    tried = 0
    try:
        for label, data in damaged_copies(original):
            path.write_bytes(data)
            with pytest.raises(ValueError) as info:
                load()
            assert str(path) in str(info.value) or path.name in str(info.value), (label, str(info.value))
            tried += 1
    finally:
        path.write_bytes(original)
    load()  # and loads again once restored
    return tried


# ---- the file kinds ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return Conv4(hidden=8, groups=2).eval().requires_grad_(False)


def test_drift_checkpoint(backbone, tmp_path):
    flow = HyperFlow(backbone, params="bias", hidden=16)
    flow.fit(_episodes(4), tasks=4, trajectory_steps=3, interpolation="linear",
             train_config=DriftTrainConfig(iters=5), progress=False)
    path = tmp_path / "drift.safetensors"
    flow.save(path)
    assert assert_every_damage_is_refused(path, lambda: HyperFlow.load(path, backbone)) > 50


def _drift_training():
    g = torch.Generator().manual_seed(0)
    ts = TrajectorySet(torch.randn(6, 2, 5, 12, generator=g).cumsum(2), torch.randn(6, 5, generator=g))
    torch.manual_seed(1)
    net = DriftNetwork(12, 5, hidden=16)
    fit_normalisation(net, ts)
    return net, ts


def test_training_checkpoint(tmp_path):
    path = tmp_path / "train.ckpt.safetensors"
    cfg = DriftTrainConfig(iters=6, batch_size=8)
    net, ts = _drift_training()
    start = {k: v.clone() for k, v in net.state_dict().items()}
    train_drift(net, ts, "linear", cfg, progress=False, checkpoint=path, checkpoint_every=3)

    def resume():
        fresh, _ = _drift_training()
        train_drift(fresh, ts, "linear", cfg, progress=False, checkpoint=path, checkpoint_every=3)
        assert not all(torch.equal(fresh.state_dict()[k], start[k]) for k in start)  # the trained weights

    assert assert_every_damage_is_refused(path, resume) > 50


def test_pruning_checkpoint(tmp_path):
    from hyperflow_ext.prune._loop import TensorLoader

    path = tmp_path / "prune.ckpt.safetensors"
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 1, 8, 8, generator=g), torch.arange(32) % 5

    def fit():
        pruner = hf.Pruner(_pruned_cnn(), target_sparsity=0.5)
        pruner.fit(TensorLoader(x, y, batch_size=16), epochs=1, progress=False, checkpoint=path)
        return pruner

    fit()
    assert assert_every_damage_is_refused(path, fit) > 50


def test_trajectory_chunk(backbone, tmp_path):
    subset, enc = ParamSubset(backbone, "bias"), TaskEncoder(backbone, backbone.feature_dim)
    cfg = TrajectoryConfig(steps=2, perturbations=1)

    def record():
        return record_trajectories(backbone, subset, enc, _episodes(2), 2, cfg, store=tmp_path, chunk_size=2,
                                   progress=False)

    record()
    (chunk,) = tmp_path.glob("traj-*.safetensors")
    assert assert_every_damage_is_refused(chunk, record) > 50


def test_pretrained_backbone(tmp_path):
    from _helpers import FAST_PRETRAIN, two_domains  # the tiny pretraining set-up of the model tests

    data = two_domains(4)

    def load():
        return load_pretrained("conv4-glyphs", cache_dir=tmp_path, progress=False, datasets=data, **FAST_PRETRAIN)

    load()
    path = pretrained_path("conv4-glyphs", tmp_path, datasets=data, **FAST_PRETRAIN)
    assert assert_every_damage_is_refused(path, load) > 50


def _pruned_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
    with torch.no_grad():
        for m in (model[0], model[3]):
            m.weight.mul_(torch.rand_like(m.weight) < 0.3)
    return model.eval()


def test_pruned_model_state_dict(tmp_path):
    """What `hyperflow prune` writes (save_tensors of the W⊙m state dict) and `hyperflow export` reads."""
    model = _pruned_cnn()
    path = tmp_path / "pruned.safetensors"
    save_tensors(path, model.state_dict(), {"task": "digits-cnn", "sparsity": 0.7})

    def load():
        tensors, _ = load_tensors(path)
        _pruned_cnn().load_state_dict(tensors)

    assert assert_every_damage_is_refused(path, load) > 50


def test_exported_sparse_model(tmp_path):
    sparse_model, _ = hf.sparse.sparsify(_pruned_cnn(), dense_above=None)
    path = tmp_path / "exported.safetensors"
    hf.sparse.save(sparse_model, path)
    x = torch.randn(2, 1, 8, 8)
    want = sparse_model(x)

    def load():
        torch.testing.assert_close(hf.sparse.load(path, _pruned_cnn)(x), want)

    assert assert_every_damage_is_refused(path, load) > 50


def test_legacy_files_without_a_checksum_still_load_and_foreign_keys_are_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "old.safetensors"
    save_file({"w": torch.arange(4.0)}, str(path), metadata={"json": json.dumps({"a": 1})})
    tensors, meta = load_tensors(path)
    assert meta == {"a": 1} and torch.equal(tensors["w"], torch.arange(4.0))
    save_file({"w": torch.arange(4.0)}, str(path), metadata={"json": "{}", "sha265": "0" * 64})
    with pytest.raises(ValueError, match=r"old\.safetensors is corrupt.*unexpected metadata keys \['sha265'\]"):
        load_tensors(path)


# ---- killed mid-write -------------------------------------------------------------------------

_CHILD = textwrap.dedent("""
    import hashlib, os, signal, sys
    import torch
    import safetensors.torch

    mode, out, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    real_save, saves = safetensors.torch.save_file, [0]

    def save_then_die(tensors, filename, metadata=None):
        # the kill_at-th write is cut off half way and the process killed, before the rename
        saves[0] += 1
        real_save(tensors, filename, metadata=metadata)
        if saves[0] == kill_at:
            with open(filename, "r+b") as fh:
                fh.truncate(os.path.getsize(filename) // 2)
            os.kill(os.getpid(), signal.SIGKILL)

    safetensors.torch.save_file = save_then_die
    sys.path.insert(0, {tests!r})
    from test_file_integrity import run_child_job
    result = run_child_job(mode, out)
    print("digest", hashlib.sha256(b"".join(t.numpy().tobytes() for t in result)).hexdigest())
""")


def run_child_job(mode: str, out: str):
    """The job a child process runs: drift training with checkpoints, or trajectory recording."""
    torch.manual_seed(0)
    if mode == "train":
        net, ts = _drift_training()
        train_drift(net, ts, "cubic", DriftTrainConfig(iters=12, batch_size=8), progress=False,
                    checkpoint=Path(out) / "train.ckpt.safetensors", checkpoint_every=3)
        return [v for _, v in sorted(net.state_dict().items())]
    backbone = Conv4(hidden=8, groups=2).eval().requires_grad_(False)
    ts = record_trajectories(backbone, ParamSubset(backbone, "bias"), TaskEncoder(backbone, backbone.feature_dim),
                             _episodes(5), 5, TrajectoryConfig(steps=2, perturbations=1), store=out, chunk_size=1,
                             progress=False)
    return [ts.deltas, ts.z]


def _run_child(tmp_path: Path, mode: str, out: Path, kill_at: int):
    code = _CHILD.format(tests=os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # cwd outside the checkout, so the child imports the installed package
    return subprocess.run([sys.executable, "-c", code, mode, str(out), str(kill_at)], capture_output=True,
                          text=True, timeout=600, cwd=tmp_path, env=env)


def _digest(res) -> str:
    assert res.returncode == 0, res.stderr[-3000:]
    return [line for line in res.stdout.splitlines() if line.startswith("digest")][-1]


@pytest.mark.parametrize("mode,kill_at", [("train", 3), ("record", 3)])
def test_killed_mid_write_leaves_no_half_file_and_a_rerun_resumes(tmp_path, mode, kill_at):
    uninterrupted = _digest(_run_child(tmp_path, mode, tmp_path / "whole", kill_at=0))
    out = tmp_path / "run"
    out.mkdir()
    killed = _run_child(tmp_path, mode, out, kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    files = sorted(p for p in out.iterdir() if not p.name.startswith("."))
    assert files, "the writes before the killed one are kept"
    for f in files:  # every file under its real name is complete and checks out
        load_tensors(f)
    leftovers = [p for p in out.iterdir() if p.name.startswith(".")]
    assert all(p.name.endswith(".tmp") for p in leftovers)  # the half-written bytes never took a real name
    if mode == "record":
        assert len(files) == kill_at - 1
    # the rerun resumes (from the checkpoint / the stored chunks) and ends where an uninterrupted run ends
    assert _digest(_run_child(tmp_path, mode, out, kill_at=0)) == uninterrupted

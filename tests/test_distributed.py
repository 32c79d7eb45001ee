"""Scale-out on torch.distributed: helpers alone, and 2-rank gloo jobs on the loopback interface.

Each job starts its ranks as separate interpreters (``tests/_dist_worker.py``) with ``cwd`` outside
the checkout, ``MASTER_ADDR=127.0.0.1`` and a free port, bounded by a timeout.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hyperflow_ext import distributed
from hyperflow_ext._io import load_tensors

WORKER = Path(__file__).with_name("_dist_worker.py")
TIMEOUT_S = 240

sys.path.insert(0, str(WORKER.parent))
import _dist_worker as worker  # noqa: E402  (the same tiny set-ups, run in this process as the reference)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path: Path, scenario: str, *extra: str, world: int = 2, expect=None):
    """Run ``world`` ranks of the worker; returns ``[(tensors, meta)]`` per rank (``None`` for a rank
    that wrote nothing). ``expect``: the exit code wanted per rank (default all 0)."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(world),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), scenario, str(out), *extra], cwd=tmp_path,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    expect = expect or [0] * world
    logs = []
    try:
        for r, proc in enumerate(procs):
            if expect[r] == "kill":  # a rank left waiting on a dead peer: stop it (as torchrun would)
                procs[1 - r].wait(timeout=TIMEOUT_S)
                proc.kill()
            logs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for r, (proc, log) in enumerate(zip(procs, logs)):
        if expect[r] != "kill":
            assert proc.returncode == expect[r], f"rank {r} exited with {proc.returncode}:\n{log[-3000:]}"
    results = []
    for r in range(world):
        f = out / f"{scenario}-rank{r}.safetensors"
        results.append(load_tensors(f) if f.is_file() else None)
    return results


# -- helpers in one process ----------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 7, 12])
def test_shard_blocks_cover_every_block_exactly_once(n):
    for world in (1, 2, 3, 5):
        shards = [distributed.shard_blocks(n, r, world) for r in range(world)]
        flat = sorted(b for s in shards for b in s)
        assert flat == list(range(n))
        slices = [distributed.batch_slice(max(n, world), r, world) for r in range(world)]
        assert slices[0][0] == 0 and slices[-1][1] == max(n, world)
        assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))
        assert max(hi - lo for lo, hi in slices) - min(hi - lo for lo, hi in slices) <= 1
    with pytest.raises(ValueError, match="cannot be split over 3 ranks"):
        distributed.batch_slice(2, 0, 3)
    with pytest.raises(ValueError, match="need 0 <= rank < world"):
        distributed.shard_blocks(4, 2, 2)
    with pytest.raises(ValueError, match="n_blocks must be an int"):
        distributed.shard_blocks(-1, 0, 1)


def test_helpers_are_identities_in_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.init_from_env()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.show_progress(True) and not distributed.show_progress(False)
    distributed.agree_across_ranks({"a": torch.ones(3)}, "nothing to compare")
    t = [torch.arange(3)]
    assert distributed.broadcast_tensors(t, 0)[0] is t[0]
    assert distributed.on_main(lambda: 5) == 5
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE and RANK must be integers"):
        distributed.init_from_env()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match=r"RANK must lie in \[0, 2\)"):
        distributed.init_from_env()


# -- 2-rank jobs ---------------------------------------------------------------------------------
def _reference_recording(store):
    backbone, subset, encoder, cfg = worker.recording_setup()
    return worker.record_trajectories(backbone, subset, encoder, worker.episodes(7), 7, cfg, store=store,
                                      chunk_size=2, progress=False)


def test_sharded_recording_writes_each_chunk_once_and_a_killed_rank_resumes_its_own(tmp_path, monkeypatch):
    # 7 episodes in chunks of 2: rank 0 owns the chunks starting at 0 and 4, rank 1 those at 2 and 6
    owned = [{"-000000-", "-000004-"}, {"-000002-", "-000006-"}]
    _launch(tmp_path, "record", "--die-after", "1", expect=["kill", 3])  # rank 1 dies after its first chunk
    store = tmp_path / "out" / "store"
    before = {p.name for p in store.glob("traj-*")}
    assert any("-000002-" in name for name in before)                   # what it wrote survived its death
    ranks = _launch(tmp_path, "record")                                  # both restarted
    wrote = [set(meta["wrote"]) for _, meta in ranks]
    assert "-000006-" in " ".join(wrote[1]) and "-000002-" not in " ".join(wrote[1])  # only what it lacked
    for r in (0, 1):                                                     # each rank kept to its own chunks
        assert all(name[name.index("-", 5):][:8] in owned[r] for name in wrote[r]), wrote[r]
    assert not wrote[0] & wrote[1] and not (wrote[0] | wrote[1]) & before  # no chunk written twice
    ref = _reference_recording(tmp_path / "ref-store")
    assert before | wrote[0] | wrote[1] == {p.name for p in (tmp_path / "ref-store").glob("traj-*")}
    assert torch.equal(ranks[0][0]["deltas"], ranks[1][0]["deltas"])   # both ranks return the whole set
    for tensors, _ in ranks:  # (to rounding: these interpreters may use other thread counts than this one)
        for key in ("deltas", "z", "losses"):
            torch.testing.assert_close(tensors[key], getattr(ref, key), rtol=1e-5, atol=1e-6)
    # one process reading the store the ranks wrote finds every chunk: nothing is recomputed
    monkeypatch.setattr(worker.traj_module, "finetune", lambda *a, **k: pytest.fail("a stored chunk was recomputed"))
    backbone, subset, encoder, cfg = worker.recording_setup()
    again = worker.record_trajectories(backbone, subset, encoder, worker.episodes(7), 7, cfg, store=store,
                                       chunk_size=2, progress=False)
    assert torch.equal(again.deltas, ranks[0][0]["deltas"]) and again.episodes == 7


def test_ddp_drift_training_matches_one_process_and_resumes_on_another_world_size(tmp_path):
    ranks = _launch(tmp_path, "drift")
    net, train, val, cfg = worker.drift_setup()
    hist = worker.train_drift(net, train, "cubic", cfg, val, progress=False)
    (a, meta_a), (b, meta_b) = ranks
    assert meta_a["saves"] == [10, 20, 30, 40] and meta_b["saves"] == []  # rank 0 alone writes checkpoints
    for name, value in net.state_dict().items():
        assert torch.equal(a[name], b[name]), name                        # the ranks hold one network
        torch.testing.assert_close(a[name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert meta_a["history"]["train"] == pytest.approx(hist["train"], rel=1e-4, abs=1e-5)
    # the 2-rank checkpoint after 20 iterations resumes in one process and ends where one process ends
    ckpt = tmp_path / "resume.safetensors"
    shutil.copy(tmp_path / "out" / "drift-at-20.safetensors", ckpt)
    resumed, train, val, cfg = worker.drift_setup()
    worker.train_drift(resumed, train, "cubic", cfg, val, progress=False, checkpoint=ckpt, checkpoint_every=10)
    for name, value in net.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_ddp_pruning_keeps_every_rank_identical_and_catches_drift(tmp_path):
    (a, meta_a), (b, meta_b) = _launch(tmp_path, "prune", "--batchnorm")
    assert a.keys() == b.keys()
    for name in a:                          # masks, scores, flow, weights and BatchNorm statistics
        assert torch.equal(a[name], b[name]), name
    assert [r["gamma"] for r in meta_a["records"]] == [r["gamma"] for r in meta_b["records"]]
    assert meta_a["records"][-1]["sparsity"] == pytest.approx(0.8, abs=0.03)
    for meta in (meta_a, meta_b):
        assert meta["drift_error"] is not None and "0.scores" in meta["drift_error"]
        assert "ranks [1] disagree with rank 0" in meta["drift_error"]


# -- pruning checkpoints in one process ----------------------------------------------------------
def test_pruner_checkpoint_resumes_exactly(tmp_path):
    from hyperflow_ext.prune import Pruner

    model, loader = worker.prune_setup(batchnorm=True)
    whole = Pruner(model, target_sparsity=0.8)
    records = whole.fit(loader, epochs=4, regrowth_epochs=2, progress=False)

    ckpt = tmp_path / "prune.ckpt.safetensors"
    for stop in (2, 5):                     # inside the pruning phase, and inside regrowth
        ckpt.unlink(missing_ok=True)

        def interrupt(rec):
            if rec["epoch"] == stop:
                raise KeyboardInterrupt

        model2, loader2 = worker.prune_setup(batchnorm=True)
        with pytest.raises(KeyboardInterrupt):
            Pruner(model2, target_sparsity=0.8).fit(loader2, 4, 2, progress=False, callback=interrupt,
                                                     checkpoint=ckpt)
        assert load_tensors(ckpt)[1]["epoch"] == (stop if stop <= 4 else stop - 4)
        model3, loader3 = worker.prune_setup(batchnorm=True)
        resumed = Pruner(model3, target_sparsity=0.8)
        assert resumed.fit(loader3, 4, 2, progress=False, checkpoint=ckpt) == records
        assert resumed.landings == whole.landings
        for name, value in model.state_dict().items():
            assert torch.equal(model3.state_dict()[name], value), (stop, name)
    model4, loader4 = worker.prune_setup(batchnorm=True)
    with pytest.raises(ValueError, match="written by another pruning run"):
        Pruner(model4, target_sparsity=0.7).fit(loader4, 4, 2, progress=False, checkpoint=ckpt)


@pytest.mark.slow
def test_cli_prune_under_torchrun_writes_one_output_from_rank_0(tmp_path):
    out = tmp_path / "pruned.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "hyperflow_ext.cli", "prune", "--quick", "--target", "0.9",
           "--out", str(out), "-q"]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("pruned digits CNN") == 1 and "hyperflows" not in res.stderr  # rank 0 prints; -q: no bars
    tensors, meta = load_tensors(out)
    assert meta["sparsity"] == pytest.approx(0.9, abs=0.005)
    assert not (tmp_path / "pruned.ckpt.safetensors").exists()  # removed once the model is written

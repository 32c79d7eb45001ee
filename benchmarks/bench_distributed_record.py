"""Trajectory recording at 1 and 2 processes (torch.distributed, gloo on the loopback interface).

Each job records the same 12 episodes (Conv4, 5-way 5-shot 28x28 support sets, 20 Adam steps, 2
perturbed extra runs) into a fresh chunk store, 2 episodes per chunk, and reports the seconds of
``record_trajectories`` itself (wall time up to a barrier that every rank reaches; interpreter
start and process group set-up excluded) and the CPU seconds each rank spent in it. Every process
runs one OpenMP/torch thread, so 2 processes can use 2 cores. The 1- and 2-process jobs alternate
(interleaved rounds); ``speedup_vs_one_process`` is the ratio of their median wall times, and
``cpu_share_per_rank`` the busiest rank's CPU seconds over the single process's: about 0.5 when
the episodes are split evenly and nothing is done twice, whatever else runs on the machine (the
wall-time ratio needs cores that are free). No thresholds: these machines are shared and noisy.

Run: ``python -m pytest benchmarks/bench_distributed_record.py --benchmark-enable -q``
"""
import os
import socket
import statistics
import subprocess
import sys
import textwrap


EPISODES, ROUNDS = 12, 3

WORKER = textwrap.dedent(f'''
    import sys, time, torch
    from hyperflow_ext import distributed
    from hyperflow_ext.flow import TaskEncoder, TrajectoryConfig, record_trajectories
    from hyperflow_ext.flow.params import ParamSubset
    from hyperflow_ext.models import Conv4

    distributed.init_from_env("cpu", timeout_s=120)
    torch.manual_seed(0)
    backbone = Conv4().eval()
    subset, encoder = ParamSubset(backbone, "bias"), TaskEncoder(backbone, backbone.feature_dim)
    g = torch.Generator().manual_seed(0)
    eps = [(torch.rand(25, 1, 28, 28, generator=g), torch.arange(5).repeat_interleave(5)) for _ in range({EPISODES})]
    distributed.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    ts = record_trajectories(backbone, subset, encoder, eps, {EPISODES}, TrajectoryConfig(steps=20, perturbations=2),
                             store=sys.argv[1], chunk_size=2, progress=False)
    cpu = time.process_time() - c0
    distributed.barrier()
    print("RECORD_S", time.perf_counter() - t0, cpu, ts.episodes)
''')


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job(tmp_path, world: int, round_: int):
    """``(wall seconds on rank 0, the busiest rank's CPU seconds)`` of one recording job."""
    script = tmp_path / "record_worker.py"
    script.write_text(WORKER)
    store = tmp_path / f"store-{world}-{round_}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_port()),
           "WORLD_SIZE": str(world)}
    procs = [subprocess.Popen([sys.executable, str(script), str(store)], cwd=tmp_path, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for r in range(world)]
    try:
        outs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), outs
    rows = [next(l for l in out.splitlines() if l.startswith("RECORD_S")).split()[1:] for out in outs]
    assert all(int(r[2]) == EPISODES for r in rows) and len(list(store.glob("traj-*"))) == EPISODES // 2
    return float(rows[0][0]), max(float(r[1]) for r in rows)


def test_recording_one_vs_two_processes(benchmark, tmp_path):
    times = {1: [], 2: []}
    benchmark.group = f"trajectory recording ({EPISODES} episodes, Conv4 5-way 5-shot, 20 steps x 3 runs)"
    if getattr(benchmark, "disabled", False):  # a plain test run: one 2-process job as a smoke check
        benchmark.pedantic(lambda: _job(tmp_path, 2, 0), rounds=1, iterations=1)
        return

    def interleaved():
        for r in range(ROUNDS):
            for world in (1, 2):
                times[world].append(_job(tmp_path, world, len(times[world])))

    benchmark.pedantic(interleaved, rounds=1, iterations=1)
    t1, t2 = (statistics.median(w for w, _ in times[k]) for k in (1, 2))
    c1, c2 = (statistics.median(c for _, c in times[k]) for k in (1, 2))
    benchmark.extra_info.update(episodes=EPISODES, rounds=ROUNDS, one_process_s=t1, two_processes_s=t2,
                                one_process_cpu_s=c1, busiest_rank_cpu_s=c2, cpu_share_per_rank=c2 / c1,
                                episodes_per_s_one_process=EPISODES / t1, episodes_per_s_two_processes=EPISODES / t2,
                                speedup_vs_one_process=t1 / t2, kernel_median_ms=1e3 * t2)

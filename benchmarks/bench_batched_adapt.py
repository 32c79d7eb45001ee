"""Batched serving: ``fused_adapt`` over many tasks in one call against one call per task.

5-way 1-shot and 5-shot tasks on a Conv4 backbone (28x28 inputs), 50 Euler steps, the native CPU
back-end. For 1, 16 and 64 tasks, one call adapts them all — the task encoder over every support set in
large batches, then one parallel native integration (one kernel launch on CUDA) — against the
baseline of one ``fused_adapt`` call per task, timed interleaved in the same run
(``hyperflow_ext.measure.interleaved_medians``). Each test records ``tasks_per_s`` for both and
``speedup_vs_one_call_per_task``; no thresholds (these machines are shared and noisy).

``stacked`` passes a ``(tasks, shots, C, H, W)`` batch and gets one batched model; ``list`` (at 64
tasks) passes a list of per-task support sets and gets a list of models.

What batching can save is the per-call cost (checks, the encoder's small forwards, the integration's
set-up); the encoder's convolutions over every support image remain, so the gain is larger for
1-shot tasks than for 5-shot ones.

Run: ``python -m pytest benchmarks/bench_batched_adapt.py --benchmark-enable -q``
"""
import pytest
import torch

from hyperflow_ext.flow import fused_adapt
from hyperflow_ext.measure import interleaved_medians

STEPS = 50
WAY = 5  # as in conftest.trained
CASES = [(shot, tasks, "stacked") for shot in (1, 5) for tasks in (1, 16, 64)] + [(1, 64, "list"), (5, 64, "list")]


@pytest.mark.parametrize("shot,tasks,mode", CASES, ids=[f"{s}shot-{t}tasks-{m}" for s, t, m in CASES])
def test_batched_adaptation(benchmark, trained, shot, tasks, mode):
    backbone, flow = trained
    gen = torch.Generator().manual_seed(tasks)
    sx = torch.rand(tasks, WAY * shot, 1, 28, 28, generator=gen)
    sy = torch.arange(WAY).repeat_interleave(shot).expand(tasks, -1).contiguous()
    xs, ys = list(sx.unbind(0)), list(sy.unbind(0))

    def batched():
        if mode == "stacked":
            return fused_adapt(backbone, sx, sy, flow=flow, steps=STEPS, backend="native")
        return fused_adapt(backbone, xs, ys, flow=flow, steps=STEPS, backend="native")

    def one_at_a_time():
        return [fused_adapt(backbone, x, y, flow=flow, steps=STEPS, backend="native") for x, y in zip(xs, ys)]

    benchmark.group = f"batched adaptation (5-way {shot}-shot, {STEPS} steps)"
    out = benchmark.pedantic(batched, rounds=3, warmup_rounds=1)
    # the batch adapts every task as one call per task does (to float rounding of the larger batches)
    thetas = out.theta if mode == "stacked" else torch.stack([m.theta for m in out])
    torch.testing.assert_close(thetas, torch.stack([m.theta for m in one_at_a_time()]), rtol=1e-4, atol=1e-5)
    if getattr(benchmark, "disabled", False):
        return
    t_loop, t_batch = interleaved_medians([one_at_a_time, batched], rounds=5)
    benchmark.extra_info.update(tasks=tasks, shot=shot, mode=mode, steps=STEPS, tasks_per_s=tasks / t_batch,
                                one_call_per_task_tasks_per_s=tasks / t_loop,
                                speedup_vs_one_call_per_task=t_loop / t_batch, kernel_median_ms=1e3 * t_batch)

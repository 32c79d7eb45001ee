"""Tiny seeded few-shot tasks shared by tests and their child processes (import with ``tests/`` on
``sys.path``: pytest puts it there, and a script in ``tests/`` has it as its own folder)."""
import torch


def episodes(n, way=3, shot=2, seed=0, query=0):
    """``n`` support sets ``(x (way·shot, 1, 16, 16), y (way·shot,))``: noisy copies of 8 fixed random
    images, ``way`` of them per task; with ``query`` > 0 each also has ``(query_x, query_y)``."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(8, 1, 16, 16, generator=g)
    for _ in range(n):
        cls = torch.randperm(8, generator=g)[:way]
        sets = []
        for k in (shot, query) if query else (shot,):
            x = centres[cls].repeat_interleave(k, 0) + 0.1 * torch.rand(way * k, 1, 16, 16, generator=g)
            sets += [x, torch.arange(way).repeat_interleave(k)]
        yield tuple(sets)


def tiny_flow(shot=2):
    """A frozen 8-channel Conv4 and a HyperFlow fitted on 12 tiny tasks: ``(backbone, flow, trajectories)``."""
    from hyperflow_ext.flow import DriftTrainConfig, HyperFlow
    from hyperflow_ext.models import Conv4

    torch.manual_seed(0)
    backbone = Conv4(hidden=8, groups=2).eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    flow = HyperFlow(backbone, params="bias", hidden=32)
    ts = flow.record(episodes(12, shot=shot), tasks=12, trajectory_steps=8, progress=False, lr=5e-2)
    flow.fit(trajectories=ts, interpolation="cubic", train_config=DriftTrainConfig(iters=60, eval_every=20),
             progress=False)
    return backbone, flow, ts

"""Tiny seeded few-shot tasks shared by tests and their child processes (import with ``tests/`` on
``sys.path``: pytest puts it there, and a script in ``tests/`` has it as its own folder)."""
import torch


def episodes(n, way=3, shot=2, seed=0):
    """``n`` support sets ``(x (way·shot, 1, 16, 16), y (way·shot,))``: noisy copies of 8 fixed random
    images, ``way`` of them per task."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(8, 1, 16, 16, generator=g)
    for _ in range(n):
        cls = torch.randperm(8, generator=g)[:way]
        x = centres[cls].repeat_interleave(shot, 0) + 0.1 * torch.rand(way * shot, 1, 16, 16, generator=g)
        yield x, torch.arange(way).repeat_interleave(shot)

"""Many tasks in one call: the task encoder over all support sets in large batches.

:func:`fused_adapt` takes a list of support sets of different sizes. Encoding them one by one runs
the encoder on tiny batches (a 5-way 1-shot set is 5 images); :func:`encode_tasks` stacks every
group of same-shaped tasks into one ``(tasks, shots, C, H, W)`` batch, so the encoder runs once
per group (in :class:`~hyperflow_ext.flow.task.TaskEncoder`'s equal parts) and the drift
integration that follows is one native call, or one kernel launch, over all tasks.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .align import probe_shifts
from .task import TaskEncoder

__all__ = ["encode_tasks"]


def encode_tasks(encoder: TaskEncoder, support_x: Sequence[torch.Tensor], support_y: Sequence[torch.Tensor],
                 ways: Sequence[int], probe: Optional[Callable[[], object]] = None,
                 reference: Optional[torch.Tensor] = None
                 ) -> Tuple[torch.Tensor, List[torch.Tensor], List[Optional[torch.Tensor]]]:
    """Task embeddings of checked support sets, same-shaped tasks encoded together, the
    encoder's support features of each task (:meth:`TaskEncoder.encode`), and per task the aligned
    bias shifts toward ``reference`` that a norm-mean probe measured in that forward.

    Args:
        probe: makes a fresh :class:`~hyperflow_ext.flow.align.NormMeanProbe` (or ``None``) per group.
        reference: the flow's reference means (:func:`~hyperflow_ext.flow.align.probe_shifts`).

    Shape:
        - support_x: per task ``(shots, C, H, W)``; support_y: per task ``(shots,)``.
        - Returns: ``(tasks, task_dim)`` in the order given, per task ``(shots, feature_dim)``, and
          per task ``(P,)`` shifts or ``None``.

    The embedding of a task does not depend on which tasks share its batch (every statistic is per
    task; the encoder is a frozen, eval-mode network), up to float rounding of the larger matmuls.
    """
    groups: Dict[Tuple, List[int]] = {}
    for i, (sx, sy, way) in enumerate(zip(support_x, support_y, ways)):
        key = (tuple(sx.shape), sx.dtype, sx.device, tuple(sy.shape), int(way))
        groups.setdefault(key, []).append(i)
    rows: List[torch.Tensor] = [None] * len(ways)  # type: ignore[list-item]
    feats: List[torch.Tensor] = [None] * len(ways)  # type: ignore[list-item]
    means: List[Optional[torch.Tensor]] = [None] * len(ways)
    for key, members in groups.items():
        p = probe() if probe is not None else None
        sy = torch.stack([support_y[i] for i in members])
        z, raw = encoder.encode(torch.stack([support_x[i] for i in members]), sy, key[-1],
                                pre_hooks=p.hooks if p is not None else None)
        found = probe_shifts(p, reference, sy.numel(), len(members))
        for j, i in enumerate(members):
            rows[i], feats[i], means[i] = z[j], raw[j], found[j]
    return torch.stack(rows), feats, means

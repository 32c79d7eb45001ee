"""Data-parallel pruning: a :class:`~hyperflow_ext.prune.pruner.Pruner` under ``torchrun``.

Every rank holds the whole model and pruner and reads the same global batches; each trains on its
share of every batch (``train_epoch(shard=True)``) through ``DistributedDataParallel``, which
averages the weight gradients. The flow step needs one more average: ``G = ∂L/∂(W⊙m)``, summed
here over the ranks before the fused step, so that scores, flow buffers, masks and hence the
pressure schedule evolve identically everywhere. :func:`check_agreement` verifies that after
every epoch and stops the run loudly if the ranks drift apart.

Scores, flow buffers and ``grad_eff`` sinks are left out of DDP's gradient and buffer traffic:
scores are updated by the flow step, not by their autograd gradient, and a buffer broadcast from
rank 0 would hide drift instead of revealing it. BatchNorm statistics are broadcast from rank 0
(DDP's default), so every rank evaluates the same network.
"""
from __future__ import annotations

from typing import Dict, Mapping

import torch
from torch import nn

from .. import distributed

__all__ = ["wrap_model", "average_grad_eff", "sync_buffers", "check_agreement"]


class _Holder(nn.Module):
    """Holds the user's model for DDP (DDP's bookkeeping attributes land here, not on the model)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def wrap_model(model: nn.Module, layers: Mapping[str, nn.Module]) -> nn.Module:
    """``model`` itself without a process group, else a ``DistributedDataParallel`` over it.

    Args:
        model: the model whose layers the pruner wrapped.
        layers: qualified name → masked layer (their scores, flow and sinks are ignored by DDP).
    """
    if not distributed.active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    holder = _Holder(model)
    ignore = [f"model.{name}.{attr}" for name in layers for attr in ("scores", "flow", "grad_eff")]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(holder, ignore)
    device = next(model.parameters()).device
    kw = ({"process_group": distributed.cpu_group()} if device.type == "cpu"
          else {"device_ids": [device.index if device.index is not None else torch.cuda.current_device()]})
    return DistributedDataParallel(holder, **kw)


def average_grad_eff(layers: Mapping[str, nn.Module]) -> None:
    """Average every layer's ``grad_eff`` over the ranks, in place, in one collective (no-op alone).

    With each rank's loss weighted by its share of the batch, the average is the global batch's
    ``∂L/∂(W⊙m)``, exactly what one process would feed the flow step (to float rounding).
    """
    if not distributed.active():
        return
    sinks = [m.grad_eff for m in layers.values()]
    flat = torch.cat([g.reshape(-1) for g in sinks])  # on the layers' device (nccl for CUDA)
    distributed.all_reduce_sum_([flat])
    flat /= distributed.world_size()
    offset = 0
    for g in sinks:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def sync_buffers(model: nn.Module, layers: Mapping[str, nn.Module]) -> None:
    """Copy rank 0's buffers other than the pruner's own (BatchNorm statistics) to every rank (no-op
    alone): each rank's last forward updated them from its own rows."""
    if not distributed.active():
        return
    own = {f"{name}.{attr}" for name in layers for attr in ("flow", "grad_eff")}
    buffers = [(n, b) for n, b in model.named_buffers() if n not in own and b is not None]
    got = distributed.broadcast_tensors([b for _, b in buffers], 0)
    with torch.no_grad():
        for (_, b), value in zip(buffers, got):
            b.copy_(value)


def check_agreement(pruner, where: str) -> None:
    """Raise :class:`~hyperflow_ext.distributed.RankDriftError` unless scores, masks, flow buffers,
    weights and the pressure state are bit-identical on every rank (no-op alone)."""
    if not distributed.active():
        return
    state: Dict[str, torch.Tensor] = {}
    for name, m in pruner.layers.items():
        state[f"{name}.scores"] = m.scores.detach()
        state[f"{name}.mask"] = m.mask()
        state[f"{name}.flow"] = m.flow.detach()
        state[f"{name}.weight"] = m.weight.detach()
    own = {f"{name}.{attr}" for name in pruner.layers for attr in ("flow", "grad_eff")}
    state.update({n: b for n, b in pruner.model.named_buffers() if n not in own and b is not None})
    sched = pruner.scheduler.state_dict() if pruner.scheduler is not None else {}
    state["pressure"] = torch.tensor([float(pruner.gamma)] + [float(v) for v in sched.values()],
                                     dtype=torch.float64)
    distributed.agree_across_ranks(state, f"Pruner {where}")

"""Scale-out on ``torch.distributed``: rank/world helpers that vanish in a single process.

Launch any entry point with ``torchrun --nproc_per_node=N``; every helper here is a no-op (or the
identity) when ``WORLD_SIZE`` is 1 or unset or no process group is initialised, so single-process
runs stay bit for bit what they were.

* :func:`rank`, :func:`world_size`, :func:`is_main`, :func:`active` — where this process stands.
* :func:`init_from_env` — join the group ``torchrun`` describes (gloo for CPU, nccl for CUDA).
* :func:`shard_blocks`, :func:`batch_slice` — deterministic sharding of an index set and of a
  global batch; the union over ranks is the whole set whatever the world size.
* :func:`show_progress`, :func:`on_main` — progress bars and file writes on rank 0 only.
* :func:`agree_across_ranks` — fail loudly when state that must be identical on every rank drifts.
* :func:`broadcast_tensors`, :func:`all_reduce_sum_` — collectives on CPU tensors, whatever the
  group's back-end (a gloo side group serves CPU tensors under nccl).
* :class:`DataParallelLoss` — a global batch's mean loss through ``DistributedDataParallel``, each
  rank on its share, equal to the single-process gradient to float rounding.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import logging
import os
from typing import Callable, List, Mapping, Optional, Sequence, Tuple, TypeVar, Union

import torch
import torch.distributed as dist

__all__ = ["rank", "world_size", "is_main", "active", "init_from_env", "shutdown", "shard_blocks", "batch_slice",
           "show_progress", "on_main", "main_first", "barrier", "agree_across_ranks", "broadcast_tensors", "all_reduce_sum_",
           "cpu_group", "DataParallelLoss", "RankDriftError"]

logger = logging.getLogger(__name__)
T = TypeVar("T")


class RankDriftError(RuntimeError):
    """State that must be identical on every rank differs between ranks."""


def active() -> bool:
    """Whether a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """Number of ranks (1 when not distributed)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process is rank 0 (always true when not distributed)."""
    return rank() == 0


def init_from_env(device: Union[str, torch.device] = "cpu", timeout_s: float = 600.0) -> bool:
    """Join the process group described by ``torchrun``'s environment, if it describes one.

    Does nothing (returns ``False``) when ``WORLD_SIZE`` is unset or 1, or a group is already up.
    The back-end is gloo for a CPU ``device`` and nccl for CUDA; a CUDA process binds to the
    GPU ``LOCAL_RANK``.

    Raises:
        ValueError: ``WORLD_SIZE`` / ``RANK`` are not integers, or ``RANK`` is out of range.
        RuntimeError: ``torch.distributed`` is not available in this torch build.
    """
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(raw)
        rk = int(os.environ.get("RANK", "0"))
    except ValueError:
        raise ValueError(f"init_from_env: WORLD_SIZE and RANK must be integers, got WORLD_SIZE={raw!r}, "
                         f"RANK={os.environ.get('RANK')!r}") from None
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if not 0 <= rk < world:
        raise ValueError(f"init_from_env: RANK must lie in [0, {world}), got {rk}")
    if not dist.is_available():
        raise RuntimeError("init_from_env: WORLD_SIZE > 1 but this torch build has no torch.distributed")
    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    logger.info("init_from_env: rank %d of %d (%s)", rk, world, backend)
    return True


def shutdown() -> None:
    """Leave the process group, if one is up (the end of a ``torchrun`` job)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_blocks(n_blocks: int, rank_: Optional[int] = None, world: Optional[int] = None) -> List[int]:
    """The blocks ``0..n_blocks-1`` this rank owns: ``b`` with ``b % world == rank`` (round robin).

    Deterministic and complete: every block belongs to exactly one rank. With one rank every block
    is owned. Index sets are sharded in blocks (e.g. trajectory chunks) so that the blocks, and the
    files written per block, do not depend on the world size.

    Raises:
        ValueError: negative ``n_blocks`` or a rank outside ``[0, world)``.
    """
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    if isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or n_blocks < 0:
        raise ValueError(f"shard_blocks: n_blocks must be an int >= 0, got {n_blocks!r}")
    if world < 1 or not 0 <= rank_ < world:
        raise ValueError(f"shard_blocks: need 0 <= rank < world, got rank={rank_}, world={world}")
    return list(range(rank_, n_blocks, world))


def batch_slice(n: int, rank_: Optional[int] = None, world: Optional[int] = None) -> Tuple[int, int]:
    """``(lo, hi)``: this rank's contiguous share of a global batch of ``n`` rows (sizes differ by at
    most one; ranks in order cover ``[0, n)``).

    Raises:
        ValueError: ``n`` is smaller than the world size (a rank would get no rows).
    """
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    if n < world:
        raise ValueError(f"batch_slice: a global batch of {n} rows cannot be split over {world} ranks "
                         f"(use a batch of at least {world})")
    base, extra = divmod(n, world)
    lo = rank_ * base + min(rank_, extra)
    return lo, lo + base + (1 if rank_ < extra else 0)


def show_progress(progress: bool) -> bool:
    """``progress`` on rank 0, ``False`` on every other rank (one progress bar per job)."""
    return bool(progress) and is_main()


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if active():
        dist.barrier(group=_cpu_group())


def on_main(fn: Callable[..., T], *args, **kwargs) -> Optional[T]:
    """Run ``fn`` on rank 0 only (a file write), then wait for every rank; returns its result on
    rank 0 and ``None`` elsewhere. An exception on rank 0 propagates there; the other ranks then
    fail at their next collective."""
    out = fn(*args, **kwargs) if is_main() else None
    barrier()
    return out


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (building a cache: a pretrained backbone, rendered data), then the
    other ranks run it and find the cache filled. A plain block when not distributed.

    Example:
        >>> with main_first():
        ...     backbone = load_pretrained("conv4-glyphs")
    """
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


@functools.lru_cache(maxsize=None)
def _side_group(key: Tuple[int, int]):
    return dist.new_group(backend="gloo")


def _cpu_group():
    """The group to use for CPU tensors: the default group under gloo, else a gloo side group."""
    if dist.get_backend() == "gloo":
        return None
    return _side_group((id(dist.distributed_c10d._get_default_group()), dist.get_world_size()))


def cpu_group():
    """The process group for CPU tensors (``None`` = the default group; for ``DistributedDataParallel``
    over a module on the CPU under an nccl job). Only meaningful when :func:`active`."""
    return _cpu_group()


def all_reduce_sum_(tensors: Sequence[torch.Tensor]) -> None:
    """Sum tensors over the ranks in place (no-op when not distributed): CPU tensors through the gloo
    group, device tensors through the default group (nccl in a CUDA job)."""
    if not active():
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=_cpu_group() if t.device.type == "cpu" else None)


_DTYPES = [torch.float32, torch.float64, torch.int64, torch.int32, torch.bool, torch.float16, torch.bfloat16,
           torch.uint8]


def broadcast_tensors(tensors: Optional[Sequence[torch.Tensor]], src: int) -> List[torch.Tensor]:
    """Rank ``src``'s list of CPU tensors on every rank (shapes and dtypes travel too, no pickling).

    Args:
        tensors: the tensors on rank ``src`` (ignored elsewhere).
        src: the sending rank.

    Returns:
        The tensors (the input itself on ``src`` or when not distributed).
    """
    if not active():
        return list(tensors or [])
    group, me = _cpu_group(), rank()
    if me == src:
        tensors = [t.detach().contiguous().cpu() for t in tensors]
        if any(t.dim() > 8 or t.dtype not in _DTYPES for t in tensors):
            raise ValueError(f"broadcast_tensors: tensors of at most 8 dimensions and dtypes {_DTYPES} only, got "
                             f"{[(t.dtype, t.dim()) for t in tensors]}")
        header = torch.tensor([len(tensors)], dtype=torch.int64)
    else:
        header = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(header, src, group=group)
    out = []
    for i in range(int(header[0])):
        if me == src:
            t = tensors[i]
            meta = torch.tensor([_DTYPES.index(t.dtype), t.dim(), *t.shape] + [0] * (8 - t.dim()),
                                dtype=torch.int64)
        else:
            meta = torch.zeros(10, dtype=torch.int64)
        dist.broadcast(meta, src, group=group)
        if me != src:
            t = torch.empty(meta[2:2 + int(meta[1])].tolist(), dtype=_DTYPES[int(meta[0])])
        dist.broadcast(t, src, group=group)
        out.append(t)
    return out


def _fingerprint(t: torch.Tensor) -> int:
    data = t.detach().cpu().contiguous()
    h = hashlib.sha256(str((data.dtype, tuple(data.shape))).encode())
    h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return int.from_bytes(h.digest()[:8], "little", signed=True)


def agree_across_ranks(tensors: Union[Mapping[str, torch.Tensor], Sequence[torch.Tensor], torch.Tensor],
                       name: str) -> None:
    """Raise unless every rank holds bit-identical ``tensors`` (no-op when not distributed).

    Each rank hashes its tensors (dtype, shape, bytes) and the 8-byte fingerprints are gathered,
    so the check costs one small collective whatever the tensors' size.

    Args:
        tensors: a tensor, a sequence of tensors, or a mapping name → tensor (names go in the message).
        name: what is checked (``"pruning masks after epoch 3"``), for the message.

    Raises:
        RankDriftError: some tensor differs between ranks (names the entries and the ranks).
        TypeError: an entry is not a tensor.
    """
    if not active():
        return
    if isinstance(tensors, torch.Tensor):
        items = [("", tensors)]
    elif isinstance(tensors, Mapping):
        items = list(tensors.items())
    else:
        items = [(str(i), t) for i, t in enumerate(tensors)]
    for key, t in items:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"agree_across_ranks({name}): entry {key!r} is a {type(t).__name__}, not a tensor")
    mine = torch.tensor([len(items)] + [_fingerprint(t) for _, t in items], dtype=torch.int64)
    count = torch.tensor([mine.numel()], dtype=torch.int64)
    counts = [torch.zeros_like(count) for _ in range(world_size())]
    group = _cpu_group()
    dist.all_gather(counts, count, group=group)
    if len({int(c) for c in counts}) != 1:
        raise RankDriftError(f"agree_across_ranks({name}): ranks hold different numbers of tensors "
                             f"({[int(c) - 1 for c in counts]})")
    gathered = [torch.zeros_like(mine) for _ in range(world_size())]
    dist.all_gather(gathered, mine, group=group)
    bad = [key or "<tensor>" for j, (key, _) in enumerate(items)
           if len({int(g[j + 1]) for g in gathered}) != 1]
    if bad:
        differing = [r for r, g in enumerate(gathered) if not torch.equal(g, gathered[0])]
        raise RankDriftError(f"agree_across_ranks({name}): {len(bad)} of {len(items)} tensors differ between ranks "
                             f"(first: {bad[:3]}; ranks {differing} disagree with rank 0); the ranks have drifted "
                             f"apart, so the run cannot continue")


class _LossModule(torch.nn.Module):
    """``loss_fn(net, *batch)`` as a module owning ``net``, so that DDP sees the forward."""

    def __init__(self, net: torch.nn.Module, loss_fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.net = net
        self.loss_fn = loss_fn

    def forward(self, *batch: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.net, *batch)


class DataParallelLoss:
    """A mean loss over a global batch, computed by ``DistributedDataParallel`` on each rank's share.

    Every rank passes the same global batch; each evaluates ``loss_fn(net, *its rows)`` (a mean over
    its rows) through DDP, weighted by ``rows_here * world / rows``, so that DDP's gradient average
    is the gradient of the global batch's mean, as one process would compute it (to float
    rounding). Without a process group it is ``loss_fn(net, *batch)`` itself, bit for bit.

    Args:
        net: the module whose parameters train (wrapped, not modified; on the CPU the gloo group
            carries its gradients, on CUDA the default group).
        loss_fn: ``(net, *batch) -> scalar mean loss``; every batch tensor has rows first.

    Returns (when called):
        ``(loss to backpropagate, the global batch's mean loss as a float)``.
    """

    def __init__(self, net: torch.nn.Module, loss_fn: Callable[..., torch.Tensor]) -> None:
        self.net, self.loss_fn, self.world = net, loss_fn, world_size()
        self.ddp = None
        if active():
            from torch.nn.parallel import DistributedDataParallel

            device = next(net.parameters()).device
            kw = ({"process_group": _cpu_group()} if device.type == "cpu"
                  else {"device_ids": [device.index if device.index is not None else torch.cuda.current_device()]})
            self.ddp = DistributedDataParallel(_LossModule(net, loss_fn), **kw)

    def __call__(self, *batch: torch.Tensor) -> Tuple[torch.Tensor, float]:
        if self.ddp is None:
            loss = self.loss_fn(self.net, *batch)
            return loss, float(loss.detach())
        n = batch[0].shape[0]
        lo, hi = batch_slice(n)
        loss = self.ddp(*(b[lo:hi] for b in batch)) * ((hi - lo) * self.world / n)
        total = loss.detach().reshape(1).cpu().clone()
        all_reduce_sum_([total])
        return loss, float(total) / self.world

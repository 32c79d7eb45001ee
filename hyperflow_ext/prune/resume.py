"""Resumable pruning: the whole state of :meth:`Pruner.fit` at an epoch boundary in one file.

One safetensors file (written atomically; plain tensors and JSON, nothing pickled) holds the
model's state (weights, scores, flow buffers, BatchNorm statistics), the scores' Adam moments and
step, the weight optimiser of the phase in progress, the pressure scheduler, the landings, the
epoch records so far and the loader's epoch counter. A :meth:`Pruner.fit` called again with the
same arguments on the same starting model continues after the last finished epoch and ends where
an uninterrupted run ends (exactly with a :class:`~hyperflow_ext.prune._loop.TensorLoader`, whose
order depends only on its seed and epoch count). Under ``torchrun`` rank 0 writes the file and
every rank resumes from it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from .. import distributed
from .._io import load_tensors, save_tensors, tensor_digest

__all__ = ["PruneCheckpoint"]


class PruneCheckpoint:
    """Where a pruning run stands, keyed by its settings and the model's state at the start.

    Args:
        path: the checkpoint file.
        pruner: the pruner about to fit (its settings and model state form the key).
        epochs, regrowth_epochs, steps_per_epoch: the fit's schedule (part of the key).
    """

    def __init__(self, path: os.PathLike, pruner, epochs: int, regrowth_epochs: int, steps_per_epoch: int) -> None:
        self.path = Path(path)
        settings = {k: repr(v) for k, v in sorted(vars(pruner).items())
                    if isinstance(v, (int, float, str, tuple, dict, type(None))) and not k.startswith("_")}
        settings.update(epochs=epochs, regrowth_epochs=regrowth_epochs, steps=steps_per_epoch,
                        history=len(pruner.history))
        start = list(pruner.model.state_dict().values())
        self.key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12] + \
            tensor_digest(start)

    def exists(self) -> bool:
        return self.path.is_file()

    def save(self, pruner, phase: str, epoch: int, step: int, optimizer: torch.optim.Optimizer, loader,
             records: List[Dict[str, Any]]) -> None:
        """Record that ``epoch`` epochs of ``phase`` are done (rank 0 writes; no-op elsewhere)."""
        if not distributed.is_main():
            return
        tensors = {f"model/{k}": v for k, v in pruner.model.state_dict().items()}
        for name, st in pruner._state.items():
            tensors[f"adam/{name}/exp_avg"] = st.exp_avg
            tensors[f"adam/{name}/exp_avg_sq"] = st.exp_avg_sq
        opt = optimizer.state_dict()
        for i, slots in opt["state"].items():
            tensors.update({f"sgd/{i}/{k}": torch.as_tensor(v) for k, v in slots.items() if v is not None})
        sched = pruner.scheduler
        meta = {"key": self.key, "phase": phase, "epoch": epoch, "step": step, "records": records,
                "score_step": pruner._score_step, "gamma": pruner.gamma, "landings": pruner.landings,
                "param_groups": opt["param_groups"], "loader_epoch": getattr(loader, "_epoch", None),
                "scheduler": None if sched is None else {"state": sched.state_dict(), "history": sched.history}}
        save_tensors(self.path, tensors, meta)

    def restore(self, pruner, loader) -> Dict[str, Any]:
        """Load the state into ``pruner`` (and ``loader``'s epoch counter); returns the position
        (``phase``, ``epoch``, ``step``, ``records``, and ``sgd``: the weight optimiser's state).

        Raises:
            ValueError: the file was written by another pruning run.
        """
        tensors, meta = load_tensors(self.path)
        if meta.get("key") != self.key:
            raise ValueError(f"Pruner.fit: checkpoint {self.path} was written by another pruning run (other "
                             f"settings, schedule or starting model); delete it or pass another path")
        device = next(pruner.model.parameters()).device
        pruner.model.load_state_dict({k[6:]: v.to(device) for k, v in tensors.items() if k.startswith("model/")})
        for name, st in pruner._state.items():
            st.exp_avg.copy_(tensors[f"adam/{name}/exp_avg"])
            st.exp_avg_sq.copy_(tensors[f"adam/{name}/exp_avg_sq"])
        pruner._score_step = int(meta["score_step"])
        pruner.gamma = float(meta["gamma"])
        pruner.landings = list(meta["landings"])
        if meta["scheduler"] is not None and pruner.scheduler is not None:
            pruner.scheduler.load_state_dict(meta["scheduler"]["state"])
            pruner.scheduler.history = list(meta["scheduler"]["history"])
        if meta["loader_epoch"] is not None and hasattr(loader, "_epoch"):
            loader._epoch = int(meta["loader_epoch"])
        slots: Dict[int, dict] = {}
        for name, v in tensors.items():
            if name.startswith("sgd/"):
                _, i, k = name.split("/")
                slots.setdefault(int(i), {})[k] = v.to(device)
        return {"phase": meta["phase"], "epoch": int(meta["epoch"]), "step": int(meta["step"]),
                "records": list(meta["records"]), "sgd": {"state": slots, "param_groups": meta["param_groups"]}}


def resume_point(ckpt: Optional[PruneCheckpoint], pruner, loader) -> Optional[Dict[str, Any]]:
    """The restored position when ``ckpt`` exists (every rank reads the same file), else ``None``."""
    if ckpt is None:
        return None
    distributed.barrier()
    return ckpt.restore(pruner, loader) if ckpt.exists() else None

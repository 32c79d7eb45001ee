"""Sparsity that pays: a wider digits CNN pruned by Hyperflows, exported, and timed end to end.

The pruning experiment's :class:`~hyperflow_ext.prune.experiment.DigitsCNN` (8/16/32 channels, 10 k
weights) is sized to strain the pruning methods, not to be worth accelerating: its layers are a few
microseconds of work, so call overhead decides its speed. :func:`run_sparsity_pays` takes the same
task and protocol with the wider variant (default 64/128/256 channels, a 128-unit hidden layer; quick:
32/64/128 and 64), prunes it with :class:`~hyperflow_ext.prune.Pruner` to the demo's sparsity, exports
it with :meth:`~hyperflow_ext.prune.Pruner.export` on an example batch of each timed size
(:func:`~hyperflow_ext.sparse.sparsify`: BatchNorm folded, ReLU fused, dense kept where sparse measured
slower, layout picked by timing) and times the export against the trained dense model run by torch at
its faster layout (default or channels-last), interleaved in one process at the current thread count.

What is measured: test accuracy of the dense model, of the pruned model and of the export (argmax
agreement with the pruned model), and per batch size the median milliseconds of the dense model in
both layouts and of the export, with ``speedup`` = faster dense median / export median.
"""
from __future__ import annotations

import copy
import statistics
import time
from typing import Any, Dict, Optional, Sequence

import torch

from ..measure import interleaved_times
from ._loop import evaluate
from .experiment import DEFAULTS, QUICK, dense_digits_setup, export_agreement
from .pruner import Pruner

__all__ = ["run_sparsity_pays", "end_to_end_speed", "PAYS_DEFAULTS", "PAYS_QUICK"]

#: Budgets and width of the full run (the other settings as :data:`~hyperflow_ext.prune.experiment.DEFAULTS`).
PAYS_DEFAULTS: Dict[str, Any] = dict(DEFAULTS, channels=(64, 128, 256), hidden=128, pretrain_epochs=6, epochs=10,
                                     regrowth_epochs=4, scheduler_step=0.4)
#: Budgets and width of ``quick=True`` (about 10 s on two quiet cores).
PAYS_QUICK: Dict[str, Any] = dict(QUICK, channels=(32, 64, 128), hidden=64, pretrain_epochs=2, epochs=5,
                                  regrowth_epochs=2, scheduler_step=0.8)


def end_to_end_speed(dense: torch.nn.Module, sparse: torch.nn.Module, x: torch.Tensor,
                     budget_s: float = 1.0) -> Dict[str, float]:
    """Median ms of ``dense`` (default and channels-last layout) and ``sparse`` on ``x``, interleaved.

    Returns:
        ``{"batch", "threads", "rounds", "dense_ms", "dense_cl_ms", "sparse_ms", "speedup"}`` with
        ``speedup`` = the faster dense median / the sparse median.
    """
    dense = copy.deepcopy(dense).eval()
    dense_cl = copy.deepcopy(dense).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        times, rounds = interleaved_times([lambda: dense(x), lambda: dense_cl(x_cl), lambda: sparse(x)],
                                          budget_s=budget_s, min_rounds=15, max_rounds=500)
    d, dc, s = (statistics.median(t) * 1e3 for t in times)
    return {"batch": int(x.shape[0]), "threads": torch.get_num_threads(), "rounds": rounds, "dense_ms": d,
            "dense_cl_ms": dc, "sparse_ms": s, "speedup": min(d, dc) / s}


def run_sparsity_pays(sparsity: float = 0.98, seed: int = 0, quick: bool = False, progress: bool = True, *,
                      batches: Sequence[int] = (1, 32), overrides: Optional[Dict[str, Any]] = None,
                      budget_s: float = 1.0) -> Dict[str, Any]:
    """Train a wider digits CNN, prune it with Hyperflows, export it and time it against dense torch.

    Args:
        sparsity: target sparsity in ``(0, 1)`` (the demo uses its pruning section's 98 %).
        seed: data split, initialisation and shuffling.
        quick: the narrower model and short budgets of :data:`PAYS_QUICK`.
        progress: tqdm bars.
        batches: batch sizes to export for and time (each taken from the test set).
        overrides: any setting of :data:`PAYS_DEFAULTS` (``channels``, ``hidden``, ``epochs``…).
        budget_s: interleaved timing budget per batch size.

    Returns:
        ``{"config", "dense_acc", "pruned_acc", "sparsity", "agreement", "max_abs_diff", "speed": [one
        :func:`end_to_end_speed` dict per batch, plus ``"dense_layers"`` (layers the export kept dense)],
        "seconds"}``.

    Raises:
        ValueError: ``sparsity`` outside ``(0, 1)``, a batch size outside ``[1, test set]``, or an unknown
            override.
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 < float(sparsity) < 1.0:
        raise ValueError(f"run_sparsity_pays: sparsity must lie in (0, 1), got {sparsity!r}")
    cfg = dict(PAYS_QUICK if quick else PAYS_DEFAULTS)
    unknown = set(overrides or {}) - set(cfg)
    if unknown:
        raise ValueError(f"run_sparsity_pays: unknown settings {sorted(unknown)}; known: {sorted(cfg)}")
    cfg.update(overrides or {})
    test_size = 450  # digits_split's 25 % of 1797 images
    for b in batches:
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= test_size:
            raise ValueError(f"run_sparsity_pays: batch sizes must lie in [1, {test_size}], got {b!r}")
    t0 = time.perf_counter()
    train, test, dense = dense_digits_setup(seed, cfg)
    dense.eval()
    torch.manual_seed(seed + 1)
    model = copy.deepcopy(dense)
    pruner = Pruner(model, target_sparsity=float(sparsity), lr=cfg["lr"], score_lr=cfg["score_lr"],
                    scheduler_step=cfg["scheduler_step"])
    pruner.fit(train.fresh(), epochs=cfg["epochs"], regrowth_epochs=cfg["regrowth_epochs"], progress=progress)
    out: Dict[str, Any] = {"config": dict(cfg, seed=seed, task="digits 8x8", target=float(sparsity)),
                           "dense_acc": evaluate(dense, test), "pruned_acc": evaluate(model, test),
                           "sparsity": pruner.sparsity()["overall"], "speed": []}
    for i, b in enumerate(batches):
        x = test.x[:b].contiguous()
        exported = pruner.export(example_input=x)
        if i == 0:
            out["agreement"], out["max_abs_diff"] = export_agreement(model, exported, test)
        row = end_to_end_speed(dense, exported, x, budget_s)
        row["dense_layers"] = [r["name"] for r in pruner.export_report if r["kind"] == "dense"]
        out["speed"].append(row)
    out["seconds"] = time.perf_counter() - t0
    return out

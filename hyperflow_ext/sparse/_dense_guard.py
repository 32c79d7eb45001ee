"""Never slower than dense: the checks :func:`~hyperflow_ext.sparse.sparsify` applies after its per-layer choices.

* **With an example input** (:func:`keep_faster_than_dense`): the whole exported model is timed,
  interleaved on that input, against the dense model it came from in torch's two layouts (NCHW and
  channels-last) and against the same model BatchNorm-folded and ReLU-fused but every layer dense, in
  both layouts. The fastest of these is returned, so the result is never slower than dense torch on
  that input (within timing noise); when a dense candidate wins, every layer record says so and why.
* **Without one** (:func:`dense_above`): a layer whose density is above its ISA path's threshold stays
  dense. The thresholds come from whole-model break-even points: ``sparsify(model, dense_above=None)``
  (every layer sparse) against the same masked model run dense by torch in its better layout, interleaved,
  batch 32, 2 threads, the four CNNs of benchmarks/bench_conv.py at 50-95 % per-layer magnitude sparsity
  (2026-12-07, AMD EPYC, torch capped to the same ISA; the host also ran two low-priority studies).
  Worst model per density: AVX-512 0.72x at 0.3, 1.08x at 0.2, 1.40x at 0.15 -> 0.15; AVX2 0.92x at 0.3,
  1.37x at 0.2 -> 0.2; baseline (torch at SSE4.1) 0.68x at 0.3, 0.82x at 0.2, 1.09x at 0.15, 1.55x at
  0.1 -> 0.1. The torch fallback (no extension) keeps a conservative 0.01.
"""
from __future__ import annotations

import copy
import logging
import statistics
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .. import native
from ..measure import interleaved_times

__all__ = ["DENSITY_THRESHOLDS", "dense_above", "keep_faster_than_dense"]

logger = logging.getLogger(__name__)

# Highest density at which a layer is made sparse when nothing is timed, per ISA path of the native
# kernels (hyperflow_ext.native.isa()); "torch" when the extension is missing (torch's CSR fallback).
DENSITY_THRESHOLDS: Dict[str, float] = {"avx512": 0.15, "avx2": 0.2, "baseline": 0.1, "torch": 0.01}


def dense_above(setting: Any) -> Optional[float]:
    """The density above which an untimed layer stays dense: ``setting`` itself when a number, the
    active ISA path's :data:`DENSITY_THRESHOLDS` entry for ``"auto"``, and ``None`` (no threshold) for None."""
    if setting is None:
        return None
    if setting == "auto":
        try:
            path = native.isa() if native.available() else "torch"
        except (ValueError, RuntimeError):  # a bad HYPERFLOW_ISA (the kernels raise it) or a stale build
            return None
        return DENSITY_THRESHOLDS.get(path, DENSITY_THRESHOLDS["baseline"])
    if isinstance(setting, bool) or not isinstance(setting, (int, float)) or not 0.0 <= float(setting) <= 1.0:
        raise ValueError(f"sparsify: dense_above must be 'auto', None or a density in [0, 1], got {setting!r}")
    return float(setting)


def _to_channels_last(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def keep_faster_than_dense(original: nn.Module, exported: nn.Module, report: List[Dict[str, Any]],
                           x: torch.Tensor, all_dense: Callable[[], nn.Module],
                           budget_s: float) -> Tuple[nn.Module, Dict[str, Any]]:
    """The fastest of ``exported`` and the dense candidates on ``x`` (see the module docstring).

    Args:
        original: the dense model as given (read, never written).
        exported: the sparse export.
        report: the export's per-layer records; rewritten when a dense candidate wins.
        x: the example input.
        all_dense: builds the folded / fused model with every layer dense (called once).
        budget_s: timing budget for the interleaved run.

    Returns:
        ``(model, summary)``: the winner (``exported`` or a dense model in eval mode, gradients off) and
        ``{"kept", "layout", "ms"}`` with the median milliseconds of every candidate.
    """
    folded = all_dense()
    candidates: Dict[str, Tuple[nn.Module, torch.Tensor]] = {"export": (exported, x), "dense": (original, x)}
    if x.dim() == 4:
        x_cl = x.contiguous(memory_format=torch.channels_last)
        candidates["dense_channels_last"] = (_to_channels_last(original), x_cl)
        candidates["folded_channels_last"] = (_to_channels_last(folded), x)  # as a caller would run it
    candidates["folded"] = (folded, x)
    names = list(candidates)
    with torch.inference_mode():
        fns = [lambda m=m, a=a: m(a) for m, a in candidates.values()]
        times, _ = interleaved_times(fns, max(budget_s, 0.05) * 6, min_rounds=9, max_rounds=200)
    ms = {n: 1e3 * statistics.median(t) for n, t in zip(names, times)}
    best_dense = min(v for k, v in ms.items() if k.startswith("dense"))
    summary: Dict[str, Any] = {"ms": ms, "dense_best_ms": best_dense}
    if ms["export"] <= best_dense:
        summary.update(kept="export", layout=None)
        logger.info("sparsify: export %.3f ms vs dense torch %.3f ms (best layout): kept the export",
                    ms["export"], best_dense)
        return exported, summary
    # A dense candidate wins: the dense model as a user deploys it (BatchNorm folded, ReLU fused, the
    # original weights) in its faster layout, or the original itself if that is faster still.
    pick = min((n for n in names if n != "export"), key=ms.__getitem__)
    model = candidates[pick][0]
    if pick in ("dense", "dense_channels_last"):
        model = copy.deepcopy(original) if pick == "dense" else model
    model.eval().requires_grad_(False)
    summary.update(kept=pick, layout="channels_last" if pick.endswith("channels_last") else "nchw")
    why = (f"whole model faster dense: export {ms['export']:.3f} ms vs dense torch {best_dense:.3f} ms; "
           f"kept {pick} ({ms[pick]:.3f} ms)")
    for r in report:
        r.update(kind="dense", depth_first=False, reason=why)
        if r.get("channels_last") is not None:
            r["channels_last"] = summary["layout"] == "channels_last"
    logger.info("sparsify: %s", why)
    return model, summary

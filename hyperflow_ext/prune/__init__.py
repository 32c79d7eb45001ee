"""Hyperflows: pruning by flow. Differentiable masked layers and the fused flow step.

* :class:`Pruner` — wrap a model's Linear/Conv2d layers, prune to a target sparsity (pressure
  scheduler) or at a constant pressure, read per-weight flow, :meth:`Pruner.export` to sparse
  kernels, :meth:`Pruner.remove` to restore plain layers.
* :class:`MaskedLinear` / :class:`MaskedConv2d` — score-gated layers (STE scaled by 0.25).
* :mod:`~hyperflow_ext.prune.masked_ops` — the kernels under them: ``masked_matmul`` (``x @ (W⊙m)ᵀ``
  skipping masked entries), its input gradient, and ``score_mask``.
* :class:`PressureScheduler`, :func:`keep_trajectory` — the pressure controller.
* :class:`PowerLaw`, :func:`fit_power_law` — ``S(γ) = c·γ^-(α0 + α1 ln γ)`` and ``pressure_for``.
* :func:`magnitude_prune` — the global magnitude (L1) baseline with fine-tuning.
* :func:`gradual_magnitude_prune` — Zhu & Gupta's gradual magnitude pruning (cubic schedule, pruning
  during training, same epoch budget).
* :mod:`~hyperflow_ext.prune.experiment` / :mod:`~hyperflow_ext.prune.pays` — the embedded experiments
  the demo runs (``run_pruning_experiment``, ``run_power_law_study``, ``run_sparsity_pays``).
"""
from .._compat import kept_names
from . import experiment, pays
from .flow_ops import flow_step
from .functional import masked_conv2d, masked_linear
from .layers import MaskedConv2d, MaskedLinear
from .gradual import cubic_sparsity, gradual_magnitude_prune
from .magnitude import magnitude_prune
from .power_law import PowerLaw, fit_power_law
from .pruner import Pruner
from .schedule import PressureScheduler, keep_trajectory

__all__ = ["flow_step", "masked_conv2d", "masked_linear", "MaskedLinear", "MaskedConv2d", "Pruner",
           "PressureScheduler", "keep_trajectory", "PowerLaw", "fit_power_law", "magnitude_prune",
           "gradual_magnitude_prune", "cubic_sparsity", "functional", "flow_ops", "masked_ops", "experiment", "pays"]

# Kept answering for the old spellings (hf.prune.run_sparsity_pays ...): the experiment runners live in
# their modules, the reference oracle in hyperflow_ext.testing.
__getattr__ = kept_names(__name__, {"run_pruning_experiment": "experiment", "run_power_law_study": "experiment",
                                    "run_sparsity_pays": "pays", "flow_step_reference": "flow_ops"})

"""HyperFlow: gradient-free few-shot adaptation by integrating a learned drift.

* :class:`HyperFlow` — records fine-tuning trajectories, trains the drift network, saves/loads.
* :func:`fused_adapt` — adapts a backbone to support sets with a few fused ODE steps.
* :func:`flow_path` — every state along that integration (for plots and analysis).
* :func:`loo_scores` — the support-only criterion behind ``fused_adapt``'s per-task choice.
* :mod:`~hyperflow_ext.flow.align` — the aligned-norm-bias candidate and the reference it aligns to.
* :class:`EpisodeAugmenter` — the capture shifts ``fit`` draws on meta-training episodes.
* :func:`emulation_fidelity` — how much of bias tuning's support-loss drop the flow reproduces.
* :func:`drift_integrate` — the fused integrator on the ``torch`` / ``native`` / ``triton`` back-ends.
* :mod:`~hyperflow_ext.flow.baselines` — the comparison methods: ``direct_transfer``, ``finetune_adapt``.
* Building blocks: :class:`DriftNetwork`, :class:`Interpolant`, :func:`odeint`, :class:`TaskEncoder`,
  :class:`ParamSubset`, :func:`record_trajectories`, :func:`train_drift`. Their pure-torch oracles
  (``drift_integrate_reference``, ``euler_update_reference``) are gathered in :mod:`hyperflow_ext.testing`.
"""
from . import align, baselines
from .adapted import AdaptedProtoNet
from .drift import DriftNetwork, PackedDrift, time_features
from .adapt import flow_path, fused_adapt
from .augment import AUGMENTATIONS, EpisodeAugmenter, augment_episode
from .evaluate import emulation_fidelity
from .functional import features_with, finetune
from .hyperflow import HyperFlow
from .integrate import drift_integrate, drift_integrate_reference
from .interpolate import INTERPOLATIONS, Interpolant
from .params import ParamSubset
from .select import loo_scores, select_adapt
from .solvers import TABLEAUS, Tableau, get_tableau, odeint
from .task import TaskEncoder
from .train import DriftTrainConfig, train_drift
from .trajectories import TrajectoryConfig, TrajectorySet, record_trajectories
from .update import euler_update, euler_update_reference

__all__ = [
    "HyperFlow", "fused_adapt", "flow_path", "baselines", "AdaptedProtoNet", "DriftNetwork", "PackedDrift",
    "time_features", "features_with", "finetune", "drift_integrate", "INTERPOLATIONS",
    "Interpolant", "ParamSubset", "TABLEAUS", "Tableau", "get_tableau", "odeint", "TaskEncoder",
    "DriftTrainConfig", "train_drift", "TrajectoryConfig", "TrajectorySet", "record_trajectories",
    "euler_update", "select_adapt", "loo_scores", "AUGMENTATIONS", "EpisodeAugmenter",
    "augment_episode", "emulation_fidelity",
]

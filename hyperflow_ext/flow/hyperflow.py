"""HyperFlow: learn the drift of fine-tuning offline (meta-training, tuning, persistence).

Adaptation with a trained flow lives in :mod:`~hyperflow_ext.flow.adapt` (:func:`fused_adapt`).
"""
from __future__ import annotations

import copy
import itertools
import logging
import math
import os
import warnings
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .._io import load_tensors, save_tensors
from .adapted import AdaptedProtoNet
from .align import reference_means
from .augment import EpisodeAugmenter
from .baselines import LR_GRID, has_queries, split_support, tune_lr
from .checks import as_episode
from .drift import DriftNetwork, PackedDrift
from .interpolate import INTERPOLATIONS
from .params import ParamSpec, ParamSubset
from .solvers import get_tableau
from .task import TaskEncoder
from .train import DriftTrainConfig, fit_normalisation, train_drift
from .trajectories import TrajectoryConfig, TrajectorySet, record_trajectories

__all__ = ["HyperFlow", "DEFAULT_TASKS", "DEFAULT_REACH", "recorded_rate"]

logger = logging.getLogger(__name__)


def _declared_feature_dim(module: nn.Module) -> Optional[int]:
    dim = getattr(module, "feature_dim", None)
    return dim if isinstance(dim, int) and not isinstance(dim, bool) else None


def _episode_list(op: str, backbone: nn.Module, episodes: Iterable, tasks: Optional[int], seed: int = 0) -> list:
    """``tasks`` episodes to meta-train on (default :data:`DEFAULT_TASKS`), in the backbone's dtypes
    (:func:`~hyperflow_ext.flow.checks.as_episode`). A finite sequence with fewer episodes is
    extended by drawing new support/query splits of its episodes (:func:`_resplit`)."""
    tasks = DEFAULT_TASKS if tasks is None else tasks
    if isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 1:
        raise ValueError(f"{op}: tasks must be a positive int, got {tasks!r}")
    eps = [as_episode(backbone, ep) for ep in itertools.islice(episodes, tasks)]
    if not eps:
        raise ValueError(f"{op}: the episode iterable is empty")
    if len(eps) < tasks:
        if not all(has_queries(ep) for ep in eps):
            logger.warning("%s: %d episodes given for %d tasks and they have no queries to re-split; "
                           "meta-training on the %d given", op, len(eps), tasks, len(eps))
            return eps
        logger.warning("%s: %d episodes given for %d tasks; drawing the other %d as new support/query splits "
                       "of the given episodes", op, len(eps), tasks, tasks - len(eps))
        gen = torch.Generator().manual_seed(seed + 7919)
        given = len(eps)
        eps += [_resplit(eps[i % given], gen) for i in range(given, tasks)]
    return eps


def _splittable(episode: Sequence) -> bool:
    try:
        split_support(episode)
        return True
    except ValueError:
        return False


def _resplit(episode: tuple, gen: torch.Generator) -> tuple:
    """The same classes with their support and query images pooled and split again at random."""
    sx, sy, qx, qy = episode[:4]
    xs, ys, xq, yq = [], [], [], []
    for c in range(int(sy.max()) + 1):
        pool = torch.cat([sx[sy == c], qx[qy == c]])
        order = torch.randperm(pool.shape[0], generator=gen)
        shots = int((sy == c).sum())
        xs.append(pool[order[:shots]])
        xq.append(pool[order[shots:]])
        ys.append(torch.full((shots,), c, dtype=sy.dtype))
        yq.append(torch.full((pool.shape[0] - shots,), c, dtype=qy.dtype))
    return (torch.cat(xs), torch.cat(ys), torch.cat(xq), torch.cat(yq)) + tuple(episode[4:])


def recorded_rate(recipe: Dict[str, object], reach: float) -> float:
    """The learning rate trajectories are recorded at: ``reach`` times the chosen rate, but below the
    first rate of the scored grid above the chosen one whose fine-tuning scored below no adaptation
    on the recipe episodes (capped at the last rate before it). Paths recorded where fine-tuning
    hurts the queries teach the drift moves that hurt (measured on the GroupNorm Conv4,
    docs/measurements.md).

    Args:
        recipe: :meth:`HyperFlow.choose_recipe`'s record (``lr``, ``accuracy`` per rate, ``unadapted``).
        reach: the multiple of the chosen rate asked for.

    Raises:
        ValueError: ``reach`` is not finite and > 0, or ``recipe`` has no ``lr`` > 0.
    """
    if not (isinstance(reach, (int, float)) and math.isfinite(reach) and reach > 0):
        raise ValueError(f"recorded_rate: reach must be finite and > 0, got {reach!r}")
    lr = recipe.get("lr") if isinstance(recipe, dict) else None
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"recorded_rate: recipe must hold a learning rate 'lr' > 0, got {recipe!r}")
    lr = float(lr)
    unadapted = float(recipe.get("unadapted", float("nan")))
    cap, below = math.inf, lr
    for rate, accuracy in sorted((float(k), float(v)) for k, v in dict(recipe.get("accuracy") or {}).items()):
        if rate <= lr:
            continue
        if accuracy < unadapted:
            cap = below
            break
        below = rate
    return min(lr * reach, cap)


TASK_STATS = ("final", "layers")


def _adapted_layers(subset: ParamSubset, encoder: nn.Module) -> List[str]:
    """The encoder's submodules that own an adapted parameter, in order (for ``task_stats="layers"``)."""
    modules = dict(encoder.named_modules())
    names = dict.fromkeys(n.rsplit(".", 1)[0] if "." in n else "" for n in subset.names)
    return [n for n in names if n and n in modules]


DEFAULT_TASKS = 200      # meta-training tasks recorded when tasks is not given
DEFAULT_REACH = 3.0      # trajectories are recorded at this multiple of the chosen learning rate
RECIPE_TASKS = 20        # meta-training episodes that score the learning-rate grid
REFERENCE_TASKS = 32     # meta-training support sets behind the norm layers' reference channel means
MIN_LOSS_DROP = 0.05     # fine-tuning that lowers its loss by less than this barely moves: warn


class HyperFlow:
    """A trained drift network for one backbone and one choice of adapted parameters.

    Args:
        backbone: the frozen, pretrained feature extractor (not modified). Any ``nn.Module``
            mapping ``(n, C, H, W)`` images to ``(n, d)`` features; ``d`` is read from a
            ``feature_dim`` attribute or inferred by one forward of the first support set.
        params: which parameters adapt: ``"bias"``, ``"head"``, ``"all"``, names, or a callable.
        metric: ProtoNet metric, ``"cosine"`` or ``"euclidean"``.
        scale: ProtoNet logit scale.
        hidden: drift-network width ``H``.
        encoder: frozen task encoder network; default: ``backbone`` itself at its pretrained values.
        seed: seeds the drift network's initialisation and training.
        task_stats: what the task embedding ``z`` summarises: ``"layers"`` (the default:
            statistics of the final features and of the head's loss gradient and, for every
            layer that owns an adapted parameter, its channel means over the support set and
            their spread across classes, collected by hooks in the encoder's one forward) or
            ``"final"`` (the final-feature statistics only).

    Example:
        >>> flow = HyperFlow(backbone, params="bias")
        >>> flow.fit(episodes)             # picks fine-tuning's learning rate, records, trains
        >>> flow.tune_horizon(held_out_episodes)
        >>> model = fused_adapt(backbone, support_x, support_y, flow=flow)  # model.selection: the choice
    """

    def __init__(self, backbone: nn.Module, params: ParamSpec = "bias", metric: str = "cosine",
                 scale: float = 10.0, hidden: int = 256, encoder: Optional[nn.Module] = None,
                 seed: int = 0, task_stats: str = "layers") -> None:
        if task_stats not in TASK_STATS:
            raise ValueError(f"HyperFlow: task_stats must be one of {TASK_STATS}, got {task_stats!r}")
        self.backbone = backbone  # referenced, never modified or copied
        self.subset = ParamSubset(backbone, params)
        self.metric, self.scale, self.seed = metric, float(scale), seed
        self.hidden, self.task_stats = hidden, task_stats
        enc = encoder if encoder is not None else backbone
        layers = _adapted_layers(self.subset, enc) if task_stats == "layers" else ()
        self.encoder = TaskEncoder(enc, _declared_feature_dim(enc), self.scale, layers=layers)
        self.net: Optional[DriftNetwork] = None
        if self.encoder.ready:
            self._build_net()
        self.max_rate = math.inf          # largest drift rate seen in training (for the guard)
        self.task_radius = math.inf       # farthest training task embedding (for the OOD guard)
        self.interpolation: Optional[str] = None
        self.horizon = 1.0                # default integration time of fused_adapt (see tune_horizon)
        # whether tune_horizon found the drift's state beating the unadapted backbone (None: not measured);
        # fused_adapt offers the mean displacement as a fallback candidate unless it did
        self.drift_pays: Optional[bool] = None
        self.mean_delta: Optional[torch.Tensor] = None  # mean end displacement of the training trajectories
        self.reference_means: Optional[torch.Tensor] = None  # norm layers' channel means on meta-training data
        self.trajectory_config: Optional[TrajectoryConfig] = None
        self.recipe: Dict[str, object] = {}  # the fine-tuning recipe emulated, and how it was chosen
        self.history: Dict[str, List[float]] = {}
        self._packed: Dict[Tuple[torch.dtype, torch.device], PackedDrift] = {}
        self._tables: Dict[tuple, torch.Tensor] = {}
        self._nets: Dict[torch.device, DriftNetwork] = {}

    def _build_net(self) -> None:
        torch.manual_seed(self.seed)
        self.net = DriftNetwork(self.subset.numel, self.encoder.dim, hidden=self.hidden)

    def _prepare(self, support_x: torch.Tensor) -> None:
        """Infer the feature size from one support image and build the drift network, if not yet."""
        if not self.encoder.ready:
            declared = self.encoder.feature_dim
            dim = self.encoder.probe(support_x)
            if declared is None:
                logger.info("HyperFlow: the backbone has no feature_dim attribute; inferred %d from one forward", dim)
            elif declared != dim:
                raise ValueError(f"HyperFlow: the backbone declares feature_dim={declared} but outputs {dim} features")
        if self.net is None:
            self._build_net()

    def probe(self, support_x: torch.Tensor) -> None:
        """Size the task embedding from one forward of a support image (``fit`` with episodes does
        this itself; call it before ``fit(trajectories=...)`` on trajectories of unknown origin)."""
        self._prepare(support_x)

    def _adopt_layout(self, ts: TrajectorySet) -> None:
        """Size an unprobed encoder from the encoder that recorded ``ts`` (see :meth:`TaskEncoder.adopt`)."""
        if not self.encoder.adopt(ts.layout, ts.z.shape[-1]):
            self.task_stats = "final"

    # -- meta-training -------------------------------------------------------------------
    def record(self, episodes: Iterable, tasks: Optional[int] = None, trajectory_steps: int = 50,
               store: Optional[os.PathLike] = None, progress: bool = True, **config) -> TrajectorySet:
        """Record fine-tuning trajectories on ``tasks`` episodes (see :func:`record_trajectories`).

        ``tasks=None`` records every episode of a finite sequence (:data:`DEFAULT_TASKS` of an
        unbounded iterable).
        """
        if tasks is None and hasattr(episodes, "__len__"):
            tasks = len(episodes)
        eps = _episode_list("HyperFlow.record", self.backbone, episodes, tasks, self.seed)
        self._prepare(eps[0][0])
        cfg = TrajectoryConfig(steps=trajectory_steps, metric=self.metric, scale=self.scale, **config)
        self.trajectory_config = cfg
        return record_trajectories(self.backbone, self.subset, self.encoder, eps, len(eps), cfg, store,
                                   seed=self.seed, progress=progress)

    def record_reference(self, episodes: Iterable, tasks: int = REFERENCE_TASKS) -> Optional[torch.Tensor]:
        """Record the channel means of the adapted norm layers on the support images of the first
        ``tasks`` meta-training episodes (un-shifted), the target of :func:`fused_adapt`'s
        ``"aligned"`` candidate (:mod:`~hyperflow_ext.flow.align`). :meth:`fit` calls this; call it
        on a flow loaded from an older checkpoint. Returns the ``(P,)`` means (``None`` when no
        norm layer's bias is adapted)."""
        images = [as_episode(self.backbone, ep)[0] for ep in itertools.islice(episodes, tasks)]
        self.reference_means = reference_means(self.backbone, self.subset, images) if images else None
        return self.reference_means

    def choose_recipe(self, episodes: Sequence, trajectory_steps: int = 50, grid: Sequence[float] = LR_GRID,
                      tasks: int = RECIPE_TASKS, optimizer: str = "adam", progress: bool = True) -> Dict[str, object]:
        """Choose the learning rate of the fine-tuning HyperFlow will emulate (see :func:`tune_lr`).

        Scores ``grid`` by query accuracy after ``trajectory_steps`` steps of fine-tuning the
        adapted parameters on the first ``tasks`` episodes, records the outcome in
        :attr:`recipe` (saved with the flow) and returns it.
        """
        choice = tune_lr(self.backbone, episodes, self.subset.names, grid, min(tasks, len(episodes)),
                         trajectory_steps, optimizer, self.metric, self.scale, progress)
        self.recipe = {"chosen_by": "tune_lr", **choice.as_dict()}
        log = logger.warning if choice.loss_drop < MIN_LOSS_DROP else logger.info
        log("HyperFlow.fit: emulating fine-tuning at lr %g (query accuracy %.3f vs %.3f unadapted on %d "
            "meta-training episodes)", choice.lr, choice.accuracy[choice.lr], choice.unadapted, choice.tasks)
        return self.recipe

    def fit(self, episodes: Optional[Iterable] = None, tasks: Optional[int] = None, trajectory_steps: int = 50,
            interpolation: str = "cubic", trajectories: Optional[TrajectorySet] = None,
            val_fraction: float = 0.1, store: Optional[os.PathLike] = None,
            train_config: DriftTrainConfig = DriftTrainConfig(), progress: bool = True,
            checkpoint: Optional[os.PathLike] = None, recipe_episodes: Optional[Iterable] = None,
            augment: Union[bool, Sequence[str], EpisodeAugmenter, None] = True, reach: float = DEFAULT_REACH,
            **trajectory_config) -> "HyperFlow":
        """Meta-train: choose the recipe, record trajectories (unless given), interpolate, regress the drift.

        Args:
            episodes: iterable of ``(support_x, support_y, query_x, query_y, ...)`` with labels
                ``0..N-1``, from meta-training domains.
            tasks: how many meta-training tasks to record (default :data:`DEFAULT_TASKS`). Given
                fewer episodes (with queries), the rest are new support/query splits of them (logged).
            trajectory_steps: fine-tuning steps ``K`` per trajectory.
            interpolation: ``"linear"`` (HyperFlow-L), ``"piecewise"`` (-PL) or ``"cubic"`` (-C).
            trajectories: reuse recorded trajectories (then ``episodes`` is not needed).
            val_fraction: share of episodes held out for validation (best weights kept).
            store: folder to keep trajectory chunks in (resumable).
            train_config: drift-network optimisation settings.
            checkpoint: file for the drift training's resumable state (see
                :func:`~hyperflow_ext.flow.train.train_drift`): an interrupted ``fit`` called again
                with the same arguments resumes there and ends with the same weights.
            recipe_episodes: episodes with queries (meta-training domains) on which
                :meth:`choose_recipe` scores the learning-rate grid; default the first 20 of
                ``episodes`` when they have queries.
            augment: capture shifts drawn on the meta-training episodes (recipe scoring and
                recording alike; see :mod:`~hyperflow_ext.flow.augment`): ``True`` (every shift, on
                3 of 4 episodes), ``False``, shift names, or an :class:`EpisodeAugmenter`. Shifted
                tasks are ones on which fine-tuning pays, so the drift learns moves worth making.
            reach: trajectories are recorded at ``reach`` times the chosen learning rate, so the
                recorded paths go past where the average meta-training task stops, but never at a
                rate whose fine-tuning scored below no adaptation (:func:`recorded_rate`);
                :func:`fused_adapt`'s per-task choice among horizons decides how far each task goes.
                A user-given ``lr`` is recorded as given.
            trajectory_config: extra :class:`TrajectoryConfig` fields (``lr``, ``optimizer``, ...).
                Without ``lr``, fine-tuning's learning rate is chosen by :meth:`choose_recipe`,
                the way bias tuning is tuned (on held-out splits of the support sets when the
                episodes have no queries).

        Warns:
            RuntimeWarning: the recorded fine-tuning barely lowers its loss (the recipe is too
                weak for this backbone, so the drift will barely move).
        """
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"HyperFlow.fit: interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
        if trajectories is None:
            if episodes is None:
                raise ValueError("HyperFlow.fit: pass episodes or trajectories")
            if not (isinstance(reach, (int, float)) and math.isfinite(reach) and reach > 0):
                raise ValueError(f"HyperFlow.fit: reach must be finite and > 0, got {reach!r}")
            augmenter = EpisodeAugmenter.from_setting(augment, self.seed)
            eps = _episode_list("HyperFlow.fit", self.backbone, episodes, tasks, self.seed)
            self._prepare(eps[0][0])
            self.record_reference(eps)
            scoring = ([as_episode(self.backbone, ep) for ep in itertools.islice(recipe_episodes, RECIPE_TASKS)]
                       if recipe_episodes is not None else eps[:RECIPE_TASKS])
            if augmenter is not None:
                eps = augmenter(eps)
                scoring = EpisodeAugmenter(augmenter.shifts, augmenter.probability, augmenter.seed + 1)(scoring)
            if "lr" in trajectory_config:
                self.recipe = {"chosen_by": "user", "lr": float(trajectory_config["lr"])}
            elif scoring and all(has_queries(ep) or _splittable(ep) for ep in scoring):
                recipe = self.choose_recipe(scoring, trajectory_steps,
                                            optimizer=trajectory_config.get("optimizer", "adam"), progress=progress)
                trajectory_config["lr"] = recorded_rate(recipe, reach)
                self.recipe.update(reach=float(reach), recorded_lr=trajectory_config["lr"])
                if trajectory_config["lr"] < recipe["lr"] * reach:
                    logger.info("HyperFlow.fit: recording at lr %g, not %g x %g: fine-tuning at the larger rates of "
                                "the grid scores below no adaptation on the recipe episodes", trajectory_config["lr"],
                                reach, recipe["lr"])
            else:
                self.recipe = {"chosen_by": "default", "lr": TrajectoryConfig.lr}
                logger.warning("HyperFlow.fit: the episodes have neither queries nor 2 shots per class to tune "
                               "fine-tuning's learning rate on; using the default lr %g (pass lr= to choose it)",
                               TrajectoryConfig.lr)
            if augmenter is not None:
                self.recipe["augment"] = augmenter.describe()
            trajectories = self.record(eps, len(eps), trajectory_steps, store, progress, **trajectory_config)
        elif self.net is None:
            self._adopt_layout(trajectories)
            self._build_net()
        if trajectories.deltas.shape[-1] != self.subset.numel:
            raise ValueError(f"HyperFlow.fit: trajectories have {trajectories.deltas.shape[-1]} parameters, "
                             f"this flow adapts {self.subset.numel}")
        if trajectories.z.shape[-1] != self.net.task_dim:
            raise ValueError(f"HyperFlow.fit: trajectories have task embeddings of size {trajectories.z.shape[-1]}, "
                             f"this flow's encoder gives {self.net.task_dim}")
        drop = trajectories.loss_drop()
        if drop is not None:
            self.recipe["loss_drop"] = drop
            if drop < MIN_LOSS_DROP:
                change, advice = ((f"lowers its loss by only {100 * drop:.1f} %", "a larger lr= or more trajectory_steps")
                                  if drop >= 0 else (f"raises its loss by {-100 * drop:.1f} %", "a smaller lr="))
                warnings.warn(f"HyperFlow.fit: the recorded fine-tuning {change} (median over episodes; recipe "
                              f"{self.recipe}); the drift will barely move the right way. Pass {advice}",
                              RuntimeWarning, stacklevel=2)
        n_val = int(round(val_fraction * trajectories.episodes))
        train, val = trajectories.split(n_val) if 0 < n_val < trajectories.episodes else (trajectories, None)
        self.max_rate = fit_normalisation(self.net, train)
        self.task_radius = float(self.net.task_distance(train.z).max())
        self.mean_delta = train.deltas[:, 0, -1].mean(dim=0).to(self.subset.vector(self.backbone).dtype)
        self.history = train_drift(self.net, train, interpolation, train_config, val, self.seed, progress,
                                   checkpoint=checkpoint)
        self.interpolation = interpolation
        self.drift_pays = None  # a new drift: tune_horizon measures it again
        self._clear_caches()
        return self

    @torch.no_grad()
    def tune_horizon(self, episodes: Iterable, tasks: int = 40,
                     horizons: Sequence[float] = (0.125, 0.25, 0.5, 0.75, 1.0), steps: int = 50,
                     progress: bool = True,
                     augment: Union[bool, Sequence[str], EpisodeAugmenter, None] = True) -> Dict[str, float]:
        """Choose the integration horizon by query accuracy on held-out episodes.

        The horizon is adaptation's step budget and is tuned like a learning rate: on episodes
        (with queries) from the meta-training domains, never from the test domains. The best
        horizon becomes :attr:`horizon`, the default of :func:`fused_adapt`. Whether the drift's
        state there beats the unadapted backbone becomes :attr:`drift_pays`: where it does not,
        :func:`fused_adapt` also offers the mean meta-training displacement, the fallback for a
        drift whose task-specific part does not transfer.

        Args:
            episodes: iterable of episodes ``(support_x, support_y, query_x, query_y, ...)``.
            tasks: how many episodes to score.
            horizons: candidate integration times (each > 0).
            steps: integration steps used for every candidate.
            augment: capture shifts drawn on the episodes, as in :meth:`fit` (a horizon is then
                chosen for tasks on which adaptation pays).

        Returns:
            Mean query accuracy per candidate (keys ``"h=<value>"``) and of the unadapted
            backbone (key ``"none"``).
        """
        if self.interpolation is None:
            raise ValueError("HyperFlow.tune_horizon: fit the flow first")
        if not horizons or not all(math.isfinite(h) and h > 0 for h in horizons):
            raise ValueError(f"HyperFlow.tune_horizon: horizons must be finite and > 0, got {list(horizons)}")
        from .adapt import fused_adapt  # adapt imports this module

        eps = [as_episode(self.backbone, ep) for ep in itertools.islice(episodes, tasks)]
        if not eps or not all(has_queries(ep) for ep in eps):
            raise ValueError("HyperFlow.tune_horizon: needs episodes with query sets (EpisodeSampler(query > 0))")
        augmenter = EpisodeAugmenter.from_setting(augment, self.seed + 2)
        if augmenter is not None:
            eps = augmenter(eps)
        sx, sy, qx, qy = ([ep[i] for ep in eps] for i in range(4))

        def accuracy(models) -> float:
            hits = [(m(q).argmax(-1) == y).float().mean() for m, q, y in zip(models, qx, qy)]
            return float(torch.stack(hits).mean())

        theta_pre = self.subset.vector(self.backbone)
        scores = {"none": accuracy([AdaptedProtoNet(self.backbone, self.subset, theta_pre, x, y, int(y.max()) + 1,
                                                    self.metric, self.scale) for x, y in zip(sx, sy)])}
        for h in tqdm(horizons, desc="horizon", disable=not progress, unit="horizon"):
            scores[f"h={h:g}"] = accuracy(fused_adapt(self.backbone, sx, sy, flow=self, steps=steps, horizon=h,
                                                      select=False))
        best = max(horizons, key=lambda h: scores[f"h={h:g}"])
        self.horizon = float(best)
        self.drift_pays = scores[f"h={best:g}"] > scores["none"]
        logger.info("HyperFlow.tune_horizon: %s -> horizon %g", scores, best)
        if scores[f"h={best:g}"] < scores["none"]:
            warnings.warn(f"HyperFlow.tune_horizon: no horizon beats the unadapted backbone on these episodes "
                          f"({scores}); keeping the best, {best:g}", RuntimeWarning, stacklevel=3)
        return scores

    # -- adaptation ----------------------------------------------------------------------
    def check_backbone(self, op: str, backbone: nn.Module) -> None:
        """Raise ValueError unless ``backbone`` has every adapted parameter with the trained shape."""
        named = dict(backbone.named_parameters())
        for name, shape in zip(self.subset.names, self.subset.shapes):
            if name not in named:
                raise ValueError(f"{op}: the backbone has no parameter {name!r} that this flow adapts")
            if named[name].shape != shape:
                raise ValueError(f"{op}: parameter {name!r} has shape {tuple(named[name].shape)}, the flow was "
                                 f"trained for {tuple(shape)}")

    def packed(self, dtype: torch.dtype, device: torch.device) -> PackedDrift:
        """The drift network's weights packed for the fused integrators, cached per dtype and device.

        Safe under concurrent calls: an entry is built in full before it is published, and the
        network itself is never moved (a copy is packed for another device).
        """
        key = (dtype, device)
        packed = self._packed.get(key)
        if packed is None:
            packed = PackedDrift(*(t.to(device) for t in self.net.packed(dtype)))
            self._packed[key] = packed
        return packed

    def net_on(self, device: torch.device) -> DriftNetwork:
        """The drift network on ``device``: the network itself, or a cached copy (never a move, so
        concurrent calls on other devices keep working)."""
        if self.net.inp.weight.device == device:
            return self.net
        copy_ = self._nets.get(device)
        if copy_ is None:
            copy_ = copy.deepcopy(self.net).to(device)
            self._nets[device] = copy_
        return copy_

    def time_table(self, steps: int, horizon: float, solver: str, dtype: torch.dtype,
                   device: Optional[torch.device] = None, start: float = 0.0) -> torch.Tensor:
        """``W_t e(t)`` at every stage time of an integration, ``(steps, stages, H)`` (cached like
        :meth:`packed`: it depends only on the schedule, not on the task).

        Raises:
            ValueError: bad ``steps``, ``horizon``, ``solver`` or ``dtype`` (see
                :meth:`DriftNetwork.time_table`).
        """
        device = self.net.time.weight.device if device is None else torch.device(device)
        key = (steps, horizon, solver, dtype, device, start)
        table = self._tables.get(key)
        if table is None:
            table = self.net.time_table(steps, horizon, get_tableau(solver), dtype, start).to(device)
            if len(self._tables) >= 32:  # many distinct schedules: keep the cache bounded
                self._tables = {}        # replaced, not cleared: a concurrent reader keeps its entry
            self._tables[key] = table
        return table

    def _clear_caches(self) -> None:
        self._packed, self._tables, self._nets = {}, {}, {}

    # -- persistence ---------------------------------------------------------------------
    def state(self) -> Tuple[Dict[str, torch.Tensor], dict]:
        meta = {"format": "hyperflow-drift/1", "names": self.subset.names, "numel": self.subset.numel,
                "metric": self.metric, "scale": self.scale, "seed": self.seed, "hidden": self.net.hidden,
                "task_dim": self.net.task_dim, "time_dim": self.net.time_dim, "task_hidden": self.net.task_hidden,
                "max_rate": self.max_rate if math.isfinite(self.max_rate) else None,
                "task_radius": self.task_radius if math.isfinite(self.task_radius) else None,
                "recipe": self.recipe,
                "interpolation": self.interpolation, "horizon": self.horizon, "drift_pays": self.drift_pays,
                "task_stats": self.task_stats,
                "feature_dim": self.encoder.feature_dim, "layers": self.encoder.layers,
                "layer_dims": self.encoder.layer_dims}
        tensors = dict(self.net.state_dict())
        if self.mean_delta is not None:
            tensors["mean_delta"] = self.mean_delta
        if self.reference_means is not None:
            tensors["reference_means"] = self.reference_means
        return tensors, meta

    def save(self, path: os.PathLike) -> None:
        """Write the drift network and its configuration as one safetensors file (atomically)."""
        tensors, meta = self.state()
        save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: os.PathLike, backbone: nn.Module, encoder: Optional[nn.Module] = None) -> "HyperFlow":
        """Load a flow saved by :meth:`save` for ``backbone`` (no unpickling).

        Raises:
            ValueError: the file is not a HyperFlow checkpoint or does not fit ``backbone``.
        """
        tensors, meta = load_tensors(path)
        if meta.get("format") != "hyperflow-drift/1":
            raise ValueError(f"HyperFlow.load: {path} is not a HyperFlow drift checkpoint")
        names = dict(backbone.named_parameters())
        missing = [n for n in meta["names"] if n not in names]
        if missing:
            raise ValueError(f"HyperFlow.load: the backbone lacks adapted parameters {missing[:3]}")
        flow = cls(backbone, params=list(meta["names"]), metric=meta["metric"], scale=meta["scale"],
                   hidden=meta["hidden"], encoder=encoder, seed=meta["seed"],
                   task_stats=meta.get("task_stats", "final"))
        if not flow.encoder.ready:  # checked against the backbone's output at the first call
            flow.encoder.restore(meta.get("feature_dim"), meta.get("layers"), meta.get("layer_dims"),
                                 int(meta["task_dim"]))
        if flow.subset.numel != meta["numel"] or flow.encoder.dim != meta["task_dim"]:
            raise ValueError(f"HyperFlow.load: {path} was trained for {meta['numel']} parameters and task_dim "
                             f"{meta['task_dim']}, the backbone gives {flow.subset.numel} and {flow.encoder.dim}")
        flow.net = DriftNetwork(meta["numel"], meta["task_dim"], meta["hidden"], meta["time_dim"], meta["task_hidden"])
        for key in ("mean_delta", "reference_means"):
            value = tensors.pop(key, None)
            if value is not None and value.shape != (flow.subset.numel,):
                raise ValueError(f"HyperFlow.load: {path} holds {key} of shape {tuple(value.shape)}, expected "
                                 f"({flow.subset.numel},)")
            setattr(flow, key, value)
        flow.net.load_state_dict(tensors)
        flow.net.eval()
        flow.max_rate = meta["max_rate"] if meta["max_rate"] is not None else math.inf
        flow.task_radius = meta["task_radius"] if meta.get("task_radius") is not None else math.inf
        flow.recipe = dict(meta.get("recipe") or {})
        flow.interpolation = meta["interpolation"]
        flow.horizon = float(meta.get("horizon", 1.0))
        drift_pays = meta.get("drift_pays")  # absent from checkpoints older than it: not measured
        if drift_pays is not None and not isinstance(drift_pays, bool):
            raise ValueError(f"HyperFlow.load: {path} holds drift_pays={drift_pays!r}, expected true, false or null")
        flow.drift_pays = drift_pays
        return flow

    def __repr__(self) -> str:
        return (f"HyperFlow(adapted={self.subset.numel}, interpolation={self.interpolation!r}, "
                f"metric={self.metric!r}, net={self.net.extra_repr()})")

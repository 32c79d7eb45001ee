"""The Hyperflows pruner: wrap a model's layers, prune by flow, export to sparse kernels.

:class:`Pruner` replaces every selected ``nn.Linear`` / ``nn.Conv2d`` with a
:class:`~hyperflow_ext.prune.layers.MaskedLinear` / :class:`~hyperflow_ext.prune.layers.MaskedConv2d`
that shares the original weight and bias, then trains weights and scores together:

* loss ``CE(label_smoothing=0.1) + γ·mean(t)`` (mean over all ``N`` scores of the network); the
  pressure enters as the constant score gradient ``γ/N`` inside the fused
  :func:`~hyperflow_ext.prune.flow_ops.flow_step`, which also updates the flow EMA and takes the
  Adam step on the scores (the paper's lr ``1e-3``, raised automatically for short epochs) — one
  native pass per layer per step;
* weights: SGD with momentum 0.9 and a cosine schedule;
* ``γ`` either constant (``pressure=``, for power-law studies) or steered by the
  :class:`~hyperflow_ext.prune.schedule.PressureScheduler` toward ``target_sparsity``;
* a regrowth phase: pressure 0, learning rates reset, the score learning rate decaying
  geometrically so the mask freezes while the network fine-tunes.

Our additions in target mode (``land=``): the controller's residual at the end of the pruning
phase is removed by one common shift of all scores, and during regrowth the active count is
capped at the target (weights with flow still regrow; the weakest active ones make room), so a
run ends at the requested sparsity. ``land=False`` reproduces the paper's free regrowth.

Like ``torch.nn.utils.prune``, the originals stay recoverable: :meth:`Pruner.remove` puts the
plain layers back with their weights multiplied by the mask, and a failed setup is rolled back.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..sparse import sparsify
from .._checks import check_int
from ._args import Rule, as_rules, finite_number, matches, unsupported_reason
from ._loop import cosine_lr, evaluate, train_epoch
from .flow_ops import flow_step
from .functional import STE_SCALE
from .layers import SCORE_INIT, MaskedConv2d, MaskedLayer, MaskedLinear
from .parallel import average_grad_eff, check_agreement, sync_buffers, wrap_model
from .resume import PruneCheckpoint, resume_point
from .schedule import PressureScheduler

__all__ = ["Pruner"]

logger = logging.getLogger(__name__)

#: The paper's score learning rate, and the per-epoch score travel it gives on CIFAR (~390 steps).
PAPER_SCORE_LR = 1e-3
SCORE_TRAVEL = 0.4
_FLOATS = (torch.float32, torch.float64)


@dataclass
class _ScoreState:
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    grad_weight: torch.Tensor   # scratch output of flow_step (autograd already set weight.grad)
    mask: torch.Tensor          # scratch output of flow_step


class Pruner:
    """Prune a model by flow (Hyperflows) to a target sparsity or at a constant pressure.

    Args:
        model: the network to prune (modified in place: its layers are wrapped).
        target_sparsity: fraction of the wrapped weights to prune, in ``[0, 1)``; the pressure
            scheduler steers toward it. Give this or ``pressure``.
        pressure: a constant pressure ``γ`` (fixed-γ mode, no scheduler; for power-law studies).
        include: which layers to wrap (default: every module of ``layer_types``): qualified
            names (a name also selects its children), glob patterns, module types, or callables
            ``(name, module) -> bool``.
        exclude: same kinds; removes layers from the selection.
        layer_types: the prunable module types (``nn.Linear``, ``nn.Conv2d``).
        lr, momentum, weight_decay: SGD of the weights (cosine schedule over each phase).
        regrowth_lr: initial weight learning rate of the regrowth phase (default ``lr``).
        score_lr: Adam learning rate of the scores. ``None`` (default): the paper's ``1e-3`` when an
            epoch has at least 400 steps, else ``0.4 / steps_per_epoch``, so that a score can
            travel about 0.4 per epoch as in the paper's CIFAR setting (Adam moves a score by at
            most about ``lr`` per step, and scores start in ``[0.2, 0.5]``).
        score_betas: Adam betas of the scores.
        regrowth_score_decay: per-epoch factor of the geometric decay of the score learning rate
            during regrowth (the mask freezes as it goes to 0).
        label_smoothing: of the cross-entropy.
        flow_decay: EMA decay of the flow buffer.
        score_init: ``(low, high)`` of the uniform score initialisation.
        scheduler_step, scheduler_exponent, aggressivity, scheduler_damping: see
            :class:`~hyperflow_ext.prune.schedule.PressureScheduler` (``damping=1``: the
            authors' controller).
        land: target mode only. ``"start"`` (or ``True``): at the end of the pruning phase shift
            every score by one common constant so that exactly the target density is active (an
            instantaneous pressure impulse that removes the controller's residual; it re-ranks
            nothing; logged in :attr:`landings`). ``"hold"`` (default): also, during regrowth,
            whenever more than the target count is active after a step, shift the scores down
            again — weights with flow still regrow, the weakest active ones make room, and the
            run ends at the target. ``False``: the authors' behaviour (free regrowth, which on our
            CNN ends 0.2–0.7 points below the target sparsity).
        backend: back-end of the fused flow step (``"auto" | "native" | "torch"``).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; arguments of the wrong kind.
        ValueError: ``target_sparsity`` outside ``[0, 1)``; neither or both of
            ``target_sparsity`` / ``pressure``; nothing to prune; NaN/Inf in a selected layer's
            parameters; an unsupported dtype.

    Example:
        >>> pruner = Pruner(model, target_sparsity=0.98)
        >>> history = pruner.fit(train_loader, epochs=30, regrowth_epochs=10, val_loader=test_loader)
        >>> pruner.sparsity()["overall"]
        0.98...
        >>> sparse_model = pruner.export()
    """

    def __init__(self, model: nn.Module, target_sparsity: Optional[float] = None, *,
                 pressure: Optional[float] = None,
                 include: Union[None, Rule, Iterable[Rule]] = None,
                 exclude: Union[None, Rule, Iterable[Rule]] = None,
                 layer_types: Sequence[Type[nn.Module]] = (nn.Linear, nn.Conv2d),
                 lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 5e-4,
                 regrowth_lr: Optional[float] = None, score_lr: Optional[float] = None,
                 score_betas: Tuple[float, float] = (0.9, 0.999), regrowth_score_decay: float = 0.05,
                 label_smoothing: float = 0.1, flow_decay: float = 0.9,
                 score_init: Tuple[float, float] = SCORE_INIT, scheduler_step: float = 0.2,
                 scheduler_exponent: float = 1.5, aggressivity: float = 6.0, scheduler_damping: float = 1.0,
                 land: Union[bool, str] = "hold", backend: Optional[str] = None) -> None:
        op = "Pruner"
        if not isinstance(model, nn.Module):
            raise TypeError(f"{op}: model must be a torch.nn.Module, got {type(model).__name__}")
        if (target_sparsity is None) == (pressure is None):
            raise ValueError(f"{op}: give exactly one of target_sparsity (scheduled pressure) or pressure "
                             f"(constant γ), got target_sparsity={target_sparsity!r}, pressure={pressure!r}")
        if target_sparsity is not None:
            target_sparsity = finite_number(op, "target_sparsity", target_sparsity)
            if not 0.0 <= target_sparsity < 1.0:
                raise ValueError(f"{op}: target_sparsity must lie in [0, 1), got {target_sparsity}")
        if pressure is not None:
            pressure = finite_number(op, "pressure", pressure, minimum=0.0)
        self.target_sparsity, self.pressure = target_sparsity, pressure
        self.lr = finite_number(op, "lr", lr, positive=True)
        self.regrowth_lr = self.lr if regrowth_lr is None else finite_number(op, "regrowth_lr", regrowth_lr,
                                                                              positive=True)
        self.momentum = finite_number(op, "momentum", momentum, minimum=0.0)
        self.weight_decay = finite_number(op, "weight_decay", weight_decay, minimum=0.0)
        self.score_lr = None if score_lr is None else finite_number(op, "score_lr", score_lr, positive=True)
        self._score_lr = self.score_lr or PAPER_SCORE_LR  # the rate in use (resolved per fit)
        self.score_betas = tuple(float(b) for b in score_betas)
        self.regrowth_score_decay = finite_number(op, "regrowth_score_decay", regrowth_score_decay, positive=True)
        if self.regrowth_score_decay > 1.0:
            raise ValueError(f"{op}: regrowth_score_decay must lie in (0, 1], got {regrowth_score_decay}")
        self.label_smoothing = finite_number(op, "label_smoothing", label_smoothing, minimum=0.0)
        self.flow_decay = finite_number(op, "flow_decay", flow_decay, minimum=0.0)
        self.scheduler_kw = {"step": scheduler_step, "exponent": scheduler_exponent, "aggressivity": aggressivity,
                             "damping": scheduler_damping}
        self.backend = backend
        if land not in (True, False, None, "start", "hold"):
            raise ValueError(f"{op}: land must be True/'start', 'hold' or False/None, got {land!r}")
        self.land = "start" if land is True else (land or None)
        self.landings: List[Dict[str, float]] = []
        self.model = model
        self.scheduler: Optional[PressureScheduler] = None
        self.gamma = 0.0 if pressure is None else pressure
        self.history: List[Dict[str, Any]] = []

        candidates = self._select(model, as_rules(op, "include", include), as_rules(op, "exclude", exclude),
                                  tuple(layer_types))
        if not candidates:
            raise ValueError(f"{op}: nothing to prune: the model has no {' / '.join(t.__name__ for t in layer_types)} "
                             f"layer left after include/exclude")
        for name, module in candidates:
            for pname, p in module.named_parameters(recurse=False):
                if p.dtype not in _FLOATS:
                    raise ValueError(f"{op}: {name}.{pname} has dtype {p.dtype}; pruning supports float32/float64")
                if not bool(torch.isfinite(p.detach()).all()):
                    raise ValueError(f"{op}: {name}.{pname} contains NaN or Inf; fix the model before pruning")

        self._layers: Dict[str, MaskedLayer] = {}
        self._originals: Dict[str, nn.Module] = {}
        self._refs: Dict[str, List[Tuple[nn.Module, str]]] = {}
        refs = self._references(model)
        try:
            for name, module in candidates:
                masked = (MaskedLinear.from_linear(module, score_init) if isinstance(module, nn.Linear)
                          else MaskedConv2d.from_conv2d(module, score_init))
                masked.train(module.training)
                self._originals[name], self._layers[name] = module, masked
                self._refs[name] = refs[id(module)]
                for parent, attr in self._refs[name]:
                    setattr(parent, attr, masked)
        except BaseException:
            self._restore()
            raise
        self.num_scores = sum(m.scores.numel() for m in self._layers.values())
        self._state: Dict[str, _ScoreState] = {}
        self._reset_score_optimizer()
        self._active = True
        #: per-layer decisions of the last :meth:`export` (see :func:`hyperflow_ext.sparse.sparsify`)
        self.export_report: List[Dict[str, Any]] = []

    # ----------------------------------------------------------------------------- selection
    @staticmethod
    def _select(model: nn.Module, include: Optional[List[Rule]], exclude: Optional[List[Rule]],
                layer_types: Tuple[Type[nn.Module], ...]) -> List[Tuple[str, nn.Module]]:
        out = []
        for name, module in model.named_modules():
            if not name or not isinstance(module, layer_types) or isinstance(module, (MaskedLinear, MaskedConv2d)):
                continue
            if include is not None and not matches(name, module, include):
                continue
            if exclude is not None and matches(name, module, exclude):
                continue
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                raise ValueError(f"Pruner: layer_types may only hold nn.Linear / nn.Conv2d (subclasses), "
                                 f"got {type(module).__name__} at {name!r}")
            reason = unsupported_reason(module)
            if reason is not None:
                logger.info("Pruner: not wrapping %s: %s", name, reason)
                continue
            out.append((name, module))
        return out

    @staticmethod
    def _references(model: nn.Module) -> Dict[int, List[Tuple[nn.Module, str]]]:
        """Every (parent, attribute) that holds each child module (shared modules included)."""
        refs: Dict[int, List[Tuple[nn.Module, str]]] = {}
        for parent in model.modules():
            for attr, child in parent._modules.items():
                if child is not None:
                    refs.setdefault(id(child), []).append((parent, attr))
        return refs

    def _restore(self) -> None:
        for name, original in self._originals.items():
            for parent, attr in self._refs.get(name, []):
                setattr(parent, attr, original)

    def _check_active(self, op: str) -> None:
        if not self._active:
            raise RuntimeError(f"Pruner.{op}: the pruner was removed; create a new Pruner to prune again")

    def _reset_score_optimizer(self) -> None:
        self._score_step = 0
        for name, m in self._layers.items():
            z = torch.zeros_like(m.scores, memory_format=torch.contiguous_format)
            self._state[name] = _ScoreState(z, z.clone(), z.clone(), torch.empty(z.shape, dtype=torch.bool,
                                                                               device=z.device))

    # ----------------------------------------------------------------------------- queries
    @property
    def layers(self) -> Dict[str, MaskedLayer]:
        """Qualified module name → masked layer."""
        return dict(self._layers)

    def masks(self) -> Dict[str, torch.Tensor]:
        """``"<layer>.weight"`` → current bool mask."""
        return {f"{n}.weight": m.mask() for n, m in self._layers.items()}

    def sparsity(self) -> Dict[str, float]:
        """Fraction of pruned weights per wrapped weight (``"<layer>.weight"``) and ``"overall"``."""
        out, pruned = {}, 0
        for n, m in self._layers.items():
            k = int((~m.mask()).sum())
            pruned += k
            out[f"{n}.weight"] = k / max(1, m.scores.numel())
        out["overall"] = pruned / max(1, self.num_scores)
        return out

    def density(self) -> float:
        """Overall fraction of active weights, ``1 − sparsity()["overall"]``."""
        active = sum(int(m.mask().sum()) for m in self._layers.values())
        return active / max(1, self.num_scores)

    def _layer(self, op: str, name: str) -> MaskedLayer:
        if not isinstance(name, str):
            raise TypeError(f"Pruner.{op}: name must be a str, got {type(name).__name__}")
        key = name[:-len(".weight")] if name.endswith(".weight") else name
        if key not in self._layers:
            raise KeyError(f"Pruner.{op}: no pruned weight named {name!r}; known: "
                           f"{', '.join(n + '.weight' for n in self._layers)}")
        return self._layers[key]

    def flow(self, name: str) -> torch.Tensor:
        """The flow (importance) of every weight of ``name`` (``"features.0.weight"`` or ``"features.0"``).

        The EMA of ``w ⊙ ∂L/∂(W⊙m)`` accumulated while the weight was pruned: negative values mean
        the loss would drop if the weight came back. A copy shaped like the weight.
        """
        return self._layer("flow", name).flow.detach().clone()

    def scores(self, name: str) -> torch.Tensor:
        """A copy of the scores of ``name`` (active iff ``>= 0``)."""
        return self._layer("scores", name).scores.detach().clone()

    # ----------------------------------------------------------------------------- training
    def _score_hook(self, pressure_per_score: Callable[[], float], score_lr: Callable[[int], float],
                    cap: Optional[int] = None):
        betas = self.score_betas

        def hook(step: int) -> None:
            self._score_step += 1
            average_grad_eff(self._layers)  # under torchrun: the global batch's G on every rank
            lr, pressure = score_lr(step), pressure_per_score()
            active = 0
            for name, m in self._layers.items():
                st = self._state[name]
                _, mask = flow_step(m.weight.detach(), m.grad_eff, m.scores.data, m.flow, st.exp_avg, st.exp_avg_sq,
                                    step=self._score_step, pressure=pressure, lr=lr, betas=betas,
                                    flow_decay=self.flow_decay, ste_scale=STE_SCALE, grad_weight_out=st.grad_weight,
                                    mask_out=st.mask, backend=self.backend)
                if cap is not None:
                    active += int(mask.sum())
            if cap is not None and active > cap:
                self._shift_scores(cap)
        return hook

    def _zero_sinks(self, step: int) -> None:
        for m in self._layers.values():
            m.grad_eff.zero_()
            m.scores.grad = None

    def _weight_params(self) -> List[nn.Parameter]:
        scores = {id(m.scores) for m in self._layers.values()}
        return [p for p in self.model.parameters() if p.requires_grad and id(p) not in scores]

    def fit(self, train_loader: Iterable, epochs: int, regrowth_epochs: int = 0, val_loader: Optional[Iterable] = None,
            *, progress: bool = True, callback: Optional[Callable[[Dict[str, Any]], None]] = None,
            checkpoint: Optional[str] = None) -> List[Dict[str, Any]]:
        """Prune for ``epochs`` epochs, then fine-tune with regrowth for ``regrowth_epochs``.

        Args:
            train_loader: re-iterable ``(inputs, labels)`` batches (a ``DataLoader`` or
                :class:`~hyperflow_ext.prune._loop.TensorLoader`); ``len()`` is used for the
                per-step cosine schedule when available.
            epochs: pruning epochs (pressure on; the scheduler's horizon in target mode).
            regrowth_epochs: epochs with pressure 0, reset learning rates, decaying score lr.
            val_loader: optional loader evaluated after every epoch.
            progress: show a tqdm bar (loss, acc, sparsity, γ).
            callback: called with each epoch's record.
            checkpoint: a file for the run's state after every epoch (see
                :mod:`~hyperflow_ext.prune.resume`); a ``fit`` called again with the same arguments on
                the same starting model resumes after its last epoch.

        Under ``torchrun`` every rank trains on its share of each global batch through
        ``DistributedDataParallel`` (see :mod:`~hyperflow_ext.prune.parallel`), rank 0 alone shows
        progress and writes the checkpoint, and the ranks' scores, masks, flow buffers, weights and
        pressure are compared after every epoch.

        Returns:
            One record per epoch: ``epoch, phase, loss, acc, sparsity, density, gamma, lr,
            score_lr`` and ``val_acc`` when ``val_loader`` is given (also appended to
            :attr:`history`).

        Raises:
            RuntimeError: the pruner was removed.
            RankDriftError: the ranks' pruning state differs (a ``RuntimeError``).
            TypeError / ValueError: bad epoch counts or batches, or a checkpoint of another run.
            FloatingPointError: the loss became NaN/Inf.
        """
        self._check_active("fit")
        epochs = check_int("Pruner.fit", "epochs", epochs, minimum=0)
        regrowth_epochs = check_int("Pruner.fit", "regrowth_epochs", regrowth_epochs, minimum=0)
        if epochs + regrowth_epochs == 0:
            raise ValueError("Pruner.fit: epochs + regrowth_epochs must be >= 1")
        try:
            steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
        except TypeError:
            steps_per_epoch = 0
        if self.target_sparsity is not None and epochs > 0:
            self.scheduler = PressureScheduler(self.target_sparsity, epochs, **self.scheduler_kw)
        if self.score_lr is None:
            self._score_lr = max(PAPER_SCORE_LR, SCORE_TRAVEL / steps_per_epoch) if steps_per_epoch else PAPER_SCORE_LR
        elif epochs and steps_per_epoch and self.score_lr * steps_per_epoch < 0.1:
            logger.warning("Pruner.fit: with score_lr=%g and %d steps per epoch a score moves at most %.3g per "
                           "epoch, but scores start in [%.2g, %.2g]: pruning will lag the schedule; consider "
                           "score_lr >= %.2g (or None)", self.score_lr, steps_per_epoch,
                           self.score_lr * steps_per_epoch, *next(iter(self._layers.values())).score_init,
                           SCORE_TRAVEL / steps_per_epoch)
        ckpt = PruneCheckpoint(checkpoint, self, epochs, regrowth_epochs, steps_per_epoch) if checkpoint else None
        at = resume_point(ckpt, self, train_loader)
        for m in self._layers.values():
            m.track_grad_eff(True)
        records: List[Dict[str, Any]] = [] if at is None else at["records"]
        bar = tqdm(total=epochs + regrowth_epochs, desc="hyperflows", unit="epoch", leave=False,
                   disable=not distributed.show_progress(progress), initial=len(records))
        self._train_model = wrap_model(self.model, self._layers)
        try:
            phases = [("prune", epochs), ("regrow", regrowth_epochs)]
            for index, (phase, n_epochs) in enumerate(phases):
                # epochs of this phase a resumed run has behind it (all of a phase before the checkpoint's)
                done = 0 if at is None else (at["epoch"] if at["phase"] == phase else
                                             n_epochs if index < [p for p, _ in phases].index(at["phase"]) else 0)
                if phase == "regrow" and epochs > 0 and self.land and self.target_sparsity is not None and done == 0:
                    self._land(1.0 - self.target_sparsity)
                if n_epochs == done:
                    continue
                resume = (done, at["step"], at["sgd"]) if at is not None and at["phase"] == phase else None
                records += self._run_phase(phase, n_epochs, steps_per_epoch, train_loader, val_loader, bar, callback,
                                           first_epoch=len(self.history) + len(records) + 1 - done, resume=resume,
                                           ckpt=ckpt, records=records)
        finally:
            bar.close()
            self._train_model = self.model
            for m in self._layers.values():
                m.track_grad_eff(False)
                m.scores.grad = None
        self.history += records
        return records

    @torch.no_grad()
    def _shift_scores(self, keep: int) -> float:
        """Subtract one constant from every score so that ``keep`` of them are ``>= 0``; returns it."""
        flat = torch.cat([m.scores.detach().reshape(-1) for m in self._layers.values()])
        if keep <= 0:
            shift = float(flat.max()) + 1e-6  # everything pruned
        else:
            shift = float(torch.kthvalue(flat.cpu(), flat.numel() - keep + 1).values)
        for m in self._layers.values():
            m.scores.sub_(shift)
        return shift

    def _keep_count(self) -> int:
        return int(round((1.0 - float(self.target_sparsity)) * self.num_scores))

    def _land(self, target_density: float) -> None:
        """Shift all scores by one constant so that ``round(target_density·N)`` are ``>= 0``."""
        before = self.density()
        shift = self._shift_scores(int(round(target_density * self.num_scores)))
        rec = {"shift": shift, "density_before": before, "density_after": self.density()}
        self.landings.append(rec)
        if abs(rec["density_after"] - before) > 0.02:
            logger.warning("Pruner: the scheduler ended %.2f points from the target density; landing shifted the "
                           "scores by %.4g (consider more pruning epochs)", 100 * (before - target_density), shift)

    def _run_phase(self, phase: str, n_epochs: int, steps_per_epoch: int, train_loader: Iterable,
                   val_loader: Optional[Iterable], bar, callback, first_epoch: int, resume=None, ckpt=None,
                   records: Sequence[Dict[str, Any]] = ()) -> List[Dict[str, Any]]:
        regrow = phase == "regrow"
        base_lr = self.regrowth_lr if regrow else self.lr
        optimizer = torch.optim.SGD(self._weight_params(), lr=base_lr, momentum=self.momentum,
                                    weight_decay=self.weight_decay)
        if regrow:  # learning rates reset (fresh weight optimiser); the score moments are kept, so the
            self.gamma = 0.0  # scores do not all take a full-size first Adam step around the threshold
        elif self.pressure is not None:
            self.gamma = self.pressure
        total = steps_per_epoch * n_epochs
        epoch_lr: List[float] = [base_lr]

        def lr_at(step: int) -> float:
            return cosine_lr(base_lr, step, total) if total else epoch_lr[0]

        def score_lr(step: int) -> float:
            if not regrow:
                return self._score_lr
            per_epoch = steps_per_epoch or 1
            return self._score_lr * self.regrowth_score_decay ** (step / per_epoch)

        hold = regrow and self.land == "hold" and self.target_sparsity is not None and bool(self.landings)
        cap = self._keep_count() if hold else None
        hook = self._score_hook(lambda: self.gamma / self.num_scores, score_lr, cap)
        out, step, e0 = [], 0, 0
        if resume is not None:
            e0, step = resume[0], resume[1]
            optimizer.load_state_dict(resume[2])
        for e in range(e0, n_epochs):
            if self.scheduler is not None and not regrow:
                self.gamma = self.scheduler.gamma
            if not total:
                epoch_lr[0] = cosine_lr(base_lr, e, n_epochs)
            gamma = self.gamma
            loss, acc, step = train_epoch(self._train_model, train_loader, optimizer,
                                          label_smoothing=self.label_smoothing, lr_at=lr_at, step0=step,
                                          after_backward=hook, before_forward=self._zero_sinks, shard=True)
            sync_buffers(self.model, self._layers)  # BatchNorm statistics: rank 0's on every rank
            density = self.density()
            if self.scheduler is not None and not regrow:
                self.scheduler.step(density)
            rec: Dict[str, Any] = {"epoch": first_epoch + e, "phase": phase, "loss": loss,
                                   "acc": acc, "density": density, "sparsity": 1.0 - density, "gamma": gamma,
                                   "lr": optimizer.param_groups[0]["lr"], "score_lr": score_lr(max(0, step - 1))}
            if val_loader is not None:
                rec["val_acc"] = evaluate(self.model, val_loader)
            out.append(rec)
            check_agreement(self, f"after {phase} epoch {rec['epoch']}")
            if ckpt is not None:
                ckpt.save(self, phase, e + 1, step, optimizer, train_loader, list(records) + out)
            if callback is not None:
                callback(rec)
            post = {"loss": f"{loss:.3f}", "acc": f"{acc:.3f}", "sparsity": f"{100 * (1 - density):.2f}%",
                    "γ": f"{gamma:.3g}"}
            if "val_acc" in rec:
                post["val"] = f"{rec['val_acc']:.3f}"
            bar.set_postfix(post, refresh=False)
            bar.update(1)
            logger.debug("hyperflows %s epoch %d: %s", phase, rec["epoch"], rec)
        if regrow:
            self.gamma = 0.0
        return out

    # ----------------------------------------------------------------------------- export / remove
    def export(self, example_input: Optional[torch.Tensor] = None, *, fold_bn: bool = True,
               fuse_relu: bool = True, time_budget_s: float = 0.1, dense_above: Any = "auto",
               never_slower: bool = True) -> nn.Module:
        """A copy of the model with every masked layer replaced by a sparse inference layer.

        Linear layers become :class:`~hyperflow_ext.sparse.SparseLinear`, convolutions
        :class:`~hyperflow_ext.sparse.SparseConv2d` (CSR of ``W⊙m``, direct sparse convolution). On the
        way (see :func:`hyperflow_ext.sparse.sparsify`) an eval-mode ``BatchNorm2d`` after a convolution is
        folded into it and a following ReLU fused into its epilogue; with ``example_input`` every layer is
        timed sparse vs dense on its real input and kept dense (:class:`~hyperflow_ext.sparse.DenseConv2d`,
        ``nn.Linear``) where dense is faster. A convolution the sparse kernels do not support
        (``groups != 1``) stays a dense convolution holding ``W⊙m``. The per-layer decisions are logged
        and kept in :attr:`export_report`. The copy is in eval mode with gradients off; the pruner and
        its model are untouched. Save it with :func:`hyperflow_ext.sparse.save`.

        Args:
            example_input: a representative input batch for the dense-or-sparse timing (optional).
            fold_bn, fuse_relu, time_budget_s, dense_above, never_slower: as
                :func:`~hyperflow_ext.sparse.sparsify` (with ``example_input`` the whole export is kept only
                where it times faster than the dense model; without one, layers denser than the ISA path's
                threshold stay dense).
        """
        self._check_active("export")
        plain: Dict[int, nn.Module] = {}
        names = []
        for name, m in self._layers.items():
            dense = copy.deepcopy(self._originals[name])
            with torch.no_grad():
                dense.weight.copy_(m.masked_weight())
            dense.requires_grad_(False)
            plain[id(m)] = dense
            if isinstance(m, MaskedLinear) or m.groups == 1:
                names.append(name)
            else:
                logger.warning("Pruner.export: %s has groups=%d; exported as a dense nn.Conv2d holding W⊙m",
                               name, m.groups)
        # deepcopy with the masked layers pre-mapped to plain W⊙m copies: nothing else is shared
        memo = {id(m): plain[id(m)] for m in self._layers.values()}
        dense_model = copy.deepcopy(self.model, memo)
        exported, self.export_report = sparsify(dense_model, example_input, layers=names, fold_bn=fold_bn,
                                                fuse_relu=fuse_relu, time_budget_s=time_budget_s, inplace=True,
                                                dense_above=dense_above, never_slower=never_slower)
        return exported

    def remove(self) -> nn.Module:
        """Put the original layers back with their weights multiplied by the mask; returns the model.

        After this the pruner is inactive (like ``torch.nn.utils.prune.remove``).
        """
        self._check_active("remove")
        with torch.no_grad():
            for name, m in self._layers.items():
                m.weight.masked_fill_(~m.mask(), 0.0)
                self._originals[name].train(m.training)
        self._restore()
        for m in self._layers.values():
            m.track_grad_eff(False)
        self._active = False
        return self.model

    def __repr__(self) -> str:
        mode = (f"target_sparsity={self.target_sparsity}" if self.target_sparsity is not None
                else f"pressure={self.pressure}")
        return (f"Pruner({mode}, layers={len(self._layers)}, scores={self.num_scores}, "
                f"sparsity={self.sparsity()['overall']:.4f})")

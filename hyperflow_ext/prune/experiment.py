"""The embedded pruning-quality experiment (runs on a CPU in minutes, nothing downloaded).

Task: scikit-learn's bundled handwritten digits at their native 8×8 resolution (1797 images,
10 classes; a seeded stratified split, 75% train / 25% test = 450 test images), classified by
:class:`DigitsCNN` — three 3×3 conv blocks (8/16/32 channels, BatchNorm, ReLU, two max-pools)
and a 128→32→10 MLP head: 10,248 prunable weights in 5 layers (98% leaves ~205 weights, 99%
~102). Digits rather than the glyph set because it loads instantly and dozens of runs fit on one
CPU core; the native 8×8 input because upsampling adds pixels, not information; a narrow CNN so
that 98–99% sparsity actually strains the network (with 16/32/64 channels — 40k weights — both
methods stay within ~1 point of the dense model down to 98% and magnitude pruning loses ~4
points at 99%; pass ``overrides={"channels": (16, 32, 64), "hidden": 64}`` to run that).

Protocol (:func:`run_pruning_experiment`): one dense model is trained first (SGD, momentum 0.9,
cosine, label smoothing 0.1); every method starts from a copy of it and gets the same budget of
``epochs + regrowth_epochs`` further epochs:

* **Hyperflows** — :class:`~hyperflow_ext.prune.pruner.Pruner` with the pressure scheduler:
  ``epochs`` pruning epochs, then ``regrowth_epochs`` regrowth epochs (default ``land="hold"``);
* **global magnitude** — ``torch.nn.utils.prune.global_unstructured`` (L1) to the *sparsity
  the Hyperflows run reached* (so both compare at equal sparsity), then fine-tuning for all
  ``epochs + regrowth_epochs`` epochs with the same weight recipe;
* **gradual magnitude** — :func:`~hyperflow_ext.prune.gradual_magnitude_prune` (Zhu & Gupta's
  cubic schedule, global magnitude masks every quarter epoch) to the same sparsity, pruning during
  the first 75 % of the same ``epochs + regrowth_epochs`` epochs and fine-tuning for the rest.

Deviation from the paper, on purpose: the score learning rate is ``1e-2`` instead of ``1e-3``.
With ~43 steps per epoch here (vs ~390 on CIFAR) a score moves at most ``lr`` per step under
Adam, so ``1e-3`` would leave every score above zero for the first ten epochs; ``1e-2`` restores
a comparable per-epoch score travel (the pruner's own default, ``score_lr=None``, applies the same
rule). ``quick=True`` shortens every budget and doubles the scheduler's step (0.4) so the shorter
schedule still reaches 99%.

:func:`run_power_law_study` runs the pruner at constant pressures, fits
:func:`~hyperflow_ext.prune.power_law.fit_power_law` on all but a held-out γ and reports how
well the law predicts the held-out run.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from ..measure import wall_time
from ._loop import TensorLoader, cosine_lr, evaluate, predict, train_epoch
from .gradual import gradual_magnitude_prune
from .magnitude import magnitude_prune
from .power_law import fit_power_law
from .pruner import Pruner

__all__ = ["DigitsCNN", "digits_split", "train_dense", "dense_digits_setup", "export_agreement",
           "run_pruning_experiment", "run_power_law_study", "DEFAULTS", "QUICK"]

logger = logging.getLogger(__name__)

#: Budgets of the full run (epochs per method after the shared dense training).
DEFAULTS: Dict[str, Any] = {"pretrain_epochs": 10, "epochs": 20, "regrowth_epochs": 10, "batch_size": 32,
                            "lr": 0.05, "score_lr": 1e-2, "power_law_epochs": 15, "channels": (8, 16, 32),
                            "hidden": 32, "scheduler_step": 0.2}
#: Budgets of ``quick=True`` (about a minute on one core for each entry point).
QUICK: Dict[str, Any] = {"pretrain_epochs": 4, "epochs": 12, "regrowth_epochs": 4, "batch_size": 32,
                         "lr": 0.05, "score_lr": 1e-2, "power_law_epochs": 6, "channels": (8, 16, 32),
                         "hidden": 32, "scheduler_step": 0.4}


class DigitsCNN(nn.Module):
    """Small CNN for 8×8 digits: ``features`` (3 conv blocks) → ``classifier`` (2 linear).

    Shape:
        ``(batch, 1, 8, 8) -> (batch, num_classes)``.
    """

    def __init__(self, num_classes: int = 10, channels: Tuple[int, int, int] = (8, 16, 32), hidden: int = 32,
                 image_size: int = 8) -> None:
        super().__init__()
        a, b, c = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, a, 3, padding=1), nn.BatchNorm2d(a), nn.ReLU(),
            nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(b, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c * side * side, hidden), nn.ReLU(),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def digits_split(seed: int = 0, test_fraction: float = 0.25, image_size: int = 8
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded stratified split of :func:`hyperflow_ext.data.load_digits`.

    Returns:
        ``(train_x, train_y, test_x, test_y)``; images ``(n, 1, image_size, image_size)`` in ``[0, 1]``.
    """
    from ..data import load_digits

    ds = load_digits(image_size=image_size)
    gen = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in range(ds.num_classes):
        idx = ds.indices_of(c)
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        k = int(round(idx.numel() * test_fraction))
        test_idx.append(idx[:k])
        train_idx.append(idx[k:])
    tr, te = torch.cat(train_idx), torch.cat(test_idx)
    return ds.images[tr], ds.labels[tr], ds.images[te], ds.labels[te]


def train_dense(model: nn.Module, loader: TensorLoader, epochs: int, lr: float = 0.05, momentum: float = 0.9,
                weight_decay: float = 5e-4, label_smoothing: float = 0.1) -> nn.Module:
    """Train ``model`` densely (SGD + momentum, per-step cosine, label smoothing); returns it."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    total, step = epochs * len(loader), 0
    for _ in range(epochs):
        _, _, step = train_epoch(model, loader, opt, label_smoothing=label_smoothing,
                                 lr_at=lambda s: cosine_lr(lr, s, total), step0=step)
    return model


def dense_digits_setup(seed: int, cfg: Dict[str, Any]) -> Tuple[TensorLoader, TensorLoader, nn.Module]:
    """The pruning experiments' starting point: seeded digits loaders and a dense model trained on them.

    Args:
        seed: seeds the split, the shuffling, the initialisation and the training.
        cfg: :data:`DEFAULTS`, :data:`QUICK` or a copy with changes (``batch_size``, ``channels``,
            ``hidden``, ``pretrain_epochs``, ``lr`` are read).

    Returns:
        ``(train_loader, test_loader, dense_model)``: the same dense :class:`DigitsCNN` for the same seed.
    """
    torch.manual_seed(seed)
    train_x, train_y, test_x, test_y = digits_split(seed)
    train = TensorLoader(train_x, train_y, cfg["batch_size"], shuffle=True, seed=seed)
    test = TensorLoader(test_x, test_y, 512)
    dense = DigitsCNN(channels=tuple(cfg["channels"]), hidden=cfg["hidden"])
    train_dense(dense, train, cfg["pretrain_epochs"], lr=cfg["lr"])
    return train, test, dense


def _config(quick: bool, overrides: Dict[str, Any]) -> Dict[str, Any]:
    cfg = dict(QUICK if quick else DEFAULTS)
    extra = overrides.pop("overrides", None) or {}
    unknown = set(extra) - set(cfg)
    if unknown:
        raise ValueError(f"unknown experiment settings {sorted(unknown)}; known: {sorted(cfg)}")
    overrides = dict(overrides, **extra)
    for k, v in overrides.items():
        if v is not None:
            cfg[k] = v
    return cfg


def export_agreement(masked: nn.Module, exported: nn.Module, loader: TensorLoader) -> Tuple[float, float]:
    """``(argmax agreement, largest absolute logit difference)`` of an export and its masked model on ``loader``."""
    with torch.inference_mode():
        a, b = predict(masked, loader), predict(exported, loader)
    return float((a.argmax(1) == b.argmax(1)).float().mean()), float((a - b).abs().max())


def _speed(dense: nn.Module, exported: nn.Module, x: torch.Tensor, repeat: int) -> Dict[str, float]:
    dense = copy.deepcopy(dense).eval()
    with torch.inference_mode():
        for m in (dense, exported):  # warm-up
            m(x)
        _, t_dense = wall_time(lambda: dense(x), repeat=repeat)
        _, t_sparse = wall_time(lambda: exported(x), repeat=repeat)
    return {"batch": int(x.shape[0]), "dense_s": t_dense, "sparse_s": t_sparse, "speedup": t_dense / t_sparse}


def run_pruning_experiment(sparsities: Sequence[float] = (0.9, 0.95, 0.98, 0.99), epochs: Optional[int] = None,
                           seed: int = 0, quick: bool = False, progress: bool = True, *,
                           regrowth_epochs: Optional[int] = None, pretrain_epochs: Optional[int] = None,
                           score_lr: Optional[float] = None, lr: Optional[float] = None,
                           magnitude_rounds: int = 1, gradual: bool = True, speed_at: Optional[float] = 0.98,
                           speed_repeat: int = 20, overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Hyperflows vs one-shot and gradual global magnitude pruning on digits at each target sparsity.

    Args:
        sparsities: target sparsities in ``[0, 1)``.
        epochs: Hyperflows pruning epochs (default 20; quick 8).
        seed: data split, initialisation and shuffling.
        quick: small budgets (:data:`QUICK`).
        progress: tqdm bars.
        regrowth_epochs: Hyperflows regrowth epochs (default 10; quick 4). Magnitude pruning
            fine-tunes for ``epochs + regrowth_epochs``.
        pretrain_epochs: dense training shared by both methods (default 10; quick 4).
        score_lr, lr: score and weight learning rates.
        magnitude_rounds: pruning rounds of the magnitude baseline (1 = one-shot).
        gradual: also run gradual magnitude pruning (cubic schedule) at the same sparsity and
            epoch budget (``False`` drops the ``"gradual"`` entry of each row).
        speed_at: target sparsity at which the exported model's CPU inference time is compared
            with the dense model's (``None`` to skip).
        speed_repeat: timing repeats (median).
        overrides: any other setting of :data:`DEFAULTS` (``channels``, ``hidden``, ``batch_size``…).

    Returns:
        ``{"config", "dense_acc", "rows": [{"target", "hyperflows": {"acc", "sparsity",
        "agreement", "max_abs_diff", "layer_sparsity"}, "magnitude": {"acc", "sparsity"},
        "gradual": {"acc", "sparsity"}, "gap", "gap_gradual"}], "speed", "seconds"}``; accuracies are
        test-set top-1 in ``[0, 1]``; ``gap`` is Hyperflows minus one-shot magnitude, ``gap_gradual``
        Hyperflows minus gradual magnitude.
    """
    for s in sparsities:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= float(s) < 1.0:
            raise ValueError(f"run_pruning_experiment: sparsities must lie in [0, 1), got {s!r}")
    cfg = _config(quick, {"epochs": epochs, "regrowth_epochs": regrowth_epochs, "pretrain_epochs": pretrain_epochs,
                          "score_lr": score_lr, "lr": lr, "overrides": overrides})
    t0 = time.perf_counter()
    train, test, dense = dense_digits_setup(seed, cfg)
    out: Dict[str, Any] = {"config": dict(cfg, seed=seed, magnitude_rounds=magnitude_rounds, gradual=bool(gradual), task="digits 8x8",
                                          prunable_weights=sum(m.weight.numel() for m in dense.modules()
                                                               if isinstance(m, (nn.Linear, nn.Conv2d)))),
                           "dense_acc": evaluate(dense, test), "rows": [], "speed": None}
    budget = cfg["epochs"] + cfg["regrowth_epochs"]
    for target in sparsities:
        torch.manual_seed(seed + 1)
        model = copy.deepcopy(dense)
        pruner = Pruner(model, target_sparsity=float(target), lr=cfg["lr"], score_lr=cfg["score_lr"],
                        scheduler_step=cfg["scheduler_step"])
        history = pruner.fit(train.fresh(), epochs=cfg["epochs"], regrowth_epochs=cfg["regrowth_epochs"],
                             progress=progress)
        hf_sparsity = pruner.sparsity()
        exported = pruner.export()
        agreement, max_diff = export_agreement(model, exported, test)
        hf = {"acc": evaluate(model, test), "sparsity": hf_sparsity.pop("overall"), "agreement": agreement,
              "max_abs_diff": max_diff, "layer_sparsity": hf_sparsity,
              "sparsity_before_landing": pruner.landings[-1]["density_before"] if pruner.landings else None,
              "gammas": [r["gamma"] for r in history if r["phase"] == "prune"]}
        if hf["sparsity_before_landing"] is not None:
            hf["sparsity_before_landing"] = 1.0 - hf["sparsity_before_landing"]
        torch.manual_seed(seed + 1)
        baseline = copy.deepcopy(dense)
        mag = magnitude_prune(baseline, hf["sparsity"], train.fresh(), budget, rounds=magnitude_rounds, lr=cfg["lr"],
                              progress=progress)
        mg = {"acc": evaluate(baseline, test), "sparsity": mag["sparsity"]}
        row = {"target": float(target), "hyperflows": hf, "magnitude": mg, "gap": hf["acc"] - mg["acc"]}
        if gradual:
            torch.manual_seed(seed + 1)
            gradual_model = copy.deepcopy(dense)
            gmp = gradual_magnitude_prune(gradual_model, hf["sparsity"], train.fresh(), budget, lr=cfg["lr"],
                                          progress=progress)
            row["gradual"] = {"acc": evaluate(gradual_model, test), "sparsity": gmp["sparsity"]}
            row["gap_gradual"] = hf["acc"] - row["gradual"]["acc"]
        out["rows"].append(row)
        logger.info("target %.3f: hyperflows %.4f @ %.4f, magnitude %.4f @ %.4f%s", target, hf["acc"],
                    hf["sparsity"], mg["acc"], mg["sparsity"],
                    f", gradual {row['gradual']['acc']:.4f} @ {row['gradual']['sparsity']:.4f}" if gradual else "")
        if speed_at is not None and math.isclose(float(target), speed_at):
            out["speed"] = dict(_speed(dense, exported, test.x, speed_repeat), sparsity=hf["sparsity"])
    out["seconds"] = time.perf_counter() - t0
    return out


def run_power_law_study(gammas: Sequence[float] = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0), held_out: float = 0.5,
                        epochs: Optional[int] = None, seed: int = 0, quick: bool = False, progress: bool = True, *,
                        score_lr: Optional[float] = None, lr: Optional[float] = None,
                        pretrain_epochs: Optional[int] = None,
                        overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Constant-γ runs, a power-law fit on ``gammas`` and its prediction for ``held_out``.

    Every run starts from the same dense model and prunes for ``epochs`` epochs at constant
    pressure (no regrowth); its remaining density is the law's ``S(γ)``.

    Returns:
        ``{"config", "gammas", "densities", "law": {"c", "alpha0", "alpha1", "r2"},
        "held_out": {"gamma", "density", "predicted", "error_points"}, "pressure_for":
        {target: γ}, "seconds"}``; ``error_points`` is ``100·|predicted − measured|`` density.
    """
    gammas = [float(g) for g in gammas]
    if len(set(gammas)) < 5:
        raise ValueError(f"run_power_law_study: need at least 5 distinct gammas, got {gammas}")
    if held_out in gammas:
        raise ValueError(f"run_power_law_study: held_out={held_out} must not be one of the fitted gammas")
    cfg = _config(quick, {"power_law_epochs": epochs, "score_lr": score_lr, "lr": lr,
                          "pretrain_epochs": pretrain_epochs, "overrides": overrides})
    t0 = time.perf_counter()
    train, _, dense = dense_digits_setup(seed, cfg)

    def density_at(gamma: float) -> float:
        torch.manual_seed(seed + 1)
        model = copy.deepcopy(dense)
        pruner = Pruner(model, pressure=gamma, lr=cfg["lr"], score_lr=cfg["score_lr"])
        pruner.fit(train.fresh(), epochs=cfg["power_law_epochs"], progress=progress)
        return pruner.density()

    densities = [density_at(g) for g in gammas]
    law = fit_power_law(gammas, densities)
    measured = density_at(float(held_out))
    predicted = law.density(float(held_out))
    targets = {}
    for t in (0.9, 0.95, 0.98, 0.99):
        try:
            targets[t] = law.pressure_for(t)
        except ValueError:
            targets[t] = None
    return {"config": dict(cfg, seed=seed, task="digits 8x8"), "gammas": gammas, "densities": densities,
            "law": {"c": law.c, "alpha0": law.alpha0, "alpha1": law.alpha1, "r2": law.r2, "formula": str(law)},
            "held_out": {"gamma": float(held_out), "density": measured, "predicted": predicted,
                         "error_points": 100.0 * abs(predicted - measured)},
            "pressure_for": targets, "seconds": time.perf_counter() - t0}

"""The main job: the whole pipeline on embedded data, written up as a report folder.

pretrain (cached, source scripts) → tune fine-tuning's learning rates and record trajectories
(meta-training domains of :func:`~hyperflow_ext.data.fewshot_benchmark`) → train
HyperFlow-L/-PL/-C and tune their horizon on held-out meta-training episodes → cross-domain
few-shot table → loss along the flow vs fine-tuning → prune with Hyperflows (vs magnitude
pruning) and fit the power law → export → a wider CNN where sparsity pays (pruned, exported, timed
end to end) → sparse-kernel timing → ``report.md`` and PNG plots.
"""
from __future__ import annotations

import json
import logging
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from . import __version__, native
from ._io import atomic_path, cache_dir as resolve_cache_dir
from .data import EpisodeSampler, fewshot_benchmark
from .flow import DriftTrainConfig, HyperFlow, flow_path, fused_adapt
from .flow.baselines import direct_transfer, finetune_adapt, tune_lr
from .flow.evaluate import FewShotResult, evaluate_few_shot, summarise
from .flow.functional import features_with, finetune, support_loss
from .models import load_pretrained

__all__ = ["DemoConfig", "run_demo", "mixed_episodes", "held_out_episodes"]

logger = logging.getLogger("hyperflow.demo")

INTERPOLATION_LABELS = {"linear": "HyperFlow-L", "piecewise": "HyperFlow-PL", "cubic": "HyperFlow-C"}
DEFAULT_LABEL = "HyperFlow (fused_adapt defaults)"
BIAS_TUNING_CURVE = "bias tuning (Adam)"


@dataclass
class DemoConfig:
    """Sizes of every stage; :meth:`quick` gives the small version (``hyperflow demo --quick``)."""

    seed: int = 0
    pretrain_epochs: Optional[int] = None        # None: the architecture's default
    pretrain_scripts: Optional[List[str]] = None  # None: every source script
    traj_tasks: int = 192
    traj_steps: int = 50
    traj_objective: str = "support"  # fit's default; "query" recovered less on fewshot_benchmark (7-8 % vs 32 %)
    traj_query: int = 5              # queries per class in trajectory episodes
    traj_shots: List[int] = field(default_factory=lambda: [1, 5])
    perturbations: int = 2
    finetune_lr: Optional[float] = None   # None: the rate fit's recipe chose on meta-training episodes
    full_finetune: bool = False           # also evaluate full fine-tuning (as costly as bias tuning again)
    full_finetune_lr: Optional[float] = None  # None: tuned on held-out meta-training episodes (tune_lr)
    lr_tasks: int = 20                    # meta-training episodes that score full fine-tuning's grid
    drift_iters: int = 600
    horizons: List[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])
    horizon_tasks: int = 60          # held-out meta-training episodes that pick the horizon
    adapt_steps: int = 50
    episodes: int = 30
    shots: List[int] = field(default_factory=lambda: [1, 5])
    domains: Optional[List[str]] = None  # None: every target of fewshot_benchmark
    loss_curve_episodes: int = 10
    prune_quick: bool = False
    power_law_gammas: List[float] = field(default_factory=lambda: [0.03, 0.1, 0.3, 1.0, 3.0, 10.0])
    kernel_sparsities: List[float] = field(default_factory=lambda: [0.9, 0.95, 0.98, 0.99])
    pays_sparsity: float = 0.98      # the wider CNN of the "sparsity pays" stage (prune.pays)

    @classmethod
    def quick(cls, seed: int = 0) -> "DemoConfig":
        return cls(seed=seed, pretrain_epochs=1, traj_tasks=8, traj_steps=20,
                   traj_query=2, perturbations=1, drift_iters=100,
                   horizons=[0.5, 1.0], horizon_tasks=4, lr_tasks=4,
                   full_finetune=True, full_finetune_lr=1e-3, adapt_steps=20, episodes=4, domains=["Lao~contrast", "digits"],
                   loss_curve_episodes=2, prune_quick=True, power_law_gammas=[0.1, 0.3, 1.0, 3.0, 10.0],
                   kernel_sparsities=[0.9, 0.98])


class _Stages:
    """Times each stage and logs a one-line summary when it ends."""

    def __init__(self) -> None:
        self.seconds: Dict[str, float] = {}

    def run(self, name: str, fn: Callable[[], Any], summary: Callable[[Any], str]) -> Any:
        t0 = time.perf_counter()
        out = fn()
        self.seconds[name] = time.perf_counter() - t0
        logger.info("[%s] %s (%.1f s)", name, summary(out), self.seconds[name])
        return out


def mixed_episodes(domains, seed: int, shots: List[int], query: int = 0):
    """Endless 5-way episodes of ``domains``, alternating the shot counts of ``shots`` (trajectory recording)."""
    samplers = [EpisodeSampler(domains, way=5, shot=s, query=query, seed=seed + s).episodes() for s in shots]
    while True:
        for it in samplers:
            yield next(it)


def held_out_episodes(domains, seed: int):
    """5-way 5-shot episodes with 15 queries, seeded apart from the trajectory episodes (horizon search)."""
    return EpisodeSampler(domains, way=5, shot=5, query=15, seed=seed + 99).episodes()


FULL_FINETUNE_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)


def _full_finetune_lr(backbone, meta, cfg: DemoConfig, progress: bool) -> dict:
    """Full fine-tuning's learning rate, chosen on held-out meta-training episodes unless the config fixes it."""
    if cfg.full_finetune_lr is not None:
        return {"lr": cfg.full_finetune_lr, "chosen_by": "config"}
    choice = tune_lr(backbone, held_out_episodes(meta, cfg.seed), "all", FULL_FINETUNE_GRID, cfg.lr_tasks,
                     cfg.adapt_steps, progress=progress)
    return {"chosen_by": "tune_lr", **choice.as_dict()}


def _bias_lr(cfg: DemoConfig, flow: HyperFlow) -> dict:
    """Bias tuning's learning rate: the config's, else the one fit's recipe chose on (shifted)
    meta-training episodes, i.e. the fine-tuning HyperFlow emulates before its reach."""
    if cfg.finetune_lr is not None:
        return {"lr": cfg.finetune_lr, "chosen_by": "config"}
    recipe = flow.recipe
    keep = ("lr", "chosen_by", "accuracy", "unadapted", "loss_drop", "tasks")
    return {k: recipe[k] for k in keep if k in recipe}


def _loss_curves(backbone, flows: Dict[str, HyperFlow], domains, cfg: DemoConfig,
                 lr: float) -> Dict[str, List[float]]:
    """Mean support loss after each step: along each HyperFlow path and along real bias tuning."""
    curves: Dict[str, List[float]] = {}
    name = "digits" if "digits" in domains else next(iter(domains))
    eps = list(EpisodeSampler(domains[name], way=5, shot=5, query=0, seed=cfg.seed + 7).episodes(cfg.loss_curve_episodes))
    any_flow = next(iter(flows.values()))
    subset = any_flow.subset
    theta_pre = subset.vector(backbone)
    for label, flow in list(flows.items()) + [(BIAS_TUNING_CURVE, None)]:
        total = torch.zeros(cfg.adapt_steps + 1)
        for ep in eps:
            if flow is None:
                _, path, _ = finetune(backbone, subset, ep.support_x, ep.support_y, theta_pre, cfg.adapt_steps, 5,
                                      lr=lr, record=True)
                states = path[0]
            else:
                states = flow_path(backbone, ep.support_x, ep.support_y, flow, cfg.adapt_steps)[0]
            with torch.no_grad():
                feats = features_with(backbone, subset, states, ep.support_x, shared_x=True)
                for k in range(states.shape[0]):
                    total[k] += float(support_loss(feats[k], ep.support_y, 5, "cosine", 10.0))
        curves[label] = (total / len(eps)).tolist()
    return curves


def emulation_fidelities(curves: Dict[str, List[float]]) -> Dict[str, float]:
    """Per flow: its support-loss drop along the path divided by bias tuning's (1.0 is perfect emulation)."""
    tuned = curves[BIAS_TUNING_CURVE]
    drop = tuned[0] - tuned[-1]
    return {label: (c[0] - c[-1]) / drop if drop > 0 else float("nan")
            for label, c in curves.items() if label != BIAS_TUNING_CURVE}


def _kernel_speed(sparsities: List[float], seed: int) -> List[Dict[str, float]]:
    """CSR linear kernel vs dense matmul and torch.sparse, 1024x1024, batch 32 (median of 20)."""
    from .measure import wall_time
    from .sparse import CSRMatrix, csr_linear

    g = torch.Generator().manual_seed(seed)
    rows = []
    x = torch.randn(32, 1024, generator=g)
    for s in sparsities:
        w = torch.randn(1024, 1024, generator=g) * (torch.rand(1024, 1024, generator=g) >= s)
        csr = CSRMatrix.from_dense(w)
        ts = csr.to_torch()
        with torch.inference_mode():
            _, t_native = wall_time(lambda: csr_linear(x, csr), repeat=20)
            _, t_dense = wall_time(lambda: x @ w.T, repeat=20)
            _, t_sparse = wall_time(lambda: (ts @ x.T).T, repeat=20)
        rows.append({"sparsity": s, "native_ms": 1e3 * t_native, "dense_ms": 1e3 * t_dense,
                     "torch_sparse_ms": 1e3 * t_sparse, "vs_dense": t_dense / t_native,
                     "vs_torch_sparse": t_sparse / t_native})
    return rows


def run_demo(out: Path, cfg: DemoConfig, cache_dir: Optional[Path] = None, progress: bool = True,
             command: str = "") -> Path:
    """Run every stage and write ``out/report.md`` plus plots; returns the report path."""
    from . import report
    from .prune.experiment import run_power_law_study, run_pruning_experiment
    from .prune.pays import run_sparsity_pays

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    st = _Stages()
    source, meta, target = st.run("data", lambda: fewshot_benchmark(cache_dir, progress=progress),
                                  lambda d: f"{len(d.source)} source scripts, {len(d.meta)} meta-training "
                                            f"domains, {len(d.target)} target domains")
    if cfg.domains:
        missing = [d for d in cfg.domains if d not in target]
        if missing:
            raise ValueError(f"demo: unknown target domains {missing}; available: {list(target)}")
        target = {d: target[d] for d in cfg.domains}
    pre_data = {k: source[k] for k in cfg.pretrain_scripts} if cfg.pretrain_scripts else None
    train_kw = {"epochs": cfg.pretrain_epochs} if cfg.pretrain_epochs else {}
    backbone = st.run("pretrain", lambda: load_pretrained("conv4-glyphs", cache_dir=cache_dir, progress=progress,
                                                          datasets=pre_data, seed=cfg.seed, **train_kw),
                      lambda b: f"conv4 backbone, {sum(p.numel() for p in b.parameters())} parameters")
    lrs: Dict[str, dict] = {}
    if cfg.full_finetune:
        lrs["all"] = st.run("learning rates", lambda: _full_finetune_lr(backbone, meta, cfg, progress),
                            lambda r: f"full fine-tuning lr {r['lr']:g} (on held-out meta-training episodes)")
    store = resolve_cache_dir(cache_dir) / "trajectories"
    flows: Dict[str, HyperFlow] = {}
    horizon_scores: Dict[str, Dict[str, float]] = {}
    recorded: Dict[str, Any] = {}
    # -C first, at fit's defaults (recipe on held-out meta episodes, capture shifts, reach); -L and -PL
    # reuse its trajectories from the store (same episodes, same recorded rate).
    for interp, label in sorted(INTERPOLATION_LABELS.items(), key=lambda kv: kv[0] != "cubic"):
        def meta_train(interp=interp, label=label) -> HyperFlow:
            flow = HyperFlow(backbone, params="bias", seed=cfg.seed)
            same = {"lr": recorded["lr"]} if recorded else {"recipe_episodes": held_out_episodes(meta, cfg.seed)}
            flow.fit(mixed_episodes(meta, cfg.seed, cfg.traj_shots, cfg.traj_query), tasks=cfg.traj_tasks,
                     trajectory_steps=cfg.traj_steps, interpolation=interp, store=store, progress=progress,
                     train_config=DriftTrainConfig(iters=cfg.drift_iters), perturbations=cfg.perturbations,
                     objective=cfg.traj_objective, **same)
            if recorded:
                flow.recipe = dict(recorded["recipe"])
            else:
                recorded.update(lr=flow.trajectory_config.lr, recipe=dict(flow.recipe))
            horizon_scores[label] = flow.tune_horizon(held_out_episodes(meta, cfg.seed + 1), cfg.horizon_tasks,
                                                      cfg.horizons, cfg.adapt_steps, progress=False)
            return flow
        flows[label] = st.run(f"drift {label}", meta_train,
                              lambda f: f"best validation loss {min(f.history['val']) if f.history['val'] else float('nan'):.4f}, "
                                        f"horizon {f.horizon:g}")
        flows[label].save(out / f"drift-{interp}.safetensors")

    lrs = {"bias": _bias_lr(cfg, flows["HyperFlow-C"]), **lrs}
    bias_lr = lrs["bias"]["lr"]
    methods = {"direct transfer": lambda sx, sy: direct_transfer(backbone, sx, sy),
               "bias tuning": lambda sx, sy: finetune_adapt(backbone, sx, sy, "bias", cfg.adapt_steps, bias_lr)}
    if cfg.full_finetune:
        methods["full fine-tuning"] = lambda sx, sy: finetune_adapt(backbone, sx, sy, "all", cfg.adapt_steps,
                                                                    lrs["all"]["lr"])
    # the headline: fused_adapt at its defaults (per-task choice); beside it the paper's plain integrations
    methods[DEFAULT_LABEL] = lambda sx, sy: fused_adapt(backbone, sx, sy, flow=flows["HyperFlow-C"],
                                                        steps=cfg.adapt_steps)
    for label, flow in flows.items():
        methods[label] = (lambda f: lambda sx, sy: fused_adapt(backbone, sx, sy, flow=f, steps=cfg.adapt_steps,
                                                               select=False))(flow)
    results: List[FewShotResult] = st.run(
        "few-shot", lambda: evaluate_few_shot(methods, target, shots=cfg.shots, episodes=cfg.episodes,
                                              seed=cfg.seed, progress=progress),
        lambda r: f"{len(r)} (method, domain, shot) cells, {cfg.episodes} episodes each")
    pooled = summarise(results, target)
    curves = st.run("loss curves", lambda: _loss_curves(backbone, flows, target, cfg, bias_lr),
                    lambda c: "final support loss " + ", ".join(f"{k}: {v[-1]:.3f}" for k, v in c.items()))
    pruning = st.run("pruning", lambda: run_pruning_experiment(seed=cfg.seed, quick=cfg.prune_quick, progress=progress),
                     lambda p: "; ".join(f"{r['target']:.0%}: HF {r['hyperflows']['acc']:.3f} vs mag "
                                         f"{r['magnitude']['acc']:.3f}" for r in p["rows"]))
    pays = st.run("sparsity pays", lambda: run_sparsity_pays(cfg.pays_sparsity, seed=cfg.seed, quick=cfg.prune_quick,
                                                             progress=progress),
                  lambda p: f"{100 * p['sparsity']:.1f}% sparse, acc {100 * p['pruned_acc']:.2f}% (dense "
                            f"{100 * p['dense_acc']:.2f}%); " + ", ".join(
                                f"batch {r['batch']}: {r['speedup']:.2f}x dense" for r in p["speed"]))
    law = st.run("power law", lambda: run_power_law_study(gammas=cfg.power_law_gammas, seed=cfg.seed,
                                                          quick=cfg.prune_quick, progress=progress),
                 lambda p: f"{p['law']['formula']}, held-out error {p['held_out']['error_points']:.2f} points")
    kernels = st.run("sparse kernels", lambda: _kernel_speed(cfg.kernel_sparsities, cfg.seed),
                     lambda k: ", ".join(f"{r['sparsity']:.0%}: {r['vs_dense']:.1f}x dense" for r in k))

    meta = {"command": command or " ".join(sys.argv), "seed": cfg.seed, "config": asdict(cfg),
            "hyperflow": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, "
                       f"{torch.get_num_threads()} torch threads, {platform.platform()}",
            "native": native.diagnostics(), "stage_seconds": st.seconds}
    data = {"meta": meta, "fewshot": [dict(method=r.method, domain=r.domain, shot=r.shot, mean=r.mean, ci95=r.ci95,
                                           median_seconds=r.median_seconds, peak_bytes=r.peak_bytes) for r in results],
            "pooled": [dict(method=r.method, shot=r.shot, mean=r.mean, ci95=r.ci95, median_seconds=r.median_seconds,
                            peak_bytes=r.peak_bytes) for r in pooled.values()],
            "learning_rates": lrs,
            "horizons": {label: {"chosen": f.horizon, "meta_val_accuracy": horizon_scores[label]}
                         for label, f in flows.items()},
            "loss_curves": curves, "fidelity": emulation_fidelities(curves), "pruning": pruning, "sparsity_pays": pays, "power_law": law, "kernels": kernels}
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str))
    return report.write_report(out, data)

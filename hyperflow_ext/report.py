"""Markdown report and plots for ``hyperflow demo`` (matplotlib, Agg back-end, PNG files)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from ._io import atomic_path

__all__ = ["write_report", "sparsity_pays_section", "PLOTS"]

PLOTS = ("fewshot_accuracy.png", "loss_vs_step.png", "power_law.png", "accuracy_vs_sparsity.png",
         "kernel_speedup.png")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    fig.clf()


def _plot_fewshot(data: Dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    rows = data["fewshot"]
    shots = sorted({r["shot"] for r in rows})
    domains = list(dict.fromkeys(r["domain"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(shots), figsize=(6 * len(shots), 4.2), squeeze=False)
    width = 0.8 / len(methods)
    for ax, shot in zip(axes[0], shots):
        for m_i, m in enumerate(methods):
            cells = {r["domain"]: r for r in rows if r["method"] == m and r["shot"] == shot}
            xs = [d_i + (m_i - (len(methods) - 1) / 2) * width for d_i in range(len(domains))]
            ax.bar(xs, [100 * cells[d]["mean"] for d in domains], width,
                   yerr=[100 * cells[d]["ci95"] for d in domains], label=m, capsize=2)
        ax.set_xticks(range(len(domains)), domains, rotation=30, ha="right")
        ax.set_ylabel("query accuracy (%)")
        ax.set_title(f"5-way {shot}-shot, per target domain (95% CI)")
        lo = min(100 * r["mean"] for r in rows if r["shot"] == shot)
        ax.set_ylim(max(0, lo - 10), 100)
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(fig, path)


def _plot_loss(data: Dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, curve in data["loss_curves"].items():
        ax.plot(range(len(curve)), curve, label=label, linestyle="--" if "tuning" in label else "-")
    ax.set_xlabel("integration / optimisation step")
    ax.set_ylabel("support loss (cross entropy, nats)")
    ax.set_title("Support loss along HyperFlow vs real fine-tuning")
    ax.legend()
    _save(fig, path)


def _plot_power_law(data: Dict[str, Any], path: Path) -> None:
    import numpy as np

    plt = _pyplot()
    p = data["power_law"]
    law = p["law"]
    g = np.array(p["gammas"], dtype=float)
    grid = np.geomspace(g.min() / 1.5, g.max() * 1.5, 100)
    fit = law["c"] * grid ** (-(law["alpha0"] + law["alpha1"] * np.log(grid)))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.loglog(g, 100 * np.array(p["densities"]), "o", label="runs at constant γ")
    ax.loglog(grid, 100 * fit, "-", label=f"fit: {law['formula']}")
    h = p["held_out"]
    ax.loglog([h["gamma"]], [100 * h["density"]], "s", label=f"held-out γ={h['gamma']:g} "
              f"(error {h['error_points']:.2f} pts)")
    ax.set_xlabel("pressure γ")
    ax.set_ylabel("remaining density (%)")
    ax.set_title("Density vs pressure (Hyperflows power law)")
    ax.legend(fontsize=8)
    _save(fig, path)


def _plot_sparsity(data: Dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    rows = data["pruning"]["rows"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("hyperflows", "Hyperflows"), ("magnitude", "global magnitude (L1)"),
                       ("gradual", "gradual magnitude (cubic)")):
        if not rows or key not in rows[0]:
            continue
        ax.plot([100 * r[key]["sparsity"] for r in rows], [100 * r[key]["acc"] for r in rows], "o-", label=label)
    ax.axhline(100 * data["pruning"]["dense_acc"], color="gray", linestyle=":", label="dense")
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy vs sparsity (" + str(data["pruning"]["config"].get("task", "")) + ")")
    ax.legend()
    _save(fig, path)


def _plot_kernels(data: Dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    rows = data["kernels"]
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [100 * r["sparsity"] for r in rows]
    ax.plot(xs, [r["vs_dense"] for r in rows], "o-", label="vs dense torch.matmul")
    ax.plot(xs, [r["vs_torch_sparse"] for r in rows], "s-", label="vs torch.sparse CSR")
    ax.axhline(1.0, color="gray", linestyle=":")
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("speedup of the native CSR kernel (x)")
    ax.set_title("Sparse linear 1024x1024, batch 32 (CPU)")
    ax.legend()
    _save(fig, path)


def _md_table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def sparsity_pays_section(p) -> str:
    """The 'sparsity pays' subsection: the wider CNN's accuracy and its export's end-to-end speed."""
    if not p:
        return "(the sparsity-pays stage was not run)"
    cfg = p["config"]
    rows = [[str(r["batch"]), str(r["threads"]), f"{r['dense_ms']:.3f}", f"{r['dense_cl_ms']:.3f}",
             f"{r['sparse_ms']:.3f}", f"{r['speedup']:.2f}x", ", ".join(r["dense_layers"]) or "-"] for r in p["speed"]]
    table = _md_table(["batch", "threads", "dense (ms)", "dense channels-last (ms)", "export (ms)",
                       "speedup vs faster dense", "layers kept dense"], rows)
    return f"""### Where sparsity pays

The same task and method on a wider digits CNN ({'/'.join(str(c) for c in cfg['channels'])} channels, a
{cfg['hidden']}-unit hidden layer; {cfg['pretrain_epochs']} dense epochs, then Hyperflows for {cfg['epochs']} + {cfg['regrowth_epochs']}
epochs): {100 * p['sparsity']:.2f}% sparse, test accuracy {100 * p['pruned_acc']:.2f}% (dense {100 * p['dense_acc']:.2f}%),
export argmax agreement {100 * p['agreement']:.2f}%. `Pruner.export(example_input=batch)` (BatchNorm folded,
ReLU fused, a layer kept dense where it measured faster, layout by timing) against the trained dense model run
by torch in its default and channels-last layouts, median of interleaved rounds in one process:

{table}
"""


def write_report(out: Path, data: Dict[str, Any]) -> Path:
    """Draw every plot in :data:`PLOTS` and write ``report.md``; returns its path."""
    for name, fn in zip(PLOTS, (_plot_fewshot, _plot_loss, _plot_power_law, _plot_sparsity, _plot_kernels)):
        fn(data, out / name)
    meta = data["meta"]
    pooled = sorted(data["pooled"], key=lambda r: (r["shot"], r["method"]))
    fs = _md_table(["method", "shot", "mean OOD accuracy (%)", "± 95% CI", "median adapt time (ms)",
                    "peak extra memory (KiB)"],
                   [[r["method"], str(r["shot"]), f"{100 * r['mean']:.2f}", f"{100 * r['ci95']:.2f}",
                     f"{1e3 * r['median_seconds']:.2f}", f"{r['peak_bytes'] / 1024:.0f}"] for r in pooled])
    per_domain = _md_table(["method", "domain", "shot", "accuracy (%)", "± 95% CI"],
                           [[r["method"], r["domain"], str(r["shot"]), f"{100 * r['mean']:.2f}", f"{100 * r['ci95']:.2f}"]
                            for r in data["fewshot"]])
    pr = data["pruning"]
    prune_rows = [[f"{100 * r['target']:.0f}%", f"{100 * r['hyperflows']['sparsity']:.2f}",
                   f"{100 * r['hyperflows']['acc']:.2f}", f"{100 * r['magnitude']['acc']:.2f}",
                   f"{100 * r['gradual']['acc']:.2f}" if "gradual" in r else "-",
                   f"{100 * r['gap']:+.2f}",
                   f"{100 * r['gap_gradual']:+.2f}" if "gap_gradual" in r else "-",
                   f"{100 * r['hyperflows']['agreement']:.2f}"] for r in pr["rows"]]
    prune = _md_table(["target", "achieved sparsity (%)", "Hyperflows acc (%)", "one-shot magnitude acc (%)",
                       "gradual magnitude acc (%)", "gap vs one-shot (pts)", "gap vs gradual (pts)",
                       "export argmax agreement (%)"], prune_rows)
    law = data["power_law"]
    kern = _md_table(["sparsity", "native CSR (ms)", "dense (ms)", "torch.sparse (ms)", "vs dense", "vs torch.sparse"],
                     [[f"{100 * r['sparsity']:.0f}%", f"{r['native_ms']:.3f}", f"{r['dense_ms']:.3f}",
                       f"{r['torch_sparse_ms']:.3f}", f"{r['vs_dense']:.2f}x", f"{r['vs_torch_sparse']:.2f}x"]
                      for r in data["kernels"]])
    speed = pr.get("speed") or {}
    pays = sparsity_pays_section(data.get("sparsity_pays"))
    hz = data.get("horizons", {})
    horizons = _md_table(["method", "chosen horizon"] + [k for k in next(iter(hz.values()), {}).get("meta_val_accuracy", {})],
                         [[label, f"{h['chosen']:g}"] + [f"{100 * v:.2f}" for v in h["meta_val_accuracy"].values()]
                          for label, h in hz.items()]) if hz else "(not recorded)"
    lr_rows = [[{"bias": "bias tuning (fit's recipe, which HyperFlow records at reach x this rate)",
                 "all": "full fine-tuning"}.get(k, k),
                f"{v['lr']:g}", v["chosen_by"],
                ", ".join(f"{g}: {100 * a:.1f}" for g, a in v.get("accuracy", {}).items()) or "-"]
               for k, v in data.get("learning_rates", {}).items()]
    lrs = _md_table(["fine-tuning", "lr", "chosen by", "query accuracy (%) per lr"], lr_rows) if lr_rows else ""
    fidelity = ", ".join(f"{k} {v:.2f}" for k, v in data.get("fidelity", {}).items()) or "(not recorded)"
    stages = _md_table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in meta["stage_seconds"].items()])
    text = f"""# hyperflow demo report

Command: `{meta['command']}` — seed {meta['seed']}

Machine: {meta['machine']}; Python {meta['python']}, torch {meta['torch']}, hyperflow {meta['hyperflow']};
native build: {meta['native'].get('native_build', 'missing')}.

## Few-shot adaptation (mean over target domains)

HyperFlow is meta-trained on the meta-training domains of `fewshot_benchmark` (printed scripts, their 8x8 coarse
scans, Hershey stroke families and capture shifts; never seen by the
backbone, never tested on); its integration horizon is chosen by query accuracy (%) on held-out meta-training episodes
(5-way 5-shot; `none` = the unadapted backbone):

{horizons}

Fine-tuning learning rates, chosen on held-out meta-training episodes only (Adam, same step budget):

{lrs}

{fs}

![accuracy per domain](fewshot_accuracy.png)

Per target domain:

{per_domain}

## Support loss along the flow

Emulation fidelity (each flow's drop in support loss along its path divided by bias tuning's, on target episodes;
1.0 is perfect emulation): {fidelity}

![loss vs step](loss_vs_step.png)

## Pruning by flow ({pr['config'].get('task', '')}, dense accuracy {100 * pr['dense_acc']:.2f}%)

Every method starts from the same dense model and gets {pr['config'].get('epochs', 0) + pr['config'].get('regrowth_epochs', 0)}
further epochs; one-shot and gradual (Zhu & Gupta cubic schedule) global magnitude pruning go to the sparsity
Hyperflows reached.

{prune}

![accuracy vs sparsity](accuracy_vs_sparsity.png)

This digits CNN is sized to strain the pruning methods, not to be worth accelerating (its layers are a few
microseconds of work each): exported at {100 * speed.get('sparsity', float('nan')):.1f}% sparsity it runs
{speed.get('speedup', float('nan')):.2f}x the dense model's speed (batch {speed.get('batch', '?')}, one timing
each, no layout choice).

{pays}

## Power law

{law['law']['formula']} (R² {law['law']['r2']:.3f}); held-out γ = {law['held_out']['gamma']:g}: measured density
{100 * law['held_out']['density']:.2f}%, predicted {100 * law['held_out']['predicted']:.2f}%
(error {law['held_out']['error_points']:.2f} points).

![power law](power_law.png)

## Sparse kernels

{kern}

![kernel speedup](kernel_speedup.png)

## Stage times

{stages}
"""
    path = out / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path

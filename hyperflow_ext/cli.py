"""The ``hyperflow`` command line.

Exit codes: 0 success, 1 failure (one line on stderr; traceback with ``-v``), 2 bad usage.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
from typing import Callable, Dict, List, Optional

logger = logging.getLogger("hyperflow")


class CLIError(Exception):
    """A failure to report as one line on stderr with exit code 1."""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging; tracebacks on error")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--cache-dir", default=None, help="cache folder (default $HYPERFLOW_CACHE or ~/.cache/hyperflow)")
    p.add_argument("--out", default=None, help="output path or folder")


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    import hyperflow_ext as hf

    info = {"hyperflow": hf.__version__, "python": platform.python_version(),
            "platform": platform.platform(), **hf.native.diagnostics(),
            "cache_dir": str(hf.cache_dir(args.cache_dir))}
    usable = ["torch"]
    if hf.native.available():
        usable.append("native (cpu)")
    if hf.native.cuda_available():
        usable.append("native (cuda)")
    if hf.native.triton_available():
        usable.append("triton (cuda)" if torch.cuda.is_available() else "triton (interpreter only: TRITON_INTERPRET=1)")
    info["backends_usable"] = usable
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            print(f"{k:<{width}}  {v}")
    return 0


def _device(args: argparse.Namespace):
    import torch

    try:
        dev = torch.device(args.device)
    except RuntimeError as exc:
        raise CLIError(f"bad --device {args.device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda requested but no CUDA device is visible")
    return dev


def _pretrain_kw(args: argparse.Namespace) -> dict:
    """Keywords of load_pretrained for the backbone options (--quick: the demo's small backbone)."""
    from .demo import DemoConfig

    kw: dict = {}
    if getattr(args, "quick", False):
        quick = DemoConfig.quick()
        kw = {"epochs": quick.pretrain_epochs}
        if quick.pretrain_scripts:
            from .data import benchmark_domains

            source = benchmark_domains(args.cache_dir, progress=not args.quiet).source
            kw["datasets"] = {k: source[k] for k in quick.pretrain_scripts}
    if getattr(args, "epochs", None):
        kw["epochs"] = args.epochs
    return kw


def _progress(args: argparse.Namespace) -> bool:
    """Progress bars unless --quiet, and under torchrun on rank 0 only."""
    from . import distributed

    return distributed.show_progress(not args.quiet)


def _backbone(args: argparse.Namespace):
    from .models import load_pretrained

    return load_pretrained(f"{args.arch}-glyphs", cache_dir=args.cache_dir, progress=_progress(args),
                           seed=args.seed, device=_device(args), **_pretrain_kw(args))


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .models.pretrained import pretrained_path

    backbone = _backbone(args)
    path = pretrained_path(f"{args.arch}-glyphs", cache_dir=args.cache_dir, seed=args.seed, **_pretrain_kw(args))
    print(f"pretrained {args.arch}: {sum(p.numel() for p in backbone.parameters())} parameters -> {path}")
    return 0


def cmd_meta_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import cache_dir, distributed
    from .data import fewshot_benchmark
    from .demo import held_out_episodes, mixed_episodes
    from .flow import DriftTrainConfig, HyperFlow

    out = Path(args.out or "drift.safetensors")
    checkpoint = Path(args.checkpoint) if args.checkpoint else out.with_suffix(".ckpt" + (out.suffix or ".safetensors"))
    with distributed.main_first():  # under torchrun rank 0 fills the caches, the other ranks read them
        backbone = _backbone(args)
        meta = fewshot_benchmark(args.cache_dir, progress=_progress(args)).meta
    flow = HyperFlow(backbone, params=args.params, seed=args.seed)
    query = 5 if args.objective == "query" else 0
    flow.fit(mixed_episodes(meta, args.seed, [1, 5], query), tasks=args.tasks, trajectory_steps=args.steps,
             interpolation=args.interpolation, store=Path(cache_dir(args.cache_dir)) / "trajectories",
             train_config=DriftTrainConfig(iters=args.iters), progress=_progress(args),
             perturbations=args.perturbations, objective=args.objective, checkpoint=checkpoint,
             recipe_episodes=held_out_episodes(meta, args.seed), augment=not args.no_augment,
             **({} if args.lr is None else {"lr": args.lr}), **({} if args.reach is None else {"reach": args.reach}))
    if args.horizon_tasks > 0:
        flow.tune_horizon(held_out_episodes(meta, args.seed + 1), args.horizon_tasks, progress=_progress(args),
                          augment=not args.no_augment)
    if not distributed.is_main():  # every rank holds the same flow; rank 0 writes it
        return 0
    flow.save(out)
    checkpoint.unlink(missing_ok=True)  # the product is saved: nothing left to resume
    print(f"drift network ({args.interpolation}, {flow.subset.numel} adapted parameters, fine-tuning lr "
          f"{flow.recipe['lr']:g} ({flow.recipe['chosen_by']}), horizon {flow.horizon:g}) -> {out}")
    return 0


def cmd_adapt(args: argparse.Namespace) -> int:
    import csv
    from pathlib import Path

    import torch

    from ._io import atomic_path
    from .data import load_folder, load_images
    from .flow import HyperFlow, fused_adapt

    flow_path = Path(args.flow)
    if not flow_path.is_file():
        raise CLIError(f"--flow {flow_path}: no such file")
    support = load_folder(args.support, image_size=args.image_size)
    query_root = Path(args.query)
    if query_root.is_dir() and any(p.is_dir() for p in query_root.iterdir()):
        q = load_folder(query_root, image_size=args.image_size)
        qx, files = q.images, q.meta["files"]
        truth = [q.class_names[int(i)] for i in q.labels]
    else:
        qx, files = load_images(query_root, image_size=args.image_size)
        truth = None
    backbone = _backbone(args)
    flow = HyperFlow.load(flow_path, backbone)
    dev = _device(args)
    model = fused_adapt(backbone, support.images.to(dev), support.labels.to(dev), flow=flow, steps=args.steps,
                        solver=args.solver, backend=args.backend, select=not args.no_select)
    with torch.no_grad():
        probs = model(qx.to(dev)).softmax(-1).cpu()
    out = Path(args.out or "predictions.csv")
    with atomic_path(out) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "predicted_class", "probability"] + (["true_class"] if truth else []))
        for i, f in enumerate(files):
            k = int(probs[i].argmax())
            w.writerow([f, support.class_names[k], f"{float(probs[i, k]):.4f}"] + ([truth[i]] if truth else []))
    msg = f"{len(files)} predictions -> {out}"
    if model.selection is not None:
        msg += f"; adapted with {model.selection['chosen']}"
    if truth:
        acc = sum(support.class_names[int(probs[i].argmax())] == truth[i] for i in range(len(files))) / len(files)
        msg += f" (accuracy {100 * acc:.1f}% against the query folders' class names)"
    print(msg)
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import distributed
    from ._io import save_tensors
    from .prune import Pruner
    from .prune._loop import evaluate
    from .prune.experiment import DEFAULTS, QUICK, dense_digits_setup

    if not 0.0 <= args.target < 1.0:
        raise CLIError(f"--target must lie in [0, 1), got {args.target}")
    out = Path(args.out or "pruned.safetensors")
    checkpoint = Path(args.checkpoint) if args.checkpoint else out.with_suffix(".ckpt" + (out.suffix or ".safetensors"))
    cfg = dict(QUICK if args.quick else DEFAULTS)
    train, test, model = dense_digits_setup(args.seed, cfg)  # the same dense model on every rank (seeded)
    dense_acc = evaluate(model, test)
    pruner = Pruner(model, target_sparsity=args.target)
    pruner.fit(train, epochs=args.epochs or cfg["epochs"], regrowth_epochs=cfg["regrowth_epochs"],
               progress=_progress(args), checkpoint=checkpoint)
    acc, sp = evaluate(model, test), pruner.sparsity()["overall"]
    pruner.remove()  # plain layers holding W ⊙ m
    if not distributed.is_main():  # every rank holds the same pruned model; rank 0 writes it
        return 0
    checkpoint.unlink(missing_ok=True)
    save_tensors(out, model.state_dict(), {"task": "digits-cnn", "target": args.target, "sparsity": sp,
                                           "accuracy": acc, "dense_accuracy": dense_acc, "seed": args.seed})
    print(f"pruned digits CNN to {100 * sp:.2f}% sparsity: accuracy {100 * acc:.2f}% "
          f"(dense {100 * dense_acc:.2f}%) -> {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from ._io import load_tensors
    from .prune.experiment import DigitsCNN, digits_split
    from .prune.pays import end_to_end_speed
    from .sparse import format_report, save, sparsify

    path = Path(args.model or "pruned.safetensors")
    tensors, meta = load_tensors(path)
    if meta.get("task") != "digits-cnn":
        raise CLIError(f"{path} is not a model written by `hyperflow prune`")
    model = DigitsCNN()
    model.load_state_dict(tensors)
    model.eval()
    _, _, test_x, _ = digits_split(args.seed)
    # BN folded, ReLU fused, each layer timed on the test batch and kept dense where that is faster
    sparse_model, report = sparsify(model, test_x)
    print(format_report(report))
    with torch.inference_mode():
        agree = float((sparse_model(test_x).argmax(-1) == model(test_x).argmax(-1)).float().mean())
    speed = end_to_end_speed(model, sparse_model, test_x, budget_s=2.0)
    best = min(speed["dense_ms"], speed["dense_cl_ms"])
    layout = "channels-last" if speed["dense_cl_ms"] < speed["dense_ms"] else "default layout"
    print(f"exported {meta.get('sparsity', float('nan')) * 100:.2f}%-sparse model: argmax agreement "
          f"{100 * agree:.2f}%, CPU inference end to end {speed['sparse_ms']:.2f} ms sparse vs {best:.2f} ms dense "
          f"({layout}, the faster): {speed['speedup']:.2f}x (batch {test_x.shape[0]}, medians of interleaved rounds)")
    if args.out:
        save(sparse_model, args.out, metadata={"task": "digits-cnn", "sparsity": meta.get("sparsity")})
        print(f"wrote {args.out} (load with hyperflow_ext.sparse.load(path, DigitsCNN))")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import os
    import subprocess
    import tempfile
    from pathlib import Path

    bench_dir = Path(args.path)
    if not bench_dir.is_dir():
        raise CLIError(f"benchmark folder {bench_dir} not found; run from a source checkout or pass --path")
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-m", "pytest", str(bench_dir), "-q", "--benchmark-enable",
               "-p", "no:cacheprovider", f"--benchmark-json={report}", "-o", "addopts="]
        if args.filter:
            cmd += ["-k", args.filter]
        # PYTHONSAFEPATH: run against the installed package, not a source tree in the cwd (Python >= 3.11)
        res = subprocess.run(cmd, capture_output=args.quiet, env={**os.environ, "PYTHONSAFEPATH": "1"})
        if res.returncode != 0 or not report.exists():
            raise CLIError(f"benchmarks failed (pytest exit code {res.returncode})")
        data = json.loads(report.read_text())
    rows = [(b["group"] or "", b["name"], 1e3 * b["stats"]["median"],
             ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in b["extra_info"].items()))
            for b in data["benchmarks"]]
    if args.out:
        Path(args.out).write_text(json.dumps(data, indent=2))
    width = max((len(r[1]) for r in rows), default=10)
    print(f"{'benchmark':<{width}}  {'median ms':>10}  extra")
    for group, name, ms, extra in rows:
        print(f"{name:<{width}}  {ms:>10.3f}  {extra}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .demo import DemoConfig, run_demo

    cfg = DemoConfig.quick(args.seed) if args.quick else DemoConfig(seed=args.seed)
    if args.episodes:
        cfg.episodes = args.episodes
    if args.shots:
        cfg.shots = args.shots
    if args.full_finetune:
        cfg.full_finetune = True
    report = run_demo(Path(args.out or "hyperflow-report"), cfg, cache_dir=args.cache_dir, progress=not args.quiet,
                      command="hyperflow " + " ".join(sys.argv[1:]))
    print(f"report -> {report}")
    return 0


#: commands that run under ``torchrun --nproc_per_node=N`` (every rank runs them; rank 0 writes)
SCALES_OUT = ("meta-train", "prune")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hyperflow", description="Flow methods for PyTorch models: "
                                     "gradient-free few-shot adaptation (HyperFlow) and pruning by flow (Hyperflows).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    commands: Dict[str, Callable[[argparse.Namespace], int]] = {}

    def add(name: str, fn: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        _common(p)
        commands[name] = fn
        return p

    p = add("info", cmd_info, "version, torch, native build (CPU/CUDA), usable back-ends")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = add("demo", cmd_demo, "the whole pipeline on embedded data; writes a report folder (--out, default hyperflow-report)")
    p.add_argument("--quick", action="store_true", help="small sizes (about 2 minutes on 2 cores)")
    p.add_argument("--episodes", type=int, default=None, help="few-shot episodes per domain and shot count")
    p.add_argument("--shots", type=int, nargs="+", default=None, help="shot counts to evaluate (default: 1 5)")
    p.add_argument("--full-finetune", action="store_true",
                   help="also evaluate full fine-tuning (an upper reference that costs as much as bias tuning again)")

    for name, fn, text in (("pretrain", cmd_pretrain, "pretrain (or load the cached) backbone on the source scripts"),
                           ("meta-train", cmd_meta_train, "record fine-tuning trajectories and train a drift network"),
                           ("adapt", cmd_adapt, "adapt to a folder of support images and predict a folder of queries")):
        p = add(name, fn, text)
        p.add_argument("--arch", default="conv4", choices=["conv4", "resnet8", "vit_tiny"], help="backbone")
        p.add_argument("--epochs", type=int, default=None, help="pretraining epochs (default: the architecture's)")
        p.add_argument("--quick", action="store_true", help="the small backbone of `hyperflow demo --quick`")
        if name == "meta-train":
            p.add_argument("--interpolation", default="cubic", choices=["linear", "piecewise", "cubic"])
            p.add_argument("--params", default="bias", help="adapted parameters: bias, head or all")
            p.add_argument("--tasks", type=int, default=192, help="meta-training episodes")
            p.add_argument("--steps", type=int, default=50, help="fine-tuning steps per trajectory")
            p.add_argument("--perturbations", type=int, default=2, help="perturbed extra runs per episode")
            p.add_argument("--lr", type=float, default=None,
                           help="fine-tuning learning rate (Adam); default: chosen on held-out meta-training "
                                "episodes from a grid (hf.flow.baselines.tune_lr)")
            p.add_argument("--iters", type=int, default=600, help="drift-network training iterations")
            p.add_argument("--objective", default="support", choices=["query", "support"],
                           help="loss the recorded fine-tuning follows")
            p.add_argument("--horizon-tasks", type=int, default=60,
                           help="held-out episodes that choose the integration horizon (0: keep 1.0)")
            p.add_argument("--no-augment", action="store_true",
                           help="meta-train on the episodes as drawn (default: random capture shifts on 3 in 4)")
            p.add_argument("--reach", type=float, default=None,
                           help="record fine-tuning at this multiple of the chosen lr (default: fit's)")
            p.add_argument("--checkpoint", default=None,
                           help="drift-training checkpoint: an interrupted run resumes from it (default "
                                "OUT with .ckpt before the suffix; removed once OUT is written)")
        if name == "adapt":
            p.add_argument("--flow", required=True, help="drift network from `hyperflow meta-train`")
            p.add_argument("--support", required=True, help="folder of class folders (the support set)")
            p.add_argument("--query", required=True, help="folder of images, or of class folders")
            p.add_argument("--steps", type=int, default=50, help="integration steps")
            p.add_argument("--solver", default="euler", choices=["euler", "heun", "rk4"])
            p.add_argument("--backend", default="auto", choices=["auto", "native", "triton", "torch"])
            p.add_argument("--image-size", type=int, default=28)
            p.add_argument("--no-select", action="store_true",
                           help="the paper's plain integration (default: the per-task choice of fused_adapt)")

    p = add("prune", cmd_prune, "prune the embedded digits CNN with Hyperflows to a target sparsity")
    p.add_argument("--target", type=float, default=0.98, help="target sparsity in [0, 1)")
    p.add_argument("--epochs", type=int, default=None, help="pruning epochs")
    p.add_argument("--quick", action="store_true", help="small budgets")
    p.add_argument("--checkpoint", default=None,
                   help="pruning checkpoint, written after every epoch: an interrupted run resumes from it "
                        "(default OUT with .ckpt before the suffix; removed once OUT is written)")

    p = add("export", cmd_export, "export a pruned model to sparse kernels; check outputs and time it")
    p.add_argument("--model", default=None, help="checkpoint from `hyperflow prune` (default pruned.safetensors)")

    p = add("bench", cmd_bench, "run the pytest-benchmark suites and print a table of ratios")
    p.add_argument("--path", default="benchmarks", help="benchmark folder (default ./benchmarks)")
    p.add_argument("--filter", default=None, help="pytest -k expression")

    parser.set_defaults(_commands=commands)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on bad usage
    level = logging.WARNING if args.quiet else (logging.DEBUG if args.verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(message)s")
    try:
        if args.command in SCALES_OUT:  # under torchrun: join the job (gloo on CPU, nccl on CUDA)
            from . import distributed

            if distributed.init_from_env(_device(args)) and not distributed.is_main():
                logging.getLogger().setLevel(max(level, logging.WARNING))  # one copy of the INFO log
        return args._commands[args.command](args)
    except CLIError as exc:
        print(f"hyperflow {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hyperflow: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one clear line; the traceback only when asked for
        if args.verbose:
            raise
        print(f"hyperflow {args.command}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.command in SCALES_OUT:
            from . import distributed

            distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())

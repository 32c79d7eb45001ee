"""Per-task, support-only selection among a few adapted models (a study script, not a test).

Fits the ``layers`` flow exactly as ``fewshot_study.py`` does (``fit``'s defaults, its
``fit_flows``), then, on the same episodes as ``evaluate_few_shot`` (seed ``seed + 1000 * domain
index + shot``), scores per episode every candidate: the HyperFlow states at a few horizons (one
integration, :func:`flow_path`), the unadapted backbone and, on a BatchNorm backbone, support
statistics. Each candidate gets its query accuracy and a support-only criterion: leave-one-out
prototype classification of the support set with the candidate's features (own-class prototype
without the sample), mean cross-entropy and accuracy. Selection rules are applied afterwards to
that per-episode matrix; the timed ``select`` is the full gradient-free pipeline for the primary
grid (integration, one support forward per candidate, the criterion).

Usage::

    python benchmarks/fewshot_select.py [--norm batch] [--tasks 200] [--episodes 50] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hyperflow_ext as hf  # noqa: E402
from hyperflow_ext._io import atomic_path  # noqa: E402
from hyperflow_ext.data import EpisodeSampler, fewshot_benchmark  # noqa: E402
from hyperflow_ext.flow import HyperFlow, fused_adapt  # noqa: E402
from hyperflow_ext.flow.adapted import AdaptedProtoNet  # noqa: E402
from hyperflow_ext.flow.baselines import direct_transfer, finetune_adapt, support_statistics  # noqa: E402
from hyperflow_ext.flow.functional import features_with  # noqa: E402
from hyperflow_ext.flow.hyperflow import flow_path  # noqa: E402
from hyperflow_ext.models import proto_logits, prototypes  # noqa: E402

from fewshot_study import fit_flows  # noqa: E402

REL_GRID = (0.0, 0.25, 0.5, 1.0, 1.5)       # x the flow's tuned horizon (primary)
FIXED_GRID = (0.0, 0.125, 0.25, 0.5, 1.0)   # absolute horizons


def loo_scores(feats: torch.Tensor, labels: torch.Tensor, way: int, metric: str = "cosine",
               scale: float = 10.0):
    """Leave-one-out prototype classification of the support set: ``(mean CE, accuracy)``.

    Sample ``i`` of class ``c`` is scored against the other classes' prototypes and against its
    own class's prototype computed without it (needs >= 2 shots per class).
    """
    protos = prototypes(feats, labels, way)                       # (way, d)
    counts = torch.bincount(labels, minlength=way).to(feats.dtype)
    if bool((counts < 2).any()):
        raise ValueError("loo_scores: needs at least 2 support examples per class")
    own = (protos[labels] * counts[labels, None] - feats) / (counts[labels, None] - 1)  # (n, d)
    logits = proto_logits(feats, protos, metric, scale)           # (n, way)
    if metric == "cosine":
        own_logit = scale * (F.normalize(feats, dim=-1, eps=1e-8) * F.normalize(own, dim=-1, eps=1e-8)).sum(-1)
    else:
        own_logit = -scale * ((feats - own) ** 2).sum(-1)
    logits = logits.scatter(1, labels[:, None], own_logit[:, None])
    return _ce_acc(logits, labels, scale)


SCALES = (2.5, 5.0, 10.0, 20.0, 40.0, 80.0)  # the "calibrated" CE: the lowest over these logit scales


def _ce_acc(logits: torch.Tensor, labels: torch.Tensor, scale: float):
    loss = float(F.cross_entropy(logits, labels))
    acc = float((logits.argmax(-1) == labels).float().mean())
    grid = [float(F.cross_entropy(logits * (s / scale), labels)) for s in SCALES]
    return loss, acc, grid


def path_states(backbone, sx, sy, flow: HyperFlow, horizons: Sequence[float]) -> Dict[float, torch.Tensor]:
    """θ at each horizon from one integration (dt no larger than fused_adapt's default h*/50)."""
    top = max(horizons)
    if top == 0:
        return {0.0: flow.subset.vector(backbone)}
    dt0 = flow.horizon / 50
    n = max(1, math.ceil(top / dt0 - 1e-9))
    while not all(abs(h / top * n - round(h / top * n)) < 1e-6 for h in horizons):
        n += 1
    path = flow_path(backbone, sx, sy, flow, steps=n, horizon=top)[0]
    return {h: path[int(round(h / top * n))] for h in horizons}


def candidates(backbone, sx, sy, flow: HyperFlow, horizons: Sequence[float], bn: bool) -> Dict[str, AdaptedProtoNet]:
    way = int(sy.max()) + 1
    out = {f"h={h:g}": AdaptedProtoNet(backbone, flow.subset, th, sx, sy, way, flow.metric, flow.scale)
           for h, th in path_states(backbone, sx, sy, flow, horizons).items()}
    if bn:
        out["support stats"] = support_statistics(backbone, sx, sy, flow.metric, flow.scale)
    return out


def score(models: Dict[str, AdaptedProtoNet], sy) -> Dict[str, tuple]:
    res = {}
    with torch.no_grad():
        for name, m in models.items():
            f = m.embed(m.support_x)
            m._protos = prototypes(f, sy, m.way)  # the chosen model reuses its support forward
            res[name] = loo_scores(f, sy, m.way, m.metric, m.scale)
    return res


def select(backbone, sx, sy, flow, horizons, bn):
    """The timed pipeline: candidates, the LOO criterion, the lowest LOO loss."""
    models = candidates(backbone, sx, sy, flow, horizons, bn)
    scores = score(models, sy)
    best = min(scores, key=lambda k: scores[k][0])
    return models[best], models, scores


def select_cv(backbone, sx, sy, flow: HyperFlow, horizons: Sequence[float], bn: bool):
    """Cross-validated adaptation (timed): for each fold ``j`` (the ``j``-th shot of every class
    held out), adapt on the other shots and classify the held-out ones against the prototypes of
    the other shots; mean CE / accuracy over all support samples per candidate. The chosen
    candidate is then built on the whole support set. Gradient-free: one batched integration over
    the folds, one support forward per (fold, adapted candidate)."""
    way = int(sy.max()) + 1
    pos = torch.empty_like(sy)
    for c in range(way):
        idx = (sy == c).nonzero().flatten()
        pos[idx] = torch.arange(idx.numel())
    folds = int(pos.max()) + 1
    train = [(pos != j).nonzero().flatten() for j in range(folds)]
    held = [(pos == j).nonzero().flatten() for j in range(folds)]
    top = max(horizons)
    dt0 = flow.horizon / 50
    n = max(1, math.ceil(top / dt0 - 1e-9))
    while not all(abs(h / top * n - round(h / top * n)) < 1e-6 for h in horizons):
        n += 1
    paths = flow_path(backbone, torch.stack([sx[t] for t in train]), torch.stack([sy[t] for t in train]), flow,
                      steps=n, horizon=top)                     # (folds, n + 1, P)
    logits: Dict[str, List[torch.Tensor]] = {}
    with torch.no_grad():
        theta0 = flow.subset.vector(backbone)
        f0 = features_with(backbone, flow.subset, theta0, sx)
        for h in horizons:
            k = int(round(h / top * n))
            for j in range(folds):
                f = f0 if k == 0 else features_with(backbone, flow.subset, paths[j, k], sx)
                p = prototypes(f[train[j]], sy[train[j]], way)
                logits.setdefault(f"h={h:g}", []).append(proto_logits(f[held[j]], p, flow.metric, flow.scale))
        if bn:
            for j in range(folds):
                m = support_statistics(backbone, sx[train[j]], sy[train[j]], flow.metric, flow.scale)
                f = m.embed(sx)
                p = prototypes(f[train[j]], sy[train[j]], way)
                logits.setdefault("support stats", []).append(proto_logits(f[held[j]], p, flow.metric, flow.scale))
    y = torch.cat([sy[h_] for h_ in held])
    scores = {}
    for name, lg in logits.items():
        lg = torch.cat(lg)
        scores[name] = _ce_acc(lg, y, flow.scale)
    best = min(scores, key=lambda k: scores[k][0])
    if best == "support stats":
        model = support_statistics(backbone, sx, sy, flow.metric, flow.scale)
    else:
        model = fused_adapt(backbone, sx, sy, flow=flow, horizon=float(best[2:])) if best != "h=0" else \
            AdaptedProtoNet(backbone, flow.subset, flow.subset.vector(backbone), sx, sy, way, flow.metric, flow.scale)
    return model, scores


def accuracy(model, ep) -> float:
    with torch.no_grad():
        return float((model(ep.query_x).argmax(-1) == ep.query_y).float().mean())


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def mean_ci(xs: List[float]):
    n = len(xs)
    m = sum(xs) / n
    var = sum((x - m) ** 2 for x in xs) / (n - 1) if n > 1 else float("nan")
    return m, 1.96 * math.sqrt(var / n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=200)
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--shot", type=int, default=5)
    ap.add_argument("--backbone", default="conv4-glyphs")
    ap.add_argument("--norm", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--eval-seed", type=int, default=None,
                    help="seed of the test episodes (default --seed: evaluate_few_shot's episodes); "
                         "the flow keeps --seed")
    ap.add_argument("--cv", action="store_true", help="also score the cross-validated adaptation criterion")
    args = ap.parse_args()
    args.variants, args.objective = ["layers"], None
    torch.set_num_threads(args.threads)
    split = fewshot_benchmark(progress=False)
    backbone = hf.models.load_pretrained(args.backbone, progress=False,
                                         backbone_kw={"norm": args.norm} if args.norm else None)
    bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in backbone.modules())
    name = f"flow-{args.backbone}-{args.norm}-{args.tasks}-{args.seed}.safetensors"
    cache = Path(hf.cache_dir()) / "select-study" / name  # the fitted flow, reused by reruns
    t0 = time.perf_counter()
    if cache.exists():
        flow = HyperFlow.load(cache, backbone)
        print(f"loaded {cache}", flush=True)
    else:
        flows, _ = fit_flows(backbone, split.meta, args)
        flow = flows["layers"]
        cache.parent.mkdir(parents=True, exist_ok=True)
        flow.save(cache)
    lr, hstar = flow.recipe["lr"], flow.horizon
    print(f"[{time.perf_counter() - t0:.0f} s] lr {lr:g}, tuned horizon {hstar:g}", flush=True)
    primary = sorted({r * hstar for r in REL_GRID})
    extra = sorted(set(FIXED_GRID) - set(primary))
    episodes: Dict[str, list] = {}
    for d_index, (dname, ds) in enumerate(split.target.items()):
        eval_seed = args.seed if args.eval_seed is None else args.eval_seed
        sampler = EpisodeSampler(ds, way=5, shot=args.shot, query=15, seed=eval_seed + 1000 * d_index + args.shot)
        rows = episodes.setdefault(dname, [])
        for ep in sampler.episodes(args.episodes):
            sx, sy = ep.support_x, ep.support_y
            row = {"acc": {}, "loo": {}, "ms": {}, "n": len(sy)}
            m, s = timed(lambda: direct_transfer(backbone, sx, sy))
            row["acc"]["direct transfer"], row["ms"]["direct transfer"] = accuracy(m, ep), 1e3 * s
            m, s = timed(lambda: finetune_adapt(backbone, sx, sy, "bias", 50, lr))
            row["acc"]["bias tuning"], row["ms"]["bias tuning"] = accuracy(m, ep), 1e3 * s
            m, s = timed(lambda: fused_adapt(backbone, sx, sy, flow=flow))
            row["acc"]["HyperFlow"], row["ms"]["HyperFlow"] = accuracy(m, ep), 1e3 * s
            (chosen, models, scores), s = timed(lambda: select(backbone, sx, sy, flow, primary, bn))
            row["ms"]["select"] = 1e3 * s
            if extra:
                more = candidates(backbone, sx, sy, flow, extra, False)
                models.update(more)
                scores.update(score(more, sy))
            for name, mdl in models.items():
                row["acc"][name] = accuracy(mdl, ep)
                row["loo"][name] = scores[name]
            if args.cv:
                (m, row["cv"]), s = timed(lambda: select_cv(backbone, sx, sy, flow, primary, bn))
                row["ms"]["select cv"] = 1e3 * s
                row["acc"]["select cv (direct)"] = accuracy(m, ep)  # check: the same as the matrix's pick
            rows.append(row)
        d = [r["acc"]["direct transfer"] for r in rows]
        b = [r["acc"]["bias tuning"] for r in rows]
        print(f"[{time.perf_counter() - t0:.0f} s] {dname}: direct {100 * sum(d) / len(d):.2f} "
              f"bias {100 * sum(b) / len(b):.2f}", flush=True)
    data = {"args": vars(args), "lr": lr, "horizon": hstar, "primary": [f"h={h:g}" for h in primary],
            "fixed": [f"h={h:g}" for h in FIXED_GRID], "bn": bn, "episodes": episodes}
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps(compact(data), separators=(",", ":")))
    report(data)


def compact(data):
    """Rounded, with each calibration grid reduced to its minimum (what ``cal`` uses)."""
    def r(v):
        if isinstance(v, float):
            return round(v, 4)
        if isinstance(v, (list, tuple)):
            return [r(x) for x in v]
        if isinstance(v, dict):
            return {k: r(x) for k, x in v.items()}
        return v
    out = dict(data)
    out["episodes"] = {d: [{**row, **{k: {n: [s[0], s[1], min(s[2])] for n, s in row[k].items()}
                                      for k in ("loo", "cv") if k in row}} for row in rows]
                       for d, rows in data["episodes"].items()}
    return r(out)


def _cal(score) -> float:
    return min(score[2]) if isinstance(score[2], (list, tuple)) else score[2]


RULES = ("loss", "acc", "cal", "acc+0", "acc+1", "cv-loss", "cv-acc", "cv-cal", "cv-acc+0")


def pick(row, names, rule: str) -> str:
    """``loss``: lowest LOO CE; ``acc``: highest LOO accuracy, CE breaks ties; ``cal``: lowest
    LOO CE at its best logit scale (:data:`SCALES`); ``acc+m``: like ``acc`` but a candidate other
    than θ0 must beat θ0's LOO accuracy by more than ``m`` support samples; ``cv-*``: the same on
    the cross-validated adaptation scores."""
    loo = row["cv"] if rule.startswith("cv") else row["loo"]
    rule = rule[3:] if rule.startswith("cv") else rule
    if rule == "loss":
        return min(names, key=lambda k: loo[k][0])
    if rule == "cal":
        return min(names, key=lambda k: _cal(loo[k]))
    best = min(names, key=lambda k: (-loo[k][1], loo[k][0]))  # LOO accuracy, CE breaks ties
    if rule.startswith("acc+") and "h=0" in names:
        if loo[best][1] - loo["h=0"][1] <= int(rule[4:]) / row.get("n", 25) + 1e-6:
            return "h=0"
    return best


def report(data) -> None:
    """Per-target tables, recovered shares and pick counts from the per-episode matrix."""
    sets = {"rel": data["primary"], "fixed": data["fixed"]}
    if data["bn"]:
        sets = {k: v + ["support stats"] for k, v in sets.items()}
    cols = ["direct transfer", "bias tuning", "HyperFlow"]
    if data["bn"]:
        cols.append("support stats")
    cv = "cv" in next(iter(data["episodes"].values()))[0]
    sel_cols = [f"select[{g},{r}]" for g in sets for r in RULES if cv and g == "rel" or not r.startswith("cv")] \
        + [f"oracle[{g}]" for g in sets]
    per: Dict[str, Dict[str, List[float]]] = {}
    picks: Dict[str, Dict[str, Dict[str, int]]] = {}
    for dname, rows in data["episodes"].items():
        acc = per.setdefault(dname, {})
        for c in cols:
            acc[c] = [r["acc"][c] for r in rows]
        for g, names in sets.items():
            for rule in RULES:
                if rule.startswith("cv") and (g != "rel" or "cv" not in rows[0]):
                    continue
                key = f"select[{g},{rule}]"
                chosen = [pick(r, names, rule) for r in rows]
                acc[key] = [r["acc"][c] for r, c in zip(rows, chosen)]
                counts = picks.setdefault(key, {}).setdefault(dname, {n: 0 for n in names})
                for c in chosen:
                    counts[c] += 1
            acc[f"oracle[{g}]"] = [max(r["acc"][n] for n in names) for r in rows]
        for n in sorted({k for r in rows for k in r["acc"]} - set(cols)):
            acc.setdefault(f"fixed {n}", [r["acc"][n] for r in rows])
    names = cols + sel_cols
    print(f"\nlr {data['lr']:g}, tuned horizon {data['horizon']:g}; primary grid {data['primary']}, "
          f"fixed grid {data['fixed']}\n")
    print("| target | " + " | ".join(names) + " |")
    print("|" + " --- |" * (len(names) + 1))
    for dname, acc in per.items():
        print(f"| {dname} | " + " | ".join("{:.2f} ± {:.2f}".format(*(100 * v for v in mean_ci(acc[n])))
                                           for n in names) + " |")
    gains = {n: [] for n in per[next(iter(per))]}
    for acc in per.values():
        d = sum(acc["direct transfer"]) / len(acc["direct transfer"])
        for n in gains:
            gains[n].append(sum(acc[n]) / len(acc[n]) - d)
    ref = sum(gains["bias tuning"]) / len(gains["bias tuning"])
    print()
    for n, g in gains.items():
        worst = min(range(len(g)), key=lambda i: g[i])
        dn = list(per)[worst]
        ci = mean_ci(per[dn]["direct transfer"])[1]
        print(f"{n}: mean gain {100 * sum(g) / len(g):+.2f} ({100 * sum(g) / len(g) / ref:.0f} % of bias tuning's "
              f"{100 * ref:+.2f}); worst {dn} {100 * g[worst]:+.2f} (direct's interval ±{100 * ci:.2f})")
    print()
    for key, by in picks.items():
        print(f"picks {key}:")
        for dname, counts in by.items():
            print(f"  {dname}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    ms = {k: sorted(r["ms"][k] for rows in data["episodes"].values() for r in rows)
          for k in data["episodes"][next(iter(data["episodes"]))][0]["ms"]}
    med = {k: v[len(v) // 2] for k, v in ms.items()}
    print("\nmedian ms per task: " + ", ".join(f"{k} {v:.1f} ({100 * v / med['bias tuning']:.2f} % of bias tuning)"
                                              for k, v in med.items()))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--report":
        report(json.loads(Path(sys.argv[2]).read_text()))
    else:
        main()

"""The `hyperflow` command line through its real entry point: happy paths and bad input."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ENTRY = shutil.which("hyperflow")


def run(*args, cache=None, check_rc=None, timeout=900):
    cmd = [ENTRY] if ENTRY else [sys.executable, "-m", "hyperflow_ext.cli"]
    env = dict(os.environ)
    if cache is not None:
        env["HYPERFLOW_CACHE"] = str(cache)
    res = subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env)
    if check_rc is not None:
        assert res.returncode == check_rc, (res.returncode, res.stdout[-2000:], res.stderr[-2000:])
    return res


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    shared = os.environ.get("HYPERFLOW_CACHE")
    return Path(shared) if shared else tmp_path_factory.mktemp("cache")


def test_info_reports_the_build():
    from hyperflow_ext import native

    res = run("info", "--json", check_rc=0)
    info = json.loads(res.stdout)
    assert info["native_cpu"] is True and info["cuda_built"] is native.cuda_built()


def test_bad_usage_exits_2():
    res = run("adapt", "--nope")
    assert res.returncode == 2 and "usage" in res.stderr
    assert run("frobnicate").returncode == 2


@pytest.fixture(scope="session")
def demo_report(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("report")
    res = run("demo", "--quick", "--out", out, "-q", cache=cache, check_rc=0)
    assert "report ->" in res.stdout
    return out


def test_demo_quick_writes_report_and_every_plot(demo_report):
    from hyperflow_ext.report import PLOTS

    text = (demo_report / "report.md").read_text()
    for heading in ("Few-shot adaptation", "Pruning by flow", "Where sparsity pays", "Power law", "Sparse kernels"):
        assert heading in text
    for name in PLOTS:
        data = (demo_report / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    assert "HyperFlow-C" in text and "direct transfer" in text
    data = json.loads((demo_report / "results.json").read_text())
    from hyperflow_ext._io import load_tensors

    _, meta = load_tensors(demo_report / "drift-cubic.safetensors")
    # bias tuning runs at the rate fit's recipe chose; --quick opts in to full fine-tuning
    assert data["learning_rates"]["bias"]["lr"] == meta["recipe"]["lr"]
    assert {r["method"] for r in data["fewshot"]} >= {"bias tuning", "full fine-tuning"}


def _glyph_folders(root: Path, cache: Path, n_classes=3, per_class=4):
    from hyperflow_ext.data import benchmark_domains

    target = benchmark_domains(cache, progress=False).target
    ds = target["Arabic"]
    support, query = root / "support", root / "query"
    for c in range(n_classes):
        idx = ds.indices_of(c)[: per_class + 2]
        for part, sel in ((support, idx[:per_class]), (query, idx[per_class:])):
            folder = part / ds.class_names[c]
            folder.mkdir(parents=True, exist_ok=True)
            for i in sel.tolist():
                Image.fromarray((ds.images[i, 0].numpy() * 255).astype(np.uint8)).save(folder / f"img{i}.png")
    return support, query


def test_adapt_on_user_folders_predicts_every_query(demo_report, cache, tmp_path):
    support, query = _glyph_folders(tmp_path, cache)
    out = tmp_path / "preds.csv"
    res = run("adapt", "--quick", "--flow", demo_report / "drift-cubic.safetensors", "--support", support,
              "--query", query, "--out", out, "--steps", "10", "-q", cache=cache, check_rc=0)
    rows = list(csv.DictReader(out.open()))
    files = sorted(str(p) for p in query.rglob("*.png"))
    assert sorted(r["file"] for r in rows) == files
    assert {r["predicted_class"] for r in rows} <= {p.name for p in support.iterdir()}
    assert "accuracy" in res.stdout


def test_adapt_bad_input(demo_report, cache, tmp_path):
    flow = demo_report / "drift-cubic.safetensors"
    res = run("adapt", "--quick", "--flow", flow, "--support", tmp_path / "missing", "--query", tmp_path, cache=cache)
    assert res.returncode == 1 and "does not exist" in res.stderr and "Traceback" not in res.stderr
    support, query = _glyph_folders(tmp_path, cache)
    (support / next(iter(os.listdir(support))) / "broken.png").write_bytes(b"not an image")
    res = run("adapt", "--quick", "--flow", flow, "--support", support, "--query", query, cache=cache)
    assert res.returncode == 1 and "broken.png" in res.stderr
    res = run("adapt", "--quick", "--flow", tmp_path / "none.safetensors", "--support", support, "--query", query)
    assert res.returncode == 1 and "no such file" in res.stderr


def test_prune_export_roundtrip(tmp_path):
    out = tmp_path / "pruned.safetensors"
    res = run("prune", "--quick", "--target", "0.9", "--out", out, "-q", check_rc=0)
    assert "sparsity" in res.stdout and out.exists()
    res = run("export", "--model", out, check_rc=0)
    assert "argmax agreement" in res.stdout
    assert run("prune", "--target", "1.5", "-q").returncode == 1
    res = run("export", "--model", tmp_path / "missing.safetensors")
    assert res.returncode == 1 and "no such file" in res.stderr


def test_pretrain_and_meta_train_quick(cache, tmp_path):
    res = run("pretrain", "--quick", "-q", cache=cache, check_rc=0)
    assert "pretrained conv4" in res.stdout
    out = tmp_path / "drift.safetensors"
    res = run("meta-train", "--quick", "--tasks", "4", "--steps", "5", "--iters", "20", "--perturbations", "0",
              "--interpolation", "linear", "--horizon-tasks", "3", "--out", out, "-q", cache=cache, check_rc=0)
    assert out.exists() and "drift network (linear" in res.stdout and "horizon" in res.stdout
    assert not (tmp_path / "drift.ckpt.safetensors").exists()  # removed once the flow is saved


def test_meta_train_refuses_a_checkpoint_of_another_run(cache, tmp_path):
    from hyperflow_ext._io import save_tensors

    run("pretrain", "--quick", "-q", cache=cache, check_rc=0)
    stale = tmp_path / "drift.ckpt.safetensors"
    save_tensors(stale, {"generator": torch.zeros(1, dtype=torch.uint8)}, {"key": "another-run", "done": 5})
    res = run("meta-train", "--quick", "--tasks", "4", "--steps", "5", "--iters", "20", "--perturbations", "0",
              "--horizon-tasks", "0", "--out", tmp_path / "drift.safetensors", "-q", cache=cache)
    assert res.returncode == 1 and "was written by another training run" in res.stderr
    assert stale.exists() and not (tmp_path / "drift.safetensors").exists()  # nothing overwritten


def test_bench_missing_folder(tmp_path):
    res = run("bench", "--path", tmp_path / "nowhere")
    assert res.returncode == 1 and "not found" in res.stderr


def test_demo_full_finetune_is_opt_in():
    from hyperflow_ext.cli import build_parser
    from hyperflow_ext.demo import DemoConfig

    assert not DemoConfig().full_finetune and DemoConfig.quick().full_finetune
    parser = build_parser()
    assert parser.parse_args(["demo", "--full-finetune"]).full_finetune
    assert not parser.parse_args(["demo"]).full_finetune

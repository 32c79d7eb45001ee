"""README.md as a test: its Python examples run, its API names resolve, its CLI lines parse.

The ```python blocks run top to bottom in one namespace, as a reader would paste them. The
expensive entry points are swapped for tiny-but-real versions that check their arguments against
the real signatures first: ``hf.models.load_pretrained`` really pretrains, on a tiny source domain
and a narrow backbone; ``hf.data.benchmark_domains`` returns a split of tiny domains;
``HyperFlow.fit`` really records and regresses, on fewer tasks, steps and iterations, and
``HyperFlow.tune_horizon`` scores fewer held-out episodes. The free
names of the examples (``support_x``, ``train_loader``, ``gammas`` ...) are bound to small objects
of the kinds the README means. A renamed function, a changed keyword or a new unbound name makes
the example, and so this test, fail.
"""
import inspect
import json
import math
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hyperflow_ext as hf
from hyperflow_ext.cli import build_parser, main
from hyperflow_ext.data import BenchmarkSplit, ImageDataset
from hyperflow_ext.data.benchmark import META_SCRIPTS, SOURCE_SCRIPTS, TARGET_SCRIPTS
from hyperflow_ext.flow import DriftTrainConfig, HyperFlow, TrajectoryConfig
from hyperflow_ext.prune._loop import TensorLoader
from hyperflow_ext.prune.experiment import DigitsCNN

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```([\w-]*)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
SIDE = 16           # image side of the stand-in domains (Conv4's smallest input)
TINY_FIT = {"tasks": 6, "trajectory_steps": 4, "perturbations": 1}  # upper bounds for HyperFlow.fit
TINY_HORIZON_TASKS = 6                                              # and for HyperFlow.tune_horizon
TINY_DRIFT = DriftTrainConfig(iters=20, batch_size=64, eval_every=10)
TINY_BACKBONES = {"conv4": {"hidden": 8, "groups": 2}, "resnet8": {"widths": (8, 8, 8), "groups": 2},
                  "vit_tiny": {"image_size": SIDE, "dim": 16, "depth": 1, "heads": 2}}
REAL = {"load_pretrained": hf.models.load_pretrained, "benchmark_domains": hf.data.benchmark_domains,
        "fewshot_benchmark": hf.data.fewshot_benchmark,
        "fit": HyperFlow.fit, "tune_horizon": HyperFlow.tune_horizon}  # taken before any test patches them


# -- reading the README ---------------------------------------------------------------------------
def fenced_blocks(text, languages):
    """``(first line number, source)`` of every fenced block whose language is in ``languages``."""
    return [(text.count("\n", 0, m.start(2)) + 1, m.group(2)) for m in FENCE.finditer(text)
            if m.group(1).lower() in languages]


def inline_code(text):
    """Every single-backtick span outside fenced blocks."""
    return re.findall(r"`([^`\n]+)`", FENCE.sub("", text))


def cli_lines(text):
    """Argument lists (after ``hyperflow``) of every command line in the README's code."""
    sources = [src for _, src in fenced_blocks(text, {"", "bash", "sh", "shell", "console"})] + inline_code(text)
    found = []
    for source in sources:
        for line in source.splitlines():
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError:
                continue
            segment = []
            for token in tokens + ["&&"]:
                if token not in ("&&", "||", ";", "|"):
                    segment.append(token)
                    continue
                if len(segment) > 1 and segment[0] == "hyperflow" and not segment[1].startswith("-"):
                    # `[--quick]`, `[--filter EXPR]`: optional parts, written the way they would be typed
                    found.append([t.strip("[]") for t in segment[1:] if t.strip("[]")])
                segment = []
    return found


# -- tiny stand-ins -------------------------------------------------------------------------------
def tiny_domain(name, classes, per_class, seed):
    """``classes`` noisy variants of random class templates, ``(classes * per_class, 1, SIDE, SIDE)``."""
    g = torch.Generator().manual_seed(seed)
    templates = (torch.rand(classes, 1, SIDE, SIDE, generator=g) > 0.6).float()
    images = templates.repeat_interleave(per_class, 0)
    images = (0.8 * images + 0.2 * torch.rand(images.shape, generator=g)).clamp(0, 1)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return ImageDataset(images, labels, [f"{name}-{c}" for c in range(classes)], name)


def tiny_split():
    # 20 images a class: tune_horizon's episodes take 5 shots + 15 queries of 5 classes
    return BenchmarkSplit(
        source={SOURCE_SCRIPTS[0]: tiny_domain(SOURCE_SCRIPTS[0], 6, 4, seed=1)},
        meta={name: tiny_domain(name, 6, 20, seed=2 + i) for i, name in enumerate(META_SCRIPTS[:2])},
        target={name: tiny_domain(name, 6, 20, seed=9 + i) for i, name in enumerate(TARGET_SCRIPTS[:1] + ("digits",))},
    )


def bound(fn, args, kwargs):
    """``{parameter: value}`` as ``fn`` itself would take them (TypeError for a keyword it does not
    have), with a ``**kwargs`` parameter merged in: ``fn(**bound(fn, args, kwargs))`` is the same call."""
    sig = inspect.signature(fn)
    arguments = sig.bind(*args, **kwargs)
    arguments.apply_defaults()
    out = {}
    for name, value in arguments.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"{fn.__qualname__}: the README stand-in does not pass *{name} on")
        else:
            out[name] = value
    return out


class StandIns:
    """Tiny versions of the README's expensive entry points, recording that they were used."""

    def __init__(self, monkeypatch, tmp_path):
        self.split, self.calls = tiny_split(), []
        real_pretrained, real_domains, real_fit = REAL["load_pretrained"], REAL["benchmark_domains"], REAL["fit"]

        def load_pretrained(*args, **kwargs):  # the real one, on tiny data (it still checks the name)
            args_ = bound(real_pretrained, args, kwargs)
            arch = str(args_["name"]).removesuffix("-glyphs")
            args_.update(datasets=self.split.source, cache_dir=tmp_path / "cache", progress=False,
                         backbone_kw={**TINY_BACKBONES.get(arch, {}), **(args_["backbone_kw"] or {})})
            args_.setdefault("epochs", 1)
            self.calls.append("load_pretrained")
            return real_pretrained(**args_)

        def benchmark_domains(*args, **kwargs):
            bound(real_domains, args, kwargs)
            self.calls.append("benchmark_domains")
            return self.split

        def fewshot_benchmark(*args, **kwargs):
            bound(REAL["fewshot_benchmark"], args, kwargs)
            self.calls.append("fewshot_benchmark")
            return self.split

        def fit(flow, *args, **kwargs):  # the real one with fewer tasks, steps, runs and iterations
            args_ = bound(real_fit, (flow,) + args, kwargs)
            for key, most in TINY_FIT.items():
                args_[key] = most if args_.get(key) is None else min(args_[key], most)
            if args_["train_config"] == DriftTrainConfig():
                args_["train_config"] = TINY_DRIFT
            args_["progress"] = False
            own = inspect.signature(real_fit).parameters
            TrajectoryConfig(**{k: v for k, v in args_.items() if k not in own})  # fails early on a keyword
            self.calls.append("fit")                                             # neither of them takes
            return real_fit(**args_)

        def tune_horizon(flow, *args, **kwargs):
            args_ = bound(REAL["tune_horizon"], (flow,) + args, kwargs)  # fewer held-out episodes
            args_["tasks"], args_["progress"] = min(args_["tasks"], TINY_HORIZON_TASKS), False
            self.calls.append("tune_horizon")
            return REAL["tune_horizon"](**args_)

        monkeypatch.setattr(hf.models, "load_pretrained", load_pretrained)
        monkeypatch.setattr(hf.data, "benchmark_domains", benchmark_domains)
        monkeypatch.setattr(hf.data, "fewshot_benchmark", fewshot_benchmark)
        monkeypatch.setattr(HyperFlow, "fit", fit)
        monkeypatch.setattr(HyperFlow, "tune_horizon", tune_horizon)
        monkeypatch.setenv("HYPERFLOW_CACHE", str(tmp_path / "cache"))
        monkeypatch.chdir(tmp_path)  # the examples write drift.safetensors in the working directory

    def free_names(self):
        """Objects for the names the README leaves to the reader."""
        (sx, sy, qx, _, *_), (sx1, sy1, *_), (sx2, sy2, *_) = hf.data.episodes(self.split.target, 5, 5, 5, n=3,
                                                                                 seed=7)
        g = torch.Generator().manual_seed(3)
        x, y = torch.rand(96, 1, 8, 8, generator=g), torch.randint(0, 10, (96,), generator=g)
        gammas = [0.03, 0.1, 0.3, 1.0, 3.0, 10.0]
        return {
            "support_x": sx, "support_y": sy, "query_x": qx, "sx1": sx1, "sy1": sy1, "sx2": sx2, "sy2": sy2,
            "cnn": DigitsCNN(channels=(4, 4, 8), hidden=8),  # the classifier to prune: features.0 is a conv
            "train_loader": TensorLoader(x[:64], y[:64], batch_size=32, shuffle=True),
            "val_loader": TensorLoader(x[64:], y[64:], batch_size=32),
            "gammas": gammas,
            "densities": [0.036 * gamma ** -(0.659 + 0.0108 * math.log(gamma)) for gamma in gammas],
        }


def run_python_blocks(text, monkeypatch, tmp_path):
    """Run every ```python block of ``text`` in order in one namespace; return the namespace."""
    blocks = fenced_blocks(text, {"python", "py"})
    assert blocks, "README.md has no ```python block"
    stand_ins = StandIns(monkeypatch, tmp_path)
    namespace = {"__name__": "__readme__", **stand_ins.free_names()}
    for line, source in blocks:
        code = compile("\n" * (line - 1) + source, str(README), "exec")  # tracebacks give README lines
        try:
            exec(code, namespace)
        except NameError as exc:
            raise AssertionError(f"README.md block at line {line}: {exc}; a new name the reader supplies "
                                 f"needs a stand-in in StandIns.free_names") from exc
    return namespace, stand_ins


# -- the tests ------------------------------------------------------------------------------------
@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread (two spin against each other on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.filterwarnings(r"ignore:HyperFlow\.:RuntimeWarning")  # tiny data: adapting barely pays
def test_readme_python_examples_run(monkeypatch, tmp_path, one_thread):
    ns, stand_ins = run_python_blocks(README.read_text(encoding="utf-8"), monkeypatch, tmp_path)
    # the tiny entry points were the ones used, so the examples did run the real code paths
    assert {"load_pretrained", "fit"} <= set(stand_ins.calls)
    assert {"benchmark_domains", "fewshot_benchmark"} & set(stand_ins.calls)
    results = [v for k, v in ns.items() if not k.startswith("__")]
    assert any(isinstance(v, HyperFlow) and v.interpolation for v in results), "no fitted HyperFlow"
    if "logits" in ns:
        assert ns["logits"].shape == (ns["query_x"].shape[0], 5) and torch.isfinite(ns["logits"]).all()
    if "models" in ns:
        assert isinstance(ns["models"], list) and len(ns["models"]) == 2
    if "sparse_model" in ns:
        kinds = {type(m) for m in ns["sparse_model"].modules()}
        assert kinds & {hf.sparse.SparseLinear, hf.sparse.SparseConv2d}


@pytest.mark.parametrize("old, new, error", [
    ("hf.models.load_pretrained(", "hf.models.load_pretrained_backbone(", "load_pretrained_backbone"),  # renamed
    ("hf.data.episodes(meta, way=5", "hf.data.episodes(meta, ways=5", "'ways'"),              # renamed keyword
    ("tasks=200", "task=200", "'task'"),                                                      # keyword fit lacks
    ('load_pretrained("conv4-glyphs")', 'load_pretrained("conv5-glyphs")', "conv5-glyphs"),  # a name not there
])
def test_a_broken_example_fails(old, new, error, monkeypatch, tmp_path, one_thread):
    """The harness does not swallow errors: each edit (early in the examples, so it is quick) fails."""
    text = README.read_text(encoding="utf-8")
    if old not in text:
        pytest.skip(f"README.md no longer contains {old!r}")
    with pytest.raises((AttributeError, TypeError, ValueError), match=error):
        run_python_blocks(text.replace(old, new, 1), monkeypatch, tmp_path)


RESOLVE = r"""
import importlib, inspect, json, re, sys
import hyperflow_ext as hf
bad = []
for ref, prose in json.loads(sys.argv[1]):
    path, _, call = ref.partition("(")
    obj, where = hf, "hyperflow_ext"
    for part in path.split(".")[1:]:
        where += "." + part
        if not hasattr(obj, part) and path.startswith("hyperflow_ext.") and inspect.ismodule(obj):
            try:  # `hyperflow_ext.a.b` is read as an import path, `hf.a.b` as attributes only
                importlib.import_module(where)
            except ImportError:
                pass
        if not hasattr(obj, part):
            bad.append(f"{path}: {where.rpartition('.')[0]} has no attribute {part!r}")
            break
        obj = getattr(obj, part)
    else:
        if not call or not callable(obj):
            continue
        params = inspect.signature(obj).parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            continue
        for kw in re.findall(r"(?<![=\w])(\w+)=(?!=)", call):
            if kw not in params:
                bad.append(f"{ref}: {path} takes no keyword {kw!r}")
        args = [a.strip() for a in call[:-1].split(",") if a.strip()]
        if prose and args and all(re.fullmatch(r"[a-z_]\w*", a) for a in args):
            # a signature written out in prose, `EpisodeSampler(datasets, way, shot, query, seed)`
            bad += [f"{ref}: {path} has no parameter {a!r}" for a in args if a not in params]
print(json.dumps(bad))
"""


def test_readme_api_names_resolve(tmp_path):
    """Every ``hf.a.b`` / ``hyperflow_ext.a.b`` in the README's code resolves after a plain
    ``import hyperflow_ext as hf`` (in a fresh interpreter: nothing imported by hand), and each
    keyword written in such a call is one the callable takes."""
    text = README.read_text(encoding="utf-8")
    pattern = re.compile(r"\b(hf|hyperflow_ext)((?:\.[A-Za-z]\w*)+)(\([^()]*\))?")
    sources = [(span, True) for span in inline_code(text)]
    sources += [(src, False) for _, src in fenced_blocks(text, {"python", "py"})]
    refs = sorted({(m.group(1) + m.group(2) + (m.group(3) or ""), prose)
                   for span, prose in sources for m in pattern.finditer(span)})
    assert refs, "no hf.* names found in README.md"
    res = subprocess.run([sys.executable, "-c", RESOLVE, json.dumps(refs)], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)  # not the checkout: the installed package
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []


def test_subpackage_all_lists_resolve():
    for module in (hf, hf.data, hf.flow, hf.models, hf.prune, hf.sparse, hf.testing):
        missing = [name for name in module.__all__ if not hasattr(module, name)]
        assert not missing, f"{module.__name__}.__all__ names missing attributes: {missing}"
        assert len(set(module.__all__)) == len(module.__all__), f"{module.__name__}.__all__ has duplicates"


def test_readme_cli_lines_parse_and_help_runs(capsys):
    """Each README command line parses with the real parser (options, choices, required
    arguments); the installed entry point lists every command the README uses; and
    ``hyperflow <command> --help`` succeeds and shows the options the README says every command
    takes. (``--help`` per command runs ``cli.main`` in this process, the function the entry point
    calls: one interpreter start instead of one per command.)"""
    text = README.read_text(encoding="utf-8")
    lines = cli_lines(text)
    commands = sorted({line[0] for line in lines})
    assert "demo" in commands and "info" in commands, commands
    parser = build_parser()
    for line in lines:
        try:
            args = parser.parse_args(line)
        except SystemExit as exc:  # argparse reports the bad part on stderr
            raise AssertionError(f"README command `hyperflow {shlex.join(line)}` does not parse") from exc
        assert args.command == line[0]
    capsys.readouterr()

    entry = [shutil.which("hyperflow")] if shutil.which("hyperflow") else [sys.executable, "-m", "hyperflow_ext.cli"]
    res = subprocess.run(entry + ["--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    listed = set(re.findall(r"^\s{4}([a-z][\w-]*)\s", res.stdout, re.M))
    assert set(commands) <= listed, (commands, res.stdout)

    common = re.search(r"Every command takes (.+?) and `--help`", text)
    options = [opt for span in re.findall(r"`([^`]+)`", common.group(1)) for opt in span.split("/")] if common else []
    for command in commands:
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        out = capsys.readouterr().out
        assert exit_.value.code == 0 and f"usage: hyperflow {command}" in out, (command, out)
        for opt in options:
            assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", out), f"`hyperflow {command}` lacks {opt}"

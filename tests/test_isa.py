"""Runtime ISA dispatch of the native CPU kernels (csrc/dispatch.cpp, hyperflow_ext.native.isa*).

The kernels themselves are checked on every supported path by the kernel test modules, which
tests/conftest.py runs once per path; here: the selection, its errors, and that the binary keeps
every ISA's instructions inside its own path (one wheel, every x86-64 CPU).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter

import pytest
import torch

from hyperflow_ext import native

pytestmark = pytest.mark.skipif(not native.available() or not native.isa_paths(),
                                reason="needs the native CPU extension, built with ISA dispatch")

PATHS = ("avx512", "avx2", "baseline")


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, **env}
    # Outside the checkout: from its root, `import hyperflow_ext` would find the unbuilt source tree
    # instead of the installed package (CI installs with build isolation, not in place).
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=300,
                          cwd=tempfile.gettempdir())


def test_paths_compiled_best_first_and_baseline_always_supported():
    paths = native.isa_paths()
    assert tuple(paths) == PATHS
    assert paths["baseline"] is True
    assert native.isa() in paths and paths[native.isa()]


def test_default_pick_is_best_supported_path():
    best = next(name for name, ok in native.isa_paths().items() if ok)
    out = _run("from hyperflow_ext import native; print(native.isa())", HYPERFLOW_ISA="")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == best


@pytest.mark.parametrize("path", PATHS)
def test_env_var_forces_each_supported_path(path):
    if not native.isa_paths()[path]:
        pytest.skip(f"this CPU lacks {path}")
    code = ("import torch; from hyperflow_ext import native, sparse; print(native.isa());"
            "w = torch.randn(8, 16) * (torch.rand(8, 16) > 0.5); x = torch.randn(3, 16);"
            "m = sparse.CSRMatrix.from_dense(w); y = sparse.csr_linear(x, m);"
            "print(float((y - x @ w.T).abs().max()))")
    out = _run(code, HYPERFLOW_ISA=path)
    assert out.returncode == 0, out.stderr
    name, err = out.stdout.split()
    assert name == path and float(err) < 1e-4


def test_env_var_unknown_value_raises_clearly_on_use():
    code = ("import torch; from hyperflow_ext import native, sparse\n"
            "try:\n    native.isa()\nexcept ValueError as e:\n    print('isa:', e)\n"
            "m = sparse.CSRMatrix.from_dense(torch.eye(4))\n"
            "try:\n    sparse.csr_linear(torch.ones(2, 4), m, backend='native')\nexcept ValueError as e:\n    print('call:', e)\n")
    out = _run(code, HYPERFLOW_ISA="avx9")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2
    for line in lines:
        assert "HYPERFLOW_ISA='avx9' is not a known ISA path" in line and "avx512, avx2, baseline" in line


def test_info_prints_chosen_and_available_paths():
    out = _run("from hyperflow_ext.cli import main; main(['info'])", HYPERFLOW_ISA="baseline")
    assert out.returncode == 0, out.stderr
    assert re.search(r"^isa\s+baseline$", out.stdout, re.M)
    assert re.search(r"^isa_paths\s+avx512 \(", out.stdout, re.M)


def test_set_isa_switches_and_rejects_bad_names():
    before = native.isa()
    with native.use_isa("baseline"):
        assert native.isa() == "baseline"
    assert native.isa() == before
    with pytest.raises(ValueError, match="not a known ISA path"):
        native.set_isa("sse9")
    with pytest.raises(TypeError, match="must be a str"):
        native.set_isa(2)  # type: ignore[arg-type]
    assert native.isa() == before


def test_unsupported_path_is_refused():
    missing = [name for name, ok in native.isa_paths().items() if not ok]
    if not missing:
        pytest.skip("this CPU supports every path")
    with pytest.raises(ValueError, match="lacks the instructions"):
        native.set_isa(missing[0])
    out = _run("from hyperflow_ext import native; native.isa()", HYPERFLOW_ISA=missing[0])
    assert out.returncode != 0 and "lacks the instructions" in out.stderr


def test_paths_agree_on_a_sparse_convolution():
    from hyperflow_ext import sparse

    conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) > 0.8)
    x = torch.randn(2, 8, 9, 9)
    ref = conv(x)
    layer = sparse.SparseConv2d.from_dense(conv.weight, padding=1, bias=conv.bias)
    for path, ok in native.isa_paths().items():
        if ok:
            with native.use_isa(path), torch.inference_mode():
                torch.testing.assert_close(layer(x), ref, rtol=1e-4, atol=1e-4, msg=lambda m: f"{path}: {m}")


def _vector_instructions_outside_isa_code(so_path: str) -> Counter:
    """VEX/EVEX or mask-register instructions in functions outside the hf::avx512 / hf::avx2 code."""
    dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", so_path], capture_output=True, text=True,
                         check=True).stdout
    leaks: Counter = Counter()
    fn = ""
    for line in dis.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            fn = head.group(1)
            continue
        parts = line.split("\t")
        if len(parts) < 2 or not parts[1].split():
            continue
        mnemonic = parts[1].split()[0]
        if (mnemonic.startswith("v") or re.match(r"^k(mov|and|or|xor|not|shift|test|add|unpck)", mnemonic)) \
                and not re.search(r"hf::(avx512|avx2)::", fn):
            leaks[fn] += 1
    return leaks


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs binutils' objdump")
def test_no_vector_instructions_outside_their_isa_path():
    """Generic code (bindings, dispatcher, the baseline path, shared inline and std templates) must run on
    any x86-64: an AVX-512 copy of an inline function merged into it by the linker would fault there."""
    build = native.cpu_module().build_info()
    if "march" in build or "sanitize" in build:
        pytest.skip(f"not a portable build: {build}")
    leaks = _vector_instructions_outside_isa_code(native.cpu_module().__file__)
    assert not leaks, f"vector instructions outside hf::avx512 / hf::avx2: {leaks.most_common(10)}"

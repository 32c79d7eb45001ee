"""The public surface: oracles under hf.testing, old spellings still resolving, no private imports across modules."""
import ast
from pathlib import Path

import pytest

import hyperflow_ext as hf

PACKAGE = Path(hf.__file__).resolve().parent


def test_testing_gathers_every_reference_oracle():
    modules = {"csr_spmm_reference": hf.sparse.csr, "csr_linear_reference": hf.sparse.linear,
               "csr_conv2d_reference": hf.sparse.conv, "masked_matmul_reference": hf.prune.masked_ops,
               "masked_matmul_grad_input_reference": hf.prune.masked_ops, "flow_step_reference": hf.prune.flow_ops,
               "euler_update_reference": hf.flow.update, "drift_integrate_reference": hf.flow.integrate,
               "group_norm_reference": hf.models.norm}
    assert sorted(hf.testing.__all__) == sorted(modules)
    for name, module in modules.items():
        assert getattr(hf.testing, name) is getattr(module, name)


@pytest.mark.parametrize("package, name, home", [
    ("data", "META_SCRIPTS", "data.benchmark"), ("data", "FEWSHOT_TARGETS", "data.fewshot"),
    ("data", "STROKE_FAMILIES", "data.strokes"), ("data", "glyph_cache_path", "data.glyphs"),
    ("data", "SHIFTS", "data.shifts"), ("data", "IMAGE_SUFFIXES", "data.folder"),
    ("prune", "run_pruning_experiment", "prune.experiment"), ("prune", "run_power_law_study", "prune.experiment"),
    ("prune", "run_sparsity_pays", "prune.pays"), ("prune", "flow_step_reference", "testing"),
    ("sparse", "masked_matmul", "prune.masked_ops"), ("sparse", "masked_matmul_grad_input", "prune.masked_ops"),
    ("sparse", "score_mask", "prune.masked_ops"), ("sparse", "masked_matmul_reference", "testing"),
    ("sparse", "masked_matmul_grad_input_reference", "testing"),
    ("flow", "drift_integrate_reference", "testing"), ("flow", "euler_update_reference", "testing"),
    ("sparse", "csr_spmm_reference", "testing"), ("sparse", "csr_linear_reference", "testing"),
    ("sparse", "csr_conv2d_reference", "testing"),
])
def test_names_off_the_surface_still_resolve(package, name, home):
    pkg = getattr(hf, package)
    module = hf
    for part in home.split("."):
        module = getattr(module, part)
    assert name not in pkg.__all__
    assert getattr(pkg, name) is getattr(module, name)
    exec(f"from hyperflow_ext.{package} import {name} as got", ns := {})
    assert ns["got"] is getattr(module, name)


def test_the_old_module_of_the_masked_ops_still_imports():
    from hyperflow_ext.sparse.masked import masked_matmul, score_mask

    assert masked_matmul is hf.prune.masked_ops.masked_matmul and score_mask is hf.prune.masked_ops.score_mask


def test_fuse_network_still_resolves_from_its_old_module():
    from hyperflow_ext.sparse.network import fuse_network

    assert fuse_network is hf.sparse.fx_passes.fuse_network is hf.sparse.fuse_network
    with pytest.raises(AttributeError, match="has no attribute 'fuse_networks'"):
        hf.sparse.network.fuse_networks  # noqa: B018


def test_an_unknown_name_is_still_an_attribute_error():
    for pkg in (hf.data, hf.prune, hf.sparse):
        with pytest.raises(AttributeError, match="has no attribute 'META_SCRIPT'"):
            pkg.META_SCRIPT  # noqa: B018


def private_imports(path: Path, compiled_ok: bool = False):
    """``(name, line)`` of every ``from x import _name`` in ``path`` (the compiled ``_C`` modules aside when
    ``compiled_ok``), and of every mention of ``hyperflow_ext._C`` otherwise (an import by name)."""
    text = path.read_text(encoding="utf-8")
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                compiled = alias.name in ("_C", "_C_cuda")
                if alias.name.startswith("_") and not alias.name.startswith("__") and not (compiled and compiled_ok):
                    yield alias.name, node.lineno
    if not compiled_ok:
        for line, row in enumerate(text.splitlines(), 1):
            if "hyperflow_ext._C" in row:
                yield "hyperflow_ext._C", line


def test_no_module_imports_a_private_name_of_another():
    """Strict: the only exception is native.py, the one module that loads the compiled extension."""
    found = {(path.relative_to(PACKAGE).as_posix(), name, line)
             for path in PACKAGE.rglob("*.py") for name, line in private_imports(path, path == PACKAGE / "native.py")}
    assert not found, "give these names a public entry point: " + "; ".join(
        sorted(f"{file}:{line} imports {name}" for file, name, line in found))


def test_the_private_import_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from .demo import _held_out_episodes\nfrom . import _C\nx = 'hyperflow_ext._C_cuda'\n")
    assert list(private_imports(bad, compiled_ok=True)) == [("_held_out_episodes", 1)]
    assert list(private_imports(bad)) == [("_held_out_episodes", 1), ("_C", 2), ("hyperflow_ext._C", 3)]

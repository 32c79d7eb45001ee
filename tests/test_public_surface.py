"""The public surface: oracles under hf.testing, old spellings still resolving, no private imports across modules."""
import ast
from pathlib import Path

import pytest

import hyperflow_ext as hf

PACKAGE = Path(hf.__file__).resolve().parent

# Private imports that the sparse/flow restructuring (issue 26, items owned with issues 24 and 25) removes;
# anything not listed here fails the test below.
KNOWN_PRIVATE_IMPORTS = {
    ("prune/functional.py", "_masked_weight"),  # the masked training ops move from sparse/ to prune/
    ("sparse/conv.py", "_apply_mask"), ("sparse/conv.py", "_check_bias"), ("sparse/conv.py", "_CSRBuffers"),
    ("sparse/conv.py", "_index_dtype"), ("sparse/conv.py", "_pick_backend"), ("sparse/linear.py", "_pick_backend"),
    ("sparse/serialize.py", "_set_module"),
}


def test_testing_gathers_every_reference_oracle():
    modules = {"csr_spmm_reference": hf.sparse.csr, "csr_linear_reference": hf.sparse.linear,
               "csr_conv2d_reference": hf.sparse.conv, "masked_matmul_reference": hf.sparse.masked,
               "masked_matmul_grad_input_reference": hf.sparse.masked, "flow_step_reference": hf.prune.flow_ops,
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
    ("flow", "drift_integrate_reference", "testing"), ("flow", "euler_update_reference", "testing"),
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


def test_an_unknown_name_is_still_an_attribute_error():
    for pkg in (hf.data, hf.prune):
        with pytest.raises(AttributeError, match="has no attribute 'META_SCRIPT'"):
            pkg.META_SCRIPT  # noqa: B018


def private_imports(path: Path):
    """``(name, line)`` of every ``from x import _name`` in ``path`` (the compiled ``_C`` modules aside)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__") and alias.name not in ("_C", "_C_cuda"):
                    yield alias.name, node.lineno


def test_no_module_imports_a_private_name_of_another():
    found = {(path.relative_to(PACKAGE).as_posix(), name, line)
             for path in PACKAGE.rglob("*.py") for name, line in private_imports(path)}
    new = sorted(f"{file}:{line} imports {name}" for file, name, line in found if (file, name) not in KNOWN_PRIVATE_IMPORTS)
    assert not new, "give these names a public entry point: " + "; ".join(new)


def test_the_private_import_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from .demo import _held_out_episodes\nfrom . import _C\n")
    assert list(private_imports(bad)) == [("_held_out_episodes", 1)]

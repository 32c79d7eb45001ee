import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Triton runs on CPU tensors only in interpreter mode; set before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

# Property-test budgets: a fixed small one by default (CI), a larger one with
# HYPERFLOW_HYPOTHESIS_PROFILE=slow (tests/test_kernel_properties.py's slow test sets it).
# Tests with an explicit @settings(max_examples=...) keep their own count.
_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", max_examples=20, deadline=None, suppress_health_check=_HEALTH)
settings.register_profile("slow", max_examples=400, deadline=None, suppress_health_check=_HEALTH)
settings.load_profile(os.environ.get("HYPERFLOW_HYPOTHESIS_PROFILE", "ci"))


# Tests marked `cuda_build` check the CUDA extension that setup.py compiles when nvcc is found.
# Without nvcc (a user's laptop) they skip; CI, where nvcc exists, sets this variable so that a
# CUDA build that silently failed fails the run instead.
REQUIRE_CUDA_BUILD = os.environ.get("HYPERFLOW_REQUIRE_CUDA_BUILD", "0") not in ("", "0")


def pytest_collection_modifyitems(config, items):
    from hyperflow_ext import native  # after TRITON_INTERPRET is set

    skips = {}
    if not torch.cuda.is_available():
        skips["gpu"] = pytest.mark.skip(reason="needs a CUDA device")
    if not REQUIRE_CUDA_BUILD and not native.cuda_built():
        skips["cuda_build"] = pytest.mark.skip(
            reason="the CUDA extension was not built (nvcc not found at install time, or HYPERFLOW_CUDA=0); "
                   "HYPERFLOW_REQUIRE_CUDA_BUILD=1 makes this a failure")
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# The kernel tests run once per ISA path of the native CPU kernels that this CPU supports (avx512,
# avx2, baseline: hyperflow_ext.native.isa_paths), switched in-process with native.use_isa. With
# $HYPERFLOW_ISA set (a forced run, e.g. .ci/sanitize.sh's loop), only that path runs;
# $HYPERFLOW_TEST_ISAS (comma-separated) narrows the list otherwise.
_ISA_MODULES = frozenset({
    "test_native", "test_sparse_kernels", "test_sparse_conv", "test_guard_pages", "test_kernel_properties",
    "test_drift_kernels", "test_flow_ops", "test_norm", "test_sparse_network",
})


def _isa_params():
    from hyperflow_ext import native

    if not native.available() or not native.isa_paths():  # no extension, or one built before ISA dispatch
        return []
    forced = os.environ.get("HYPERFLOW_ISA", "")
    if forced and forced != "auto":
        return [forced]
    paths = [name for name, ok in native.isa_paths().items() if ok]
    wanted = [w.strip() for w in os.environ.get("HYPERFLOW_TEST_ISAS", "").split(",") if w.strip()]
    return [p for p in paths if p in wanted] if wanted else paths


def pytest_generate_tests(metafunc):
    if metafunc.module.__name__.rpartition(".")[2] not in _ISA_MODULES or "isa_path" in metafunc.fixturenames:
        return
    params = _isa_params()
    if params:
        metafunc.fixturenames.append("isa_path")
        metafunc.parametrize("isa_path", params, indirect=True, scope="module")


@pytest.fixture(scope="module")
def isa_path(request):
    """The ISA path this module's tests run on (see pytest_generate_tests); None without the extension."""
    param = getattr(request, "param", None)
    if param is None:
        yield None
        return
    from hyperflow_ext import native

    with native.use_isa(param):
        yield param

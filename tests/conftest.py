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

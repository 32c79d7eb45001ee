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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

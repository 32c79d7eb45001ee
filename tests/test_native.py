"""The build and the native/Triton plumbing: import, diagnostics, one kernel per path."""
import subprocess
import sys

import pytest
import torch

import hyperflow_ext as hf
from hyperflow_ext import native
from hyperflow_ext.flow import euler_update, euler_update_reference
from hyperflow_ext.sparse import CSRMatrix, csr_spmm, csr_spmm_reference

from _helpers import random_csr, tol


def test_cpu_extension_loaded():
    assert native.available(), native.diagnostics()
    info = native.diagnostics()
    assert info["native_cpu"] and info["openmp_threads"] >= 1


@pytest.mark.cuda_build
def test_cuda_module_imports_without_gpu():
    # CI sets HYPERFLOW_REQUIRE_CUDA_BUILD=1 (nvcc is present there), so the CUDA module must be
    # built and importable even though there is no GPU or driver on the machine.
    assert native.cuda_built(), native.diagnostics()
    mod = native.cuda_module()
    assert "cuda runtime" in mod.build_info()
    assert mod.device_count() >= 0
    assert native.cuda_available() == torch.cuda.is_available()


def test_import_works_in_a_fresh_interpreter_without_gpu(tmp_path):
    code = "import hyperflow_ext as hf; print(hf.__version__, hf.native.available(), hf.native.cuda_built())"
    # cwd outside the checkout: `python -c` puts the cwd first on sys.path
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    # the CUDA module loads here exactly when it does in this process (required by the test above in CI)
    assert res.stdout.split() == [hf.__version__, "True", str(native.cuda_built())]
    assert res.stderr == ""


@pytest.mark.parametrize("backend", ["native", "triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 1000, 4099])
def test_euler_update_matches_reference(backend, dtype, n):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton interpreter path is exercised in float32")
    theta, drift = torch.randn(n, dtype=dtype), torch.randn(n, dtype=dtype)
    got = euler_update(theta, drift, 0.05, backend=backend)
    torch.testing.assert_close(got, euler_update_reference(theta, drift, 0.05))
    assert not got.requires_grad


def test_euler_update_in_place_and_bad_input():
    theta, drift = torch.randn(10), torch.randn(10)
    want = theta + 0.5 * drift
    euler_update(theta, drift, 0.5, out=theta, backend="native")
    torch.testing.assert_close(theta, want)
    with pytest.raises(ValueError, match="drift must have shape"):
        euler_update(theta, torch.randn(11), 0.1)
    with pytest.raises(ValueError, match="dtype"):
        euler_update(theta, drift.double(), 0.1)
    with pytest.raises(ValueError, match="dt must be finite"):
        euler_update(theta, drift, float("nan"))
    with pytest.raises(TypeError, match="theta must be a torch.Tensor"):
        euler_update([1.0], drift, 0.1)
    with pytest.raises(ValueError, match="backend must be one of"):
        euler_update(theta, drift, 0.1, backend="cuda")


@pytest.mark.parametrize("shape", [(1, 1), (1, 50), (50, 1), (64, 100), (257, 129)])
@pytest.mark.parametrize("n", [1, 3, 33])
@pytest.mark.parametrize("density", [0.0, 0.05, 1.0])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_csr_spmm_matches_torch(shape, n, density, index_dtype):
    dense, a = random_csr(*shape, density, index_dtype=index_dtype)
    b = torch.randn(shape[1], n)
    torch.testing.assert_close(csr_spmm(a, b, backend="native"), dense @ b, **tol(dense.dtype))
    torch.testing.assert_close(csr_spmm(a, b, backend="torch"), csr_spmm_reference(a, b))


def test_csr_spmm_float64_and_noncontiguous_b():
    dense, a = random_csr(40, 30, 0.2, dtype=torch.float64, index_dtype=torch.int64)
    b = torch.randn(7, 30, dtype=torch.float64).t()  # (30, 7), column-major
    torch.testing.assert_close(csr_spmm(a, b), dense @ b, **tol(dense.dtype))


def test_csr_validation():
    rowptr = torch.tensor([0, 1, 2]); col = torch.tensor([0, 5]); val = torch.ones(2)
    with pytest.raises(ValueError, match=r"col_indices must lie in \[0, 3\)"):
        CSRMatrix(rowptr, col, val, (2, 3))
    with pytest.raises(ValueError, match="non-decreasing"):
        CSRMatrix(torch.tensor([0, 2, 1, 2]), torch.tensor([0, 1]), val, (3, 3))
    with pytest.raises(ValueError, match="end at nnz"):
        CSRMatrix(torch.tensor([0, 1, 3]), torch.tensor([0, 1]), val, (2, 3))
    with pytest.raises(ValueError, match="values must have shape"):
        CSRMatrix(rowptr, torch.tensor([0, 1]), torch.ones(3), (2, 3))
    a = CSRMatrix(rowptr, torch.tensor([0, 1]), val, (2, 3))
    with pytest.raises(ValueError, match="b must have 3 rows"):
        csr_spmm(a, torch.randn(4, 2))
    with pytest.raises(ValueError, match="dtype"):
        csr_spmm(a, torch.randn(3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="out must have shape"):
        csr_spmm(a, torch.randn(3, 2), out=torch.empty(2, 3))


@pytest.mark.gpu
def test_cuda_kernels_match_reference():
    dense, a = random_csr(300, 200, 0.1, index_dtype=torch.int64)
    a, b = a.to("cuda"), torch.randn(200, 17, device="cuda")
    torch.testing.assert_close(csr_spmm(a, b, backend="native"), dense.cuda() @ b, **tol(dense.dtype))
    t, d = torch.randn(5000, device="cuda"), torch.randn(5000, device="cuda")
    torch.testing.assert_close(euler_update(t, d, 0.1, backend="native"), t + 0.1 * d)

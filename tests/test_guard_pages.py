"""Native kernels never touch a byte past the end of their operands, vector paths included.

The sanitised build (.ci/sanitize.sh) checks every scalar access, but GCC does not instrument the
loads and stores of vector intrinsics, and that build is the generic x86-64 one. Here the installed
build (``-march=native``: the AVX2 / AVX-512 paths where the machine has them) runs with every operand
placed so that its last byte is the last byte before an inaccessible page (or its first byte the first
after one): one byte read or written past the end (or before the start) is a segmentation fault. A child process runs the kernels over ragged sizes (0, 1 and
around the vector widths), so a fault fails this test instead of the whole run.
"""
import os
import subprocess
import sys
import textwrap

import pytest

from hyperflow_ext import native

pytestmark = pytest.mark.skipif(not native.available() or not sys.platform.startswith("linux"),
                                reason="native extension not built, or no mprotect")

CHILD = textwrap.dedent('''
    import ctypes, itertools, math, mmap, os
    import torch
    from hyperflow_ext.flow.drift import PackedDrift
    from hyperflow_ext.flow.integrate import drift_integrate, drift_integrate_reference
    from hyperflow_ext.flow.update import euler_update
    from hyperflow_ext.models.norm import group_norm_, group_norm_reference
    from hyperflow_ext.prune.flow_ops import flow_step, flow_step_reference
    from hyperflow_ext.prune.masked_ops import (masked_matmul, masked_matmul_grad_input, masked_matmul_reference,
                                                score_mask)
    from hyperflow_ext.sparse import CSRMatrix, csr_conv2d, csr_linear, csr_spmm
    import torch.nn.functional as F

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    PAGE, keep = mmap.PAGESIZE, []

    AT_END = os.environ["FENCE"] == "end"

    def fenced(t):
        """A copy of ``t`` (contiguous) whose storage ends right before a PROT_NONE page (FENCE=end), or
        starts right after one (FENCE=start)."""
        nbytes = t.numel() * t.element_size()
        pages = -(-nbytes // PAGE) + 1
        buf = mmap.mmap(-1, pages * PAGE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        guard = base + (pages - 1) * PAGE if AT_END else base
        assert libc.mprotect(guard, PAGE, 0) == 0, ctypes.get_errno()
        keep.append(buf)
        if nbytes == 0:
            return t.clone()
        offset = (pages - 1) * PAGE - nbytes if AT_END else PAGE
        out = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=offset).view(t.dtype).view(t.shape)
        out.copy_(t)
        assert out.data_ptr() == (guard - nbytes if AT_END else guard + PAGE)
        return out

    def close(a, b, dtype):
        tol = 1e-4 if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)

    g = torch.Generator().manual_seed(0)
    SIZES = (0, 1, 3, 7, 8, 9, 15, 16, 17, 31, 33, 64, 65)
    calls = 0
    for dtype in (torch.float32, torch.float64):
        rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)
        for n in SIZES:  # elementwise kernels
            theta, drift = fenced(rnd(n)), fenced(rnd(n))
            out = fenced(torch.empty(n, dtype=dtype))
            close(euler_update(theta, drift, 0.3, out=out, backend="native"), theta + 0.3 * drift, dtype)
            scores = fenced(rnd(n))
            mask, count = score_mask(scores, backend="native")
            assert torch.equal(mask, scores >= 0) and count == int((scores >= 0).sum())
            w, grad = fenced(rnd(n)), fenced(rnd(n))
            state = [fenced(rnd(n) * 0.01)] + [fenced(torch.zeros(n, dtype=dtype)) for _ in range(3)]
            ref = [t.clone() for t in state]
            gw_out, m_out = fenced(torch.empty(n, dtype=dtype)), fenced(torch.empty(n, dtype=torch.bool))
            gw, _ = flow_step(w, grad, *state, step=1, pressure=1e-3, grad_weight_out=gw_out, mask_out=m_out,
                              backend="native")
            close(gw, flow_step_reference(w, grad, *ref, step=1, pressure=1e-3)[0], dtype)
            calls += 4
        for (rows, cols), k in itertools.product(itertools.product(SIZES[::2], SIZES[::3]), (1, 5, 17)):
            dense = rnd(rows, cols) * (torch.rand(rows, cols, generator=g) < 0.4)
            dense[::3] = 0  # empty rows
            for itype in (torch.int32, torch.int64):
                csr = CSRMatrix.from_dense(dense, index_dtype=itype)
                W = CSRMatrix(fenced(csr.crow_indices), fenced(csr.col_indices), fenced(csr.values), csr.shape)
                b, out = fenced(rnd(cols, k)), fenced(torch.empty(rows, k, dtype=dtype))
                close(csr_spmm(W, b, out=out), dense.double() @ b.double(), dtype)
                x = fenced(rnd(k, cols))
                close(csr_linear(x, W), x.double() @ dense.double().T, dtype)
                calls += 2
            mask = fenced(torch.rand(rows, cols, generator=g) < 0.5)
            wd, x, gout = fenced(rnd(rows, cols)), fenced(rnd(k, cols)), fenced(rnd(k, rows))
            close(masked_matmul(x, wd, mask, backend="native"), masked_matmul_reference(x, wd, mask), dtype)
            close(masked_matmul_grad_input(gout, wd, mask, backend="native"), gout @ (wd * mask), dtype)
            calls += 2
        for n, c, hw, kk in itertools.product((1, 2), (1, 3, 8), (1, 5, 9), (1, 3)):  # convolution, group norm
            if kk > hw:
                continue
            w4 = rnd(5, c, kk, kk) * (torch.rand(5, c, kk, kk, generator=g) < 0.5)
            csr = CSRMatrix.from_dense(w4.reshape(5, -1))
            W = CSRMatrix(fenced(csr.crow_indices), fenced(csr.col_indices), fenced(csr.values), csr.shape)
            x = fenced(rnd(n, c, hw, hw))
            close(csr_conv2d(x, W, kk, padding=kk // 2), F.conv2d(x, w4, padding=kk // 2), dtype)
            xn = rnd(n, c, hw, hw).contiguous(memory_format=torch.channels_last)
            want = group_norm_reference(xn.double(), 1, None, None, 1e-5, True) if n * c * hw * hw > 1 else None
            flat = fenced(xn.permute(0, 2, 3, 1).contiguous()).permute(0, 3, 1, 2)  # the NHWC storage, fenced
            got = group_norm_(flat, 1, None, None, 1e-5, True, backend="native")
            if want is not None:
                close(got, want, dtype)
            calls += 2
        for tasks, p, h in itertools.product((1, 3), (1, 7, 17, 33), (1, 8, 17)):  # fused drift integration
            pw = PackedDrift(*(fenced(t) for t in (rnd(h, p) * 0.3, rnd(h, h) * 0.3, rnd(h), rnd(p, h) * 0.3,
                                                      rnd(p))))
            d, tb, tt = fenced(rnd(tasks, p)), fenced(rnd(tasks, h)), fenced(rnd(3, 4, h))
            got, _ = drift_integrate(pw, d, tb, tt, 0.1, "rk4", backend="native")
            close(got, drift_integrate_reference(pw, d, tb, tt, 0.1, "rk4")[0], dtype)
            calls += 1
    print("ok", calls)
''')


@pytest.mark.parametrize("threads,fence", [("1", "end"), ("2", "end"), ("2", "start")])
def test_no_kernel_reads_or_writes_past_its_operands(tmp_path, threads, fence):
    env = dict(os.environ, OMP_NUM_THREADS=threads, FENCE=fence)
    # cwd outside the checkout, so the child imports the installed package and its native build
    res = subprocess.run([sys.executable, "-X", "faulthandler", "-c", CHILD], capture_output=True, text=True,
                         timeout=600, cwd=tmp_path, env=env)
    assert res.returncode == 0, f"rc {res.returncode} (-11: a kernel touched a guard page)\n{res.stderr[-4000:]}"
    assert res.stdout.split()[0] == "ok" and int(res.stdout.split()[1]) > 1000

"""Fused integration of a packed drift network as one Triton launch: every step, stage and task.

Per task, step ``n`` and stage ``s`` of an explicit Runge–Kutta tableau ``(a, b)``::

    y_s = y + dt * Σ_{j<s} a[s][j] k_j
    k_s = W_out silu(W_mid silu(W_in y_s + task_bias + time_table[n, s]) + b_mid) + b_out
    y  += dt * Σ_s b[s] k_s      unless that increment has a non-finite entry or one above
                                 max_increment: then the task stops for good

Shapes (all contiguous, one dtype: float32 — the tested path — or float64):
``w_in (H, P)``, ``w_mid (H, H)``, ``b_mid (H,)``, ``w_out (P, H)``, ``b_out (P,)``,
``task_bias (tasks, H)``, ``time_table (steps, stages, H)``, ``state (tasks, P)`` updated in place,
``done (tasks,)`` int64: the accepted steps per task.

Grid ``(tasks,)``: one program integrates one task from the first step to the last. Mat-vecs are
tiled by ``BLOCK_P`` / ``BLOCK_K`` with the whole hidden vector (``H`` padded to ``BLOCK_H``, a
power of two) in registers; the stage derivatives ``k_s`` and the first hidden activation go
through a per-task scratch in global memory, with ``tl.debug_barrier()`` wherever a program reads
what it wrote there. CPU tensors run under ``TRITON_INTERPRET=1``.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _silu(x):
    # x / (1 + exp(-x)), as torch writes it
    return x / (1.0 + tl.exp(-x))


@triton.jit
def _increment(k_row, coef_ptr, offs_p, mask_p, P, STAGES: tl.constexpr, BLOCK_P: tl.constexpr,
               acc_ty: tl.constexpr):
    """``Σ_s b_s k_s`` on one tile of parameters (``b`` is stored after the ``a`` matrix)."""
    inc = tl.zeros([BLOCK_P], dtype=acc_ty)
    for s in tl.static_range(STAGES):
        b_s = tl.load(coef_ptr + STAGES * STAGES + s)
        inc += b_s * tl.load(k_row + s * P + offs_p, mask=mask_p, other=0.0)
    return inc


@triton.jit
def fused_drift_kernel(
    # pointers: packed drift (H, P), (H, H), (H,), (P, H), (P,)
    w_in_ptr, w_mid_ptr, b_mid_ptr, w_out_ptr, b_out_ptr,
    # pointers: per-task and per-(step, stage) biases (tasks, H), (steps, STAGES, H)
    task_bias_ptr, time_table_ptr,
    # pointers: state (tasks, P) in/out, accepted steps (tasks,) int64 out
    state_ptr, done_ptr,
    # pointers: scratch (tasks, STAGES, P) stage derivatives, (tasks, BLOCK_H) hidden activations
    k_ptr, h_ptr,
    # pointer: (STAGES * STAGES + STAGES + 1,) dt * a (row-major), dt * b, max_increment
    coef_ptr,
    # sizes
    P, H, steps,
    # meta-parameters
    STAGES: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(axis=0).to(tl.int64)
    acc_ty = state_ptr.dtype.element_ty  # fp32 for fp32 inputs; fp64 inputs accumulate in fp64
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    offs_p0 = tl.arange(0, BLOCK_P)
    offs_k0 = tl.arange(0, BLOCK_K)

    y_row = state_ptr + pid * P
    k_row = k_ptr + pid * STAGES * P
    h_row = h_ptr + pid * BLOCK_H
    tb = tl.load(task_bias_ptr + pid * H + offs_h, mask=mask_h, other=0.0)
    b_mid = tl.load(b_mid_ptr + offs_h, mask=mask_h, other=0.0)
    max_increment = tl.load(coef_ptr + STAGES * STAGES + STAGES)

    n = tl.full((), 0, tl.int32)        # accepted steps
    running = tl.full((), 1, tl.int32)  # 0 once the guard stopped this task
    while (n < steps) & (running != 0):
        for s in tl.static_range(STAGES):
            tl.debug_barrier()  # k_j (j < s) and the state were written by this program
            # h1 = silu(W_in y_s + task_bias + time_table[n, s]); y_s formed tile by tile
            acc = tl.zeros([BLOCK_H], dtype=acc_ty)
            for p0 in range(0, P, BLOCK_P):
                offs_p = p0 + offs_p0
                mask_p = offs_p < P
                ys = tl.load(y_row + offs_p, mask=mask_p, other=0.0)
                for j in tl.static_range(s):
                    a_sj = tl.load(coef_ptr + s * STAGES + j)
                    ys += a_sj * tl.load(k_row + j * P + offs_p, mask=mask_p, other=0.0)
                w = tl.load(w_in_ptr + offs_h[:, None] * P + offs_p[None, :],
                            mask=mask_h[:, None] & mask_p[None, :], other=0.0)
                acc += tl.sum(w * ys[None, :], axis=1)
            tt = tl.load(time_table_ptr + (n * STAGES + s) * H + offs_h, mask=mask_h, other=0.0)
            h1 = tl.where(mask_h, _silu(acc + (tb + tt)), 0.0)
            tl.store(h_row + offs_h, h1)
            tl.debug_barrier()
            # h2 = silu(W_mid h1 + b_mid), h1 read back in BLOCK_K chunks
            acc = tl.zeros([BLOCK_H], dtype=acc_ty)
            for k0 in range(0, H, BLOCK_K):
                offs_k = k0 + offs_k0
                mask_k = offs_k < H
                hk = tl.load(h_row + offs_k, mask=mask_k, other=0.0)
                w = tl.load(w_mid_ptr + offs_h[:, None] * H + offs_k[None, :],
                            mask=mask_h[:, None] & mask_k[None, :], other=0.0)
                acc += tl.sum(w * hk[None, :], axis=1)
            h2 = tl.where(mask_h, _silu(acc + b_mid), 0.0)
            # k_s = W_out h2 + b_out
            for p0 in range(0, P, BLOCK_P):
                offs_p = p0 + offs_p0
                mask_p = offs_p < P
                w = tl.load(w_out_ptr + offs_p[:, None] * H + offs_h[None, :],
                            mask=mask_p[:, None] & mask_h[None, :], other=0.0)
                kv = tl.sum(w * h2[None, :], axis=1) + tl.load(b_out_ptr + offs_p, mask=mask_p, other=0.0)
                tl.store(k_row + s * P + offs_p, kv, mask=mask_p)
        tl.debug_barrier()
        # The guard: count entries of the increment that are non-finite or above max_increment.
        bad = tl.full((), 0, tl.int32)
        for p0 in range(0, P, BLOCK_P):
            offs_p = p0 + offs_p0
            mask_p = offs_p < P
            inc = _increment(k_row, coef_ptr, offs_p, mask_p, P, STAGES, BLOCK_P, acc_ty)
            out_of_bounds = tl.where(tl.abs(inc) <= max_increment, 0, 1)  # NaN compares false
            bad += tl.sum(tl.where(mask_p, out_of_bounds, 0), axis=0)
        running = tl.where(bad == 0, 1, 0)
        # The update, masked off entirely when the step was rejected.
        for p0 in range(0, P, BLOCK_P):
            offs_p = p0 + offs_p0
            mask_p = offs_p < P
            inc = _increment(k_row, coef_ptr, offs_p, mask_p, P, STAGES, BLOCK_P, acc_ty)
            y = tl.load(y_row + offs_p, mask=mask_p, other=0.0)
            accepted = (offs_p0 * 0 + running) != 0  # broadcast explicitly (the interpreter needs it)
            tl.store(y_row + offs_p, y + inc, mask=mask_p & accepted)
        n += running
    tl.store(done_ptr + pid, n.to(tl.int64))


def _check(name, t, shape, dtype, device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fused_drift_integrate: {name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != device or not t.is_contiguous():
        raise ValueError(f"fused_drift_integrate: {name} must be a contiguous {dtype} tensor of shape "
                         f"{tuple(shape)} on {device}, got {t.dtype} {tuple(t.shape)} on {t.device}"
                         f"{'' if t.is_contiguous() else ' (non-contiguous)'}")


def fused_drift_integrate(w, out: torch.Tensor, task_bias: torch.Tensor, time_table: torch.Tensor, dt: float,
                          tab, max_increment: float, done: torch.Tensor) -> torch.Tensor:
    """Launch :func:`fused_drift_kernel`: integrate ``out`` (initialised to ``delta0``) in place.

    Args:
        w: :class:`~hyperflow_ext.flow.drift.PackedDrift`.
        out: ``(tasks, P)`` state, updated in place.
        task_bias: ``(tasks, H)``; time_table: ``(steps, stages, H)``.
        dt: step size. tab: :class:`~hyperflow_ext.flow.solvers.Tableau`.
        max_increment: divergence guard (``inf`` for none).
        done: ``(tasks,)`` int64, receives the accepted steps per task.
    """
    tasks, p = out.shape
    h = w.w_in.shape[0]
    steps, stages = time_table.shape[0], tab.stages
    dev, dtype = out.device, out.dtype
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"fused_drift_integrate: dtype must be float32 or float64, got {dtype}")
    for name, t, shape in (("w_in", w.w_in, (h, p)), ("w_mid", w.w_mid, (h, h)), ("b_mid", w.b_mid, (h,)),
                           ("w_out", w.w_out, (p, h)), ("b_out", w.b_out, (p,)), ("out", out, (tasks, p)),
                           ("task_bias", task_bias, (tasks, h)), ("time_table", time_table, (steps, stages, h))):
        _check(name, t, shape, dtype, dev)
    _check("done", done, (tasks,), torch.int64, dev)
    if steps < 1 or tasks < 1 or p < 1 or h < 1:
        raise ValueError(f"fused_drift_integrate: sizes must be positive, got tasks={tasks}, P={p}, H={h}, "
                         f"steps={steps}")
    if max(h * p, tasks * stages * p, steps * stages * h) >= 2**31:
        raise ValueError("fused_drift_integrate: tensors too large for 32-bit offsets")

    block_h = max(16, triton.next_power_of_2(h))
    block_p = min(max(16, 8192 // block_h), max(16, triton.next_power_of_2(p)))
    block_k = min(block_h, max(16, 8192 // block_h))
    k_scratch = torch.empty(tasks, stages, p, dtype=dtype, device=dev)
    h_scratch = torch.empty(tasks, block_h, dtype=dtype, device=dev)
    big = torch.finfo(dtype).max  # |inc| <= big is false exactly for non-finite entries
    coef = torch.tensor([dt * x for x in tab.a_matrix().reshape(-1).tolist()] + [dt * x for x in tab.b]
                        + [min(float(max_increment), big)], dtype=dtype, device=dev)
    grid = lambda meta: (tasks,)  # noqa: E731
    fused_drift_kernel[grid](
        w.w_in, w.w_mid, w.b_mid, w.w_out, w.b_out, task_bias, time_table, out, done, k_scratch, h_scratch,
        coef, p, h, steps, STAGES=stages, BLOCK_P=block_p, BLOCK_H=block_h, BLOCK_K=block_k, num_warps=4)
    return out


def fused_drift_integrate_reference(w, delta0: torch.Tensor, task_bias: torch.Tensor, time_table: torch.Tensor,
                                    dt: float, tab, max_increment: float):
    """The torch reference: ``(delta, steps_done)`` from :func:`drift_integrate_reference`."""
    from hyperflow_ext.flow.integrate import drift_integrate_reference

    y, done, _ = drift_integrate_reference(w, delta0, task_bias, time_table, dt, tab.name, max_increment)
    return y, done

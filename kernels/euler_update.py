"""Euler update ``out = theta + dt * drift`` as a Triton kernel.

Shapes: ``theta``, ``drift``, ``out``: ``(n,)`` contiguous, float32 or float64.
The smallest kernel of the fused-adaptation family; it proves the Triton path end to end
(GPU, or CPU tensors under ``TRITON_INTERPRET=1``).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def euler_update_kernel(
    # pointers
    theta_ptr, drift_ptr, out_ptr,
    # sizes
    n,
    # scalars
    dt,
    # meta-parameters
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(axis=0)
    offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n
    theta = tl.load(theta_ptr + offsets, mask=mask, other=0.0)
    drift = tl.load(drift_ptr + offsets, mask=mask, other=0.0)
    tl.store(out_ptr + offsets, theta + dt * drift, mask=mask)


def euler_update(theta: torch.Tensor, drift: torch.Tensor, dt: float, out: torch.Tensor) -> torch.Tensor:
    """Launch :func:`euler_update_kernel` on validated, contiguous 1-D tensors."""
    n = theta.numel()
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_SIZE"]),)  # noqa: E731
    euler_update_kernel[grid](theta, drift, out, n, dt, BLOCK_SIZE=1024)
    return out


def euler_update_reference(theta: torch.Tensor, drift: torch.Tensor, dt: float) -> torch.Tensor:
    return theta + dt * drift

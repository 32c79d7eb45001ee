"""The per-call back-end choice of the CPU-first kernels (masked matmuls, CSR linear and convolution).

:func:`hyperflow_ext.native.resolve_backend` holds the rules (explicit ``backend=`` or
``$HYPERFLOW_BACKEND`` wins, a missing back-end that was asked for raises with the original error,
``auto`` falls back to torch with one warning). :func:`pick_backend` answers the common call — CPU
tensors, no override, the extension loaded — without going through them: these ops run once per
training step or inference call, where microseconds of dispatch count.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from . import native

__all__ = ["pick_backend"]

_ENV = "HYPERFLOW_BACKEND"  # forces a back-end for every call (read by native.resolve_backend)


def pick_backend(backend: Optional[str], device: torch.device, op: str) -> str:
    """The back-end of one call of an op that has no Triton implementation.

    Args:
        backend: ``"auto" | "native" | "torch"`` or ``None`` (then ``$HYPERFLOW_BACKEND`` or ``"auto"``).
        device: the device of the operands.
        op: the operation's name, for messages.

    Returns:
        ``"native"`` or ``"torch"``.

    Raises:
        ValueError / NotImplementedError / RuntimeError: as :func:`hyperflow_ext.native.resolve_backend`.
    """
    if backend is None and device.type == "cpu" and _ENV not in os.environ and native.available():
        return "native"
    return native.resolve_backend(backend, device, op, triton_ok=False)

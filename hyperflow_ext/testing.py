"""Pure-PyTorch references of every kernel: the oracles the tests compare the native and Triton paths with.

Each ``<op>_reference`` computes what ``<op>`` computes, in plain PyTorch, with no validation and no
speed in mind. Use them to check a back-end on your own shapes::

    import hyperflow_ext as hf
    torch.testing.assert_close(hf.sparse.csr_spmm(a, b), hf.testing.csr_spmm_reference(a, b))

They live beside their kernels (``hyperflow_ext.sparse.csr``, ``hyperflow_ext.flow.update`` ...);
this namespace gathers them so the kernel namespaces hold only what users call.
"""
from __future__ import annotations

from .flow.integrate import drift_integrate_reference
from .flow.update import euler_update_reference
from .models.norm import group_norm_reference
from .prune.flow_ops import flow_step_reference
from .prune.masked_ops import masked_matmul_grad_input_reference, masked_matmul_reference
from .sparse.conv import csr_conv2d_reference
from .sparse.csr import csr_spmm_reference
from .sparse.linear import csr_linear_reference

__all__ = [
    "csr_spmm_reference", "csr_linear_reference", "csr_conv2d_reference",
    "masked_matmul_reference", "masked_matmul_grad_input_reference",
    "flow_step_reference", "euler_update_reference", "drift_integrate_reference", "group_norm_reference",
]

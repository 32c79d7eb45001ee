"""Sparse formats and kernels for pruned models: CSR SpMM, masked matmuls for training, and
sparse inference layers."""
from .csr import CSRMatrix, csr_spmm, csr_spmm_reference
from .conv import SparseConv2d, csr_conv2d, csr_conv2d_reference
from .linear import SparseLinear, csr_linear, csr_linear_reference
from .masked import (masked_matmul, masked_matmul_grad_input, masked_matmul_grad_input_reference,
                     masked_matmul_reference, score_mask)

__all__ = ["CSRMatrix", "csr_spmm", "csr_spmm_reference", "csr_linear", "csr_linear_reference", "csr_conv2d", "csr_conv2d_reference",
           "SparseLinear", "SparseConv2d", "masked_matmul", "masked_matmul_grad_input",
           "masked_matmul_reference", "masked_matmul_grad_input_reference", "score_mask"]

"""Sparse formats and kernels for pruned models: CSR SpMM, masked matmuls for training, sparse
inference layers (direct sparse convolution, depth-first network execution), and stand-alone export (:func:`sparsify`, :func:`save`,
:func:`load`)."""
from .csr import CSRMatrix, csr_spmm, csr_spmm_reference
from .conv import SparseConv2d, csr_conv2d, csr_conv2d_reference
from .export import CollapsedLayerWarning, DenseConv2d, fold_batchnorm, format_report, sparsify
from .serialize import load, save
from .linear import SparseLinear, csr_linear, csr_linear_reference
from .network import SparseConvNet, fuse_network
from .masked import (masked_matmul, masked_matmul_grad_input, masked_matmul_grad_input_reference,
                     masked_matmul_reference, score_mask)

__all__ = ["CSRMatrix", "csr_spmm", "csr_spmm_reference", "csr_linear", "csr_linear_reference", "csr_conv2d", "csr_conv2d_reference",
           "SparseLinear", "SparseConv2d", "masked_matmul", "masked_matmul_grad_input",
           "masked_matmul_reference", "masked_matmul_grad_input_reference", "score_mask",
           "DenseConv2d", "CollapsedLayerWarning", "fold_batchnorm", "sparsify", "format_report", "save", "load",
           "SparseConvNet", "fuse_network"]

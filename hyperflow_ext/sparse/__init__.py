"""Sparse formats and kernels for pruned models."""
from .csr import CSRMatrix, csr_spmm, csr_spmm_reference

__all__ = ["CSRMatrix", "csr_spmm", "csr_spmm_reference"]

"""Sparse formats and kernels for pruned models: CSR SpMM, sparse inference layers (direct sparse
convolution, depth-first network execution), and stand-alone export (:func:`sparsify`, :func:`save`, :func:`load`).

The masked matmuls that training uses live in :mod:`hyperflow_ext.prune.masked_ops`."""
from .._compat import kept_names
from .csr import CSRMatrix, csr_spmm, csr_spmm_reference
from .conv import SparseConv2d, csr_conv2d, csr_conv2d_reference
from .export import CollapsedLayerWarning, DenseConv2d, fold_batchnorm, format_report, sparsify
from .serialize import load, save
from .linear import SparseLinear, csr_linear, csr_linear_reference
from .fx_passes import fuse_network
from .network import SparseConvNet

# The *_reference oracles stay importable here; hf.testing gathers them, so they are off the surface.
__all__ = ["CSRMatrix", "csr_spmm", "csr_linear", "csr_conv2d", "SparseLinear", "SparseConv2d",
           "DenseConv2d", "CollapsedLayerWarning", "fold_batchnorm", "sparsify", "format_report", "save", "load",
           "SparseConvNet", "fuse_network"]

# The masked training ops moved to hyperflow_ext.prune.masked_ops; the old spellings (hf.sparse.masked_matmul ...)
# keep resolving through the old module, hyperflow_ext.sparse.masked.
__getattr__ = kept_names(__name__, {name: "masked" for name in (
    "masked_matmul", "masked_matmul_grad_input", "masked_matmul_reference", "masked_matmul_grad_input_reference",
    "score_mask")})

"""Helpers shared by the tests: kernel tolerances, random sparse operands, pruned CNNs, tiny pretraining data.

Import with ``tests/`` on ``sys.path`` (pytest puts it there): ``from _helpers import tol, random_csr``.
"""
from typing import Optional, Tuple

import torch
from torch import nn

from hyperflow_ext.prune.cnns import apply_masks, magnitude_masks, randomize_batchnorm
from hyperflow_ext.sparse import CSRMatrix

#: assert_close tolerances of a kernel against its pure-torch reference, per dtype.
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def tol(dtype: torch.dtype) -> dict:
    """``rtol`` / ``atol`` for comparing a kernel's ``dtype`` result with its reference."""
    return TOL[dtype]


def random_sparse(*shape: int, density: float = 0.3, dtype: torch.dtype = torch.float32, seed: int = 0,
                  generator: Optional[torch.Generator] = None, empty_rows: bool = False) -> torch.Tensor:
    """A dense tensor with about ``density`` of its entries nonzero (standard normal values).

    Values are drawn in float64 and cast, so the same seed gives the same matrix at every dtype.
    ``generator`` overrides ``seed``; ``empty_rows`` zeroes every third row (along the first dim).
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, dtype=torch.float64, generator=gen)
    w = w * (torch.rand(*shape, dtype=torch.float64, generator=gen) < density)
    if empty_rows and shape[0]:
        w[::3] = 0
    return w.to(dtype)


def random_csr(rows: int, cols: int, density: float, dtype: torch.dtype = torch.float32,
               index_dtype: torch.dtype = torch.int32, **kwargs) -> Tuple[torch.Tensor, CSRMatrix]:
    """``(dense, CSRMatrix of dense)`` for a :func:`random_sparse` ``rows x cols`` matrix (its keywords pass on)."""
    dense = random_sparse(rows, cols, density=density, dtype=dtype, **kwargs)
    return dense, CSRMatrix.from_dense(dense, index_dtype=index_dtype)


def pruned_cnn(cls: type, sparsity: float = 0.9, seed: int = 0, dtype: torch.dtype = torch.float32,
               **kwargs) -> nn.Module:
    """``cls(**kwargs)`` in eval mode with random BatchNorm statistics and its weights magnitude-pruned to
    ``sparsity`` per layer (the export and depth-first tests' model)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = cls(**kwargs).to(dtype)
    randomize_batchnorm(model, gen)
    apply_masks(model, magnitude_masks(model, sparsity))
    return model.eval()


# ---- tiny pretraining data (model and file-integrity tests) -------------------------------------

class DuckDataset:
    """Stand-in for hyperflow_ext.data.ImageDataset (duck-typed)."""

    def __init__(self, images, labels, num_classes, domain="synthetic"):
        self.images, self.labels, self.num_classes = images, labels, num_classes
        self.class_names = [str(i) for i in range(num_classes)]
        self.domain = domain


def quadrant_dataset(quadrants, per_class, seed, noise=0.25):
    """Class i = a bright 10x10 square in quadrant ``quadrants[i]`` of a 28x28 image, plus noise."""
    g = torch.Generator().manual_seed(seed)
    k = len(quadrants)
    labels = torch.arange(k).repeat_interleave(per_class)
    images = noise * torch.rand(k * per_class, 1, 28, 28, generator=g)
    for i, q in enumerate(quadrants):
        r, c = 2 + 14 * (q // 2), 2 + 14 * (q % 2)
        images[labels == i, :, r:r + 10, c:c + 10] += 0.75
    return DuckDataset(images.clamp(0, 1), labels, k)


def two_domains(per_class=24):
    """Two tiny domains of two classes each (quadrants 0/1 and 2/3)."""
    return [quadrant_dataset([0, 1], per_class, seed=1),
            quadrant_dataset([2, 3], per_class, seed=2)]


#: The model tests' tiny pretraining: a narrow Conv4, two epochs.
FAST_PRETRAIN = dict(backbone_kw={"hidden": 8}, epochs=2, batch_size=32)

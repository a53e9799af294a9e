"""Sparse execution: compressed weight formats, their PyTorch references, Triton kernels, SparseLinear,
and the compressed-tensors checkpoint layout they are saved in and loaded from."""

from .compressed import export as export_compressed
from .formats import SEGMENT, Bitmap, Sparse24, choose_format, reference_matmul
from .linear import SparseLinear
from .swap import SparsifyReport, restore_sparse, sparse_layers, sparsify
from .triton_ops import HAVE_TRITON

__all__ = [
    "HAVE_TRITON",
    "SEGMENT",
    "Bitmap",
    "SparseLinear",
    "Sparse24",
    "SparsifyReport",
    "choose_format",
    "export_compressed",
    "reference_matmul",
    "restore_sparse",
    "sparse_layers",
    "sparsify",
]

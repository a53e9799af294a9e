"""Sparse execution: compressed weight formats (one file each, named in ``registry.py``) with their
PyTorch references and kernels, SparseLinear, and the compressed-tensors checkpoint layout they are
saved in and loaded from."""

from .bitmap import SEGMENT, Bitmap
from .compressed import export as export_compressed
from .formats import SparseFormat, reference_matmul
from .linear import SparseLinear
from .nm48 import Nm48
from .nm816 import Nm816
from .registry import choose_format
from .sparse24 import Sparse24
from .swap import SparsifyReport, restore_sparse, sparse_layers, sparsify
from .triton_ops import HAVE_TRITON

__all__ = [
    "HAVE_TRITON",
    "SEGMENT",
    "Bitmap",
    "Nm48",
    "Nm816",
    "SparseFormat",
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

"""Names of the unstructured / N:M methods, resolved lazily so each method stays its own file."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ..errors import UsageError

if TYPE_CHECKING:  # the names are read by the CLI's --help, which must not import torch
    from .base import SparsityMethod

METHODS: dict[str, str] = {
    "magnitude": "secateurs.sparsity.magnitude:Magnitude",
    "wanda": "secateurs.sparsity.wanda:Wanda",
    "sparsegpt": "secateurs.sparsity.sparsegpt:SparseGPT",
    "ria": "secateurs.sparsity.ria:RIA",
}


def method_names() -> list[str]:
    return list(METHODS)


def method_class(name: str) -> type[SparsityMethod]:
    if name not in METHODS:
        raise UsageError(f"unknown method {name!r}; use one of {', '.join(METHODS)}")
    module, attr = METHODS[name].split(":")
    return getattr(importlib.import_module(module), attr)

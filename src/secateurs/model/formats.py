"""Saved-folder layouts that load as the stock model and then need some modules put back (the sparse
export of :mod:`secateurs.kernels`, the ``block_configs`` layout of :mod:`secateurs.model.deci`): each
is a :class:`FolderFormat` that the package writing it registers here. The modules that register one
are named in :data:`FOLDER_FORMAT_MODULES` and imported by name the first time a folder is inspected,
so this layer imports no upper one and ``import secateurs`` no kernel code.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class FolderFormat:
    """A saved-folder layout that loads as the stock model and then needs some modules put back.

    ``detect(folder)`` says whether a folder is one (before loading: its replaced weights are missing on
    purpose, so transformers' "missing weights" warning is silenced); ``restore(model, folder, dtype)``
    puts them back into the freshly loaded model. ``config_keys``: config entries that describe those
    weights (compressed-tensors' ``quantization_config``), hidden from ``from_pretrained`` so it neither
    needs nor acts on the package that wrote them; ``restore`` sets what the model should keep.
    ``config(folder)``: for a layout whose config.json ``transformers`` cannot read without the folder's
    code (``block_configs``), the config the package rebuilds the model from instead; the model is then
    always built by the package's code, whatever ``trust_remote_code`` says.
    """

    name: str
    detect: Callable[[Path], bool]
    restore: Callable[[nn.Module, Path, torch.dtype], object]
    config_keys: tuple[str, ...] = ()
    config: Callable[[Path], object] | None = None


FOLDER_FORMATS: dict[str, FolderFormat] = {}

FOLDER_FORMAT_MODULES: tuple[str, ...] = ("secateurs.kernels.swap", "secateurs.kernels.compressed", "secateurs.model.deci")
"""Modules that register a folder format when imported; named, not imported, so that loading the
package (and ``secateurs --help``) does not import the kernels and Triton."""


def register_folder_format(fmt: FolderFormat) -> None:
    """Make :func:`load_model` restore folders of ``fmt`` (called by the package that writes them)."""
    FOLDER_FORMATS[fmt.name] = fmt


def folder_formats() -> dict[str, FolderFormat]:
    """Every registered folder format, importing :data:`FOLDER_FORMAT_MODULES` first (once: later
    imports are no-ops), so a folder is never inspected before its format is known."""
    for module in FOLDER_FORMAT_MODULES:
        importlib.import_module(module)
    return FOLDER_FORMATS


def _own_config(folder: Path):
    """The config a :class:`FolderFormat` reads itself from ``folder`` (``block_configs``), else None."""
    for fmt in folder_formats().values():
        if fmt.config is not None and fmt.detect(folder):
            return fmt.config(folder)
    return None

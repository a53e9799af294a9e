"""Names of the layer-importance criteria, resolved lazily so each stays its own file."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ..errors import UsageError

if TYPE_CHECKING:  # the names are read by the CLI's --help, which must not import torch
    from .base import LayerScorer

SCORERS: dict[str, str] = {
    "gradmap": "secateurs.depth.gradmap:GradMAP",
    "block-influence": "secateurs.depth.block_influence:BlockInfluence",
    "angular": "secateurs.depth.angular:Angular",
    "taylor": "secateurs.depth.taylor:Taylor",
    "ppl": "secateurs.depth.ppl:Perplexity",
}


def scorer_names() -> list[str]:
    return list(SCORERS)


def scorer_class(name: str) -> type[LayerScorer]:
    if name not in SCORERS:
        raise UsageError(f"unknown layer-pruning method {name!r}; use one of {', '.join(SCORERS)}")
    module, attr = SCORERS[name].split(":")
    return getattr(importlib.import_module(module), attr)

"""Names of the width-pruning methods and targets: what the CLI's ``--help`` lists, importable without
torch. :func:`method_class` resolves a name to its class, lazily, so each method stays its own file."""

from __future__ import annotations

import importlib

from ..errors import UsageError

METHODS: dict[str, str] = {
    "llm-pruner": "secateurs.structured.llm_pruner:LLMPruner",
    "wanda-sp": "secateurs.structured.wanda_sp:WandaSP",
    "flap": "secateurs.structured.flap:FLAP",
    "magnitude": "secateurs.structured.magnitude:MagnitudeWidth",
}

TARGET_NAMES = ("heads", "channels", "both")
"""What a width prune (or LoRAPrune's structured mode) removes: attention heads, MLP channels or both."""
TARGETS = dict(zip(TARGET_NAMES, (("heads",), ("channels",), ("heads", "channels")), strict=True))
MODES = ("uniform", "global")
AGGREGATES = ("sum", "prod", "max")


def method_names() -> list[str]:
    return list(METHODS)


def method_class(name: str) -> type:
    """The width method (a :class:`secateurs.structured.base.WidthMethod` subclass) named ``name``."""
    if name not in METHODS:
        raise UsageError(f"unknown width method {name!r}; use one of {', '.join(METHODS)}")
    module, attr = METHODS[name].split(":")
    return getattr(importlib.import_module(module), attr)

"""Names of the width-pruning methods and targets: what the CLI's ``--help`` lists, importable without
torch. :func:`secateurs.structured.base.method_class` resolves a name to its class, lazily, so each
method stays its own file."""

from __future__ import annotations

METHODS: dict[str, str] = {
    "llm-pruner": "secateurs.structured.llm_pruner:LLMPruner",
    "wanda-sp": "secateurs.structured.wanda_sp:WandaSP",
    "flap": "secateurs.structured.flap:FLAP",
    "magnitude": "secateurs.structured.magnitude:MagnitudeWidth",
}

TARGET_NAMES = ("heads", "channels", "both")
"""What a width prune (or LoRAPrune's structured mode) removes: attention heads, MLP channels or both."""


def method_names() -> list[str]:
    return list(METHODS)

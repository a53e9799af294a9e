"""secateurs: prune large language models and measure honestly what it cost and what it won."""

import importlib
import importlib.util
from typing import Any

# Public name -> the module defining it, imported on first use (PEP 562): `import secateurs` and the
# CLI's --help stay free of torch, transformers and the kernels, which the verbs import when called.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(
        ("PruneConfig", "PruneReport", "drop_layers_streamed", "evaluate_perplexity", "experts", "generate", "loraprune",
         "prune", "prune_iterative", "prune_layers", "prune_streamed", "recover", "save", "shear", "width"),
        "secateurs.api",
    ),
    "CalibConfig": "secateurs.data.calib",
    "LayerConfig": "secateurs.depth.prune",
    "LayerReport": "secateurs.depth.prune",
    "EngineOptions": "secateurs.engine.sequential",
    "NumericalError": "secateurs.errors",
    "SecateursError": "secateurs.errors",
    "UsageError": "secateurs.errors",
    "Generation": "secateurs.evaluate.generate",
    "ZeroShot": "secateurs.evaluate.zeroshot",
    "zero_shot": "secateurs.evaluate.zeroshot",
    "LoadedModel": "secateurs.model.load",
    "ExpertConfig": "secateurs.moe.config",
    "ExpertReport": "secateurs.moe.prune",
    "load_model": "secateurs.model.load",
    "run": "secateurs.recipe",
    "RecoverConfig": "secateurs.recover.lora",
    "RecoverReport": "secateurs.recover.lora",
    "LoRAPruneConfig": "secateurs.recover.loraprune",
    "write_report": "secateurs.report",
    "load_run": "secateurs.runs",
    "WidthConfig": "secateurs.structured.base",
    "WidthReport": "secateurs.structured.base",
    "ShearConfig": "secateurs.structured.shearing",
    "ShearReport": "secateurs.structured.shearing",
    "ShearTarget": "secateurs.structured.shearing",
}


def __getattr__(name: str) -> Any:
    """``secateurs.<name>``: import the defining module the first time a public name is used; a
    subpackage (``secateurs.stages``) is imported on first use too, as an eager package would have it."""
    module = _EXPORTS.get(name)
    if module is None:
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f"{__name__}.{name}")
        raise AttributeError(f"module 'secateurs' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__all__ = [
    "CalibConfig",
    "ExpertConfig",
    "ExpertReport",
    "EngineOptions",
    "Generation",
    "LayerConfig",
    "LayerReport",
    "LoRAPruneConfig",
    "LoadedModel",
    "NumericalError",
    "PruneConfig",
    "PruneReport",
    "RecoverConfig",
    "RecoverReport",
    "SecateursError",
    "ShearConfig",
    "ShearReport",
    "ShearTarget",
    "UsageError",
    "ZeroShot",
    "WidthConfig",
    "WidthReport",
    "drop_layers_streamed",
    "evaluate_perplexity",
    "experts",
    "generate",
    "load_model",
    "load_run",
    "loraprune",
    "prune",
    "prune_iterative",
    "prune_layers",
    "prune_streamed",
    "recover",
    "run",
    "save",
    "shear",
    "write_report",
    "zero_shot",
    "width",
]

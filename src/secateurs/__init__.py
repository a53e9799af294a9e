"""secateurs: prune large language models and measure honestly what it cost and what it won."""

from . import (
    kernels as kernels,  # registers the sparse-export folder format that load_model restores
)
from .api import (
    PruneConfig,
    PruneReport,
    drop_layers_streamed,
    evaluate_perplexity,
    loraprune,
    prune,
    prune_iterative,
    prune_layers,
    prune_streamed,
    recover,
    save,
    shear,
    width,
)
from .data.calib import CalibConfig
from .depth.prune import LayerConfig, LayerReport
from .engine.sequential import EngineOptions
from .errors import NumericalError, SecateursError, UsageError
from .evaluate.zeroshot import ZeroShot, zero_shot
from .model.load import LoadedModel, load_model
from .recipe import run
from .recover.lora import RecoverConfig, RecoverReport
from .recover.loraprune import LoRAPruneConfig
from .report import write_report
from .runs import load_run
from .structured.base import WidthConfig, WidthReport
from .structured.shearing import ShearConfig, ShearReport, ShearTarget

__all__ = [
    "CalibConfig",
    "EngineOptions",
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

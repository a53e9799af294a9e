"""Stages: one spec per stage kind, shared by the CLI commands and the recipe runner.

Each spec names its config (``PruneRequest``, ``EvalRequest``, ...: the whole request, whose fields
are the command's flags and a recipe stage's keys, :mod:`secateurs.schema`), checks it against the
model before any weight loads, and runs the one load → verb → evaluate → save flow
(:mod:`secateurs.stages.base`). From Python::

    from secateurs import stages
    stages.run(stages.STAGES["prune"].parse("smollm2-135m", "out", method="wanda", calib="wikitext2"))
"""

from __future__ import annotations

from .base import Outcome, Stage, StageConfig, Table, check, run, run_command
from .experts import ExpertsStage
from .export import ExportStage
from .generate import GenerateStage
from .groups import Evaluation, LoadOptions
from .layers import LayersStage
from .measure import BenchStage, EvalStage
from .prune import PruneStage
from .recover import RecoverStage
from .shear import ShearStage
from .width import WidthStage

# In the order a recipe may chain them (and `secateurs run --help` lists them).
STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (LayersStage(), WidthStage(), ExpertsStage(), PruneStage(), ShearStage(), RecoverStage(), EvalStage(),
                  BenchStage(), ExportStage(), GenerateStage())
}

__all__ = ["STAGES", "Evaluation", "LoadOptions", "Outcome", "Stage", "StageConfig", "Table", "check", "run",
           "run_command"]

"""Stages: one spec per stage kind, shared by the CLI commands and the recipe runner.

Each spec parses its flags (today's CLI flag names, which are also a recipe stage's keys) into the
typed configs of the Python API, checks them before any weight loads, and runs the one
load → verb → evaluate → save flow (:mod:`secateurs.stages.base`). From Python::

    from secateurs import stages
    stages.run(stages.STAGES["prune"].parse("smollm2-135m", "out", method="wanda", calib="wikitext2"))
"""

from __future__ import annotations

from .base import Evaluation, Outcome, Request, Stage, StageConfig, Table, check, run
from .layers import LayersStage
from .measure import BenchStage, EvalStage
from .prune import PruneStage
from .recover import RecoverStage
from .shear import ShearStage
from .width import WidthStage

# In the order a recipe may chain them (and `secateurs run --help` lists them).
STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (LayersStage(), WidthStage(), PruneStage(), ShearStage(), RecoverStage(), EvalStage(), BenchStage())
}

__all__ = ["STAGES", "Evaluation", "Outcome", "Request", "Stage", "StageConfig", "Table", "check", "run"]

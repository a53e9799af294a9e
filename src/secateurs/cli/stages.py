"""The stage commands (layers, width, prune, shear, recover, eval, bench): one per spec in
:data:`secateurs.stages.STAGES`, so a command's flags are exactly a recipe stage's keys."""

from __future__ import annotations

from ..stages import STAGES
from .app import stage_command

for _stage in STAGES.values():
    stage_command(_stage)

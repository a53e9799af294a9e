"""Users' scripts and recipes keep working: every command's flag names and every stage's recipe keys
are compared with a snapshot taken before the stages' schemas moved from ``parse`` signatures into
their configs (issue 30). A flag may be added (update the snapshot on purpose); none may vanish or
be renamed silently."""

from __future__ import annotations

import json
from pathlib import Path

import typer.main

from secateurs.cli import app
from secateurs.recipe import stage_keys
from secateurs.stages import STAGES

SNAPSHOT = json.loads((Path(__file__).parent / "cli_flags.json").read_text())


def _spellings(command) -> list[str]:
    """A command's option spellings (``--x`` and ``--no-x``) and its arguments' metavars."""
    return sorted(
        spelling
        for param in command.params
        for spelling in (param.opts + param.secondary_opts if param.param_type_name == "option" else [param.name.upper()])
    )


def test_every_command_keeps_its_flag_names():
    commands = typer.main.get_command(app).commands
    assert {name: _spellings(command) for name, command in sorted(commands.items())} == SNAPSHOT["flags"]


def test_every_stage_keeps_its_recipe_keys():
    assert {name: sorted(stage_keys(name)) for name in STAGES} == SNAPSHOT["recipe_keys"]

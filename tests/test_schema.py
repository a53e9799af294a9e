"""Configs are the schema (issue 30): a converted stage's flags, their defaults and help, and its recipe
keys all come from its config's fields, so a default is written once and a typo is still caught."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import typer.main
from typer.testing import CliRunner

from secateurs import schema
from secateurs.cli import app
from secateurs.errors import UsageError
from secateurs.recipe import load_recipe, stage_flags
from secateurs.stages import STAGES

CONVERTED = [name for name, stage in STAGES.items() if stage.config_class is not None]


def _field(cls: type, path: tuple[str, ...]) -> dataclasses.Field:
    """The (nested) config field a flag's value goes to."""
    for name in path[:-1]:
        cls = next(f for f in dataclasses.fields(cls) if f.name == name).metadata[schema.GROUP].cls
    return next(f for f in dataclasses.fields(cls) if f.name == path[-1])


def test_every_stage_is_converted():
    assert set(CONVERTED) == set(STAGES)


@pytest.mark.parametrize("name", CONVERTED)
def test_every_cli_default_is_its_config_fields_default(name):
    config_class = STAGES[name].config_class
    command = typer.main.get_command(app).commands[name]
    cli_defaults = {param.name: param.default for param in command.params}
    for flag in schema.flags(config_class).values():
        if flag.required:
            continue
        assert cli_defaults[flag.name] == flag.default, flag.name
        for path in flag.paths:
            field = _field(config_class, path)
            default, _ = schema._default(field)
            if flag.stage_default:  # the stage's own default, written once in its group() call
                continue
            if field.metadata.get(schema.HELP) and field.metadata[schema.HELP].parse is not None:
                assert flag.default is None, flag.name  # absent: the field keeps its default
            elif path[0] not in ("calib",) or path[-1] != "source":  # --calib absent means no calibration
                assert flag.default == default, flag.name


def test_prune_help_lists_every_config_field():
    result = CliRunner().invoke(app, ["prune", "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    for flag in schema.flags(STAGES["prune"].config_class).values():
        spelling = flag.name.upper() if flag.argument else (flag.decls or (f"--{flag.name.replace('_', '-')}",))[0]
        assert spelling.lower() in result.output.lower(), spelling
        assert flag.help[:40] in result.output, flag.name


@pytest.mark.parametrize(("stage", "message"), [
    ({"prune": {"sparsty": 0.5}}, "stage 1 (prune): unknown key 'sparsty'; did you mean 'sparsity'?"),
    ({"prune": {"n_sampels": 4}}, "stage 1 (prune): unknown key 'n_sampels'; did you mean 'n_samples'?"),
    ({"eval": {"limit_window": 4}}, "stage 1 (eval): unknown key 'limit_window'; did you mean 'limit_windows'?"),
])
def test_recipe_key_typo_gets_did_you_mean(tmp_path, stage, message):
    with pytest.raises(UsageError) as error:
        load_recipe({"model": "smollm2-135m", "stages": [stage], "out": str(tmp_path / "o")})
    assert message in str(error.value)


def test_recipe_keys_are_the_config_flags():
    for name in CONVERTED:
        assert list(stage_flags(name)) == list(schema.flags(STAGES[name].config_class))


def test_build_refuses_an_unknown_option_and_validates_once():
    prune = STAGES["prune"]
    with pytest.raises(UsageError, match="did you mean 'pattern'"):
        prune.parse("m", "o", patern="2:4")
    with pytest.raises(UsageError, match="--export 'zip' is not known"):
        prune.parse("m", "o", export="zip")


def test_a_shared_flag_with_two_defaults_is_refused():
    @dataclasses.dataclass
    class A:
        device: str = schema.option("auto", "where")

    @dataclasses.dataclass
    class B:
        device: str = schema.option("cpu", "where")

    @dataclasses.dataclass
    class Both:
        a: A = schema.group(A)
        b: B = schema.group(B)

    with pytest.raises(TypeError, match="two defaults"):
        schema.flags(Both)


def test_configs_import_without_torch():
    code = ("import sys, secateurs.stages, secateurs.sparsity.config, secateurs.data.config, secateurs.engine.options; "
            "print(sorted(m for m in ('torch', 'transformers', 'triton') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"

"""The Python API is the spine: the CLI and recipes run the same stage specs over the same verbs, with
the same (paper) defaults, and the recipe runner never needs the command line."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file
from tiny_models import tiny_model
from typer.testing import CliRunner

import secateurs
from secateurs.cli import app
from secateurs.errors import UsageError
from secateurs.recipe import load_recipe, stage_flags
from secateurs.stages import STAGES

runner = CliRunner()


@pytest.fixture()
def tiny(tmp_path):
    loaded = tiny_model("llama", num_hidden_layers=4)
    folder = tmp_path / "tiny"
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    return folder, text


def _same_weights(a, b) -> None:
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert first.keys() == second.keys() and all((first[k] == second[k]).all() for k in first)


def _last_stage(folder) -> dict:
    return json.loads((folder / "secateurs.json").read_text())["stages"][-1]


def test_width_through_the_api_equals_the_cli_with_the_papers_calibration(tmp_path, tiny):
    folder, text = tiny
    loaded = secateurs.load_model(str(folder))
    report = secateurs.width(loaded, secateurs.WidthConfig("wanda-sp", 0.25), str(text), "cpu")
    assert (report.calibration.n_samples, report.calibration.seq_len) == (128, 128)  # Wanda-SP's, not 128 × 2048
    secateurs.save(loaded, tmp_path / "api", [report])
    result = runner.invoke(app, ["width", str(folder), "--out", str(tmp_path / "cli"), "--method", "wanda-sp",
                                 "--ratio", "0.25", "--calib", str(text), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    _same_weights(tmp_path / "api", tmp_path / "cli")
    api_stage, cli_stage = _last_stage(tmp_path / "api"), _last_stage(tmp_path / "cli")
    assert api_stage["calibration"] == cli_stage["calibration"]
    assert api_stage["widths"] == cli_stage["widths"] and api_stage["achieved"] == cli_stage["achieved"]


def test_layers_through_the_api_writes_the_cli_outputs_plot_included(tmp_path, tiny):
    folder, text = tiny
    loaded = secateurs.load_model(str(folder))
    config = secateurs.LayerConfig("block-influence", remove=1)
    report = secateurs.prune_layers(loaded, config, secateurs.CalibConfig(str(text), 4, 32), "cpu")
    secateurs.save(loaded, tmp_path / "api", [report])
    result = runner.invoke(app, ["layers", str(folder), "--out", str(tmp_path / "cli"), "--method", "block-influence",
                                 "--remove", "1", "--calib", str(text), "--n-samples", "4", "--seq-len", "32",
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    _same_weights(tmp_path / "api", tmp_path / "cli")
    assert _last_stage(tmp_path / "api")["removed_layers"] == _last_stage(tmp_path / "cli")["removed_layers"]
    assert (tmp_path / "api" / "layer_scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "cli" / "layer_scores.png").is_file()


def test_recover_defaults_are_the_configs(tmp_path, tiny):
    folder, _ = tiny
    out = tmp_path / "o"
    parse = STAGES["recover"].parse
    loraprune = parse(str(folder), str(out), method="loraprune").train
    assert loraprune.lr == secateurs.LoRAPruneConfig().train_config().lr == 3e-4  # LoRAPrune's released code
    assert parse(str(folder), str(out)).train.lr == secateurs.RecoverConfig().lr == 1e-4  # LLM-Pruner
    assert parse(str(folder), str(out), method="loraprune", lr=5e-5).train.lr == 5e-5
    assert loraprune.checkpoint_dir == f"{out.resolve()}.ckpt"


def test_cli_options_are_the_stage_flags():
    """One definition: each command's parameters are its stage spec's flags, i.e. a recipe stage's keys."""
    commands = {info.name: info.callback for info in app.registered_commands}
    for name in STAGES:
        assert list(inspect.signature(commands[name]).parameters) == list(stage_flags(name))


@pytest.mark.parametrize(("stage", "message"), [
    ({"width": {"ratoi": 0.2}}, "stage 1 (width): unknown key 'ratoi'; did you mean 'ratio'?"),
    ({"recover": {"setps": 5}}, "stage 1 (recover): unknown key 'setps'; did you mean 'steps'?"),
])
def test_recipe_unknown_key_gets_did_you_mean(tmp_path, tiny, stage, message):
    folder, _ = tiny
    with pytest.raises(UsageError) as error:
        load_recipe({"model": str(folder), "stages": [stage], "out": str(tmp_path / "o")})
    assert message in str(error.value)


def test_recipe_runner_does_not_import_the_cli():
    code = ("import sys, secateurs, secateurs.recipe, secateurs.stages; "
            "print(sorted(m for m in sys.modules if m == 'secateurs.cli' or m.startswith('secateurs.cli.')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"

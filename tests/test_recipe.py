"""Recipes: end to end on a tiny model, equal to the CLI calls, validation errors, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from tiny_models import tiny_model
from typer.testing import CliRunner

from secateurs.cli import app
from secateurs.errors import UsageError
from secateurs.recipe import load_recipe, run
from secateurs.runs import load_chain

runner = CliRunner()


@pytest.fixture()
def setup(tmp_path):
    loaded = tiny_model("llama", num_hidden_layers=4)
    folder = tmp_path / "tiny"
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 300)
    return folder, text


def recipe_dict(folder, text, out, stages=None):
    return {
        "model": str(folder),
        "calib": {"source": str(text), "n_samples": 4, "seq_len": 32, "seed": 0},
        "stages": stages
        or [
            {"layers": {"method": "block-influence", "remove": 1, "device": "cpu"}},
            {"prune": {"method": "magnitude", "sparsity": 0.5, "pattern": "2:4", "device": "cpu"}},
            {"eval": {"ppl": [str(text)], "seq_len": 32, "device": "cpu"}},
        ],
        "out": str(out),
    }


def test_recipe_end_to_end_and_resume(tmp_path, setup):
    folder, text = setup
    out = tmp_path / "run"
    record = run(recipe_dict(folder, text, out), echo=lambda _: None)
    assert [s["stage"] for s in record["stages"]] == ["layers", "prune", "eval"]
    final = json.loads((out / "secateurs.json").read_text())
    assert final["stages"][2]["results"]["perplexity"][str(text)]["ppl"] > 1
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    weights = load_file(out / "model.safetensors")
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    assert (q == 0).float().mean().item() == pytest.approx(0.5)

    chain = load_chain(out)
    assert [r.label for r in chain] == ["01-layers", "02-prune", "03-eval"]
    assert chain[1].method == "magnitude 2:4" and chain[1].removed == pytest.approx(0.5)
    assert chain[2].perplexity[str(text)] == final["stages"][2]["results"]["perplexity"][str(text)]["ppl"]
    assert chain[0].params is not None and chain[0].params == chain[1].params

    lines: list[str] = []
    run(recipe_dict(folder, text, out), echo=lines.append)
    assert all("reusing" in line for line in lines)

    changed = recipe_dict(folder, text, out)
    changed["stages"][1]["prune"]["pattern"] = "4:8"
    lines.clear()
    run(changed, echo=lines.append)
    assert "reusing" in lines[0] and "running" in lines[1] and "running" in lines[2]


def test_recipe_equals_cli_calls(tmp_path, setup):
    folder, text = setup
    stage = {"method": "magnitude", "sparsity": 0.6, "device": "cpu"}
    run(recipe_dict(folder, text, tmp_path / "r", [{"prune": stage}]), echo=lambda _: None)
    result = runner.invoke(app, ["prune", str(folder), "--out", str(tmp_path / "c"), "--method", "magnitude",
                                 "--sparsity", "0.6", "--device", "cpu", "--calib", str(text),
                                 "--n-samples", "4", "--seq-len", "32"])
    assert result.exit_code == 0, result.output
    a, b = load_file(tmp_path / "r" / "model.safetensors"), load_file(tmp_path / "c" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([{"prune": {"sparsty": 0.5}}], "stage 1 (prune): unknown key 'sparsty'; did you mean 'sparsity'?"),
        ([{"prnue": {}}], "stage 1: unknown stage 'prnue'; did you mean 'prune'?"),
        ([{"prune": {"n_samples": "many"}}], "stage 1 (prune): n_samples must be an integer"),
        ([{"prune": {"out": "x"}}], "set by the recipe runner"),
        ([{"prune": {}}, {"width": {"ratio": 0.2}}], "stage 2 (width): structured pruning after stage 1 (prune)"),
    ],
)
def test_validation_errors(tmp_path, setup, stages, message):
    folder, text = setup
    with pytest.raises(UsageError) as error:
        load_recipe(recipe_dict(folder, text, tmp_path / "o", stages))
    assert message in str(error.value)
    assert not (tmp_path / "o").exists()


def test_cli_run_dry_run_and_errors(tmp_path, setup):
    folder, text = setup
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(folder, text, tmp_path / "o")))
    result = runner.invoke(app, ["run", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "01-layers" in result.output and "run" in result.output
    assert not (tmp_path / "o").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**recipe_dict(folder, text, tmp_path / "o"), "stagez": []}))
    result = runner.invoke(app, ["run", str(bad)])
    assert result.exit_code == 2 and "did you mean 'stages'" in result.output


def test_width_ratio_breaking_nm(tmp_path, setup):
    folder, text = setup
    stages = [{"width": {"ratio": 0.3, "target": "channels"}}, {"prune": {"pattern": "2:4"}}]
    with pytest.raises(UsageError, match=r"stage 1 \(width\): ratio 0.3 leaves 90 MLP channels, not a multiple of 4"):
        load_recipe(recipe_dict(folder, text, tmp_path / "o", stages))
    stages = [{"width": {"ratio": 0.25, "target": "channels"}}, {"prune": {"pattern": "2:4"}}]
    load_recipe(recipe_dict(folder, text, tmp_path / "o", stages))
    stages = [{"width": {"ratio": 0.3, "target": "channels", "round_to": 4}}, {"prune": {"pattern": "2:4"}}]
    load_recipe(recipe_dict(folder, text, tmp_path / "o", stages))


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_example_recipes_validate(path, tmp_path):
    """The shipped examples use only keys and values the CLI accepts (they are checked, not just run once)."""
    recipe = load_recipe(path, out=tmp_path / "o")
    assert recipe.stages and all(stage.command for stage in recipe.stages)

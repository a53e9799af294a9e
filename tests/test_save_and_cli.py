"""Save / reload round trip, secateurs.json, and the CLI's one-line errors (exit 2, nothing written)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import random_ids, tiny_model
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from secateurs.api import PruneConfig, prune, save
from secateurs.cli import app
from secateurs.engine.sequential import EngineOptions
from secateurs.errors import UsageError
from secateurs.model.load import load_model

runner = CliRunner()


def test_round_trip_keeps_weights_and_records(tmp_path, tiny_folder):
    loaded = load_model(str(tiny_folder))
    report = prune(loaded, PruneConfig("magnitude", 0.5), None, EngineOptions(device="cpu"))
    out = save(loaded, tmp_path / "out", [report.stage_record()], {"note": 1})
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for (name, a), (_, b) in zip(loaded.model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    record = json.loads((out / "secateurs.json").read_text())
    stage = record["stages"][-1]
    assert stage["method"] == "magnitude" and stage["achieved_sparsity"]["mean"] == pytest.approx(0.5, abs=0.01)
    assert record["versions"]["torch"] and record["results"] == {"note": 1}
    assert not list(tmp_path.glob(".out.tmp-*"))
    again = load_model(str(out))
    report2 = prune(again, PruneConfig("magnitude", 0.6), None, EngineOptions(device="cpu"))
    out2 = save(again, tmp_path / "out2", [report2.stage_record()])
    assert [s["sparsity"][0] for s in json.loads((out2 / "secateurs.json").read_text())["stages"]] == [0.5, 0.6]


def test_save_refuses_input_and_existing(tmp_path, tiny_folder):
    loaded = load_model(str(tiny_folder))
    with pytest.raises(UsageError, match="overlaps the input model"):
        save(loaded, tiny_folder, [])
    (tmp_path / "taken").mkdir()
    with pytest.raises(UsageError, match="--overwrite"):
        save(loaded, tmp_path / "taken", [])
    assert save(loaded, tmp_path / "taken", [], overwrite=True).is_dir()


def test_cli_prune_then_eval(tmp_path, tiny_folder):
    text = tmp_path / "eval.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 100)
    out = tmp_path / "pruned"
    result = runner.invoke(app, ["prune", str(tiny_folder), "--out", str(out), "--pattern", "2:4",
                                 "--device", "cpu", "--ppl", str(text), "--eval-seq-len", "32"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "secateurs.json").read_text())
    assert record["stages"][0]["pattern"] == "2:4"
    assert record["results"][f"ppl_{text}"]["ppl"] > 1
    result = runner.invoke(app, ["eval", str(out), "--ppl", str(text), "--seq-len", "32", "--device", "cpu",
                                 "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r.json").read_text())["perplexity"][str(text)]["windows"] >= 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sparsity", "1.5"], "[0, 1)"),
        (["--pattern", "3:7"], "multiple of 7"),
        (["--pattern", "2-4"], "unknown pattern"),
        (["--calib", "wikitext3"], "unknown dataset"),
        (["--calib", "missing.txt"], "data file not found"),
        (["--method", "bogus"], "unknown method"),
        (["--option", "per=diagonal"], "comparison group"),
    ],
)
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, tiny_folder, args, message):
    out = tmp_path / "never"
    result = runner.invoke(app, ["prune", str(tiny_folder), "--out", str(out), "--device", "cpu", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output.replace("\n", " ")
    assert "Traceback" not in result.output
    assert not out.exists() and not list(tmp_path.glob(".never*"))


def test_cli_bad_models(tmp_path, tiny_folder):
    assert runner.invoke(app, ["prune", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]).exit_code == 2
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    result = runner.invoke(app, ["eval", str(broken), "--ppl", "wikitext2"])
    assert result.exit_code == 2 and "could not load" in result.output
    result = runner.invoke(app, ["prune", str(tiny_folder), "--out", str(tiny_folder), "--device", "cpu"])
    assert result.exit_code == 2 and "overlaps the input" in result.output.replace("\n", " ")


def test_every_command_has_help():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("prune", "eval", "demo"):
        help_text = runner.invoke(app, [command, "--help"])
        assert help_text.exit_code == 0 and "Usage" in help_text.output


def test_per_block_schedule_applies_per_block():
    loaded = tiny_model("qwen2")
    prune(loaded, PruneConfig("magnitude", [0.2, 0.5, 0.8]), None, EngineOptions(device="cpu"))
    blocks = loaded.spec.blocks_of(loaded.model)
    for block, target in zip(blocks, [0.2, 0.5, 0.8], strict=True):
        w = block.mlp.down_proj.weight
        assert (w == 0).float().mean().item() == pytest.approx(target, abs=0.01)
    with torch.no_grad():
        assert torch.isfinite(loaded.model(input_ids=random_ids(1, 8)).logits).all()

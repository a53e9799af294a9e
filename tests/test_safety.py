"""Safe by default (issue 24): no code from a model folder or a checkpoint runs unasked, every bad
input is refused before the model loads, and nothing is left half-written behind."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import random_ids, tiny_model
from typer.testing import CliRunner

import secateurs
from secateurs.cli import app
from secateurs.errors import UsageError
from secateurs.model.slice import apply_widths
from secateurs.structured.base import WidthConfig

runner = CliRunner()

GQA = dict(num_attention_heads=8, num_key_value_heads=4, head_dim=8)


def _plant(folder, marker) -> None:
    """Replace the saved modeling file with one that writes ``marker`` when imported or built."""
    payload = (
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('ran')\n"
    )
    code = folder / "modeling_secateurs.py"
    code.write_text(payload + code.read_text())


def _global_width_folder(tmp_path, monkeypatch):
    """A per-layer-width folder (global ranking + FLAP's added bias), and the model that made it."""
    from secateurs.structured import base

    monkeypatch.setattr(base, "calibration_ids", lambda config, tokenizer, model: random_ids(config.n_samples, config.seq_len))
    loaded = tiny_model("llama", **GQA)
    config = WidthConfig("flap", 0.25, mode="global", bias_compensation=True)
    secateurs.width(loaded, config, secateurs.CalibConfig("x", 4, 16), secateurs.EngineOptions(device="cpu"))
    folder = secateurs.save(loaded, tmp_path / "wide", [])
    assert json.loads((folder / "config.json").read_text())["auto_map"]
    return loaded, folder


def test_planted_modeling_file_never_runs(tmp_path, monkeypatch):
    loaded, folder = _global_width_folder(tmp_path, monkeypatch)
    marker = tmp_path / "ran.txt"
    _plant(folder, marker)
    reloaded = secateurs.load_model(str(folder))
    ids = random_ids(2, 10)
    with torch.no_grad():
        assert torch.equal(reloaded.model(ids).logits, loaded.model(ids).logits)
    assert any(n.endswith(".bias") for n, _ in reloaded.model.named_parameters() if ".o_proj." in n or ".down_proj." in n)
    text = tmp_path / "eval.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 50)
    result = runner.invoke(app, ["eval", str(folder), "--ppl", str(text), "--seq-len", "16", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert not marker.exists()
    # The user's explicit opt-in is the only way that file runs.
    secateurs.load_model(str(folder), trust_remote_code=True)
    assert marker.read_text() == "ran"


def test_saved_modeling_file_still_loads_with_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    loaded = tiny_model("qwen2", num_attention_heads=8, num_key_value_heads=4)
    keep = [{"channels": torch.arange(128 - 16 * i)} for i in range(3)]
    apply_widths(loaded.model, loaded.spec, keep)
    folder = secateurs.save(loaded, tmp_path / "out", [])
    ids = random_ids(1, 8)
    plain = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ours = secateurs.load_model(str(folder)).model
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, loaded.model(ids).logits)
        assert torch.equal(ours(ids).logits, loaded.model(ids).logits)


def test_foreign_code_folder_is_refused(tmp_path):
    loaded = tiny_model("llama")
    folder = tmp_path / "foreign"
    loaded.model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "evil_llama"
    config["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.Evil"}
    (folder / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "ran.txt"
    (folder / "modeling_evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    with pytest.raises(UsageError):
        secateurs.load_model(str(folder))
    assert not marker.exists()

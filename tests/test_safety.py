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


class _Payload:
    """Unpickling this object writes a marker file: what a planted checkpoint would do."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (_write_marker, (self.marker,))


def _write_marker(path: str) -> None:
    with open(path, "w") as f:
        f.write("ran")


def _recover_args(tmp_path, text_file, ckpt) -> list[str]:
    loaded = tiny_model("llama")
    folder = tmp_path / "model"
    if not folder.exists():
        loaded.model.save_pretrained(folder)
        loaded.tokenizer.save_pretrained(folder)
    return ["recover", str(folder), "--out", str(tmp_path / "rec"), "--steps", "2", "--seq-len", "16",
            "--batch-size", "1", "--data", str(text_file), "--device", "cpu", "--checkpoint-dir", str(ckpt)]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    return path


@pytest.mark.parametrize("name", ["recover_state.pt", "recover_state.safetensors"])
def test_planted_pickle_checkpoint_never_runs(tmp_path, text_file, name):
    from secateurs.recover.lora import CHECKPOINT

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    marker = tmp_path / "ran.txt"
    torch.save({"digest": "x", "payload": _Payload(marker)}, ckpt / name)
    assert CHECKPOINT == "recover_state.safetensors"
    result = runner.invoke(app, _recover_args(tmp_path, text_file, ckpt))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.output.strip().splitlines() == [result.output.strip()]
    assert "pickle" in result.output or "damaged" in result.output
    assert not marker.exists() and not (tmp_path / "rec").exists()


@pytest.mark.parametrize("content", [b"", b"\x00" * 7, b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1", b"not a checkpoint at all"])
def test_corrupt_checkpoint_is_one_line(tmp_path, text_file, content):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "recover_state.safetensors").write_bytes(content)
    result = runner.invoke(app, _recover_args(tmp_path, text_file, ckpt))
    assert result.exit_code == 2, result.output
    assert "damaged" in result.output and "Traceback" not in result.output


def test_checkpoint_with_wrong_fields_is_one_line(tmp_path):
    """A well-formed file whose fields do not fit the run (planted digest, wrong shapes)."""
    from secateurs.recover.checkpoint import load_checkpoint, restoring, save_checkpoint

    path = tmp_path / "state.safetensors"
    save_checkpoint(path, {"digest": "d", "model": {"w": torch.ones(3)}})
    state = load_checkpoint(path, "d")
    with pytest.raises(UsageError, match="damaged"), restoring(path):
        torch.nn.Linear(2, 2).load_state_dict(state["model"])


def test_checkpoint_round_trip_keeps_every_kind_of_state(tmp_path):
    """Optimizer state (int keys, tuples), LoRAPrune scores (tuple keys), RNG bytes, shared tensors."""
    from secateurs.recover.checkpoint import read_checkpoint, save_checkpoint

    linear = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(linear.parameters())
    linear(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    shared = torch.arange(6.0)
    state = {
        "step": 3, "losses": [1.5, float("inf")], "optimizer": optimizer.state_dict(),
        "scores": {(0, "heads"): torch.ones(2), (1, "channels"): torch.zeros(3)},
        "generator": torch.Generator().manual_seed(1).get_state(), "a": shared, "b": shared[:3], "none": None,
    }
    save_checkpoint(tmp_path / "s.safetensors", state)
    back = read_checkpoint(tmp_path / "s.safetensors")
    assert back["step"] == 3 and back["losses"] == [1.5, float("inf")] and back["none"] is None
    assert set(back["scores"]) == {(0, "heads"), (1, "channels")}
    assert torch.equal(back["b"], shared[:3]) and torch.equal(back["generator"], state["generator"])
    assert back["optimizer"]["param_groups"][0]["betas"] == optimizer.state_dict()["param_groups"][0]["betas"]
    fresh = torch.optim.AdamW(linear.parameters())
    fresh.load_state_dict(back["optimizer"])
    for key, value in optimizer.state_dict()["state"][0].items():
        assert torch.equal(fresh.state_dict()["state"][0][key], value)

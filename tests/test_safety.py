"""Safe by default (issue 24): no code from a model folder or a checkpoint runs unasked, every bad
input is refused before the model loads, and nothing is left half-written behind."""

from __future__ import annotations

import io
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
    torch.load(io.BytesIO((ckpt / name).read_bytes()), weights_only=False)  # the payload is live when unpickled
    assert marker.read_text() == "ran"


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
    from secateurs.training.checkpoint import load_checkpoint, restoring, save_checkpoint

    path = tmp_path / "state.safetensors"
    save_checkpoint(path, {"digest": "d", "model": {"w": torch.ones(3)}})
    state = load_checkpoint(path, "d")
    with pytest.raises(UsageError, match="damaged"), restoring(path):
        torch.nn.Linear(2, 2).load_state_dict(state["model"])


def test_checkpoint_round_trip_keeps_every_kind_of_state(tmp_path):
    """Optimizer state (int keys, tuples), LoRAPrune scores (tuple keys), RNG bytes, shared tensors."""
    from secateurs.training.checkpoint import read_checkpoint, save_checkpoint

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


# --- checks before loading -------------------------------------------------------------------



def _commands(model: str, out: str) -> dict[str, list[str]]:
    return {
        "prune": ["prune", model, "--out", out, "--device", "cpu"],
        "width": ["width", model, "--out", out, "--device", "cpu", "--method", "magnitude"],
        "layers": ["layers", model, "--out", out, "--device", "cpu", "--remove", "1", "--method", "block-influence"],
        "recover": ["recover", model, "--out", out, "--device", "cpu", "--steps", "1"],
        "shear": ["shear", model, "--out", out, "--device", "cpu", "--target", "layers=2"],
    }


def _one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    # transformers' own weight-loading bar may precede an error raised after the model loaded
    text = "\n".join(line for line in result.output.strip().splitlines() if "Loading weights" not in line)
    assert "Traceback" not in text and len(text.splitlines()) == 1 and text.startswith("error:"), text
    for needle in needles:
        assert needle in text, text


@pytest.mark.parametrize("command", ["prune", "width", "layers", "recover", "shear"])
def test_out_under_a_file_fails_before_loading(tmp_path, tiny_folder, no_loading, command):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = runner.invoke(app, _commands(str(tiny_folder), str(blocker / "out"))[command])
    _one_line_error(result, "is a file")


def test_read_only_and_full_disk_fail_before_loading(tmp_path, tiny_folder, no_loading, monkeypatch):
    import errno
    import shutil
    import tempfile
    from collections import namedtuple

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    with monkeypatch.context() as patch:
        patch.setattr(tempfile, "TemporaryFile", read_only)
        result = runner.invoke(app, _commands(str(tiny_folder), str(tmp_path / "out"))["prune"])
    _one_line_error(result, "Read-only file system")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1000))
    result = runner.invoke(app, _commands(str(tiny_folder), str(tmp_path / "out"))["prune"])
    _one_line_error(result, "GiB free")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("raised", ["os", "safetensors"])
def test_late_disk_full_during_save_is_one_line_and_leaves_nothing(tmp_path, tiny_folder, monkeypatch, raised):
    import errno

    from safetensors import SafetensorError
    from transformers import PreTrainedModel

    def full(self, *args, **kwargs):
        if raised == "safetensors":  # what safetensors raises when the disk fills while it writes
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    result = runner.invoke(app, _commands(str(tiny_folder), str(tmp_path / "out"))["prune"])
    _one_line_error(result, "o space left on device", "nothing was written")
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]


@pytest.mark.parametrize(("args", "message"), [
    (["--limit-windows", "-1", "--ppl", "wikitext2"], "--limit-windows must be at least 1"),
    (["--eval-seq-len", "1", "--ppl", "wikitext2"], "--eval-seq-len must be at least 2"),
    (["--ppl", "wikitxt2"], "unknown dataset"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--calib", "wikitext2", "--seq-len", "512"], "longer than the model's context of 256"),
    (["--sparsity", "1.5"], "[0, 1)"),
    (["--pattern", "3:7"], "multiple of 7"),
])
def test_prune_flags_fail_before_loading(tmp_path, tiny_folder, no_loading, args, message):
    result = runner.invoke(app, _commands(str(tiny_folder), str(tmp_path / "out"))["prune"] + args)
    _one_line_error(result, message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["width", "layers"])
def test_ppl_typo_on_width_and_layers_fails_before_work(tmp_path, tiny_folder, no_loading, command):
    result = runner.invoke(app, _commands(str(tiny_folder), str(tmp_path / "out"))[command] + ["--ppl", "wikitxt2"])
    _one_line_error(result, "unknown dataset 'wikitxt2'")


def test_eval_json_checked_first_and_written_into_a_new_folder(tmp_path, tiny_folder, no_loading, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = runner.invoke(app, ["eval", str(tiny_folder), "--json", str(blocker / "r.json"), "--device", "cpu"])
    _one_line_error(result, "is a file")
    result = runner.invoke(app, ["eval", str(tiny_folder), "--json", str(tmp_path), "--device", "cpu"])
    _one_line_error(result, "is a folder")
    monkeypatch.undo()
    text = tmp_path / "eval.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 50)
    target = tmp_path / "new" / "deeper" / "r.json"
    result = runner.invoke(app, ["eval", str(tiny_folder), "--ppl", str(text), "--seq-len", "16", "--device", "cpu",
                                 "--json", str(target)])
    assert result.exit_code == 0, result.output
    assert json.loads(target.read_text())["perplexity"][str(text)]["windows"] >= 1


def test_output_beside_a_gguf_input_is_not_overlapping(tmp_path):
    from secateurs.model.save import check_output

    models = tmp_path / "models"
    models.mkdir()
    (models / "x.gguf").write_bytes(b"GGUF")
    assert check_output(models / "x-pruned", str(models / "x.gguf"), False) == (models / "x-pruned").resolve()
    for bad in (models / "x.gguf", models):
        with pytest.raises(UsageError, match="overlaps the input"):
            check_output(bad, str(models / "x.gguf"), True)


def test_offline_hub_id_fails_fast(monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from secateurs.model import load as load_module

    load_module.hub_reachable.cache_clear()
    start = time.perf_counter()
    with pytest.raises(UsageError, match="not reachable"):
        secateurs.load_model("no-such-org/no-such-model")
    assert time.perf_counter() - start < 10
    load_module.hub_reachable.cache_clear()


def test_cpu_calibration_cost_is_stated_before_work(tiny_folder, capsys):
    from secateurs.stages.flags import cpu_cost_note, preflight

    cpu_cost_note(preflight(str(tiny_folder)), "cpu", 128, 2048)
    note = capsys.readouterr().err
    assert "262,144 tokens" in note and "GiB of activations" in note and "min" in note


# --- debris ----------------------------------------------------------------------------------


def test_bad_stream_call_leaves_no_partial(tmp_path, tiny_folder):
    out = tmp_path / "out"
    result = runner.invoke(app, ["prune", str(tiny_folder), "--out", str(out), "--stream", "--sparsity", "1.0",
                                 "--device", "cpu"])
    _one_line_error(result, "[0, 1)")
    assert not list(tmp_path.glob(".out*")) and not out.exists()
    # Through the Python API too: the request is checked before .OUT.partial is made.
    with pytest.raises(UsageError):
        secateurs.prune_streamed(str(tiny_folder), out, secateurs.PruneConfig("magnitude", 1.0))
    assert not list(tmp_path.glob(".out*"))
    result = runner.invoke(app, ["prune", str(tiny_folder), "--out", str(out), "--stream", "--sparsity", "0.5",
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output


def test_abandoned_temporary_folders_are_removed_by_a_later_save(tmp_path, tiny_folder):
    import os
    import socket
    import subprocess
    import sys

    from secateurs.files import OWNER_SUFFIX

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()

    def planted(name: str, pid: int, host: str) -> None:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"0" * 100)
        (tmp_path / (name + OWNER_SUFFIX)).write_text(json.dumps({"secateurs_temporary": name, "pid": pid, "host": host}))

    planted(".out.tmp-killed", dead.pid, socket.gethostname())
    planted(".out.tmp-running", os.getpid(), socket.gethostname())
    planted(".out.tmp-elsewhere", dead.pid, "another-host")
    (tmp_path / ".unmarked").mkdir()
    loaded = secateurs.load_model(str(tiny_folder))
    secateurs.save(loaded, tmp_path / "out", [])
    left = sorted(p.name for p in tmp_path.iterdir())
    assert ".out.tmp-killed" not in left and ".out.tmp-killed" + OWNER_SUFFIX not in left
    assert {".out.tmp-running", ".out.tmp-elsewhere", ".unmarked", "out"} <= set(left)
    assert not [n for n in left if n.startswith(".out.tmp-") and n not in (".out.tmp-running", ".out.tmp-elsewhere")
                and not n.endswith(OWNER_SUFFIX)]


# --- recipes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stage2", [{"pattern": "3:2"}, {"sparsity": 1.5}, {"method": "bogus"}])
def test_recipe_value_error_in_a_later_stage_fails_before_any_work(tmp_path, tiny_folder, stage2):
    import yaml

    out = tmp_path / "run"
    recipe = {"model": str(tiny_folder), "stages": [{"prune": {"sparsity": 0.3, "device": "cpu"}},
                                                      {"prune": {"device": "cpu", **stage2}}], "out": str(out)}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    for extra in (["--dry-run"], []):
        result = runner.invoke(app, ["run", str(path), *extra])
        _one_line_error(result, "stage 2 (prune)")
        assert not out.exists()


def test_sigkill_during_the_final_save_leaves_debris_the_next_save_removes(tmp_path, tiny_folder):
    """A real SIGKILL while the weights are being written, then a second save into the same folder."""
    import signal
    import subprocess
    import sys

    script = f"""
import time
import secateurs
from transformers import PreTrainedModel
original = PreTrainedModel.save_pretrained
def slow(self, folder, *args, **kwargs):
    original(self, folder, *args, **kwargs)
    print("written", flush=True)
    time.sleep(60)
PreTrainedModel.save_pretrained = slow
secateurs.save(secateurs.load_model({str(tiny_folder)!r}), {str(tmp_path / "out")!r}, [])
"""
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "written"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        child.kill()
    debris = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert debris and not (tmp_path / "out").exists()
    secateurs.save(secateurs.load_model(str(tiny_folder)), tmp_path / "out", [])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert (tmp_path / "out" / "config.json").is_file()


def test_every_stage_spec_checks_everything_before_loading(tmp_path, tiny_folder, no_loading):
    """What recipes rely on: each stage's own spec checks everything before any weight loads."""
    from secateurs.recipe import STAGE_COMMANDS
    from secateurs.stages import STAGES, check

    out = str(tmp_path / "out")
    extra = {"prune": dict(out=out), "width": dict(out=out, method="magnitude"), "layers": dict(out=out, remove=1, seq_len=16),
             "recover": dict(out=out, steps=1), "shear": dict(out=out, target="layers=2", seq_len=16),
             "eval": dict(seq_len=16), "bench": {}, "export": dict(gguf=str(tmp_path / "out" / "m.gguf")),
             "generate": dict(prompt="the quick brown fox", max_new_tokens=8),
             "experts": dict(out=out, keep=0.5, seq_len=16)}
    moe = tiny_model("mixtral")  # expert pruning takes a mixture-of-experts model
    moe.model.save_pretrained(tmp_path / "moe")
    moe.tokenizer.save_pretrained(tmp_path / "moe")
    models = {"experts": str(tmp_path / "moe")}
    assert set(STAGES) == set(STAGE_COMMANDS)
    for name, stage in STAGES.items():
        check(stage.parse(model=models.get(name, str(tiny_folder)), **extra[name]), pending=frozenset())
    assert not (tmp_path / "out").exists()
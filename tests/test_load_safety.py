"""Loading runs no code it was not asked to run and reads only what it names (issue 34): a GGUF reads
nothing beside it, every transformers loader gets the user's ``trust_remote_code`` explicitly, a damaged
tokenizer is named before any work, and what OUT's config promises (``auto_map``) is in OUT."""

from __future__ import annotations

import ast
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tiny_models import tiny_model
from typer.testing import CliRunner

import secateurs
from secateurs.cli import app
from secateurs.model.load import load_skeleton

runner = CliRunner()
SRC = Path(__file__).resolve().parents[1] / "src" / "secateurs"

# Loaders that can import code named by a file they read (auto_map, custom generate): each call must
# say what the user chose. GenerationConfig reads one JSON file and would store the flag as a setting.
CODE_LOADERS = ("from_pretrained", "from_config")
NO_CODE_RECEIVERS = {"GenerationConfig"}


def write_tiny_gguf(path: Path) -> Path:
    """A one-layer llama GGUF (float32, byte-ish BPE tokenizer of 100 tokens) that loads in a second."""
    import gguf

    words = ["<s>", "</s>", *(chr(c) for c in range(33, 127)), "Ġ", "th", "he", "the"]
    hidden, ffn, heads = 32, 64, 4
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(1)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(words))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(words)
    writer.add_token_types([3, 3] + [1] * (len(words) - 2))
    writer.add_token_merges(["t h", "h e", "th e"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    rng = np.random.default_rng(0)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    writer.add_tensor("token_embd.weight", weight(len(words), hidden))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.add_tensor("output.weight", weight(len(words), hidden))
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(hidden, np.float32))
    writer.add_tensor("blk.0.ffn_norm.weight", np.ones(hidden, np.float32))
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        writer.add_tensor(f"blk.0.{name}.weight", weight(hidden, hidden))
    writer.add_tensor("blk.0.ffn_gate.weight", weight(ffn, hidden))
    writer.add_tensor("blk.0.ffn_up.weight", weight(ffn, hidden))
    writer.add_tensor("blk.0.ffn_down.weight", weight(hidden, ffn))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def plant_tokenizer_code(folder: Path, marker: Path) -> None:
    """A tokenizer_config.json whose auto_map names tokenization_evil.py, which writes ``marker`` when imported."""
    (folder / "tokenization_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n\n\nclass EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    auto_map = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", "tokenization_evil.EvilTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "EvilTokenizer", "auto_map": auto_map}))


def run_in_terminal(args: list[str], answer: bytes, timeout: float = 240) -> tuple[int | None, str]:
    """Run ``python -m secateurs ARGS`` with a pseudo-terminal as stdin/stdout/stderr, ``answer`` already
    typed; (exit code or None if it was still running after ``timeout`` s, everything it printed)."""
    master, slave = os.openpty()
    process = subprocess.Popen([sys.executable, "-m", "secateurs", *args], stdin=slave, stdout=slave, stderr=slave,
                               start_new_session=True, env={**os.environ, "TERM": "dumb"})
    os.close(slave)
    os.write(master, answer)
    output = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    chunk = b""
                if not chunk and process.poll() is not None:
                    break
                output += chunk
            elif process.poll() is not None:
                break
        code = process.poll()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)
    return code, output.decode(errors="replace")


def test_every_loader_call_passes_trust_remote_code():
    missing = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            receiver = ast.unparse(node.func.value)
            if node.func.attr in CODE_LOADERS and receiver not in NO_CODE_RECEIVERS:
                if "trust_remote_code" not in {k.arg for k in node.keywords}:
                    missing.append(f"{path.relative_to(SRC)}:{node.lineno} {ast.unparse(node.func)}")
    assert not missing, "calls that leave trust_remote_code to transformers' default (it asks on a terminal):\n" + "\n".join(missing)


def test_code_beside_a_gguf_never_runs_even_answering_yes(tmp_path):
    folder = tmp_path / "downloaded"
    folder.mkdir()
    gguf_file = write_tiny_gguf(folder / "x.gguf")
    marker = tmp_path / "ran.txt"
    plant_tokenizer_code(folder, marker)
    text = tmp_path / "eval.txt"
    text.write_text("the hat the thing " * 40)
    code, output = run_in_terminal(
        ["eval", str(gguf_file), "--ppl", str(text), "--seq-len", "16", "--limit-windows", "1", "--device", "cpu"], b"y\n"
    )
    assert not marker.exists(), output
    assert "[y/N]" not in output
    assert code == 0, output
    assert "perplexity" in output


def test_gguf_config_and_model_read_the_file_alone(tmp_path):
    folder = tmp_path / "downloaded"
    folder.mkdir()
    gguf_file = write_tiny_gguf(folder / "x.gguf")
    marker = tmp_path / "ran.txt"
    plant_tokenizer_code(folder, marker)
    (folder / "config.json").write_text("{not json")  # a loader that read the folder would fail on it
    (folder / "generation_config.json").write_text("{not json")
    for trust in (False, True):
        loaded = secateurs.load_model(str(gguf_file), trust_remote_code=trust)
        assert loaded.tokenizer("the")["input_ids"]
        assert loaded.tokenizer.name_or_path == str(gguf_file)
        assert load_skeleton(str(gguf_file), trust).model.config.num_hidden_layers == 1
    assert not marker.exists()


def _saved_tiny(tmp_path: Path) -> Path:
    return secateurs.save(tiny_model("llama"), tmp_path / "model", [])


def test_damaged_tokenizer_is_named_before_the_model_loads(tmp_path, no_loading):
    folder = _saved_tiny(tmp_path)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    text = tmp_path / "eval.txt"
    text.write_text("the quick brown fox " * 50)
    result = runner.invoke(app, ["eval", str(folder), "--ppl", str(text), "--seq-len", "16", "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "damaged: tokenizer.json is not valid JSON" in result.output
    out = tmp_path / "out"
    result = runner.invoke(app, ["prune", str(folder), "--out", str(out), "--method", "magnitude", "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "tokenizer.json is not valid JSON" in result.output
    assert not out.exists()


def test_eval_without_a_tokenizer_fails_before_loading(tmp_path, no_loading):
    folder = _saved_tiny(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    for flags in (["--ppl", "wikitext2"], ["--tasks", "arc_easy"]):
        result = runner.invoke(app, ["eval", str(folder), *flags, "--seq-len", "16", "--device", "cpu"])
        assert result.exit_code == 2, result.output
        assert "error:" in result.output and "has no tokenizer" in result.output


def test_prune_of_a_folder_without_tokenizer_says_out_has_none(tmp_path):
    folder = _saved_tiny(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    out = tmp_path / "out"
    result = runner.invoke(app, ["prune", str(folder), "--out", str(out), "--method", "magnitude", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "has no tokenizer, so OUT will have none" in result.output
    assert not (out / "tokenizer.json").exists()


def _tiny_shortcut(tmp_path: Path, monkeypatch) -> str:
    """A shortcut name that resolves like smollm2-135m (packaged GGUF → cached HF folder), on the tiny GGUF."""
    from secateurs.model import sources

    gguf_file = write_tiny_gguf(tmp_path / "packaged.gguf")
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sources.SHORTCUTS, "tiny-shortcut", sources.Shortcut("tiny", "tiny", gguf_file.name))
    monkeypatch.setattr(sources, "_packaged_file", lambda shortcut: gguf_file)
    return "tiny-shortcut"


def test_stream_resolves_shortcuts(tmp_path, monkeypatch):
    name = _tiny_shortcut(tmp_path, monkeypatch)
    out = tmp_path / "out"
    result = runner.invoke(app, ["prune", name, "--out", str(out), "--stream", "--method", "magnitude", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    pruned = secateurs.load_model(str(out)).model
    weight = pruned.model.layers[0].mlp.up_proj.weight
    assert (weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_version():
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"secateurs {version('secateurs')}"


def test_foreign_auto_map_is_not_copied_without_its_file(tmp_path):
    folder = _saved_tiny(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_foreign.ForeignConfig",
                          "AutoModelForCausalLM": "modeling_foreign.ForeignForCausalLM",
                          "AutoModel": "someone/else--modeling_other.OtherModel"}
    (folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    result = runner.invoke(app, ["prune", str(folder), "--out", str(out), "--method", "magnitude", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "no longer names code absent from OUT" in result.output and "modeling_foreign" in result.output
    saved = json.loads((out / "config.json").read_text())
    assert saved["auto_map"] == {"AutoModel": "someone/else--modeling_other.OtherModel"}
    assert secateurs.load_model(str(out)).model.config.model_type == "llama"

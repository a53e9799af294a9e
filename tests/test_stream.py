"""Streaming from safetensors shards: the same output as the in-memory path, resumable, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_models import tiny_model

from secateurs.api import PruneConfig, drop_layers_streamed, prune, prune_streamed, save
from secateurs.data.calib import CalibConfig
from secateurs.engine.sequential import EngineOptions
from secateurs.errors import UsageError
from secateurs.model.drop_layers import drop_layers
from secateurs.model.load import load_model
from secateurs.sparsity.registry import method_names


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                assert key not in found, f"{key} stored twice"
                found[key] = handle.get_tensor(key)
    return found


def assert_same_folder(a: Path, b: Path) -> None:
    ta, tb = tensors_of(a), tensors_of(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert ta[key].dtype == tb[key].dtype, key
        assert torch.equal(ta[key], tb[key]), key
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """A tiny Llama saved in several safetensors shards with an index, plus a calibration text file."""
    folder = tmp_path_factory.mktemp("input") / "tiny-llama"
    loaded = tiny_model("llama", num_hidden_layers=4)
    loaded.model.save_pretrained(folder, max_shard_size="60KB")
    loaded.tokenizer.save_pretrained(folder)
    assert (folder / "model.safetensors.index.json").is_file()
    (folder.parent / "calib.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    return folder


def calib_for(folder: Path) -> CalibConfig:
    return CalibConfig(str(folder.parent / "calib.txt"), n_samples=3, seq_len=16, seed=0)


def in_memory(folder: Path, out: Path, config: PruneConfig, calib: CalibConfig | None) -> None:
    loaded = load_model(str(folder))
    report = prune(loaded, config, calib, EngineOptions(device="cpu"))
    save(loaded, out, [report.stage_record()])


def input_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


CASES = [("magnitude", "uniform"), ("wanda", "uniform"), ("sparsegpt", "uniform"), ("wanda", "owl")]


@pytest.mark.parametrize(("method", "allocation"), [c for c in CASES if c[0] in method_names()])
def test_streamed_equals_in_memory(sharded, tmp_path, method, allocation):
    before = input_bytes(sharded)
    sparsity = 0.5 if allocation == "uniform" else 0.6
    config = PruneConfig(method, sparsity, allocation=allocation, allocation_options={"lam": 0.05})
    calib = calib_for(sharded) if method != "magnitude" or allocation == "owl" else None
    in_memory(sharded, tmp_path / "memory", config, calib)
    report, path = prune_streamed(sharded, tmp_path / "stream", config, calib, EngineOptions(device="cpu"))
    assert path == (tmp_path / "stream").resolve()
    assert_same_folder(tmp_path / "memory", path)
    assert not list(tmp_path.glob(".*partial"))
    assert 0.3 < report.achieved < 0.7 and len(report.per_layer) == 4 * 7
    record = json.loads((path / "secateurs.json").read_text())
    assert record["stages"][0]["method"] == method
    reloaded = load_model(str(path))
    assert reloaded.model.config.num_hidden_layers == 4
    assert input_bytes(sharded) == before


def test_streamed_layer_removal_equals_in_memory(sharded, tmp_path):
    loaded = load_model(str(sharded))
    drop_layers(loaded.model, loaded.spec, [1, 2])
    save(loaded, tmp_path / "memory", [])
    path = drop_layers_streamed(sharded, tmp_path / "stream", [1, 2])
    assert_same_folder(tmp_path / "memory", path)
    assert load_model(str(path)).model.config.num_hidden_layers == 2


class Interrupt(Exception):
    """Stands in for a crash or Ctrl-C in the middle of a long run."""


def test_resume_after_interruption(sharded, tmp_path, monkeypatch):
    from secateurs.sparsity.wanda import Wanda

    config = PruneConfig("wanda", 0.5)
    calib = calib_for(sharded)
    prune_streamed(sharded, tmp_path / "whole", config, calib, EngineOptions(device="cpu"))

    original = Wanda.process_block
    calls: list[int] = []

    def crash_at_block_2(self, index, block, linears, stats):
        calls.append(index)
        if index == 2:
            raise Interrupt
        original(self, index, block, linears, stats)

    monkeypatch.setattr(Wanda, "process_block", crash_at_block_2)
    with pytest.raises(Interrupt):
        prune_streamed(sharded, tmp_path / "out", config, calib, EngineOptions(device="cpu"))
    assert not (tmp_path / "out").exists()
    partial = tmp_path / ".out.partial"
    assert sorted(json.loads((partial / "progress.json").read_text())["done"]) == ["0", "1"]

    with pytest.raises(UsageError, match="other arguments"):
        prune_streamed(sharded, tmp_path / "out", PruneConfig("wanda", 0.6), calib, EngineOptions(device="cpu"))

    monkeypatch.setattr(Wanda, "process_block", lambda self, *a: (calls.append(a[0]), original(self, *a)))
    _, path = prune_streamed(sharded, tmp_path / "out", config, calib, EngineOptions(device="cpu"))
    assert calls == [0, 1, 2, 2, 3]  # blocks 0 and 1 were not pruned again
    assert_same_folder(tmp_path / "whole", path)
    assert not partial.exists()


def test_truncated_or_missing_shard(sharded, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in sharded.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    before = input_bytes(broken)
    with pytest.raises(UsageError, match=f"shard {shard.name} is truncated"):
        prune_streamed(broken, tmp_path / "out", PruneConfig("magnitude", 0.5))
    shard.unlink()
    with pytest.raises(UsageError, match=f"shard {shard.name} is missing"):
        prune_streamed(broken, tmp_path / "out", PruneConfig("magnitude", 0.5))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    before.pop(shard.name)
    assert input_bytes(broken) == before


def test_disk_full_is_one_line_and_resumable(sharded, tmp_path, monkeypatch):
    import secateurs.engine.stream as stream

    real = stream.write_tensors
    written: list[str] = []

    def fills_up(path, entries):
        if len(written) == 2:
            raise OSError(28, "No space left on device")
        written.append(str(path))
        real(path, entries)

    monkeypatch.setattr(stream, "write_tensors", fills_up)
    with pytest.raises(UsageError, match="disk full"):
        prune_streamed(sharded, tmp_path / "out", PruneConfig("magnitude", 0.5))
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(stream, "write_tensors", real)
    _, path = prune_streamed(sharded, tmp_path / "out", PruneConfig("magnitude", 0.5))
    in_memory(sharded, tmp_path / "memory", PruneConfig("magnitude", 0.5), None)
    assert_same_folder(tmp_path / "memory", path)


def test_stream_rejects_self_calibration(sharded, tmp_path):
    with pytest.raises(UsageError, match="--calib self"):
        prune_streamed(sharded, tmp_path / "out", PruneConfig("wanda", 0.5), CalibConfig("self", 2, 8))


def test_activations_fit_leaves_half_the_free_memory():
    from secateurs.engine.sequential import activations_fit

    # 128 × 2048 tokens of hidden 8192 in fp16 are 4 GiB: they fit beside a block in 10 GiB free, not in 6.
    assert activations_fit(128, 2048, 8192, 2, 10 * 2**30)
    assert not activations_fit(128, 2048, 8192, 2, 6 * 2**30)


def test_cli_prune_stream(sharded, tmp_path):
    from typer.testing import CliRunner

    from secateurs.cli import app

    runner = CliRunner()
    args = ["prune", str(sharded), "--method", "magnitude", "--device", "cpu", "--stream"]
    bad = runner.invoke(app, [*args, "--out", str(tmp_path / "bad"), "--ppl", "wikitext2"])
    assert bad.exit_code == 2 and "--stream writes OUT block by block" in bad.output
    done = runner.invoke(app, [*args, "--out", str(tmp_path / "out")])
    assert done.exit_code == 0, done.output
    in_memory(sharded, tmp_path / "memory", PruneConfig("magnitude", 0.5), None)
    assert_same_folder(tmp_path / "memory", tmp_path / "out")


def test_overlapped_reads_and_writes_equal_sequential(sharded, tmp_path, monkeypatch):
    """Reading block i+1 and writing block i in the background changes nothing in the output."""
    import threading

    import secateurs.engine.stream as stream

    threads: list[str] = []
    real_read = stream.ShardReader.read

    def read(self, keys, *args):
        threads.append(threading.current_thread().name)
        return real_read(self, keys, *args)

    monkeypatch.setattr(stream.ShardReader, "read", read)
    config, calib = PruneConfig("sparsegpt", 0.5), calib_for(sharded)
    _, overlapped = prune_streamed(sharded, tmp_path / "overlap", config, calib, EngineOptions(device="cpu"))
    assert sum(name.startswith("secateurs-read") for name in threads) == 3  # blocks 1-3 read ahead
    defaults = stream.StreamSession.__init__.__defaults__
    monkeypatch.setattr(stream.StreamSession.__init__, "__defaults__", (*defaults[:-1], False))
    threads.clear()
    _, plain = prune_streamed(sharded, tmp_path / "plain", config, calib, EngineOptions(device="cpu"))
    assert not any(name.startswith("secateurs-read") for name in threads)
    assert_same_folder(plain, overlapped)


def test_activations_spill_to_host_when_the_gpu_is_short(monkeypatch, capsys):
    """The engine picks host memory by itself when the activations would not fit, and says so."""
    from secateurs.engine.sequential import activation_store

    loaded = tiny_model("llama")
    ids = torch.zeros(4, 16, dtype=torch.long)
    need = 4 * 16 * loaded.model.config.hidden_size * 4
    cuda = torch.device("cuda")
    for free, expected in ((4 * need, "cuda"), (need, "cpu")):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, 8 * need))
        options = EngineOptions(device="cuda")
        assert activation_store(loaded.model, loaded.spec, ids, options, cuda).type == expected
    assert "keeping them in pinned host memory" in capsys.readouterr().err
    assert activation_store(loaded.model, loaded.spec, ids, EngineOptions(device="cuda", offload_activations=True), cuda).type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_streamed_on_gpu_equals_in_memory_on_gpu(sharded, tmp_path, method):
    """On a GPU blocks travel through page-locked buffers and DMA copies; the output must not change."""
    config, calib = PruneConfig(method, 0.5), calib_for(sharded)
    loaded = load_model(str(sharded))
    report = prune(loaded, config, calib, EngineOptions(device="cuda"))
    save(loaded, tmp_path / "memory", [report.stage_record()])
    _, path = prune_streamed(sharded, tmp_path / "stream", config, calib, EngineOptions(device="cuda"))
    assert_same_folder(tmp_path / "memory", path)

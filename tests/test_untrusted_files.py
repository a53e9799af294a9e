"""Trust no number read from a file (issue 34, items 5-7): a malformed safetensors header, an index
naming a shard outside the folder, a header that lies about a tensor, or an absurd config is one
``error:`` line before any work, and leaves no OUT and no ``.OUT.partial`` behind."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors import safe_open
from tiny_models import tiny_model
from typer.testing import CliRunner

import secateurs
from secateurs.cli import app
from secateurs.errors import UsageError
from secateurs.model.load import load_model
from secateurs.model.shards import read_header

runner = CliRunner()
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
Q = "model.layers.0.self_attn.q_proj.weight"  # 64 × 64 F32 in the tiny Llama
O = "model.layers.0.self_attn.o_proj.weight"  # 64 × 64 F32, stored after q_proj's bytes


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, Path]:
    """The tiny Llama saved once as a single file and once sharded with an index (copied per test)."""
    root = tmp_path_factory.mktemp("originals")
    loaded = tiny_model("llama")
    folders = {"single": root / "single", "sharded": root / "sharded"}
    loaded.model.save_pretrained(folders["single"])
    loaded.model.save_pretrained(folders["sharded"], max_shard_size="60KB")
    for folder in folders.values():
        loaded.tokenizer.save_pretrained(folder)
    assert (folders["sharded"] / INDEX).is_file()
    return folders


@pytest.fixture
def single(originals, tmp_path) -> Path:
    return Path(shutil.copytree(originals["single"], tmp_path / "model"))


@pytest.fixture
def sharded(originals, tmp_path) -> Path:
    return Path(shutil.copytree(originals["sharded"], tmp_path / "model"))


def split(path: Path) -> tuple[dict, bytes]:
    """A safetensors file's header (parsed) and data bytes."""
    blob = path.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def join(path: Path, head: bytes, data: bytes, length: int | None = None) -> None:
    path.write_bytes(struct.pack("<Q", len(head) if length is None else length) + head + data)


def edit_header(path: Path, change: Callable[[dict], None]) -> None:
    header, data = split(path)
    change(header)
    join(path, json.dumps(header).encode(), data)


def run(args: list[str], out: Path):
    result = runner.invoke(app, args)
    text = result.output.strip()
    assert result.exit_code == 2, (result.exit_code, text, result.exception)
    assert "Traceback" not in text and len(text.splitlines()) == 1 and text.startswith("error:"), text
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*")), list(out.parent.iterdir())
    return text


def prune_args(folder: Path, out: Path, stream: bool) -> list[str]:
    return ["prune", str(folder), "--out", str(out), "--device", "cpu", *(["--stream"] if stream else [])]


# --- item 5: safetensors headers ---------------------------------------------------------------

def _set(key: str, field: str, value) -> Callable[[dict], None]:
    return lambda header: header[key].__setitem__(field, value)


HEADER_CASES: dict[str, Callable[[Path], None]] = {
    "not an object": lambda p: join(p, b"[1, 2]", split(p)[1]),
    "no data_offsets": lambda p: edit_header(p, lambda h: h[Q].pop("data_offsets")),
    "string in shape": lambda p: edit_header(p, _set(Q, "shape", ["64", 64])),
    "negative shape": lambda p: edit_header(p, _set(Q, "shape", [-64, -64])),
    "float shape": lambda p: edit_header(p, _set(Q, "shape", [64.0, 64])),
    "unknown dtype": lambda p: edit_header(p, _set(Q, "dtype", "F33")),
    "two tensors on the same bytes": lambda p: edit_header(p, lambda h: h[O].__setitem__("data_offsets", h[Q]["data_offsets"])),
    "offsets do not match the shape": lambda p: edit_header(p, _set(Q, "shape", [64, 63])),
    "metadata not strings": lambda p: edit_header(p, lambda h: h.__setitem__("__metadata__", {"format": 1})),
    "entry not a tensor": lambda p: edit_header(p, lambda h: h.__setitem__("x", [0, 1])),
    "bytes after the last tensor": lambda p: p.write_bytes(p.read_bytes() + b"\0" * 8),
}


@pytest.mark.parametrize("case", HEADER_CASES)
def test_malformed_header_is_refused_as_safetensors_refuses_it(single, case):
    shard = single / SINGLE
    HEADER_CASES[case](shard)
    with pytest.raises(Exception):  # noqa: B017 - the library's own error type varies by case
        with safe_open(str(shard), framework="pt") as handle:
            list(handle.keys())
    with pytest.raises(UsageError, match="model.safetensors") as caught:
        read_header(shard, single)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("stream", [False, True], ids=["in-memory", "stream"])
@pytest.mark.parametrize("case", HEADER_CASES)
def test_malformed_header_is_one_line_before_any_work(single, tmp_path, case, stream):
    HEADER_CASES[case](single / SINGLE)
    out = tmp_path / "out"
    assert "model.safetensors" in run(prune_args(single, out, stream), out)


def test_header_over_100_mb_is_refused_without_reading_it(tmp_path):
    """safetensors' limit is 100,000,000 bytes: one more (valid JSON padded with spaces) is refused."""
    big = tmp_path / "big.safetensors"
    with big.open("wb") as f:
        f.write(struct.pack("<Q", 100_000_001) + b"{}")
        f.write(b" " * (100_000_001 - 2))
    with pytest.raises(Exception):  # noqa: B017
        safe_open(str(big), framework="pt")
    with pytest.raises(UsageError, match="header length field says 100000001 bytes"):
        read_header(big, tmp_path)


def _move_out(folder: Path, how: str) -> None:
    """Make the index name its last shard so that it lies outside the folder (``how``)."""
    index = json.loads((folder / INDEX).read_text())
    name = sorted(set(index["weight_map"].values()))[-1]
    outside = folder.parent / "elsewhere"
    outside.mkdir()
    shutil.move(folder / name, outside / name)
    if how == "dotdot":
        new = f"../elsewhere/{name}"
    elif how == "absolute":
        new = str(outside / name)
    else:  # a symlink in the folder pointing out of it
        new = name
        (folder / name).symlink_to(outside / name)
    index["weight_map"] = {k: (new if v == name else v) for k, v in index["weight_map"].items()}
    (folder / INDEX).write_text(json.dumps(index))


@pytest.mark.parametrize("stream", [False, True], ids=["in-memory", "stream"])
@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_shard_outside_the_folder_is_refused(sharded, tmp_path, how, stream):
    _move_out(sharded, how)
    out = tmp_path / "out"
    assert "lies outside it" in run(prune_args(sharded, out, stream), out)
    with pytest.raises(UsageError, match="lies outside it"):
        secateurs.prune_streamed(sharded, out, secateurs.PruneConfig("magnitude", 0.5))
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_hub_cache_symlinks_into_blobs_still_load(originals, tmp_path):
    """A Hugging Face cache snapshot links each file to ``../../blobs/<hash>``: that is not leaving."""
    repo = tmp_path / "models--tiny"
    snapshot, blobs = repo / "snapshots" / "abc", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for item in originals["sharded"].iterdir():
        blob = blobs / f"hash-{item.name}"
        shutil.copy(item, blob)
        (snapshot / item.name).symlink_to(Path("..", "..", "blobs", blob.name))
    out = tmp_path / "out"
    result = runner.invoke(app, prune_args(snapshot, out, True) + ["--sparsity", "0.5"])
    assert result.exit_code == 0, result.output


def test_index_weight_map_that_is_not_a_map_is_one_line(sharded, tmp_path):
    (sharded / INDEX).write_text(json.dumps({"weight_map": ["model-00001-of-00002.safetensors"]}))
    out = tmp_path / "out"
    assert INDEX in run(prune_args(sharded, out, True), out)


# --- item 6: a header that lies about a tensor ---------------------------------------------------

LIES: dict[str, Callable[[dict], None]] = {
    "shape": _set(Q, "shape", [32, 128]),  # the same bytes, another shape
    "integer dtype": _set(Q, "dtype", "I32"),  # the same bytes read as integers
    "lm_head stored as U32": _set("lm_head.weight", "dtype", "U32"),
}


@pytest.mark.parametrize("stream", [False, True], ids=["in-memory", "stream"])
@pytest.mark.parametrize("lie", LIES)
def test_header_that_lies_about_a_tensor_is_refused_before_work(single, tmp_path, lie, stream):
    edit_header(single / SINGLE, LIES[lie])
    out = tmp_path / "out"
    key = "lm_head.weight" if "lm_head" in lie else Q
    assert key in run(prune_args(single, out, stream), out)
    # The streaming session checks again by itself (the Python API has no CLI pre-flight).
    with pytest.raises(UsageError, match=key.replace(".", r"\.")):
        secateurs.prune_streamed(single, out, secateurs.PruneConfig("magnitude", 0.5))
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_extra_tensor_streaming_cannot_read_is_refused_before_work(single, tmp_path):
    """A tensor the model does not have is copied through by ``finish()``, after every block: a
    dtype streaming cannot read is refused before the first."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(single / SINGLE)
    tensors["extra.scale"] = torch.zeros(4, dtype=torch.uint16)
    save_file(tensors, single / SINGLE, metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(UsageError, match="extra.scale in model.safetensors has dtype U16, which streaming cannot read"):
        secateurs.prune_streamed(single, out, secateurs.PruneConfig("magnitude", 0.5))
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_integer_weight_is_not_loaded_as_floats(single):
    edit_header(single / SINGLE, LIES["integer dtype"])
    with pytest.raises(UsageError, match=f"{Q} in model.safetensors is stored as I32"):
        load_model(str(single))


# --- item 7: absurd configs ------------------------------------------------------------------

CONFIGS: dict[str, dict] = {
    "a million layers": {"num_hidden_layers": 1_000_000},
    "more layers than the weights hold": {"num_hidden_layers": 4},
    "negative hidden size": {"hidden_size": -64},
    "hidden size 1e9 as a float": {"hidden_size": 1e9},
    "hidden size 10**9": {"hidden_size": 10**9},
    "hidden size the weights do not have": {"hidden_size": 128, "head_dim": 32},
    "vocabulary the weights do not have": {"vocab_size": 100_000},
    "layers as a string": {"num_hidden_layers": "3"},
}


def _write_config(folder: Path, change: dict) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(change)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("stream", [False, True], ids=["in-memory", "stream"])
@pytest.mark.parametrize("case", CONFIGS)
def test_absurd_config_is_one_line_before_anything_is_built(single, tmp_path, case, stream):
    _write_config(single, CONFIGS[case])
    out = tmp_path / "out"
    key = next(iter(CONFIGS[case]))
    assert key in run(prune_args(single, out, stream), out)
    with pytest.raises(UsageError, match=key):
        secateurs.prune_streamed(single, out, secateurs.PruneConfig("magnitude", 0.5))
    with pytest.raises(UsageError, match=key):
        load_model(str(single))
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_eval_refuses_an_absurd_config_before_loading(single, tmp_path):
    """``eval`` has no shape pre-flight: the load itself checks the config first."""
    _write_config(single, {"num_hidden_layers": 1_000_000})
    result = runner.invoke(app, ["eval", str(single), "--device", "cpu"])
    assert result.exit_code == 2 and result.output.strip().startswith("error:"), result.output
    assert "num_hidden_layers" in result.output


def test_width_the_weights_do_not_have_is_refused_before_it_is_allocated(single):
    """An MLP width of 4 million in a 128-wide model: the load would allocate 9 GB of random weights
    before transformers noticed the mismatch; the weightless skeleton is compared first."""
    _write_config(single, {"intermediate_size": 4_000_000})
    with pytest.raises(UsageError, match=r"mlp\.gate_proj\.weight in model.safetensors has shape \[128, 64\]"):
        load_model(str(single))

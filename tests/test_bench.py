"""``secateurs bench`` and ``prune --export sparse`` on tiny models (mechanics only, never timings)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import prune_2of4, random_ids, tiny_model
from typer.testing import CliRunner

from secateurs import UsageError, load_model, save
from secateurs.cli import app
from secateurs.evaluate.speed import SpeedConfig, measure, ratios
from secateurs.kernels import sparse_layers

SMALL = ["--prompt-lengths", "8,16", "--batches", "1,2", "--new-tokens", "3", "--warmup", "0", "--repeats", "1"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A dense tiny Llama and its magnitude-2:4 twin, both saved as HF folders."""
    root = tmp_path_factory.mktemp("bench")
    loaded = tiny_model("llama")
    dense = save(loaded, root / "dense", stages=[])
    prune_2of4(loaded)
    pruned = save(loaded, root / "pruned", stages=[])
    return dense, pruned


def test_measure_reports_every_requested_point():
    loaded = tiny_model("llama")
    config = SpeedConfig(prompt_lengths=(8, 16), decode_batches=(1, 3), new_tokens=2, warmup=0, repeats=1)
    result = measure(loaded.model, "m", torch.device("cpu"), config)
    assert set(result.prefill_ms) == {8, 16} and set(result.ttft_ms) == {8, 16}
    assert set(result.decode_tokens_per_s) == {1, 3}
    assert all(v > 0 for v in [*result.prefill_ms.values(), *result.decode_tokens_per_s.values()])
    assert result.decode_mode == "eager" and result.peak_mib is None
    tensors = [*loaded.model.parameters(), *loaded.model.buffers()]
    assert result.weight_mib == pytest.approx(sum(t.numel() * t.element_size() for t in tensors) / 2**20)
    same = ratios(result, result)
    assert same["decode_speedup"] == {1: 1.0, 3: 1.0} and same["weight_fraction"]["all"] == 1.0


def test_decode_does_not_change_the_model_output():
    loaded = tiny_model("llama")
    ids = random_ids(1, 10)
    before = loaded.model(ids).logits
    measure(loaded.model, "m", torch.device("cpu"), SpeedConfig((8,), (1,), new_tokens=2, warmup=0, repeats=1))
    torch.testing.assert_close(loaded.model(ids).logits, before)


def test_bench_cli_compares_baseline_pruned_and_sparse(folders, tmp_path):
    dense, pruned = folders
    out = tmp_path / "bench.json"
    done = CliRunner().invoke(app, ["bench", str(pruned), "--baseline", str(dense), "--device", "cpu", *SMALL,
                                    "--json", str(out)])
    assert done.exit_code == 0, done.output
    report = json.loads(out.read_text())
    assert [r["label"] for r in report["results"]] == ["baseline", "pruned", "sparse"]
    assert set(report["ratios"]) == {"pruned", "sparse"}
    assert report["ratios"]["sparse"]["weight_fraction"]["all"] < 1.0
    assert report["sparsify"]["layers"] and "decode batch 2" in done.output
    assert any("reference" in note for note in report["notes"])


def test_bench_of_a_dense_model_falls_back_with_a_note(folders, tmp_path):
    dense, _ = folders
    out = tmp_path / "dense.json"
    done = CliRunner().invoke(app, ["bench", str(dense), "--device", "cpu", *SMALL, "--json", str(out)])
    assert done.exit_code == 0, done.output
    report = json.loads(out.read_text())
    assert [r["label"] for r in report["results"]] == ["model"]
    assert "prune it first" in report["notes"][0]


@pytest.mark.parametrize("args, message", [
    (["--device", "cuda"], "no CUDA GPU"),
    (["--device", "cpu", "--batches", "1,x"], "comma-separated integers"),
    (["--device", "cpu", "--new-tokens", "0"], "--new-tokens"),
])
def test_bench_bad_input_exits_2(folders, args, message):
    if args[1] == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    done = CliRunner().invoke(app, ["bench", str(folders[0]), *args])
    assert done.exit_code == 2 and message in done.output


def test_prune_export_sparse_reloads_like_the_dense_export(folders, tmp_path):
    dense, _ = folders
    runner = CliRunner()
    common = ["prune", str(dense), "--pattern", "2:4", "--device", "cpu"]
    done = runner.invoke(app, [*common, "--out", str(tmp_path / "d")])
    assert done.exit_code == 0, done.output
    done = runner.invoke(app, [*common, "--out", str(tmp_path / "s"), "--export", "sparse"])
    assert done.exit_code == 0, done.output
    plain, sparse = load_model(str(tmp_path / "d")), load_model(str(tmp_path / "s"))
    assert not sparse_layers(plain.model) and len(sparse_layers(sparse.model)) == 21
    stages = json.loads((tmp_path / "s" / "secateurs.json").read_text())["stages"]
    assert [s["stage"] for s in stages] == ["prune", "export"]
    ids = random_ids(2, 12)
    torch.testing.assert_close(sparse.model(ids).logits, plain.model(ids).logits)


def test_prune_export_unknown_value_exits_2_before_work(folders, tmp_path):
    done = CliRunner().invoke(app, ["prune", str(folders[0]), "--out", str(tmp_path / "x"), "--export", "csr"])
    assert done.exit_code == 2 and "--export" in done.output
    assert not (tmp_path / "x").exists()


def test_bench_of_a_sparse_export_reports_its_stored_bytes_and_decode_method(folders, tmp_path):
    dense, _ = folders
    exported = tmp_path / "s"
    done = CliRunner().invoke(app, ["prune", str(dense), "--pattern", "2:4", "--device", "cpu", "--out", str(exported),
                                    "--export", "sparse"])
    assert done.exit_code == 0, done.output
    out = tmp_path / "bench.json"
    done = CliRunner().invoke(app, ["bench", str(exported), "--baseline", str(dense), "--device", "cpu", *SMALL,
                                    "--json", str(out)])
    assert done.exit_code == 0, done.output
    report = json.loads(out.read_text())
    assert [r["label"] for r in report["results"]] == ["baseline", "sparse"]
    sparse = report["results"][1]
    assert sparse["extra_mib"] == 0 and sparse["decode_mode"] == "eager" and set(sparse["decode_by_method"]) == {"eager"}
    assert report["ratios"]["sparse"]["weight_fraction"]["all"] < 1.0
    assert "run-time copies" in done.output and "decode by" in done.output


def test_bench_unknown_decode_method_exits_2(folders):
    done = CliRunner().invoke(app, ["bench", str(folders[0]), "--device", "cpu", "--decode-methods", "cuda-graph,warp"])
    assert done.exit_code == 2 and "--decode-methods" in done.output
    with pytest.raises(UsageError, match="decode-methods"):
        SpeedConfig(decode_methods=()).check()

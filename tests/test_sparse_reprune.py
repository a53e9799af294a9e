"""A stage that edits weights, run on a sparse export, works on its dense expansion (zeros kept) instead of
failing inside a method on a layer with no ``.weight``; MoE experts in the sparse layout are one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model
from typer.testing import CliRunner

from secateurs.cli import app
from secateurs.model.load import load_model


def _save(arch: str, folder: Path) -> Path:
    loaded = tiny_model(arch)
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


def _prune(source: Path, out: Path, *flags: str) -> object:
    return CliRunner().invoke(app, ["prune", str(source), "--method", "magnitude", *flags, "--out", str(out),
                                    "--device", "cpu"])


def test_pruning_a_sparse_export_again_prunes_its_dense_expansion(tmp_path):
    sparse = tmp_path / "sparse"
    assert _prune(_save("llama", tmp_path / "dense"), sparse, "--pattern", "2:4", "--export", "sparse").exit_code == 0
    again = _prune(sparse, tmp_path / "again", "--sparsity", "0.6")
    assert again.exit_code == 0, again.output
    before = load_model(str(sparse)).model
    after = load_model(str(tmp_path / "again")).model
    q_before = before.get_submodule("model.layers.0.self_attn.q_proj").dense_weight()
    q_after = after.get_submodule("model.layers.0.self_attn.q_proj").weight
    assert torch.all(q_after[q_before == 0] == 0)  # the 2:4 zeros stay zeros
    assert (q_after == 0).float().mean() > 0.59  # then pruned to 60% (rounded per row)


def test_a_sparse_moe_export_given_to_prune_is_one_line(tmp_path):
    sparse = tmp_path / "sparse"
    assert _prune(_save("mixtral", tmp_path / "dense"), sparse, "--pattern", "2:4", "--export", "sparse").exit_code == 0
    again = _prune(sparse, tmp_path / "again", "--sparsity", "0.6")
    assert again.exit_code == 2
    assert "dense checkpoint the export came from" in " ".join(again.output.split())
    assert "Traceback" not in again.output
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("stage", ["eval"])
def test_measuring_stages_keep_the_sparse_layers(tmp_path, stage, monkeypatch):
    """eval/bench measure the export as it runs (on its kernels), so they never expand it."""
    from secateurs.kernels import swap

    sparse = tmp_path / "sparse"
    assert _prune(_save("llama", tmp_path / "dense"), sparse, "--pattern", "2:4", "--export", "sparse").exit_code == 0
    monkeypatch.setattr(swap, "densify", lambda *a: pytest.fail("a measuring stage expanded a sparse export"))
    from secateurs.stages.measure import EvalStage

    request = EvalStage().parse(str(sparse))
    loaded = EvalStage().load(request)
    assert any(type(m).__name__ == "SparseLinear" for m in loaded.model.modules())

"""``secateurs eval`` knows before the model loads whether its data can be read: an offline
``--ppl c4`` (no local copy, hub offline) is one ``error:`` line and exit 2, and the model is never
loaded (it was loaded, evaluated on nothing, and the reason printed as a note)."""

from __future__ import annotations

import pytest
from tiny_models import tiny_model
from typer.testing import CliRunner

from secateurs.cli import app


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    loaded = tiny_model("llama")
    path = tmp_path_factory.mktemp("model") / "tiny"
    loaded.model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    return path


def _never_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the data was checked")


@pytest.mark.parametrize("datasets", ["c4", "wikitext2,c4"])
def test_unreachable_data_is_one_error_before_the_model_loads(folder, data_dir, monkeypatch, datasets):
    """The shared data folder has wikitext2 but no c4."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr("secateurs.model.load.load_model", _never_load)
    result = CliRunner().invoke(app, ["eval", str(folder), "--ppl", datasets, "--seq-len", "16", "--device", "cpu",
                                      "--data-dir", str(data_dir)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "c4 (test) is unavailable" in lines[0], result.output

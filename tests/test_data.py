"""Data sources: local copies, text files, clear errors offline, perplexity windows."""

from __future__ import annotations

import json

import pytest
import torch

from secateurs.data.calib import CalibConfig, calibration_ids, random_windows
from secateurs.data.sources import load_text
from secateurs.errors import UsageError
from secateurs.evaluate.perplexity import windows_of


def test_local_wikitext2_and_ptb(data_dir):
    test = load_text("wikitext2", "test", data_dir)
    assert "Robert Boulter" in test[:200]
    assert "\r" not in test
    assert "\n\n" in test
    calib = load_text("wikitext2", "train", data_dir)
    assert calib[:500] != test[:500]
    ptb = load_text("ptb", "test", data_dir)
    assert "\n" not in ptb and "<unk>" in ptb
    assert len(load_text("ptb", "train", data_dir)) > 4_000_000


def test_c4_offline_is_a_clear_error(data_dir):
    with pytest.raises(UsageError, match="c4 .*unavailable"):
        load_text("c4", "test", data_dir)


def test_missing_local_copy_names_the_fix(tmp_path):
    with pytest.raises(UsageError, match="no local copy"):
        load_text("wikitext2", "test", tmp_path)


def test_unknown_dataset():
    with pytest.raises(UsageError, match="unknown dataset 'wikitext3'"):
        load_text("wikitext3", "test")


def test_jsonl_and_txt(tmp_path):
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps({"text": t}) for t in ["alpha", "beta"]) + "\n")
    assert load_text(str(jl), "train") == "alpha\n\nbeta"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": 1}\n')
    with pytest.raises(UsageError, match="bad.jsonl:1 has no string field 'text'"):
        load_text(str(bad), "train")
    txt = tmp_path / "t.txt"
    txt.write_text("one\r\ntwo\r\n")
    assert load_text(str(txt), "test") == "one\ntwo\n"


def test_too_short_for_requested_windows():
    with pytest.raises(UsageError, match="fewer than --seq-len 64"):
        random_windows(torch.arange(50), 4, 64, 0, "data file x.txt")


def test_windows_are_non_overlapping_and_limited():
    ids = torch.arange(1000)
    w = windows_of(ids, 128)
    assert w.shape == (7, 128) and torch.equal(w.flatten(), ids[:896])
    assert windows_of(ids, 128, limit=3).shape == (3, 128)


def test_self_generated_calibration_is_seeded():
    from tiny_models import tiny_model

    loaded = tiny_model("llama")
    config = CalibConfig("self", n_samples=3, seq_len=12, seed=5)
    a = calibration_ids(config, loaded.tokenizer, loaded.model)
    b = calibration_ids(config, loaded.tokenizer, loaded.model)
    assert a.shape == (3, 12)
    assert torch.equal(a, b)

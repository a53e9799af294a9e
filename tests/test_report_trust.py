"""``secateurs report`` reads records a user may have edited: every malformation of a real record
(a type swapped, a field removed, deep nesting, huge numbers, NaN, a zero perplexity, a label that
breaks lines) gives either a report whose table is whole or one line naming the file and the field,
exit 2 and no OUT, never a traceback."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
from tiny_models import tiny_model
from typer.testing import CliRunner

from secateurs.api import PruneConfig, prune, save
from secateurs.cli import app

pytest.importorskip("matplotlib")

DEEP = "__deep__"
REMOVE = object()
# What a field is replaced by: every JSON type, numbers a float cannot hold or a ratio cannot use,
# and nesting deeper than Python's decoder can recurse.
SWAPS = {"removed": REMOVE, "text": "x", "list": [], "object": {}, "null": None, "true": True, "zero": 0,
         "negative": -1, "huge int": 10**400, "infinity": math.inf, "nan": math.nan, "deep": DEEP}
# The fields report reads, by path in the record.
FIELDS = [
    ("stages",), ("stages", 0), ("stages", 0, "stage"), ("stages", 0, "method"), ("stages", 0, "pattern"),
    ("stages", 0, "achieved_sparsity"), ("stages", 0, "achieved_sparsity", "mean"),
    ("stages", 0, "achieved_sparsity", "per_layer"),
    ("stages", 0, "achieved_sparsity", "per_layer", "model.layers.1.mlp.up_proj"),
    ("results",), ("results", "ppl_wikitext2"), ("results", "ppl_wikitext2", "ppl"), ("results", "zeroshot"),
    ("results", "zeroshot", "tasks"), ("results", "zeroshot", "tasks", "piqa"),
    ("results", "zeroshot", "tasks", "piqa", "acc"), ("results", "zeroshot", "mean_acc"),
    ("results", "zeroshot", "limit"), ("results", "speed", "decode_tokens_per_s"),
    ("results", "speed", "decode_tokens_per_s", "1"), ("label",),
]


@pytest.fixture(scope="module")
def record(tmp_path_factory) -> dict:
    """The secateurs.json of a tiny magnitude prune, with the results an eval and a bench add."""
    loaded = tiny_model("llama")
    stage = prune(loaded, PruneConfig("magnitude", 0.5)).stage_record()
    results = {"ppl_wikitext2": {"ppl": 30.0, "windows": 4, "seq_len": 64},
               "zeroshot": {"tasks": {"piqa": {"acc": 0.6}}, "mean_acc": 0.6, "limit": 10},
               "speed": {"decode_tokens_per_s": {"1": 50.0}}}
    folder = save(loaded, tmp_path_factory.mktemp("real") / "mag", [stage], results)
    data = json.loads((folder / "secateurs.json").read_text())
    data["label"] = "mag"
    return data


def _write(path: Path, data: dict) -> None:
    text = json.dumps(data)  # NaN and Infinity as Python writes them
    path.write_text(text.replace(json.dumps(DEEP), "[" * 100_000 + "]" * 100_000))


def _edited(record: dict, where: tuple, swap: object) -> dict:
    data = copy.deepcopy(record)
    target = data
    for key in where[:-1]:
        target = target[key]
    if swap is REMOVE:
        del target[where[-1]]
    else:
        target[where[-1]] = swap
    return data


def _check(result, out: Path, record_file: Path) -> None:
    """Exit 0 with a whole table, or exit 2 with one line naming the record file and no OUT."""
    assert result.exit_code in (0, 2), f"{result.exception!r}\n{result.output}"
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), result.output
        assert record_file.name in result.output.replace("\n", "")
        assert not out.exists()
        return
    table = [line for line in (out / "report.md").read_text().splitlines() if line.startswith("|")]
    assert len(table) == 3, table
    cells = {line.replace("\\|", "").count("|") for line in table}
    assert len(cells) == 1, table


@pytest.mark.parametrize("where", FIELDS, ids=[".".join(map(str, f)) for f in FIELDS])
def test_every_malformed_field_is_a_report_or_one_line(record, tmp_path, monkeypatch, where):
    """(The plots are laid out but not rendered here, for speed; the label tests render them.)"""
    monkeypatch.setattr("secateurs.report._png", lambda fig: b"\x89PNG")
    runner = CliRunner()
    for name, swap in SWAPS.items():
        path, out = tmp_path / f"{name}.json", tmp_path / f"report-{name}"
        _write(path, _edited(record, where, swap))
        _check(runner.invoke(app, ["report", str(path), "--out", str(out)]), out, path)


@pytest.mark.parametrize("label", ["two\nlines", "a | b", "cr\rhere", "a$_$b", "tab\there|\n|"])
def test_a_label_never_breaks_the_table(record, tmp_path, label):
    path, out = tmp_path / "run.json", tmp_path / "report"
    _write(path, {**record, "label": label})
    result = CliRunner().invoke(app, ["report", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    _check(result, out, path)


@pytest.mark.parametrize("name, edit", [
    ("block past any model", lambda r: r["stages"][0]["achieved_sparsity"]["per_layer"].update(
        {"model.layers.99999999999.mlp.up_proj": 0.5})),
    ("zero perplexity", lambda r: r["results"]["ppl_wikitext2"].update(ppl=0)),
    ("sparsity as text", lambda r: r["stages"][0]["achieved_sparsity"].update(mean="half")),
    ("accuracy above one", lambda r: r["results"]["zeroshot"]["tasks"]["piqa"].update(acc=7)),
    ("stage record a list", lambda r: r.update(stages=[[1, 2]])),
])
def test_a_malformed_record_names_the_field(record, tmp_path, name, edit):
    data = copy.deepcopy(record)
    edit(data)
    path, out = tmp_path / "run.json", tmp_path / "report"
    _write(path, data)
    result = CliRunner().invoke(app, ["report", str(path), "--out", str(out)])
    assert result.exit_code == 2, result.output
    _check(result, out, path)
    assert "stages[0]" in result.output or "results." in result.output


def test_a_benchmark_file_with_a_bad_entry_is_one_line(record, tmp_path):
    path, out = tmp_path / "bench.json", tmp_path / "report"
    path.write_text(json.dumps({"runs": [record, "not a run"]}))
    result = CliRunner().invoke(app, ["report", str(path), "--out", str(out)])
    assert result.exit_code == 2 and "runs[1]" in result.output, result.output
    _check(result, out, path)

"""A report renders from saved runs: the table holds each run's numbers, the plots are real PNGs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny_models import tiny_model
from typer.testing import CliRunner

from secateurs.api import PruneConfig, prune, save
from secateurs.cli import app
from secateurs.record import run_record
from secateurs.report import results_table
from secateurs.runs import count_parameters, load_run, load_runs

pytest.importorskip("matplotlib")

SERIES_COLORS = {"C0": (31, 119, 180), "C1": (255, 127, 14)}  # matplotlib's first two cycle colours


def _scores(accs: dict[str, float], limit: int) -> dict:
    tasks = {t: {"task": t, "acc": a, "acc_norm": None, "samples": limit, "source": "local"} for t, a in accs.items()}
    return {"tasks": tasks, "unavailable": {}, "mean_acc": sum(accs.values()) / len(accs), "limit": limit,
            "lm_eval": "test"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A dense folder, two magnitude-pruned folders, and an eval --json file for the dense one."""
    root = tmp_path_factory.mktemp("runs")
    made = {}
    for name, sparsity, ppl, acc in (("dense", None, 20.0, 0.6), ("mag30", 0.3, 25.0, 0.5), ("mag60", 0.6, 80.0, 0.4)):
        loaded = tiny_model("llama")
        stages = []
        if sparsity is not None:
            stages.append(prune(loaded, PruneConfig("magnitude", sparsity)).stage_record())
        results = {"ppl_wikitext2": {"ppl": ppl, "windows": 4, "seq_len": 64, "tokens": 256},
                   "zeroshot": _scores({"piqa": acc, "hellaswag": acc - 0.1}, 10)}
        made[name] = save(loaded, root / name, stages, results)
    evaluated = root / "dense.eval.json"
    evaluated.write_text(json.dumps({"model": str(made["dense"]),
                                     "perplexity": {"wikitext2": {"ppl": 21.0, "windows": 4, "seq_len": 64}},
                                     "zeroshot": _scores({"piqa": 0.7}, 5)}))
    made["eval"] = evaluated
    return made


def _png_pixels(path) -> np.ndarray:
    import matplotlib.image

    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return (matplotlib.image.imread(path)[..., :3] * 255).round().astype(int)


def _has_color(pixels: np.ndarray, rgb: tuple[int, int, int]) -> bool:
    return bool((np.abs(pixels - np.array(rgb)).sum(axis=-1) < 12).sum() > 20)


def test_report_renders_from_saved_runs(runs, tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["report", str(runs["dense"]), str(runs["mag30"]), str(runs["mag60"]),
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = (out / "report.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "80.00" in rows["mag60"] and "4.00" in rows["mag60"]  # ppl and ppl / dense
    assert "0.400" in rows["mag60"] and "-0.200" in rows["mag60"]  # piqa acc and mean acc − dense
    assert "magnitude" in rows["mag30"] and "0.300 sparsity" in rows["mag30"]
    assert "![quality](quality.png)" in text and "![per_layer](per_layer.png)" in text
    quality = _png_pixels(out / "quality.png")
    # Two series: dense (C0) and magnitude (C1), drawn in both panels.
    assert _has_color(quality, SERIES_COLORS["C0"]) and _has_color(quality, SERIES_COLORS["C1"])
    per_layer = _png_pixels(out / "per_layer.png")
    assert per_layer.shape[0] > quality.shape[0] // 2 and _has_color(per_layer, SERIES_COLORS["C0"])


def test_run_from_folder_and_eval_json(runs):
    mag = load_run(runs["mag60"])
    assert mag.kind == "sparsity" and mag.removed == pytest.approx(0.6, abs=0.01)
    assert set(mag.layers["sparsity"]) == {0, 1, 2}
    assert mag.params == count_parameters(runs["mag60"]) and mag.params > 0
    evaluated = load_run(runs["eval"])
    assert evaluated.kind == "dense" and evaluated.perplexity == {"wikitext2": 21.0}
    assert evaluated.zeroshot == {"piqa": 0.7} and evaluated.zeroshot_limit == 5


def test_bad_runs_exit_2(runs, tmp_path):
    runner = CliRunner()
    missing = runner.invoke(app, ["report", str(tmp_path / "nope"), "--out", str(tmp_path / "r")])
    assert missing.exit_code == 2 and "not found" in missing.output
    several = runner.invoke(app, ["report", str(runs["dense"]), str(runs["mag30"])])
    assert several.exit_code == 2 and "--out" in several.output
    same = runner.invoke(app, ["report", str(runs["dense"]), str(runs["dense"]), "--out", str(tmp_path / "r")])
    assert same.exit_code == 2 and "share a name" in same.output
    assert not (tmp_path / "r" / "report.md").exists()


def test_benchmark_results_file_renders_one_run_per_variant(tmp_path):
    """A benchmark's results file (benchmarks/records.py) holds run records that report reads like folders."""
    loaded = tiny_model("llama")
    stage = prune(loaded, PruneConfig("magnitude", 0.5, "2:4")).stage_record()
    runs = [run_record("dense", "tiny", [], {"wikitext2": 30.0}), run_record("mag 2:4", "tiny", [stage], {"wikitext2": 45.0})]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"rows": [], "runs": runs}))
    dense, pruned = load_runs(path)
    assert (dense.label, dense.kind, dense.perplexity) == ("dense", "dense", {"wikitext2": 30.0})
    assert (pruned.label, pruned.method, pruned.kind) == ("mag 2:4", "magnitude 2:4", "sparsity")
    assert pruned.removed == pytest.approx(0.5) and pruned.perplexity == {"wikitext2": 45.0}
    result = CliRunner().invoke(app, ["report", str(path), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "| mag 2:4 |" in (tmp_path / "r" / "report.md").read_text()


def test_a_bar_in_a_label_stays_inside_its_cell(tmp_path):
    """Benchmark labels such as ``gradmap weights mean|g|`` must not add a column to the Markdown table."""
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"runs": [run_record("dense", "tiny", [], {"wikitext2": 30.0}),
                                         run_record("mean|g| -1", "tiny", [], {"wikitext2": 31.0})]}))
    table = results_table(load_runs(path))
    header, _, dense, bar = table.splitlines()
    assert "mean\\|g\\| -1" in bar
    assert bar.replace("\\|", "").count("|") == header.count("|")

"""benchmarks/distill_tables.py --jobs: the children get the command line less the options the parent
sets for them, a failed child's finished rows are kept and it is reported, the rest go on (a fake child
stands in for the script: no model, no GPU)."""

import argparse
import json
import sys
from pathlib import Path

FAKE_CHILD = """
import json, sys
args = sys.argv[1:]
case, out = args[args.index("--cases") + 1], args[args.index("--results") + 1]
print("argv", json.dumps(args), flush=True)
rows = [{"case": case, "loss": "pruned"}] + ([] if case == "broken" else [{"case": case, "loss": "kl"}])
if case != "silent":
    json.dump({"rows": rows}, open(out, "w"))
sys.exit(3 if case == "broken" else 0)
"""


class _Rows:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, row: dict) -> None:
        self.rows.append(row)


def test_side_by_side_filters_the_childrens_options_keeps_a_failed_childs_rows_and_reports_it(
        tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import distill_tables

    child = tmp_path / "child.py"
    child.write_text(FAKE_CHILD)
    monkeypatch.setattr(distill_tables, "__file__", str(child))
    monkeypatch.setattr(sys, "argv", ["distill_tables.py", "--model", "m", "--jobs", "2", "--cases=ok,broken,silent",
                                      "--keep", "--results", "x.json", "--tokens", "1k"])
    table = _Rows()
    distill_tables.side_by_side(["ok", "broken", "silent"], table, argparse.Namespace(jobs=2))
    out = capsys.readouterr().out
    passed = [json.loads(line.split("argv ", 1)[1]) for line in out.splitlines() if "argv " in line]
    assert len(passed) == 3
    for argv in passed:
        assert argv[:4] == ["--model", "m", "--tokens", "1k"] and argv.count("--cases") == 1
        assert "--jobs" not in argv and "--keep" not in argv and "x.json" not in argv and argv[-1] == "--no-dense"
    assert sorted((r["case"], r["loss"]) for r in table.rows) == [("broken", "pruned"), ("ok", "kl"), ("ok", "pruned")]
    assert all(r["concurrent_jobs"] == 2 for r in table.rows)
    assert "cases that failed: broken, silent" in out


def test_each_recovery_loss_maps_to_its_objective_and_an_unknown_one_is_refused_before_any_work(monkeypatch):
    """--losses picks the rows' objectives: lm trains without a teacher, kd is logit KD alone, kd+lm mixes the
    two by --alpha (the mix for where KD alone lost the training corpus's own perplexity on the H100 run)."""
    import pytest

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import distill_tables

    args = argparse.Namespace(lora_lr=1e-3, batch_size=2, seq_len=64, seed=0, tokens=1024, epochs=1.0, eval_every=4,
                              eval_windows=2, temperature=2.0, alpha=0.25)
    objectives = {loss: distill_tables.recover_config(args, loss).distill for loss in distill_tables.LOSSES}
    assert objectives["lm"].loss is None
    assert (objectives["kd"].loss, objectives["kd"].temperature) == ("kl", 2.0)
    assert (objectives["kd+lm"].loss, objectives["kd+lm"].alpha, objectives["kd+lm"].temperature) == ("kl+lm", 0.25, 2.0)
    monkeypatch.setattr(sys, "argv", ["distill_tables.py", "--losses", "lm,kl"])
    with pytest.raises(SystemExit, match="unknown --losses 'kl'; use any of lm, kd, kd\\+lm"):
        distill_tables.main()

"""What secateurs never does to an output: delete a file it did not write, replace a folder that is
not its own, let two runs write one OUT, or lose the final model of a recipe on a rerun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from secateurs import stages
from secateurs.model import load as model_load
from secateurs.cli import app
from secateurs.errors import UsageError
from secateurs.files import HOLDER_ENV, lock_file, output_lock
from secateurs.recipe import load_recipe, run

runner = CliRunner()



def _one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert "Traceback" not in text and len(text.splitlines()) == 1 and text.startswith("error:"), text
    for needle in needles:
        assert needle in text, text
    return text


def _prune(model: Path, out: Path | str, *extra: str):
    return runner.invoke(app, ["prune", str(model), "--out", str(out), "--method", "magnitude", "--sparsity", "0.5",
                               "--device", "cpu", *extra])


# --- recipes: a rerun never loses the final model or a user's file ---------------------------


def _recipe(folder: Path, out: Path) -> dict:
    return {"model": str(folder), "stages": [{"prune": {"method": "magnitude", "sparsity": 0.5, "device": "cpu"}}],
            "out": str(out)}


def _weights(out: Path) -> int:
    return (out / "model.safetensors").stat().st_size


@pytest.mark.parametrize("removed", ["model", "model/model.safetensors"])
def test_recipe_rerun_rebuilds_a_removed_stage_output_and_keeps_the_final_model(tmp_path, tiny_folder, removed):
    out = tmp_path / "run"
    run(_recipe(tiny_folder, out), echo=lambda _: None)
    size = _weights(out)
    target = out / "stages" / "01-prune" / removed
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    lines: list[str] = []
    run(_recipe(tiny_folder, out), echo=lines.append)
    assert "missing" in lines[0] and "running it again" in lines[0], lines
    assert _weights(out) == size
    assert (out / "stages" / "01-prune" / "model" / "model.safetensors").is_file()
    assert json.loads((out / "secateurs.json").read_text())["results"]["published"]


def test_recipe_publish_that_fails_leaves_the_previous_output(tmp_path, tiny_folder, monkeypatch):
    import secateurs.recipe

    out = tmp_path / "run"
    run(_recipe(tiny_folder, out), echo=lambda _: None)
    before = sorted(path.name for path in out.iterdir())
    (out / "stages" / "01-prune" / "stage.json").unlink()  # the stage runs again, then publishing fails

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(secateurs.recipe, "replace_folder", full)
    with pytest.raises(UsageError, match="No space left"):
        run(_recipe(tiny_folder, out), echo=lambda _: None)
    assert sorted(path.name for path in out.iterdir()) == before
    assert (out / "stages" / "01-prune" / "model" / "model.safetensors").is_file()
    assert not [path for path in tmp_path.iterdir() if ".publish-" in path.name]


def test_recipe_refuses_an_out_holding_a_user_file_and_keeps_it(tmp_path, tiny_folder):
    out = tmp_path / "run"
    run(_recipe(tiny_folder, out), echo=lambda _: None)
    notes = out / "notes.txt"
    notes.write_text("mine")
    changed = _recipe(tiny_folder, out)
    changed["stages"][0]["prune"]["sparsity"] = 0.6
    lines: list[str] = []
    with pytest.raises(UsageError, match="notes.txt.*did not write"):
        run(changed, echo=lines.append)
    assert lines == []  # refused before stage 1
    assert notes.read_text() == "mine"
    with pytest.raises(UsageError, match="notes.txt"):
        run(changed, dry_run=True)


def test_recipe_output_written_before_the_published_list_is_still_recognised(tmp_path, tiny_folder):
    """A record without the list of published files (an older secateurs): the final model's files are its own."""
    out = tmp_path / "run"
    run(_recipe(tiny_folder, out), echo=lambda _: None)
    record = json.loads((out / "secateurs.json").read_text())
    del record["results"]["published"]
    (out / "secateurs.json").write_text(json.dumps(record))
    changed = _recipe(tiny_folder, out)
    changed["stages"][0]["prune"]["sparsity"] = 0.6
    run(changed, echo=lambda _: None)
    assert _weights(out) > 0


@pytest.mark.parametrize("content", ['"done"', "[1, 2]", "{not json"])
def test_stage_json_that_is_not_an_object_reruns_the_stage(tmp_path, tiny_folder, content):
    out = tmp_path / "run"
    run(_recipe(tiny_folder, out), echo=lambda _: None)
    (out / "stages" / "01-prune" / "stage.json").write_text(content)
    assert run(_recipe(tiny_folder, out), dry_run=True)["plan"][0]["action"] == "run"
    lines: list[str] = []
    run(_recipe(tiny_folder, out), echo=lines.append)
    assert "stage.json" in lines[0] and "running it again" in lines[0], lines
    assert _weights(out) > 0


def test_recipe_eval_data_is_checked_before_stage_1_and_data_dir_reaches_eval(tmp_path, tiny_folder, monkeypatch):
    monkeypatch.delenv("SECATEURS_DATA", raising=False)
    recipe = _recipe(tiny_folder, tmp_path / "run")
    recipe["stages"].append({"eval": {"ppl": ["wikitext2"], "seq_len": 32, "device": "cpu"}})
    with pytest.raises(UsageError, match=r"stage 2 \(eval\).*wikitext2 \(test\) is unavailable"):
        load_recipe(recipe)
    data = tmp_path / "data"
    (data / "wikitext-2-raw").mkdir(parents=True)
    (data / "wikitext-2-raw" / "wiki.test.raw").write_text(" = title = \n\n the quick brown fox jumps . " * 40)
    recipe["calib"] = {"data_dir": str(data)}
    parsed = load_recipe(recipe)
    assert parsed.stages[1].fields["data_dir"] == str(data)
    record = run(parsed, echo=lambda _: None)
    assert record["stages"][1]["results"]["perplexity"]["wikitext2"]["ppl"] > 1


# --- --overwrite replaces only what secateurs wrote -----------------------------------------


def test_overwrite_refuses_a_folder_of_user_files(tmp_path, tiny_folder, no_loading):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"\xff\xd8")
    _one_line_error(_prune(tiny_folder, out, "--overwrite"), "did not write", "secateurs.json")
    assert (out / "holiday.jpg").read_bytes() == b"\xff\xd8"


@pytest.mark.parametrize("where", ["current", "parent", "home"])
def test_overwrite_never_replaces_the_current_folder_its_parents_or_home(tmp_path, tiny_folder, no_loading,
                                                                        monkeypatch, where):
    work = tmp_path / "home" / "work"
    work.mkdir(parents=True)
    (work / "secateurs.json").write_text("{}")  # even a secateurs output is refused there
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    out = {"current": ".", "parent": "..", "home": "~"}[where]
    _one_line_error(_prune(tiny_folder, out, "--overwrite"), "never replaces it")
    assert (work / "secateurs.json").is_file()


def test_overwrite_replaces_an_empty_folder_or_a_secateurs_output(tmp_path, tiny_folder):
    out = tmp_path / "out"
    out.mkdir()
    assert _prune(tiny_folder, out, "--overwrite").exit_code == 0
    assert (out / "secateurs.json").is_file()
    result = _prune(tiny_folder, out, "--overwrite")
    assert result.exit_code == 0, result.output


# --- OUT paths that cannot be resolved -------------------------------------------------------


def test_out_through_a_symlink_loop_is_one_line_before_loading(tmp_path, tiny_folder, no_loading):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    _one_line_error(_prune(tiny_folder, tmp_path / "a" / "out"), "loops")


def test_out_with_bytes_that_are_not_utf8_is_one_line_before_loading(tmp_path, tiny_folder, no_loading):
    out = os.fsdecode(os.fsencode(str(tmp_path)) + b"/out\xff")
    _one_line_error(_prune(tiny_folder, out), "not valid UTF-8")


def test_recipe_out_through_a_symlink_loop_is_one_line(tmp_path, tiny_folder):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(UsageError, match="loops"):
        load_recipe(_recipe(tiny_folder, tmp_path / "a" / "run"))


# --- one writer per OUT -----------------------------------------------------------------------

HOLD = """
import sys
from pathlib import Path
from secateurs.files import output_lock
with output_lock(Path(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def held_elsewhere(tmp_path):
    """Another process holding OUT's lock until the test ends; yields OUT and that process's pid."""
    out = (tmp_path / "out").resolve()
    env = {k: v for k, v in os.environ.items() if k != HOLDER_ENV}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env)
    assert holder.stdout.readline().strip() == "held"
    yield out, holder.pid
    holder.stdin.close()
    assert holder.wait(timeout=30) == 0
    assert not lock_file(out).exists()


def test_second_run_into_a_locked_out_is_one_line_naming_the_first(held_elsewhere, tiny_folder):
    out, pid = held_elsewhere
    _one_line_error(_prune(tiny_folder, out), "being written by another secateurs run", f"pid {pid}")
    assert not out.exists()


def test_second_stream_run_does_not_touch_the_first_ones_partial_output(held_elsewhere, tiny_folder):
    out, pid = held_elsewhere
    partial = out.parent / f".{out.name}.partial"
    partial.mkdir()
    (partial / "progress.json").write_text("{}")
    _one_line_error(_prune(tiny_folder, out, "--stream"), f"pid {pid}")
    assert (partial / "progress.json").read_text() == "{}"


def test_second_recipe_into_a_locked_out_is_refused(held_elsewhere, tiny_folder):
    out, pid = held_elsewhere
    with pytest.raises(UsageError, match=f"pid {pid}"):
        run(_recipe(tiny_folder, out), echo=lambda _: None)


def test_lock_left_by_a_killed_run_is_taken_over(tmp_path, tiny_folder):
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_file(out).write_text(json.dumps({"secateurs_lock": "out", "pid": dead.pid, "host": os.uname().nodename}))
    result = _prune(tiny_folder, out)
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file() and not lock_file(out).exists()


def test_two_concurrent_writers_one_refused(tmp_path, tiny_folder, monkeypatch):
    """Two runs into one OUT at once (threads here; the process case above): the second stops with one
    line while the first holds OUT, and the first's output is whole."""
    out = tmp_path / "out"
    second_done = threading.Event()
    real_load = model_load.load_model

    def slow_load(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            assert second_done.wait(timeout=60)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(model_load, "load_model", slow_load)
    def request():
        return stages.STAGES["prune"].parse(str(tiny_folder), str(out), method="magnitude", device="cpu")

    outcome: list = []
    first = threading.Thread(target=lambda: outcome.append(stages.run(request())))
    first.start()
    for _ in range(600):  # the first run holds OUT once its checks passed
        if lock_file(out.resolve()).exists() or not first.is_alive():
            break
        first.join(timeout=0.05)
    try:
        with pytest.raises(UsageError, match=f"being written by another secateurs run \\(pid {os.getpid()}"):
            stages.run(request())
    finally:
        second_done.set()
        first.join(timeout=60)
    assert outcome and outcome[0].path == out.resolve() and (out / "model.safetensors").is_file()


def test_torchrun_rank_writes_under_its_launchers_lock(held_elsewhere, monkeypatch):
    """``--nproc``: the launcher holds OUT; its rank 0 writes under that lock, other ranks never lock."""
    out, pid = held_elsewhere
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv(HOLDER_ENV, str(pid))
    with output_lock(out):
        pass
    monkeypatch.setenv(HOLDER_ENV, "1")
    with pytest.raises(UsageError, match=f"pid {pid}"), output_lock(out):
        pass
    monkeypatch.setenv("RANK", "1")
    with output_lock(out):
        pass

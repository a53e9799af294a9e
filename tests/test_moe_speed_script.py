"""The MoE size/speed benchmark runs end to end on a tiny config (its GPU run is the issue-32 speed row)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_moe_speed_script_runs_every_variant_and_checks_the_stored_model():
    """Every variant is built and measured; the 2:4 variants hold SparseExperts whose logits match the masked
    dense model (the script exits non-zero otherwise); removing half the experts shrinks the weights."""
    done = subprocess.run([sys.executable, "moe_speed.py", "--tiny", "--batches", "1,2"], cwd=ROOT / "benchmarks",
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    for label in ("dense (grouped_mm)", "dense (batched_mm)", "experts50:", "24:", "experts50+24:"):
        assert label in out
    assert out.count("logits of the stored-format model vs the masked dense one") == 2
    # every phase says when it starts and how long it took, with the seconds since the run began
    assert "24: sparsify (stored formats) ... [" in out
    assert "24: logits check (the first sparse forward): 0 kernel plans tuned in " in out  # none on the CPU
    assert "experts50+24: prefill at 16 tokens (4 forwards): " in out
    assert "24: decode at batch 2 by eager (8 steps): " in out and " tokens/s in " in out
    fractions = [line for line in out.splitlines() if line.startswith("experts50 /")]
    assert fractions and "'weight_fraction': {'all': 0.6" in fractions[0]
    assert "nothing saved" in out


def _moe_speed(monkeypatch):
    """The benchmark script as a module (it imports its sibling ``records``, so benchmarks/ goes on the path)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import moe_speed

    return moe_speed


def test_an_out_of_memory_implementation_is_recorded_and_the_other_variants_still_run(monkeypatch, capsys):
    """torch.OutOfMemoryError while measuring dense batched_mm (as on the H100 at a 2048-token prompt) is
    noted with torch's first line and printed, and every other variant is still measured."""
    import torch

    moe_speed = _moe_speed(monkeypatch)
    real_measure = moe_speed.measure

    def measure(model, label, *args, **kwargs):
        if label == "dense (batched_mm)":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 128.00 GiB. GPU 0 has ...\nmore")
        return real_measure(model, label, *args, **kwargs)

    monkeypatch.setattr(moe_speed, "measure", measure)
    monkeypatch.setattr(sys, "argv", ["moe_speed.py", "--tiny", "--batches", "1"])
    payload = moe_speed.main()
    measured = [r["label"] for r in payload["results"]]
    assert measured == ["dense (grouped_mm)", "experts50", "24", "experts50+24"]
    note = payload["notes"]["dense (batched_mm) not measured"]
    assert note == "out of memory at measure: CUDA out of memory. Tried to allocate 128.00 GiB. GPU 0 has ..."
    assert payload["baseline"] == "dense (grouped_mm)"
    assert f"dense (batched_mm): not measured: {note}" in capsys.readouterr().out


def test_batched_mm_is_measured_only_at_the_sizes_whose_expert_copies_fit(monkeypatch):
    """OLMoE-1B-7B on an H100: batched_mm copies 96 MiB of expert matrices per token (8 experts x (8 + 4) MiB),
    so with about 60 GiB free a 2048-token prompt (192 GiB) and batch 32's 1024-token decode prompt are
    skipped and named, while 512 tokens and batches 1 and 8 are kept."""
    moe_speed = _moe_speed(monkeypatch)
    per_token = 8 * (2 * 1024 * 2048 + 2048 * 1024) * 2
    config = moe_speed.SpeedConfig(prompt_lengths=(512, 2048), decode_batches=(1, 8, 32))
    fitted, skipped = moe_speed.fitting(config, per_token, 60 * 2**30)
    assert (fitted.prompt_lengths, fitted.decode_batches) == ((512,), (1, 8))
    assert skipped == ["prefill at 2048 tokens", "decode at batch 32"]
    assert fitted.new_tokens == config.new_tokens


def test_gathered_bytes_per_token_counts_top_k_copies_of_an_experts_matrices(monkeypatch):
    """On the tiny OLMoE config (hidden 64, expert width 32, top-2, fp32): 2 x (64x64 + 64x32) x 4 bytes."""
    import torch

    moe_speed = _moe_speed(monkeypatch)
    model, spec = moe_speed.build("tiny", None, torch.device("cpu"), torch.float32, "batched_mm")
    assert moe_speed.gathered_bytes_per_token(model, spec) == 2 * (64 * 64 + 64 * 32) * 4


def test_out_naming_a_folder_is_a_one_line_usage_error(monkeypatch, tmp_path, capsys):
    """``--out`` takes the JSON file's path; a folder is refused before any model is built, naming the fix."""
    moe_speed = _moe_speed(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["moe_speed.py", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exited:
        moe_speed.main()
    assert exited.value.code == 2
    assert f"name the JSON file, e.g. {tmp_path / 'moe_speed.json'}" in capsys.readouterr().err


def test_a_run_cut_off_mid_variant_keeps_every_variant_measured_before_it(monkeypatch, tmp_path, capsys):
    """The JSON is rewritten after each variant and each phase, marked partial, with each finished phase's
    seconds and the phase running: a run stopped while measuring the 2:4 variant (as the H100 calls were,
    by their time limit) keeps the three rows before it and shows where the 2:4 one was (measure's phases come
    through its phase hook)."""
    import json

    import secateurs.evaluate.speed as speed_module

    moe_speed = _moe_speed(monkeypatch)
    real_median = speed_module._median
    calls = []

    def median(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # the fourth model's prefill (tiny: one prompt length each): the 2:4 variant
            raise KeyboardInterrupt  # what a time limit's signal leaves: nothing after this runs
        return real_median(*args, **kwargs)

    monkeypatch.setattr(speed_module, "_median", median)
    out = tmp_path / "moe.json"
    monkeypatch.setattr(sys, "argv", ["moe_speed.py", "--tiny", "--batches", "1", "--variants", "dense,experts50,24",
                                      "--out", str(out)])
    with pytest.raises(KeyboardInterrupt):
        moe_speed.main()
    saved = json.loads(out.read_text())
    assert saved["partial"] is True
    assert [r["label"] for r in saved["results"]] == ["dense (grouped_mm)", "dense (batched_mm)", "experts50"]
    assert saved["phase_running"] == "24: prefill at 16 tokens (4 forwards)"
    assert list(saved["phase_seconds"]["24"]) == ["build", "prune the experts to 2:4, reference logits",
                                                  "sparsify (stored formats)", "logits check (the first sparse forward)",
                                                  "warm-up forwards (each new kernel shape tuned)"]
    assert "decode at batch 1 by eager (8 steps)" in saved["phase_seconds"]["experts50"]
    assert "24: prefill at 16 tokens (4 forwards) ... [" in capsys.readouterr().out


def test_the_measured_sizes_shrink_from_the_command_line_and_the_last_save_is_complete(monkeypatch, tmp_path):
    """--prompt-lengths, --new-tokens, --warmup and --repeats set what measure runs (a short GPU call of the
    2:4 variant), and the JSON written at the end is no longer partial."""
    import json

    moe_speed = _moe_speed(monkeypatch)
    out = tmp_path / "moe.json"
    monkeypatch.setattr(sys, "argv", ["moe_speed.py", "--tiny", "--variants", "24", "--batches", "2",
                                      "--prompt-lengths", "8,12", "--new-tokens", "3", "--warmup", "0",
                                      "--repeats", "2", "--out", str(out)])
    payload = moe_speed.main()
    saved = json.loads(out.read_text())
    assert saved["partial"] is False and saved["phase_running"] is None
    assert [r["label"] for r in saved["results"]] == [r["label"] for r in payload["results"]] == ["24"]
    config = saved["speed_config"]
    assert (config["prompt_lengths"], config["decode_batches"], config["new_tokens"], config["warmup"],
            config["repeats"]) == ([8, 12], [2], 3, 0, 2)
    assert set(saved["results"][0]["prefill_ms"]) == {"8", "12"}
    assert "decode at batch 2 by eager (6 steps)" in saved["phase_seconds"]["24"]


@pytest.mark.parametrize(("flags", "message"), [
    (["--repeats", "0"], "--new-tokens and --repeats must be at least 1"),
    (["--prompt-lengths", "512,2k"], "'512,2k' is not comma-separated integers, e.g. 512,2048"),
    (["--batches", "0"], "--batches needs positive batch sizes"),
])
def test_sizes_that_cannot_be_measured_are_a_one_line_usage_error(monkeypatch, capsys, flags, message):
    """Bad sizes stop the script before any model is built, in one line naming the flag."""
    moe_speed = _moe_speed(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["moe_speed.py", "--tiny", *flags])
    with pytest.raises(SystemExit) as exited:
        moe_speed.main()
    assert exited.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]  # argparse's usage, then the error on one line
    assert last.startswith("moe_speed.py: error: ") and message in last

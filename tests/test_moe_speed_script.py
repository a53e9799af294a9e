"""The MoE size/speed benchmark runs end to end on a tiny config (its GPU run is the issue-32 speed row)."""

import subprocess
import sys
from pathlib import Path

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
    fractions = [line for line in out.splitlines() if line.startswith("experts50 /")]
    assert fractions and "'weight_fraction': {'all': 0.6" in fractions[0]
    assert "nothing saved" in out

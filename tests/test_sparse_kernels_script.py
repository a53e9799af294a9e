"""benchmarks/sparse_kernels.py's end-to-end part keeps what it measured when a run is cut off (its GPU runs are
the BENCHMARKS rows; here everything that needs a GPU is replaced, so only the bookkeeping runs)."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_models import tiny_model

from secateurs.evaluate.speed import SpeedResult

ROOT = Path(__file__).resolve().parents[1]


def test_the_end_to_end_part_saves_every_model_measured_before_a_cut(monkeypatch):
    """The first H100 run measured dense, 2:4, 4:8 and 50% and then hit its time limit on the next model, and
    wrote nothing: now the rows measured so far reach the checkpoint after each model."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import sparse_kernels

    measured = []

    def fake_measure(model, label, device, speed, phase=None):
        if len(measured) == 2:
            raise TimeoutError("the call's time limit")
        measured.append(label)
        return SpeedResult(label=label, device="cuda", decode_tokens_per_s={1: 100.0 + len(measured)})

    monkeypatch.setattr(sparse_kernels, "_llama2_7b", lambda device, layers: tiny_model("llama").model)
    monkeypatch.setattr(sparse_kernels, "measure", fake_measure)
    monkeypatch.setattr(sparse_kernels, "_prefill_peak_mib", lambda model, vocab, device: 1.0)
    monkeypatch.setattr(sparse_kernels, "linear_step", lambda model, spec, batch: {})
    monkeypatch.setattr(sparse_kernels, "_prune", lambda model, spec, pattern: None)
    monkeypatch.setattr(sparse_kernels, "sparsify", lambda model, spec: SimpleNamespace(sparse_bytes=1, dense_bytes=2))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    saved: list[dict] = []
    with pytest.raises(TimeoutError):
        sparse_kernels.end_to_end("e2e", torch.device("cuda"), "", ("cuda-graph",), ("2:4", "4:8", "70%"), layers=1,
                                  checkpoint=saved.append)
    assert measured == ["dense", "2:4 sparse"]
    assert [row["label"] for row in saved[-1]["results"]] == ["dense", "2:4 sparse"] and saved[-1]["partial"]
    assert saved[-1]["compressed_weight_fraction"] == {"2:4": 0.5, "4:8": 0.5}


def test_each_sparse_model_tunes_its_own_kernel_plans(monkeypatch):
    """The 50% and 70% bitmap models share kind and shapes, and the bitmap's plan key has no density band: the 70%
    model replayed the plans timed on the 50% weights (0 plans tuned on the H100). Every model now starts from no
    plans, as it would alone in a user's process, and the JSON keeps each model's plans under its label."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import sparse_kernels
    from secateurs.kernels import linear

    seen: list[int] = []

    def fake_measure(model, label, device, speed, phase=None):
        seen.append(len(linear.plans()))
        linear._PLANS[(label, 1, 1, 1, "none")] = "a plan tuned on this model"
        return SpeedResult(label=label, device="cuda", decode_tokens_per_s={1: 100.0}, weight_mib=1.0, peak_mib=2.0)

    monkeypatch.setattr(sparse_kernels, "_llama2_7b", lambda device, layers: tiny_model("llama").model)
    monkeypatch.setattr(sparse_kernels, "measure", fake_measure)
    monkeypatch.setattr(sparse_kernels, "_prefill_peak_mib", lambda model, vocab, device: 1.0)
    monkeypatch.setattr(sparse_kernels, "linear_step", lambda model, spec, batch: {"ms": 1.0})
    monkeypatch.setattr(sparse_kernels, "_prune", lambda model, spec, pattern: None)
    monkeypatch.setattr(sparse_kernels, "sparsify", lambda model, spec: SimpleNamespace(sparse_bytes=1, dense_bytes=2))
    monkeypatch.setattr(sparse_kernels, "label", lambda plan: plan)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    linear.clear_plans()
    try:
        result = sparse_kernels.end_to_end("e2e", torch.device("cuda"), "", ("cuda-graph",), ("50%", "70%"),
                                           layers=1)
    finally:
        linear.clear_plans()
    assert seen == [0, 0, 0]  # dense, 50%, 70%: none found the previous model's plan
    assert list(result["kernel_plans"]) == ["50% sparse", "70% sparse"]
    assert list(result["kernel_plans"]["70% sparse"].values()) == ["a plan tuned on this model"]


def test_every_pattern_the_help_names_prunes_and_an_unknown_one_stops_before_the_dense_model(monkeypatch, capsys):
    """The H100 run of ``--patterns 8:16`` spent 30 s on the dense model and then raised a KeyError: 8:16 was in
    the kernels but not in the benchmark's pruning table. Each N:M pattern now prunes to exactly N of every M, and
    an unknown pattern is refused by the parser before anything is built."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import sparse_kernels

    w = torch.randn(8, 64)
    for pattern in ("2:4", "4:8", "8:16"):
        n, m = (int(v) for v in pattern.split(":"))
        kept = sparse_kernels.PATTERNS[pattern](w).reshape(8, -1, m).sum(-1)
        assert torch.equal(kept, torch.full_like(kept, n))
    monkeypatch.setattr("sys.argv", ["sparse_kernels.py", "--part", "e2e", "--patterns", "8:16,3:8@dense"])
    monkeypatch.setattr(sparse_kernels, "end_to_end", lambda *a, **k: pytest.fail("ran before checking the patterns"))
    with pytest.raises(SystemExit):
        sparse_kernels.main()
    assert "unknown pattern(s) 3:8@dense" in capsys.readouterr().err

"""Sparse formats, their references, SparseLinear, the swap and the saved round trip; Triton kernels
through Triton's CPU interpreter (a subprocess, since TRITON_INTERPRET is read when kernels are defined)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib.util import find_spec

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from tiny_models import random_ids, tiny_model

from secateurs import UsageError, load_model, save
from secateurs.api import export_sparse
from secateurs.kernels import SEGMENT, Bitmap, Sparse24, SparseLinear, choose_format, sparse_layers, sparsify
from secateurs.kernels.swap import block_linears
from secateurs.model.linear import weight_matrix
from secateurs.sparsity.masks import nm_mask, unstructured_mask


def _w24(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    return w * nm_mask(w.abs(), 2, 4)


def _wu(rows: int, cols: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    return w * unstructured_mask(w.abs(), sparsity)


def test_sparse24_round_trip_is_exact_including_sparser_groups():
    w = _w24(24, 64)
    w[3, :8] = 0.0  # groups with no non-zero
    w[5, 4:8] = torch.tensor([0.0, 0.0, 0.0, 2.5])  # a group with one
    fmt = Sparse24.compress(w)
    assert fmt.values.shape == (24, 32) and fmt.meta.shape == (24, 8) and fmt.meta.dtype == torch.uint8
    assert torch.equal(fmt.to_dense(), w)
    assert fmt.nbytes() == 24 * 64 * 4 * 0.5 + 24 * 64 / 8


def test_sparse24_refuses_what_it_cannot_hold():
    w = torch.randn(8, 64)
    with pytest.raises(UsageError, match="2:4"):
        Sparse24.compress(w)
    assert "multiple of 8" in Sparse24.supports(_w24(8, 12))


@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.9])
def test_bitmap_round_trip_is_exact(sparsity):
    w = _wu(20, 2 * SEGMENT, sparsity, seed=1)
    w[2] = 0.0  # an empty row
    w[4, 31] = 1.0  # the sign bit of a 32-bit word
    fmt = Bitmap.compress(w)
    assert torch.equal(fmt.to_dense(), w)
    assert fmt.values.numel() == int((w != 0).sum())
    counts = (w != 0).reshape(20, 2, SEGMENT).sum(2).flatten()
    assert torch.equal(fmt.offsets.flatten().long(), counts.cumsum(0) - counts)


def test_choose_format_prefers_24_then_bitmap_then_dense():
    assert choose_format(_w24(8, 128), 0.5)[0] is Sparse24
    assert choose_format(_wu(8, 128, 0.7), 0.5)[0] is Bitmap
    fmt, why = choose_format(_wu(8, 128, 0.3), 0.5)
    assert fmt is None and "0.30" in why


@pytest.mark.parametrize("kind", ["2:4", "bitmap"])
def test_sparse_linear_matches_dense_linear(kind):
    w = _w24(48, 128, 2) if kind == "2:4" else _wu(48, 128, 0.7, 2)
    bias = torch.randn(48)
    layer = SparseLinear.from_module(w, bias, Sparse24 if kind == "2:4" else Bitmap)
    x = torch.randn(2, 5, 128)
    torch.testing.assert_close(layer(x), F.linear(x, w, bias))
    assert layer(x).shape == (2, 5, 48)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sparsify_keeps_the_model_function(arch):
    loaded = tiny_model(arch)
    for module in block_linears(loaded.model, loaded.spec).values():
        w = weight_matrix(module)
        w.mul_(nm_mask(w.abs(), 2, 4))
    ids = random_ids(2, 16)
    before = loaded.model(ids).logits
    report = sparsify(loaded.model, loaded.spec)
    assert len(report.swapped) == len(block_linears(loaded.model, loaded.spec)) and not report.kept_dense
    assert report.sparse_bytes < 0.6 * report.dense_bytes
    torch.testing.assert_close(loaded.model(ids).logits, before)


def test_sparsify_without_sparse_layers_says_to_prune_first():
    loaded = tiny_model("llama")
    with pytest.raises(UsageError, match="prune it first"):
        sparsify(loaded.model, loaded.spec)


def test_mixed_model_keeps_too_dense_layers_dense():
    loaded = tiny_model("llama")
    linears = block_linears(loaded.model, loaded.spec)
    target = "model.layers.1.mlp.down_proj"  # 128 inputs: one bitmap segment
    w = weight_matrix(linears[target])
    w.mul_(unstructured_mask(w.abs(), 0.7))
    report = sparsify(loaded.model, loaded.spec)
    assert list(report.swapped) == [target] and report.swapped[target]["kind"] == "bitmap"
    assert len(report.kept_dense) == len(linears) - 1


def test_sparse_export_saves_compressed_and_reloads_identically(tmp_path):
    loaded = tiny_model("llama")
    for module in block_linears(loaded.model, loaded.spec).values():
        w = weight_matrix(module)
        w.mul_(nm_mask(w.abs(), 2, 4))
    dense_dir = save(loaded, tmp_path / "dense", stages=[])
    ids = random_ids(1, 12)
    expected = loaded.model(ids).logits
    stage = export_sparse(loaded)
    sparse_dir = save(loaded, tmp_path / "sparse", stages=[stage])
    with safe_open(str(sparse_dir / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert "model.layers.0.mlp.up_proj.values" in keys and "model.layers.0.mlp.up_proj.weight" not in keys
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))  # noqa: E731
    assert size(sparse_dir) < size(dense_dir)
    reloaded = load_model(str(sparse_dir))
    assert len(sparse_layers(reloaded.model)) == len(stage["layers"])
    torch.testing.assert_close(reloaded.model(ids).logits, expected)


def test_reload_of_an_export_missing_tensors_is_a_usage_error(tmp_path):
    loaded = tiny_model("llama")
    for module in block_linears(loaded.model, loaded.spec).values():
        w = weight_matrix(module)
        w.mul_(nm_mask(w.abs(), 2, 4))
    stage = export_sparse(loaded)
    stage["layers"]["model.layers.0.mlp.ghost"] = {"kind": "2:4", "shape": [8, 8]}
    folder = save(loaded, tmp_path / "broken", stages=[stage])
    with pytest.raises(UsageError, match="re-export"):
        load_model(str(folder))


_INTERPRETER_CHECK = textwrap.dedent("""
    import json, torch
    from secateurs.kernels import triton_ops
    from secateurs.kernels.formats import Bitmap, Sparse24, SEGMENT
    from secateurs.sparsity.masks import nm_mask, unstructured_mask
    gen = torch.Generator().manual_seed(0)
    errors = {}
    for n, k in ((40, 256), (24, 384)):
        w = torch.randn(n, k, generator=gen)
        w24 = w * nm_mask(w.abs(), 2, 4)
        w70 = w * unstructured_mask(w.abs(), 0.7)
        f24, f70 = Sparse24.compress(w24), Bitmap.compress(w70)
        for m in (1, 7, 33):
            x = torch.randn(m, k, generator=gen)
            for c in (triton_ops.Config(16, 32, 128, 1), triton_ops.Config(16, 16, 256, 3), triton_ops.Config(32, 64, 64, 2),
                      triton_ops.Config(1, 16, 128, 1, gemv=True), triton_ops.Config(1, 8, 256, 3, gemv=True)):
                key = f"{n}x{k} m={m} {c.block_m}x{c.block_n}x{c.block_k}/s{c.split_k}"
                for name, fmt, ref in (("2:4", f24, w24), ("bitmap", f70, w70)):
                    y = triton_ops.run(x, fmt, c)
                    assert y.shape == (m, n) and y.dtype == x.dtype
                    errors[f"{name} {key}"] = float((y - x @ ref.T).abs().max() / (x @ ref.T).abs().max())
    print(json.dumps(errors))
""")


@pytest.mark.skipif(find_spec("triton") is None, reason="triton not installed (pip install 'secateurs[kernels]')")
def test_triton_kernels_match_the_reference_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", _INTERPRETER_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(errors) == 2 * 3 * 5 * 2
    assert max(errors.values()) < 1e-5, {k: v for k, v in errors.items() if v >= 1e-5}

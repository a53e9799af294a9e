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


# ---- CUDA C++ GEMVs (kernels/cuda_ops.py): what CPU can check of them ----
# The kernels themselves need a GPU (benchmarks/sparse_kernels.py --part kernels checks them against float64
# there); these tests pin down, on CPU, the layout reading and the arithmetic the kernels do.


def _byte_perm(lo, hi, sel):
    """CUDA's __byte_perm(lo, hi, sel) (default mode) on numpy uint64 arrays holding 32-bit words."""
    import numpy as np

    raw = (lo & 0xFFFFFFFF) | ((hi & 0xFFFFFFFF) << np.uint64(32))
    out = np.zeros(np.broadcast(raw, sel).shape, dtype=np.uint64)
    for i in range(4):
        index = (sel >> np.uint64(4 * i)) & np.uint64(7)
        out |= ((raw >> (np.uint64(8) * index)) & np.uint64(0xFF)) << np.uint64(8 * i)
    return out


def _halves(words):
    import numpy as np

    lo = (words & np.uint64(0xFFFF)).astype(np.uint16).view(np.float16).astype(np.float64)
    hi = (words >> np.uint64(16)).astype(np.uint16).view(np.float16).astype(np.float64)
    return lo, hi


def _emulate_gemv24(x: torch.Tensor, fmt: Sparse24) -> torch.Tensor:
    """The 2:4 GEMV's arithmetic, step for step: positions read as 16-bit words (4 bits a group), the two
    activations of a group picked from its two 32-bit words by one byte-permute, products summed."""
    import numpy as np

    n, k = fmt.shape
    xw = x.contiguous().view(torch.int32).numpy().astype(np.int64).astype(np.uint64) & np.uint64(0xFFFFFFFF)
    words = fmt.meta.view(torch.int16).numpy().astype(np.int64).astype(np.uint64) & np.uint64(0xFFFF)
    values = fmt.values.double().numpy()
    y = np.zeros((x.shape[0], n))
    for g in range(k // 4):
        code = (words[:, g // 4] >> np.uint64(4 * (g % 4))) & np.uint64(15)
        sel = (code & np.uint64(3)) * np.uint64(0x22) + ((code >> np.uint64(2)) & np.uint64(3)) * np.uint64(0x2200) + np.uint64(0x1010)
        a, b = _halves(_byte_perm(xw[:, 2 * g][:, None], xw[:, 2 * g + 1][:, None], sel[None, :]))
        y += a * values[:, 2 * g] + b * values[:, 2 * g + 1]
    return torch.from_numpy(y)


def test_cuda_gemv24_byte_permute_selection_equals_the_dense_product():
    w = _w24(12, 96, seed=3).half()
    w[2, :8] = 0.0  # groups with fewer than two non-zeros
    fmt = Sparse24.compress(w)
    words = fmt.meta.view(torch.int16).to(torch.int64) & 0xFFFF  # the kernel's (N, K/16) view
    nibbles = torch.stack([(words >> (4 * q)) & 15 for q in range(4)], dim=2).reshape(12, 24)
    assert torch.equal(torch.stack([nibbles & 3, nibbles >> 2], dim=2), fmt.positions())
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(4)).half()
    expected = x.double() @ w.double().T
    torch.testing.assert_close(_emulate_gemv24(x, fmt), expected, rtol=1e-12, atol=1e-12)


def _emulate_bitmap_gemv(x: torch.Tensor, fmt: Bitmap, tile: int = 4096) -> torch.Tensor:
    """The bitmap GEMV's walk: a lane owns a 32-input word, finds its first value from the segment offset plus
    the popcounts of the words before it in the segment, walks its set bits, and reads x from the tile staged
    transposed (input b of word w at (w // 32) * 1024 + b * 32 + w % 32, so lane w % 32 always hits bank w % 32)."""
    n, k = fmt.shape
    bits = fmt.bits.to(torch.int64) & 0xFFFFFFFF
    y = torch.zeros(x.shape[0], n, dtype=torch.float64)
    for k0 in range(0, k, tile):
        width = min(tile, k - k0)
        staged = torch.zeros(x.shape[0], tile, dtype=torch.float64)
        for w in range(width // 32):
            for b in range(32):
                staged[:, (w >> 5) * 1024 + b * 32 + (w & 31)] = x[:, k0 + w * 32 + b].double()
        for row in range(n):
            for w in range(width // 32):
                gw = k0 // 32 + w
                start = int(fmt.offsets[row, gw >> 2]) + sum(bin(int(bits[row, g])).count("1") for g in range(gw & ~3, gw))
                word = int(bits[row, gw])
                while word:
                    b = (word & -word).bit_length() - 1
                    word &= word - 1
                    y[:, row] += float(fmt.values[start]) * staged[:, (w >> 5) * 1024 + b * 32 + (w & 31)]
                    start += 1
    return y


@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_cuda_bitmap_gemv_walk_equals_the_dense_product(sparsity):
    w = _wu(6, 2 * SEGMENT + 4096, sparsity, seed=5).half()  # a full 4096-input tile and a partial one
    w[1] = 0.0
    fmt = Bitmap.compress(w)
    x = torch.randn(2, w.shape[1], generator=torch.Generator().manual_seed(6)).half()
    torch.testing.assert_close(_emulate_bitmap_gemv(x, fmt), x.double() @ w.double().T, rtol=1e-12, atol=1e-12)


def test_cuda_ops_have_fake_implementations_for_graphs_and_compile():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from secateurs.kernels import cuda_ops  # noqa: F401  (registers the ops)

    with FakeTensorMode():
        x = torch.empty(2, 64, dtype=torch.float16)
        y24 = torch.ops.secateurs.sparse24_gemv(x, torch.empty(16, 32, dtype=torch.float16),
                                                torch.empty(16, 8, dtype=torch.uint8), 1, 1)
        ybm = torch.ops.secateurs.bitmap_gemv(x[:1], torch.empty(100, dtype=torch.float16),
                                              torch.empty(24, 2, dtype=torch.int32), torch.empty(24, 1, dtype=torch.int32), 2, 4)
    assert (tuple(y24.shape), y24.dtype) == ((2, 16), torch.float16)
    assert tuple(ybm.shape) == (1, 24)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer")
def test_cuda_ops_say_why_they_are_off_and_offer_nothing_on_cpu():
    from secateurs.kernels import cuda_ops

    why = cuda_ops.status()
    assert isinstance(why, str) and "\n" not in why and "CUDA" in why
    assert cuda_ops.candidates(Sparse24.compress(_w24(16, 64).half()), 1) == {}
    assert cuda_ops.candidates(Bitmap.compress(_wu(16, SEGMENT, 0.7).half()), 1) == {}

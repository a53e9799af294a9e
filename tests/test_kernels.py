"""Sparse formats, their references, SparseLinear, the swap and the saved round trip; Triton kernels
through Triton's CPU interpreter (a subprocess, since TRITON_INTERPRET is read when kernels are defined)."""

from __future__ import annotations

import json
import os
import re
import weakref
import subprocess
import sys
import textwrap
from collections.abc import MutableMapping
from dataclasses import dataclass
from importlib.util import find_spec

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from tiny_models import prune_2of4, random_ids, tiny_model

from secateurs import UsageError, load_model, save
from secateurs.api import export_sparse
from secateurs.kernels import SEGMENT, Bitmap, Sparse24, SparseFormat, SparseLinear, choose_format, sparse_layers, sparsify
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


def test_choose_format_prefers_24_then_banded_then_bitmap_then_dense():
    from secateurs.kernels.banded import Banded

    assert choose_format(_w24(8, 128), 0.5)[0] is Sparse24
    assert choose_format(_wu(8, 128, 0.7), 0.5)[0] is Banded  # 50-90% zeros
    assert choose_format(_wu(8, 128, 0.4), 0.3)[0] is Bitmap  # outside the banded layout's bands
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
    prune_2of4(loaded)
    ids = random_ids(2, 16)
    before = loaded.model(ids).logits
    report = sparsify(loaded.model, loaded.spec)
    assert len(report.swapped) == len(loaded.spec.named_linears(loaded.model)) and not report.kept_dense
    assert report.sparse_bytes < 0.6 * report.dense_bytes
    torch.testing.assert_close(loaded.model(ids).logits, before)


def test_sparsify_without_sparse_layers_says_to_prune_first():
    loaded = tiny_model("llama")
    with pytest.raises(UsageError, match="prune it first"):
        sparsify(loaded.model, loaded.spec)


def test_mixed_model_keeps_too_dense_layers_dense():
    loaded = tiny_model("llama")
    linears = loaded.spec.named_linears(loaded.model)
    target = "model.layers.1.mlp.down_proj"
    w = weight_matrix(linears[target])
    w.mul_(unstructured_mask(w.abs(), 0.7))
    report = sparsify(loaded.model, loaded.spec)
    assert list(report.swapped) == [target] and report.swapped[target]["kind"] == "banded"
    assert len(report.kept_dense) == len(linears) - 1


def test_sparse_export_saves_compressed_and_reloads_identically(tmp_path):
    loaded = tiny_model("llama")
    prune_2of4(loaded)
    dense_dir = save(loaded, tmp_path / "dense", stages=[])
    ids = random_ids(1, 12)
    expected = loaded.model(ids).logits
    stage = export_sparse(loaded)
    sparse_dir = save(loaded, tmp_path / "sparse", stages=[stage])
    with safe_open(str(sparse_dir / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert "model.layers.0.mlp.up_proj.compressed" in keys and "model.layers.0.mlp.up_proj.weight" not in keys
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))  # noqa: E731
    assert size(sparse_dir) < size(dense_dir)
    reloaded = load_model(str(sparse_dir))
    assert len(sparse_layers(reloaded.model)) == len(stage.layers)
    torch.testing.assert_close(reloaded.model(ids).logits, expected)


def test_reload_of_an_export_missing_tensors_is_a_usage_error(tmp_path):
    loaded = tiny_model("llama")
    prune_2of4(loaded)
    stage = sparsify(loaded.model, loaded.spec).stage_record()  # the layout of earlier versions
    stage.layers["model.layers.0.mlp.ghost"] = {"kind": "2:4", "shape": [8, 8]}
    folder = save(loaded, tmp_path / "broken", stages=[stage])
    with pytest.raises(UsageError, match="re-export"):
        load_model(str(folder))


_INTERPRETER_CHECK = textwrap.dedent("""
    import json, torch
    from secateurs.kernels import triton_ops
    from secateurs.kernels import Bitmap, Sparse24, SEGMENT
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
                    y = fmt.triton_matmul(x, c)
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
        ymma = torch.ops.secateurs.sparse24_mma(torch.empty(9, 128, dtype=torch.bfloat16), torch.empty(40, 64, dtype=torch.bfloat16),
                                                torch.empty(40, 16, dtype=torch.uint8), 2, 8)
        ygemm = torch.ops.secateurs.sparse24_gemm(torch.empty(300, 128, dtype=torch.float16), torch.empty(40, 64, dtype=torch.float16),
                                                  torch.empty(40, 16, dtype=torch.uint8), "m128_n128_s4")
        scratch = torch.empty(40 * 128, dtype=torch.float16)
        torch.ops.secateurs.sparse24_expand(torch.empty(40, 64, dtype=torch.float16), torch.empty(40, 16, dtype=torch.uint8), scratch)
        torch.ops.secateurs.bitmap_expand(torch.empty(100, dtype=torch.float16), torch.empty(40, 4, dtype=torch.int32),
                                          torch.empty(40, 1, dtype=torch.int32), scratch)
    assert (tuple(y24.shape), y24.dtype) == ((2, 16), torch.float16)
    assert tuple(ybm.shape) == (1, 24)
    assert (tuple(ymma.shape), ymma.dtype) == ((9, 40), torch.bfloat16)
    assert (tuple(ygemm.shape), ygemm.dtype) == ((300, 40), torch.float16)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer")
def test_cuda_ops_say_why_they_are_off_and_offer_nothing_on_cpu():
    from secateurs.kernels import cuda_ops

    why = cuda_ops.status()
    assert isinstance(why, str) and "\n" not in why and "CUDA" in why
    assert cuda_ops.candidates(Sparse24.compress(_w24(16, 64).half()), 1) == {}
    assert cuda_ops.candidates(Bitmap.compress(_wu(16, SEGMENT, 0.7).half()), 1) == {}


def _fresh_notes(monkeypatch):
    from secateurs.kernels import linear

    monkeypatch.setattr(linear, "_NOTES", {})
    return linear


class _FakeCudaOps:
    """Stands in for kernels.cuda_ops: the dispatcher must only use status() and candidates()."""

    def __init__(self, reason, paths=None):
        self.reason, self.paths, self.asked = reason, paths or {}, 0

    def status(self):
        return self.reason

    def candidates(self, fmt, m):
        self.asked += 1
        return self.paths


def test_dispatch_says_once_which_path_runs_when_cuda_kernels_cannot(monkeypatch):
    linear = _fresh_notes(monkeypatch)
    fake = _FakeCudaOps("NVRTC not found")
    monkeypatch.setattr(linear, "cuda_ops", fake)
    fmt = Sparse24.compress(_w24(8, 32))
    assert linear.cuda_candidates(fmt, 1) == {} and linear.cuda_candidates(fmt, 2) == {}
    assert fake.asked == 0
    notes = linear.fallback_notes()
    assert len(notes) == 1 and "NVRTC not found" in notes[0] and "Triton, cuSPARSELt or dense" in notes[0]
    monkeypatch.setattr(linear, "cuda_ops", None)
    assert linear.cuda_candidates(fmt, 1) == {} and "not installed" in linear.fallback_notes()[-1]


def test_dispatch_offers_the_cuda_kernels_when_they_can_run(monkeypatch):
    linear = _fresh_notes(monkeypatch)
    kernel = lambda x: x  # noqa: E731
    monkeypatch.setattr(linear, "cuda_ops", _FakeCudaOps(None, {"gemv": kernel}))
    assert linear.cuda_candidates(Sparse24.compress(_w24(8, 32)), 1) == {"gemv": kernel}
    assert linear.fallback_notes() == []


def test_choose_takes_the_fastest_correct_path_and_dense_when_sparse_loses():
    from secateurs.kernels.linear import choose

    expected = torch.randn(4, 8)

    def boom():
        raise RuntimeError("the device refused this launch configuration")

    options = [(("cuda:wrong", None), lambda: expected + 1), (("cuda:crash", None), boom),
               (("cuda:gemv", None), lambda: expected.clone()), (("dense", None), lambda: expected.clone())]
    times = {"cuda:wrong": 0.1, "cuda:crash": 0.1, "cuda:gemv": 2.0, "dense": 1.0}
    plan, timings = choose(options, expected, lambda p: times[p[0]])
    assert plan == ("dense", None) and set(timings) == {"cuda:gemv", "dense"}
    times["cuda:gemv"] = 0.5
    assert choose(options, expected, lambda p: times[p[0]])[0] == ("cuda:gemv", None)
    assert choose(options[:2], expected, lambda p: times[p[0]])[0] == ("reference", None)


def test_sparse_linear_on_cpu_runs_the_reference_and_says_so(monkeypatch):
    linear = _fresh_notes(monkeypatch)
    w = _wu(24, 256, 0.7)
    layer = SparseLinear(Bitmap.compress(w))
    x = torch.randn(3, 5, 256)
    torch.testing.assert_close(layer(x), F.linear(x, w))
    assert layer(x[:, :0]).shape == (3, 0, 24)
    assert any("no CUDA device" in n and "reference" in n for n in linear.fallback_notes())
    assert layer.extra_bytes() == 0


@pytest.fixture()
def fresh_policies():
    """The dispatcher's environment policies are read once and kept: read them afresh around a test that
    changes the environment, so no other test sees its values."""
    from secateurs.kernels import cuda_ops, linear

    linear.policies.cache_clear()
    cuda_ops.enabled.cache_clear()
    yield linear
    linear.policies.cache_clear()
    cuda_ops.enabled.cache_clear()


def test_copy_policy_names_the_fallback_for_an_unknown_value(monkeypatch, fresh_policies):
    linear = _fresh_notes(monkeypatch)
    monkeypatch.setenv("SECATEURS_SPARSE_COPIES", "sparse")
    assert linear.reread_policies().copies == "sparse" and linear.copy_policy() == "sparse"
    monkeypatch.setenv("SECATEURS_SPARSE_COPIES", "lots")
    assert linear.reread_policies().copies == "none" and "'lots'" in linear.fallback_notes()[-1]


class _CountingEnviron(MutableMapping):
    """``os.environ`` that records every key read, to show what a forward call consults."""

    def __init__(self, wrapped):
        self.wrapped, self.read = wrapped, []

    def __getitem__(self, key):
        self.read.append(key)
        return self.wrapped[key]

    def __setitem__(self, key, value):
        self.wrapped[key] = value

    def __delitem__(self, key):
        del self.wrapped[key]

    def __iter__(self):
        return iter(self.wrapped)

    def __len__(self):
        return len(self.wrapped)


@pytest.mark.parametrize("kind", ["2:4", "bitmap"])
def test_sparse_linear_forward_reads_no_environment_and_builds_its_format_once(kind, monkeypatch, fresh_policies):
    from secateurs.kernels import cuda_ops

    linear = fresh_policies
    fmt_cls = Sparse24 if kind == "2:4" else Bitmap
    w = _w24(16, 256) if kind == "2:4" else _wu(16, 256, 0.7)
    layer = SparseLinear.from_module(w, torch.randn(16), fmt_cls)
    monkeypatch.setenv("SECATEURS_CUDA_KERNELS", "0")
    linear.policies(), cuda_ops.enabled()  # what a process reads once, on first use
    environ = _CountingEnviron(os.environ)
    monkeypatch.setattr(os, "environ", environ)
    built = []
    init = fmt_cls.__init__
    monkeypatch.setattr(fmt_cls, "__init__", lambda self, *a, **k: (built.append(1), init(self, *a, **k))[1])
    x = torch.randn(2, 3, 256)
    for _ in range(3):
        torch.testing.assert_close(layer(x), F.linear(x, w, layer.bias))
        # what the GPU dispatch consults on every call
        linear.copy_policy(), linear.tuning_enabled(), cuda_ops.status()
    assert [key for key in environ.read if key.startswith("SECATEURS_")] == []
    assert built == [] and layer.format() is layer.format()
    assert "turned off" in cuda_ops.status()
    moved = layer.to(torch.float64)  # new buffers: the format follows them, once
    assert moved.format().dtype == torch.float64 and len(built) == 1 and moved.format() is moved.format()


@dataclass
class Coo(SparseFormat):
    """A toy format for the registry test: the non-zeros and their flat positions, for any weight at all
    (so it takes what 2:4 and bitmap refuse). It lives only in this file."""

    values: torch.Tensor
    index: torch.Tensor
    shape: tuple[int, int]

    kind = "coo"
    parts = ("values", "index")
    any_sparsity = True

    @staticmethod
    def fits(weight: torch.Tensor) -> str | None:
        return None

    @classmethod
    def compress(cls, weight: torch.Tensor) -> Coo:
        index = weight.flatten().nonzero().flatten()
        return cls(weight.flatten()[index].contiguous(), index, tuple(weight.shape))

    def to_dense(self) -> torch.Tensor:
        dense = torch.zeros(self.shape[0] * self.shape[1], dtype=self.values.dtype)
        return dense.scatter(0, self.index, self.values).reshape(self.shape)

    @classmethod
    def why(cls, sparsity: float) -> str:
        return f"coo {sparsity:.2f}"


def _pruned_30(arch: str = "llama"):
    """A tiny model at 30% unstructured sparsity: not 2:4, and too dense for a bitmap."""
    loaded = tiny_model(arch)
    for module in loaded.spec.named_linears(loaded.model).values():
        w = weight_matrix(module)
        w.mul_(unstructured_mask(w.abs(), 0.3))
    return loaded


def test_a_format_in_the_registry_is_used_by_swap_export_and_both_reloads(tmp_path, monkeypatch):
    from secateurs.kernels import registry

    monkeypatch.setitem(registry.FORMATS, Coo.kind, f"{__name__}:Coo")  # the one line a new format adds
    ids = random_ids(2, 9)
    loaded = _pruned_30()
    expected = loaded.model(ids).logits
    old_layout = sparsify(loaded.model, loaded.spec).stage_record()
    assert {info["kind"] for info in old_layout.layers.values()} == {"coo"}
    assert {info["why"] for info in old_layout.layers.values()} == {"coo 0.30"}
    torch.testing.assert_close(loaded.model(ids).logits, expected)
    reloaded = load_model(str(save(loaded, tmp_path / "old", stages=[old_layout])))
    assert {layer.kind for layer in sparse_layers(reloaded.model).values()} == {"coo"}
    torch.testing.assert_close(reloaded.model(ids).logits, expected)

    loaded = _pruned_30()
    stage = export_sparse(loaded)
    assert stage.storage == "sparse-bitmask"
    reloaded = load_model(str(save(loaded, tmp_path / "ct", stages=[stage])))
    layers = sparse_layers(reloaded.model)
    assert len(layers) == len(stage.layers) and {layer.kind for layer in layers.values()} == {"coo"}
    torch.testing.assert_close(reloaded.model(ids).logits, expected)
    compiled = torch.compile(next(iter(layers.values())), backend="eager", fullgraph=True)
    x = torch.randn(3, compiled.in_features)
    torch.testing.assert_close(compiled(x), F.linear(x, next(iter(layers.values())).dense_weight()))


@pytest.mark.parametrize("kind", ["2:4", "bitmap"])
def test_sparse_linear_traces_whole_under_torch_compile(kind):
    w = _w24(16, 256) if kind == "2:4" else _wu(16, 256, 0.7)
    layer = SparseLinear(Sparse24.compress(w) if kind == "2:4" else Bitmap.compress(w), torch.randn(16))
    compiled = torch.compile(layer, backend="eager", fullgraph=True)  # fullgraph: a graph break is an error
    x = torch.randn(2, 3, 256)
    torch.testing.assert_close(compiled(x), F.linear(x, w, layer.bias))


def test_unstructured_sparse_export_reloads_with_the_same_logits(tmp_path):
    loaded = tiny_model("llama")
    for module in loaded.spec.named_linears(loaded.model).values():
        w = weight_matrix(module)
        w.mul_(unstructured_mask(w.abs(), 0.7))
    ids = random_ids(2, 9)
    expected = loaded.model(ids).logits
    stage = export_sparse(loaded)
    assert {info["kind"] for info in stage.layers.values()} == {"banded"}  # every width here is a multiple of 8
    reloaded = load_model(str(save(loaded, tmp_path / "u70", stages=[stage])))
    assert set(sparse_layers(reloaded.model)) == set(stage.layers)
    torch.testing.assert_close(reloaded.model(ids).logits, expected)


def _byte_perm1(lo: int, hi: int, sel: int) -> int:
    raw = (lo & 0xFFFFFFFF) | ((hi & 0xFFFFFFFF) << 32)
    return sum(((raw >> (8 * ((sel >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))


def _meta24_word(meta: torch.Tensor, row_g: int, row_g8: int, block: int, t: int) -> int:
    """The decode kernel's metadata register (meta24_word in sparse_gemv.cu), step for step: the 8 stored bytes
    of rows g and g+8 for a 64-input block, nibble t of each 16-bit word gathered by byte-permutes."""
    def nibbles(row: int) -> int:
        raw = bytes(meta[row, 8 * block: 8 * block + 8].tolist())
        lo, hi = int.from_bytes(raw[:4], "little"), int.from_bytes(raw[4:], "little")
        v = _byte_perm1(lo, hi, (t >> 1) * 0x1111 + 0x6420)
        v = (v >> (4 * (t & 1))) & 0x0F0F0F0F
        return (v | (v >> 4)) & 0xFFFFFFFF

    return _byte_perm1(nibbles(row_g), nibbles(row_g8), 0x6420)


def _mma_sp(a, meta, b, y_row, token_count):
    """One mma.sp.m16n8k32 as PTX defines it for 16-bit types: compressed A (16, 16) = two values per group
    of four, meta (16, 8) one 4-bit code per (row, group), b (tokens, 32): y[token, row] += sum."""
    for row in range(16):
        for j in range(8):
            for v in range(2):
                index = (meta[row, j] >> (2 * v)) & 3
                y_row[:, row] += a[row, 2 * j + v] * b[:token_count, 4 * j + index]


def _emulate_mma24(x: torch.Tensor, fmt: Sparse24) -> torch.Tensor:
    """The tensor-core 2:4 decode kernel's data flow, lane by lane, through mma.sp.m16n8k32 as PTX defines it:
    lane (g, t) holds A = (row g, slot group t), (row g+8, slot t), (row g, slot 4+t), (row g+8, slot 4+t), B rows
    2t, 2t+8, 2t+16, 2t+24 (and +1) of token g, and lanes t = 2s, 2s+1 give selector s's metadata for slot
    groups 0-3 and 4-7 (row g low 16 bits, row g+8 high), assembled from the stored ``meta`` in the kernel's
    way. Checks the in-register position gathering and the K permutation."""
    import numpy as np

    n, k = fmt.shape
    values = fmt.values.double().numpy()
    xs = x.double().numpy()
    y = np.zeros((x.shape[0], n))
    for tile in range((n + 15) // 16):
        rows = [min(tile * 16 + r, n - 1) for r in range(16)]
        for kb in range(k // 64):
            base_v, base_x = kb * 32, kb * 64
            for mma, selector in ((0, 0), (1, 1)):
                a = np.zeros((16, 16))  # compressed A as the MMA sees it: [row][2 * slot group + v]
                meta = np.zeros((16, 8), dtype=np.int64)  # nibble per (row, slot group)
                for lane in range(32):
                    g, t = lane // 4, lane % 4
                    word = _meta24_word(fmt.meta, rows[g], rows[g + 8], kb, t)
                    for half, row in ((0, g), (1, g + 8)):
                        regs = values[rows[row], base_v + 8 * t: base_v + 8 * t + 8].reshape(4, 2)
                        a[row, 2 * t: 2 * t + 2] = regs[2 * mma]  # slot t
                        a[row, 8 + 2 * t: 8 + 2 * t + 2] = regs[2 * mma + 1]  # slot 4 + t
                        if t in (2 * selector, 2 * selector + 1):
                            bits = (word >> (16 * half)) & 0xFFFF
                            for j in range(4):
                                meta[row, 4 * (t - 2 * selector) + j] = (bits >> (4 * j)) & 15
                b = np.zeros((x.shape[0], 32))
                for t in range(4):
                    h, odd = t >> 1, t & 1
                    pairs = [base_x + 16 * h + 8 * mma + 2 * odd + off for off in (0, 32, 4, 36)]
                    for reg, col in enumerate(pairs):
                        b[:, 8 * reg + 2 * t: 8 * reg + 2 * t + 2] = xs[:, col: col + 2]
                part = np.zeros((x.shape[0], 16))
                _mma_sp(a, meta, b, part, x.shape[0])
                for row in range(16):
                    if tile * 16 + row < n:
                        y[:, tile * 16 + row] += part[:, row]
    return torch.from_numpy(y)


def _emulate_gemm24(x: torch.Tensor, fmt: Sparse24) -> torch.Tensor:
    """The prompt GEMM's data flow (gemm24 in sparse_gemv.cu) per 16-row tile and 64-input stage, through
    mma.sp.m16n8k32 as PTX defines it, in natural K order: MMA c (selector c) takes inputs 32c..32c+31 of
    the stage; A = compressed columns 16c..16c+15 of the stored values as ldmatrix delivers them (lane (g, t):
    columns 2t, 2t+1 and 2t+8, 2t+9 of rows g, g+8); lane t's metadata register = stored 16-bit position word
    t of the stage for row g (low) and g+8 (high), of which lanes 2c, 2c+1 feed MMA c; B = x columns in order."""
    import numpy as np

    n, k = fmt.shape
    values = fmt.values.double().numpy()
    words = (fmt.meta.view(torch.int16).to(torch.int64) & 0xFFFF).numpy()  # (N, K/16)
    xs = x.double().numpy()
    y = np.zeros((x.shape[0], n))
    for tile in range((n + 15) // 16):
        rows = [min(tile * 16 + r, n - 1) for r in range(16)]
        for kb in range(k // 64):
            for c in range(2):
                a = np.zeros((16, 16))
                meta = np.zeros((16, 8), dtype=np.int64)
                for lane in range(32):
                    g, t = lane // 4, lane % 4
                    register = int(words[rows[g], 4 * kb + t]) | (int(words[rows[g + 8], 4 * kb + t]) << 16)
                    for half, row in ((0, g), (1, g + 8)):
                        chunk = values[rows[row], 32 * kb + 16 * c: 32 * kb + 16 * c + 16]
                        a[row, 2 * t: 2 * t + 2] = chunk[2 * t: 2 * t + 2]
                        a[row, 8 + 2 * t: 10 + 2 * t] = chunk[8 + 2 * t: 10 + 2 * t]
                        if t in (2 * c, 2 * c + 1):
                            bits = (register >> (16 * half)) & 0xFFFF
                            for j in range(4):
                                meta[row, 4 * (t - 2 * c) + j] = (bits >> (4 * j)) & 15
                b = xs[:, 64 * kb + 32 * c: 64 * kb + 32 * c + 32]
                part = np.zeros((x.shape[0], 16))
                _mma_sp(a, meta, b, part, x.shape[0])
                for row in range(16):
                    if tile * 16 + row < n:
                        y[:, tile * 16 + row] += part[:, row]
    return torch.from_numpy(y)


def _emulate_expand24(fmt: Sparse24) -> torch.Tensor:
    """The expand kernel on raw 16-bit patterns: per 16-input chunk, value pair q goes to the 64-bit group word
    at 16 x position (expand24 in sparse_gemv.cu)."""
    n, k = fmt.shape
    vals = fmt.values.contiguous().view(torch.int16).to(torch.int64).reshape(-1) & 0xFFFF
    words = fmt.meta.contiguous().view(torch.int16).to(torch.int64).reshape(-1) & 0xFFFF
    out = torch.zeros(n * k, dtype=torch.int64)
    for i in range(words.numel()):
        m = int(words[i])
        for q in range(4):
            code = m >> (4 * q)
            p0, p1 = code & 3, (code >> 2) & 3
            group = (int(vals[8 * i + 2 * q]) << (16 * p0)) | (int(vals[8 * i + 2 * q + 1]) << (16 * p1))
            for e in range(4):
                out[16 * i + 4 * q + e] = (group >> (16 * e)) & 0xFFFF
    return torch.where(out >= 2**15, out - 2**16, out).to(torch.int16).view(fmt.values.dtype).reshape(n, k)


def test_cuda_mma24_reads_the_stored_positions_and_equals_the_dense_product():
    w = _w24(20, 128, seed=7).half()  # 20 rows: a partial second tile
    w[3, :16] = 0.0
    fmt = Sparse24.compress(w)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(8)).half()
    torch.testing.assert_close(_emulate_mma24(x, fmt), x.double() @ w.double().T, rtol=1e-12, atol=1e-12)


def test_cuda_gemm24_natural_order_and_stored_position_words_equal_the_dense_product():
    w = _w24(24, 192, seed=11).half()
    w[5, 64:80] = 0.0
    fmt = Sparse24.compress(w)
    x = torch.randn(5, 192, generator=torch.Generator().manual_seed(12)).half()
    torch.testing.assert_close(_emulate_gemm24(x, fmt), x.double() @ w.double().T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_expand24_is_bit_exact(dtype):
    w = _w24(6, 64, seed=13).to(dtype)
    w[0, :8] = 0.0
    fmt = Sparse24.compress(w)
    assert torch.equal(_emulate_expand24(fmt).view(torch.int16), fmt.to_dense().view(torch.int16))
    assert torch.equal(_emulate_expand24(fmt), w)


def _emulate_expand_bitmap(fmt: Bitmap, run: int = 1040) -> torch.Tensor:
    """expandbm in sparse_gemv.cu on raw 16-bit patterns: a warp per 32 words of the flat bitmap; lane l's first value
    = its segment's offset + a 4-lane popcount scan; the warp's run of values staged from a 16-byte aligned start in
    8-value vectors (the last partial one value by value, never past the end; at most ``run`` halves); then chunk j
    of 128 (8 inputs) takes word j // 4 and its first value by shuffle, skips the popcount of the word's lower
    bytes and reads its values in bit order."""
    n, k = fmt.shape
    bits = [b & 0xFFFFFFFF for b in fmt.bits.reshape(-1).tolist()]
    offs = fmt.offsets.reshape(-1).tolist()
    vals = (fmt.values.view(torch.int16).to(torch.int64) & 0xFFFF).tolist()
    words, nnz = len(bits), len(vals)
    out = [None] * (n * k)  # an unwritten element fails the comparison
    for w0 in range(0, words, 32):
        word = [bits[w0 + lane] if w0 + lane < words else 0 for lane in range(32)]
        count = [x.bit_count() for x in word]
        start = [(offs[(w0 + lane) >> 2] if w0 + lane < words else 0) + sum(count[lane & ~3: lane]) for lane in range(32)]
        last = min(31, words - w0 - 1)
        a0 = start[0] & ~7
        vecs = (start[last] + count[last] - a0 + 7) >> 3
        assert 8 * vecs <= run
        staged = []
        for v in range(vecs):
            e = a0 + 8 * v
            staged += vals[e: e + 8] if e + 8 <= nnz else [vals[e + i] if e + i < nnz else 0 for i in range(8)]
        for j in range(128):
            src, q = j >> 2, j & 3
            byte = (word[src] >> (8 * q)) & 0xFF
            r = start[src] - a0 + (word[src] & ((1 << (8 * q)) - 1)).bit_count()
            if w0 + src >= words:
                continue
            for b in range(8):
                bit = (byte >> b) & 1
                out[(w0 * 32) + 8 * j + b] = staged[r] if bit else 0
                r += bit
    return torch.tensor(out, dtype=torch.int32).to(torch.int16).view(fmt.values.dtype).reshape(n, k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7, 0.97])
def test_cuda_bitmap_expand_index_math_is_bit_exact(dtype, sparsity):
    """The bitmap prompt path's expand kernel rebuilds the stored weight exactly: 12 words a row, so warps straddle
    rows and the last of three is partial; a row all zero, one all kept (a warp's longest run) and a last row that
    ends the values in a partial vector."""
    w = _wu(7, 3 * SEGMENT, sparsity, seed=17).to(dtype)
    w[2] = 0.0
    w[4] = (torch.rand(3 * SEGMENT, generator=torch.Generator().manual_seed(18)) + 1.0).to(dtype)
    w[6, -5:] = 0.0
    w[6, -12:-5] = 1.5
    fmt = Bitmap.compress(w)
    assert fmt.values.numel() % 8  # the run's last vector is read value by value
    got = _emulate_expand_bitmap(fmt)
    assert torch.equal(got.view(torch.int16), fmt.to_dense().view(torch.int16))
    assert torch.equal(got, w)


def test_2of4_layers_keep_one_position_table_and_no_copy_by_default(fresh_policies, monkeypatch):
    """The no-copies default: the dispatcher offers no dense or cuSPARSELt copy unless asked, a layer holds
    only values and positions (0.5625 of the dense bytes), and the kernels derive no table from them."""
    from secateurs.kernels import linear

    monkeypatch.delenv("SECATEURS_SPARSE_COPIES", raising=False)
    assert linear.reread_policies().copies == "none" == linear.DEFAULT_COPY_POLICY
    w = _w24(64, 256).half()
    layer = SparseLinear.from_module(w, None, Sparse24)
    assert [name for name, _ in layer.named_buffers()] == ["values", "meta"]
    assert layer.format().nbytes() / (w.numel() * 2) == 0.5625
    assert not hasattr(layer.format(), "cuda_extra_bytes") or layer.format().cuda_extra_bytes() == 0
    offered = {}

    def capture(options, expected, timer):
        offered[linear.copy_policy()] = [plan[0] for plan, _ in options]
        return options[0][0], {}

    monkeypatch.setattr(linear, "choose", capture)
    monkeypatch.setattr(linear, "_copies", lambda size, device: 1)
    monkeypatch.setattr(linear, "cuda_candidates", lambda fmt, m: {"gemm": lambda x: x})
    monkeypatch.setattr(linear.triton_ops, "HAVE_TRITON", False)
    x = torch.randn(32, 256).half()
    for policy in ("none", "dense"):
        monkeypatch.setenv("SECATEURS_SPARSE_COPIES", policy)
        linear.reread_policies()
        layer._tune(layer.format(), 32, x)
    assert offered["none"] == ["cuda:gemm", "reference"]
    assert "dense" in offered["dense"]
    assert layer._dense is None and layer._semi is None and layer.extra_bytes() == 0


def test_2of4_candidates_per_token_count_read_only_the_stored_tensors():
    """Which CUDA paths a 2:4 weight offers (their callables are not run here): GEMV and tensor-core decode
    kernels up to 4 / 32 tokens, the tiled GEMM and the expand path from 32 tokens on, each over values and meta."""
    fmt = Sparse24.compress(_w24(128, 256).half())
    names = {m: list(fmt.cuda_candidates(m)) for m in (1, 8, 32, 512, 8192)}
    assert names[1][0].startswith("cuda_gemv24") and any(n.startswith("cuda_mma24") for n in names[1])  # narrow: GEMV first
    assert all(n.startswith("cuda_mma24") for n in names[8])
    assert names[32][:3] == ["cuda_gemm24_m64_n32_s4", "cuda_gemm24_m64_n64_s4", "cuda_gemm24_m128_n64_s4"]
    assert "expand_cublas" in names[32] and any(n.startswith("cuda_mma24") for n in names[32])
    assert names[8192] == ["cuda_gemm24_m128_n256_s3", "cuda_gemm24_m128_n128_s4", "cuda_gemm24_m256_n128_s3",
                           "expand_cublas"]
    assert not any("gemm" in n or "expand" in n for n in names[1] + names[8])
    narrow = Sparse24.compress(_w24(16, 48).half())  # K % 64 != 0: no tensor-core kernels, expand still offered
    assert list(narrow.cuda_candidates(64)) == ["expand_cublas"]


def test_bitmap_candidates_per_token_count_offer_the_expand_path_from_two_rows(monkeypatch):
    """One row: the bitmap GEMV; row bucket 2 on (prompts included): expand into the shared scratch + cuBLAS, whose
    product (the kernel replaced by its emulation) is the dense one; values not 16-byte aligned: no expand path."""
    from secateurs.kernels import cuda_ops

    w = _wu(40, 2 * SEGMENT, 0.7, seed=19).half()
    fmt = Bitmap.compress(w)
    names = {m: list(fmt.cuda_candidates(m)) for m in (1, 2, 4, 8, 512, 8192)}  # no opt-in: both ran on an H100
    assert names[1] and all(n.startswith("cuda_gemv_bitmap") for n in names[1])
    assert all(names[m] == ["expand_cublas"] for m in (2, 4, 8, 512, 8192))
    monkeypatch.setattr(cuda_ops, "_SCRATCH", {})
    monkeypatch.setattr(cuda_ops, "bitmap_expand", lambda values, bits, offsets, out: out[: w.numel()].copy_(
        _emulate_expand_bitmap(Bitmap(values, bits, offsets, tuple(w.shape))).reshape(-1)))
    x = torch.randn(3, 2 * SEGMENT, generator=torch.Generator().manual_seed(20)).half()
    torch.testing.assert_close(fmt.cuda_candidates(4)["expand_cublas"](x).float(), x.float() @ w.float().T,
                               rtol=2e-3, atol=2e-3)
    assert cuda_ops.scratch_bytes() == w.numel() * 2
    shifted = torch.empty(fmt.values.numel() + 1, dtype=fmt.values.dtype)[1:]  # 2 bytes past an aligned start
    misaligned = Bitmap(shifted.copy_(fmt.values), fmt.bits, fmt.offsets, fmt.shape)
    assert misaligned.cuda_candidates(2) == {} and list(misaligned.cuda_candidates(1)) == names[1]


@pytest.mark.parametrize("kind", ["4:8", "bitmap"])
def test_4of8_and_bitmap_prompts_run_stored_with_no_copy_by_default(kind, fresh_policies, monkeypatch):
    """The no-copies default for the other stored formats: at a prompt bucket the dispatcher offers their expand
    paths and the reference, no dense or cuSPARSELt copy; the layer keeps only its stored tensors; the shared
    scratch is reserved for the largest live layer of any format before timing, once, not per layer."""
    from secateurs.kernels import Nm48, cuda_ops, linear
    from secateurs.sparsity.masks import nm_mask

    monkeypatch.delenv("SECATEURS_SPARSE_COPIES", raising=False)
    assert linear.reread_policies().copies == "none"
    monkeypatch.setattr(cuda_ops, "_module", lambda index, source=None: None)  # offer 4:8's kernels on a CPU weight
    monkeypatch.setattr(cuda_ops, "unverified_offered", lambda: True)
    monkeypatch.setattr(linear, "_LAYERS", weakref.WeakValueDictionary())  # only this test's layers are live
    if kind == "4:8":
        base = torch.randn(64, 256, generator=torch.Generator().manual_seed(21))
        fmt_cls, w = Nm48, (base * nm_mask(base.abs(), 4, 8)).half()
    else:
        fmt_cls, w = Bitmap, _wu(64, 256, 0.7, seed=21).half()
    layer = SparseLinear.from_module(w, None, fmt_cls)
    assert [name for name, _ in layer.named_buffers()] == list(fmt_cls.parts)
    offered = {}

    def capture(options, expected, timer):
        offered[linear.copy_policy()] = [plan[0] for plan, _ in options]
        return options[0][0], {}

    monkeypatch.setattr(linear, "choose", capture)
    monkeypatch.setattr(linear, "cuda_candidates", lambda fmt, m: fmt.cuda_candidates(m))
    monkeypatch.setattr(linear.triton_ops, "HAVE_TRITON", False)
    layer._tune(layer.format(), 512, torch.randn(512, 256).half())
    expands = ["cuda:expand_cublas_c1", "cuda:expand_cublas_c4"] if kind == "4:8" else ["cuda:expand_cublas"]
    assert offered["none"] == [*expands, "reference"]
    assert layer._dense is None and layer._semi is None and layer.extra_bytes() == 0
    monkeypatch.setattr(cuda_ops, "_SCRATCH", {})
    smaller = SparseLinear.from_module(w[:16], None, fmt_cls)
    linear._reserve_scratch(torch.device("cpu"), torch.float16)
    assert linear.shared_bytes() == w.numel() * 2  # the larger layer's dense size, one buffer for both
    assert smaller.extra_bytes() == 0 and layer.extra_bytes() == 0


def test_expand_scratch_is_one_buffer_counted_once(monkeypatch):
    from secateurs.evaluate.speed import extra_bytes
    from secateurs.kernels import cuda_ops, linear

    monkeypatch.setattr(cuda_ops, "_SCRATCH", {})
    first = cuda_ops.scratch(torch.device("cpu"), torch.float16, 1000)
    assert cuda_ops.scratch(torch.device("cpu"), torch.float16, 500) is first  # reused, not per layer
    model = torch.nn.Sequential(SparseLinear(Sparse24.compress(_w24(8, 64).half())),
                                SparseLinear(Sparse24.compress(_w24(8, 64).half())))
    assert linear.shared_bytes() == 2000 and extra_bytes(model) == 2000
    cuda_ops.release_scratch()
    assert extra_bytes(model) == 0


def test_cuda_source_compiles_for_hopper_and_ampere(nvcc_cubins):
    """The .cu compiles with nvcc where a toolkit is installed (NVRTC compiles it at run time on users' GPUs)."""
    from secateurs.kernels import cuda_ops

    for binary in nvcc_cubins(cuda_ops.SOURCE).values():
        assert "gemm24_f16_m128_n128_s4" in binary and "expand24" in binary and "expandbm" in binary


def test_cuda_candidates_read_nothing_back_from_the_device(monkeypatch):
    """The dispatcher asks a format for its CUDA candidates on every call (``SparseLinear._run``), inside CUDA-graph
    capture too, where a device-to-host read (``.item()``, ``int(tensor)``) fails the capture: every format decides
    from shapes, dtypes and pointers alone. Checked on meta tensors, which refuse any read, with every kernel offered
    (the opt-in on), at decode and prompt row counts."""
    from secateurs.kernels import Nm48, Nm816, cuda_ops
    from secateurs.kernels.banded import Banded

    monkeypatch.setattr(cuda_ops, "_module", lambda index, source=None: None)
    monkeypatch.setattr(cuda_ops, "unverified_offered", lambda: True)
    base = torch.randn(64, 512, generator=torch.Generator().manual_seed(30))
    weights = [(Sparse24, nm_mask(base.abs(), 2, 4)), (Nm48, nm_mask(base.abs(), 4, 8)),
               (Nm816, nm_mask(base.abs(), 8, 16)), (Bitmap, unstructured_mask(base.abs(), 0.7))]
    weights += [(Banded, unstructured_mask(base.abs(), sparsity)) for sparsity in (0.5, 0.7, 0.85)]
    for cls, mask in weights:
        fmt = cls.compress((base * mask).half())
        on_meta = cls.from_parts({name: t.to("meta") for name, t in fmt.tensors().items()}, fmt.shape)
        for m in (1, 2, 4, 8, 64):
            assert on_meta.cuda_candidates(m), (cls.kind, m)


def test_without_the_opt_in_only_kernels_cleared_on_a_gpu_are_offered(monkeypatch):
    """Today's behaviour without SECATEURS_UNVERIFIED_KERNELS=1, on a Hopper GPU (faked: nothing compiled or
    launched): at every row bucket every format offers only the kernels that matched float64 on an H100 (2:4's GEMV,
    mma.sp kernel, mma.sp GEMM, expand path and timed wgmma and wide decode configurations; 4:8's, 8:16's and the
    bitmap's GEMVs and expand paths; the pipelined expand path; the 4:8 / 8:16 and bitmap tensor-core kernels and
    the 4:8 / 8:16 ring depths timed fastest; the banded GEMV and tensor-core kernel); and choose_format stores a
    70% unstructured weight as banded."""
    from secateurs.kernels import Nm48, Nm816, cuda_ops, nm, wgmma
    from secateurs.kernels.banded import Banded

    monkeypatch.delenv(cuda_ops.UNVERIFIED_ENV, raising=False)
    cuda_ops.unverified_offered.cache_clear()
    monkeypatch.setattr(cuda_ops, "_module", lambda index, source=None: None)
    monkeypatch.setattr(wgmma, "capability", lambda device: (9, 0))
    monkeypatch.setattr(wgmma, "sm_count", lambda device: 132)
    measured = ("cuda_gemv24_", "cuda_mma24_", "cuda_gemm24_", "cuda_gemv48_", "cuda_gemv816_", "cuda_tc48_",
                "cuda_tc816_", "cuda_gemv_bitmap_", "cuda_tcbitmap_", "cuda_gemvbd_", "cuda_tcbanded_", "expand_cublas",
                "expand_pipelined_")
    cleared_wgmma = re.compile(rf"cuda_wgmma24_({'|'.join(sorted(wgmma.CLEARED))})(_k\d+)?")  # whole or split K
    cleared_ring = re.compile("|".join(rf"cuda_tcr(48|816)_n{t}_d{d}_s\d+" for t, d in sorted(nm.TC_RING_CLEARED)))
    cleared_wide = re.compile(rf"cuda_wide24_({'|'.join(sorted(cuda_ops.WIDE_CLEARED))})_s\d+")  # its split-K choices
    base = torch.randn(256, 512, generator=torch.Generator().manual_seed(31))
    weights = [(Sparse24, nm_mask(base.abs(), 2, 4)), (Nm48, nm_mask(base.abs(), 4, 8)),
               (Nm816, nm_mask(base.abs(), 8, 16)), (Bitmap, unstructured_mask(base.abs(), 0.7)),
               (Banded, unstructured_mask(base.abs(), 0.7))]
    try:
        for cls, mask in weights:
            w = (base * mask).half()
            fmt = cls.compress(w)
            for m in (1, 2, 4, 8, 32, 512, 8192):
                for name in fmt.cuda_candidates(m):
                    cleared = name.startswith(measured) or any(
                        r.fullmatch(name) for r in (cleared_wgmma, cleared_ring, cleared_wide))
                    assert cleared, (cls.kind, m, name)
            assert choose_format(w, 0.5)[0] in (Sparse24, Nm48, Nm816, Banded)
        assert Banded.compress((base * unstructured_mask(base.abs(), 0.7)).half()).cuda_candidates(1)
    finally:
        cuda_ops.unverified_offered.cache_clear()


def test_a_plan_naming_a_kernel_this_weight_is_not_offered_runs_its_first_kernel_not_the_reference(monkeypatch):
    """A tuned plan is shared by every layer of a kind and shape; where one weight is not offered its kernel (the
    values' alignment decides some), that layer runs its own first CUDA candidate, not the slow PyTorch reference."""
    from secateurs.kernels import linear

    w = _wu(16, 2 * SEGMENT, 0.7, seed=23).half()
    layer = SparseLinear(Bitmap.compress(w))
    ran = []
    monkeypatch.setattr(linear, "cuda_candidates", lambda fmt, m: {"own": lambda x: ran.append("own") or x @ w.T})
    monkeypatch.setattr(linear, "reference_matmul", lambda x, fmt: ran.append("reference") or x @ w.T)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    x = torch.randn(1, 2 * SEGMENT).half()
    layer._run(("cuda:other", None), x, layer.format())
    assert ran == ["own"]

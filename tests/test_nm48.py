"""The 4:8 pattern end to end on a CPU: exact masks after every method that makes N:M, the 4:8 stored format
(round trip, reference product, the GEMV's byte-permute decode emulated bit for bit), its choice by the
registry, its compressed-tensors export and reload, and one line for what does not run."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from tiny_models import random_ids, tiny_model

import secateurs.sparsity.prune as sparsity_prune
from secateurs import UsageError, load_model, save
from secateurs.api import (
    PruneConfig,
    PruneReport,
    export_sparse,
    prunable_linears,
    prune,
)
from secateurs.data.calib import CalibConfig
from secateurs.engine.options import EngineOptions
from secateurs.kernels import (
    Nm48,
    Sparse24,
    SparseLinear,
    choose_format,
    reference_matmul,
    sparse_layers,
)
from secateurs.kernels.banded import Banded
from secateurs.kernels.compressed import FORMAT_BITMASK
from secateurs.model.linear import weight_matrix
from secateurs.sparsity.masks import Pattern, nm_mask, unstructured_mask
from secateurs.sparsity.registry import method_names


def _prune(loaded, config: PruneConfig, ids: torch.Tensor) -> PruneReport:
    with mock.patch.object(sparsity_prune, "calibration_ids", lambda *a, **k: ids):
        return prune(loaded, config, CalibConfig("wikitext2", len(ids), ids.shape[1]), EngineOptions(device="cpu"))


def _w48(rows: int, cols: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    return (w * nm_mask(w.abs(), 4, 8)).to(dtype)


def _exactly_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    rows, cols = weight.shape
    return bool(((weight != 0).reshape(rows, cols // m, m).sum(dim=2) == n).all())


@pytest.mark.parametrize("method", method_names())
@pytest.mark.parametrize("pattern", ["4:8", "8:16"])
def test_every_method_leaves_exact_nm_masks(method, pattern):
    loaded = tiny_model("llama")
    report = _prune(loaded, PruneConfig(method, None, pattern), random_ids(4, 16))
    n, m = Pattern.parse(pattern).n, Pattern.parse(pattern).m
    for name, module in prunable_linears(loaded).items():
        assert _exactly_nm(weight_matrix(module), n, m), name
    assert report.achieved == pytest.approx(0.5, abs=1e-9)


@pytest.mark.parametrize("step", [{"permute": True}, {"reconstruct": {"steps": 2, "check": 1}}])
def test_block_steps_keep_exact_4of8_masks(step):
    loaded = tiny_model("llama")
    _prune(loaded, PruneConfig("wanda", None, "4:8", **step), random_ids(4, 16))
    for name, module in prunable_linears(loaded).items():
        assert _exactly_nm(weight_matrix(module), 4, 8), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_exact_including_sparser_groups(dtype):
    w = _w48(24, 96, dtype=dtype)
    w[3, :8] = 0.0  # a group with no non-zero
    w[5, 8:16] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.5])  # a group with one, at the last position
    w[7, 16:24] = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0])  # all four in the low half
    w[7, 24:32] = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 4.0])  # all four in the high half
    fmt = Nm48.compress(w)
    assert (fmt.values.shape, fmt.meta.shape, fmt.high.shape) == ((24, 48), (24, 12), (24, 6))
    assert fmt.meta.dtype == fmt.high.dtype == torch.uint8 and fmt.values.dtype == dtype
    assert torch.equal(fmt.to_dense(), w)
    assert torch.equal(Nm48.from_parts(fmt.tensors(), fmt.shape).to_dense(), w)
    again = Nm48.from_mask(fmt.values, fmt.mask())
    assert all(torch.equal(a, b) for a, b in zip(again.tensors().values(), fmt.tensors().values()))
    if dtype == torch.float16:
        assert fmt.nbytes() == 24 * 96 * 1.1875  # 4 values + 4 three-bit positions per 8 weights


def test_reference_product_equals_the_dense_product():
    w = _w48(40, 160, seed=1, dtype=torch.float64)
    x = torch.randn(5, 160, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    bias = torch.randn(40, dtype=torch.float64)
    torch.testing.assert_close(reference_matmul(x, Nm48.compress(w), bias), x @ w.T + bias, rtol=0, atol=1e-12)


def _byte_perm(a: int, b: int, selector: int) -> int:
    """CUDA's __byte_perm: byte i of the result is byte (selector >> 4i) & 7 of the 8 bytes b:a."""
    pool = (b << 32) | a
    return sum(((pool >> (8 * ((selector >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))


def _halves(register: int) -> tuple[float, float]:
    """The two fp16 values of a 32-bit register, low half first."""
    pair = torch.tensor([register & 0xFFFF, register >> 16], dtype=torch.int32).to(torch.int16)
    low, high = pair.view(torch.float16).tolist()
    return low, high


def _emulate_gemv48(x: torch.Tensor, fmt: Nm48) -> torch.Tensor:
    """sparse48.cu's step48, word for word: per 16 inputs, the 16-bit low-bits word and the third-bits byte
    give each value pair its two selectors; three byte-permutes per token pick the pair's activations."""
    n, k = fmt.shape
    xs = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # (M, K/2): two halves per register
    values = fmt.values.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # (N, K/4): pair i of a chunk at 4c + i
    words = fmt.meta.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF  # (N, K/16), little-endian
    y = torch.zeros(x.shape[0], n, dtype=torch.float64)
    for row in range(n):
        for c in range(k // 16):
            m, h = int(words[row, c]), int(fmt.high[row, c])
            hs = (h | (h << 4)) & 0x0F0F
            for i in range(4):
                pick = ((m >> (2 * i)) & 0x0303) * 0x22 + 0x1010
                half = ((hs >> i) & 0x0101) * 0x44 + 0x3210
                w0, w1 = _halves(int(values[row, 4 * c + i]))
                q = 8 * c + 4 * (i >> 1)  # the group's first register in x's (M, K/2) view
                for t in range(x.shape[0]):
                    regs = [int(r) for r in xs[t, q:q + 4]]
                    lo, hi = _byte_perm(regs[0], regs[1], pick), _byte_perm(regs[2], regs[3], pick)
                    a, b = _halves(_byte_perm(lo, hi, half))
                    y[t, row] += w0 * a + w1 * b
    return y


def test_gemv48_byte_permute_decode_equals_the_dense_product():
    w = _w48(6, 64, seed=3, dtype=torch.float16)
    w[1, :16] = 0.0
    w[2, 16:24] = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 4.0]).half()
    w[4, 24:32] = torch.tensor([5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 6.0]).half()
    fmt = Nm48.compress(w)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(4)).half()
    torch.testing.assert_close(_emulate_gemv48(x, fmt), x.double() @ w.double().T, rtol=1e-12, atol=1e-12)


def test_supports_names_why_a_weight_is_not_4of8():
    assert "more than 4 non-zeros" in Nm48.supports(torch.randn(8, 64))
    assert "multiple of 16" in Nm48.supports(_w48(8, 24))
    sparse = torch.zeros(8, 64)
    sparse[:, ::8] = 1.0  # 1 of 8: fits 4:8, but the bitmap is far smaller
    assert "bitmap" in Nm48.supports(sparse)
    with pytest.raises(UsageError, match="--pattern 4:8"):
        Nm48.compress(torch.randn(8, 64))
    with pytest.raises(ValueError, match="exactly 4"):
        Nm48.from_mask(torch.zeros(8, 32), torch.zeros(8, 64, dtype=torch.bool))


def test_registry_stores_2of4_as_2of4_4of8_as_4of8_and_unstructured_in_the_bands_as_banded():
    w24 = torch.randn(16, 256)
    w24 = w24 * nm_mask(w24.abs(), 2, 4)
    assert choose_format(w24, 0.5) == (Sparse24, "2:4")
    assert choose_format(_w48(16, 256), 0.5) == (Nm48, "4:8")
    unstructured = torch.randn(16, 256)
    for sparsity in (0.5, 0.9):
        assert choose_format(unstructured * unstructured_mask(unstructured.abs(), sparsity), 0.5)[0] is Banded


def test_a_4of8_weight_asked_for_as_2of4_says_what_it_is_in_one_line():
    with pytest.raises(UsageError, match="4:8") as caught:
        Sparse24.compress(_w48(8, 64))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("bad", ["4:4", "0:4", "8:4"])
def test_a_pattern_that_does_not_exist_names_the_patterns_that_run(bad):
    with pytest.raises(UsageError, match="4:8") as caught:
        Pattern.parse(bad)
    assert "\n" not in str(caught.value) and "2:4" in str(caught.value)


def test_sparse_layer_traces_whole_under_torch_compile_and_runs_the_reference_on_cpu():
    w = _w48(16, 256)
    layer = SparseLinear(Nm48.compress(w), torch.randn(16))
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    x = torch.randn(2, 3, 256)
    torch.testing.assert_close(compiled(x), F.linear(x, w, layer.bias))
    if not torch.cuda.is_available():
        from secateurs.kernels import cuda_ops

        assert cuda_ops.candidates(Nm48.compress(w.half()), 1) == {}


def test_gemv48_op_has_a_fake_implementation():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        y = torch.ops.secateurs.nm48_gemv(torch.empty(3, 64, dtype=torch.bfloat16), torch.empty(24, 32, dtype=torch.bfloat16),
                                          torch.empty(24, 8, dtype=torch.uint8), torch.empty(24, 4, dtype=torch.uint8), 2, 1)
        scratch = torch.empty(24 * 64, dtype=torch.bfloat16)
        torch.ops.secateurs.nm48_expand(torch.empty(24, 32, dtype=torch.bfloat16), torch.empty(24, 8, dtype=torch.uint8),
                                        torch.empty(24, 4, dtype=torch.uint8), scratch, 4)
    assert (tuple(y.shape), y.dtype) == ((3, 24), torch.bfloat16)


def _emulate_expand48(fmt: Nm48, chunks: int) -> torch.Tensor:
    """sparse48.cu's expand48<C> on raw 16-bit patterns, flat over units of C 16-input chunks: the unit's position
    words and third-bit bytes as one little-endian 2C- and C-byte load, per chunk value e (pair e // 2, half e % 2)
    at 16 x (position & 3) of its group's low or high 64-bit word (position & 4), stored as two 16-byte vectors."""
    n, k = fmt.shape
    vals = fmt.values.contiguous().view(torch.int32).reshape(-1).tolist()  # four 32-bit pairs per chunk
    meta, high = fmt.meta.reshape(-1).tolist(), fmt.high.reshape(-1).tolist()
    units = n * k // 16 // chunks
    assert units * chunks * 16 == n * k
    out = [0] * (n * k)
    for i in range(units):
        mw = int.from_bytes(bytes(meta[2 * chunks * i: 2 * chunks * (i + 1)]), "little")
        hw = int.from_bytes(bytes(high[chunks * i: chunks * (i + 1)]), "little")
        for c in range(chunks):
            chunk = i * chunks + c
            v = [x & 0xFFFFFFFF for x in vals[4 * chunk: 4 * chunk + 4]]
            m, h = (mw >> (16 * c)) & 0xFFFF, (hw >> (8 * c)) & 0xFF
            g = [[0, 0], [0, 0]]
            for e in range(8):
                i2, second = e >> 1, e & 1
                p = ((m >> (2 * i2 + 8 * second)) & 3) | (((h >> (i2 + 4 * second)) & 1) << 2)
                g[i2 >> 1][p >> 2] |= ((v[i2] >> (16 * second)) & 0xFFFF) << (16 * (p & 3))
            for q in range(2):
                for half in range(2):
                    for e in range(4):
                        out[16 * chunk + 8 * q + 4 * half + e] = (g[q][half] >> (16 * e)) & 0xFFFF
    return torch.tensor(out, dtype=torch.int32).to(torch.int16).view(fmt.values.dtype).reshape(n, k)


@pytest.mark.parametrize("chunks", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_expand48_index_math_is_bit_exact(chunks, dtype):
    """The prompt path's expand kernel, emulated bit for bit, rebuilds the stored weight exactly: groups with fewer
    than four non-zeros (zeros kept at unused positions), all four in the high half, negative zero."""
    from secateurs.kernels import nm48

    assert chunks in nm48.EXPAND_CHUNKS
    w = _w48(6, 128, seed=21, dtype=dtype)
    w[0, :16] = 0.0
    w[1, 8:16] = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, -2.0, 3.0, -4.0])
    w[2, 16:24] = torch.tensor([-0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 6.0])
    fmt = Nm48.compress(w)
    got = _emulate_expand48(fmt, chunks)
    assert torch.equal(got.view(torch.int16), fmt.to_dense().view(torch.int16))
    assert torch.equal(got, w)


def _gpu_like(fmt: Nm48, monkeypatch) -> None:
    """Let ``cuda_candidates`` run on a CPU weight: the source is not compiled, the launches are never made."""
    from secateurs.kernels import cuda_ops

    monkeypatch.setattr(cuda_ops, "_module", lambda index, source=None: None)
    monkeypatch.setattr(cuda_ops, "unverified_offered", lambda: True)


def test_the_expand_path_is_offered_without_the_opt_in(monkeypatch, not_opted_in):
    """The 4:8 expand path matched float64 on an H100 at every row bucket 8-8192 (benchmarks/gpu_kernel_check.py),
    so prompts get it without SECATEURS_UNVERIFIED_KERNELS=1, beside the GEMV for 1-4 rows (and, at 5-64 rows, the
    tensor-core kernel: tests/test_nm_tensorcore.py)."""
    from secateurs.kernels import cuda_ops

    fmt = Nm48.compress(_w48(128, 256, dtype=torch.float16))
    monkeypatch.setattr(cuda_ops, "_module", lambda index, source=None: None)
    assert list(fmt.cuda_candidates(8))[:2] == ["expand_cublas_c1", "expand_cublas_c4"] and fmt.cuda_candidates(1)
    assert list(fmt.cuda_candidates(128)) == ["expand_cublas_c1", "expand_cublas_c4"]


def test_candidates_per_token_count_include_the_expand_path_above_the_gemv(monkeypatch):
    """1-4 rows: the GEMV; row bucket 8 on (prompts included): expand into the shared scratch + cuBLAS, one chunk per
    thread first, four where the position tables allow 8- and 4-byte loads; nothing else, and no dense copy (row
    buckets 8-64 add the tensor-core kernel and its ring form: tests/test_nm_tensorcore.py)."""
    fmt = Nm48.compress(_w48(128, 256, dtype=torch.float16))
    _gpu_like(fmt, monkeypatch)
    names = {m: list(fmt.cuda_candidates(m)) for m in (1, 2, 4, 8, 16, 512, 2048, 8192)}
    assert all(n.startswith("cuda_gemv48") for m in (1, 2, 4) for n in names[m]) and names[1]
    for m in (8, 16, 512, 2048, 8192):
        assert [n for n in names[m] if not n.startswith(("cuda_tc48_", "cuda_tcr48_"))] == ["expand_cublas_c1",
                                                                                             "expand_cublas_c4"]
    odd = Nm48.compress(_w48(5, 48, dtype=torch.float16))  # 15 chunks: no whole four-chunk units
    assert [n for n in odd.cuda_candidates(8) if not n.startswith(("cuda_tc48_", "cuda_tcr48_"))] == ["expand_cublas_c1"]


def test_expand_candidate_multiplies_through_the_shared_scratch(monkeypatch):
    """The candidate's wiring (scratch sized to the weight, the kernel writing into it, cuBLAS on its (N, K) view)
    with the kernel replaced by its emulation; the scratch is the one every layer shares, not a copy."""
    from secateurs.kernels import cuda_ops, nm48

    w = _w48(24, 64, seed=5, dtype=torch.float16)
    fmt = Nm48.compress(w)
    _gpu_like(fmt, monkeypatch)
    monkeypatch.setattr(cuda_ops, "_SCRATCH", {})
    held = cuda_ops.scratch(torch.device("cpu"), torch.float16, 5000)  # a larger layer's reservation
    held.fill_(float("nan"))
    monkeypatch.setattr(nm48, "nm48_expand", lambda values, meta, high, out, chunks: out[: w.numel()].copy_(
        _emulate_expand48(Nm48(values, meta, high, tuple(w.shape)), chunks).reshape(-1)))
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(6)).half()
    for name, call in fmt.cuda_candidates(8).items():
        if name.startswith("expand_cublas"):  # the tensor-core kernel beside it: tests/test_nm_tensorcore.py
            torch.testing.assert_close(call(x).float(), (x.float() @ w.float().T), rtol=2e-3, atol=2e-3, msg=name)
    assert cuda_ops.scratch(torch.device("cpu"), torch.float16, 1) is held and cuda_ops.scratch_bytes() == 10000


def test_a_4of8_model_exports_as_a_bitmask_checkpoint_and_reloads_onto_4of8(tmp_path):
    loaded = tiny_model("llama")
    _prune(loaded, PruneConfig("wanda", None, "4:8"), random_ids(4, 16))
    ids = random_ids(1, 12)
    expected = loaded.model(ids).logits
    stage = export_sparse(loaded)
    assert stage.storage == FORMAT_BITMASK
    assert {info["kind"] for info in stage.layers.values()} == {"4:8"}
    reloaded = load_model(str(save(loaded, tmp_path / "s48", stages=[stage])))
    layers = sparse_layers(reloaded.model)
    assert set(layers) == set(stage.layers) and {layer.kind for layer in layers.values()} == {"4:8"}
    torch.testing.assert_close(reloaded.model(ids).logits, expected)


# 3:16 (81% zeros) runs as the banded layout; 8:16: test_nm816.py
@pytest.mark.parametrize(("pattern", "stored"), [("4:8", "4:8"), ("3:16", "banded")])
def test_prune_export_says_which_format_each_pattern_runs_as(tmp_path, tiny_folder, pattern, stored):
    from typer.testing import CliRunner

    from secateurs.cli import app

    result = CliRunner().invoke(app, ["prune", str(tiny_folder), "--out", str(tmp_path / "out"), "--device", "cpu",
                                      "--method", "magnitude", "--pattern", pattern, "--export", "sparse"])
    assert result.exit_code == 0, result.output
    assert f"sparse ({stored})" in result.output
    named = f"{pattern} has no kernel of its own" in result.output
    assert named == (pattern == "3:16")
    assert {layer.kind for layer in sparse_layers(load_model(str(tmp_path / "out")).model).values()} == {stored}


def test_every_kernel_the_format_launches_is_instantiated_and_the_source_compiles(nvcc_cubins):
    """nm48.py names kernels gemv48_<dtype>_t<tokens>_r<rows>; each must exist in sparse48.cu (NVRTC compiles it on
    users' GPUs; where nvcc is installed the source is compiled here for Hopper and Ampere)."""
    import re

    from secateurs.kernels import nm48

    source = nm48.SOURCE.read_text()
    made = {(int(t), int(r)) for t, r in re.findall(r"GEMV48\(DT, BF, (\d+), (\d+), \d+\)", source)}
    assert {(t, r) for t in nm48.TOKENS for r in nm48.ROWS[t]} <= made
    expands = {int(c) for c in re.findall(r"^EXPAND48\((\d+)\)$", source, re.MULTILINE)}
    assert set(nm48.EXPAND_CHUNKS) <= expands
    for binary in nvcc_cubins(nm48.SOURCE).values():
        assert all(f"gemv48_{dtype}_t{t}_r{r}" in binary for dtype in ("f16", "bf16") for t, r in made)
        assert all(f"expand48_c{c}" in binary for c in expands)

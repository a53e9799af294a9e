"""The banded unstructured layout on a CPU: exact round trips, the reference product, the GEMV's and the expand
kernel's index arithmetic emulated bit for bit (which lane reads which 16-byte value chunk and which staged
inputs), its bands and their one-line refusals, its place as the default store of unstructured weights in its bands
(the bitmap keeps the rest), its compressed-tensors export and reload, the fake implementations, and the nvcc build
of banded.cu."""

from __future__ import annotations

import re
from unittest import mock

import pytest
import torch
from tiny_models import random_ids, tiny_model

import secateurs.sparsity.prune as sparsity_prune
from secateurs import UsageError, load_model, save
from secateurs.api import PruneConfig, export_sparse, prune
from secateurs.data.calib import CalibConfig
from secateurs.engine.options import EngineOptions
from secateurs.kernels import (
    Bitmap,
    Nm48,
    Sparse24,
    SparseLinear,
    banded,
    choose_format,
    cuda_ops,
    reference_matmul,
    sparse_layers,
)
from secateurs.kernels.banded import BANDS, LAYOUT_ENV, SEG, Banded, band_of, layout
from secateurs.kernels.compressed import FORMAT_BITMASK
from secateurs.sparsity.masks import nm_mask, unstructured_mask

M32 = 0xFFFFFFFF


def _weight(rows: int, cols: int, sparsity: float, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    return (w * unstructured_mask(w.abs(), sparsity)).to(dtype)


def _awkward(dtype: torch.dtype) -> torch.Tensor:
    """37 x 4168 (three segments, the last 72 wide) at 70% zeros, with an all-zero row, a fully dense segment,
    long gaps (fillers), a lone value at the last column, negative values."""
    w = _weight(37, 4168, 0.7, seed=1, dtype=dtype)
    w[3] = 0.0
    w[5, :SEG] = torch.randn(SEG).to(dtype) + 3.0  # every input of one segment kept
    w[5, SEG:] = 0.0
    w[7] = 0.0
    w[7, [0, 40, 41, 200, 2047, 2048, 4167]] = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0]).to(dtype)
    w[9, SEG:] = 0.0
    return w


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("sparsity", [0.5, 0.6, 0.7, 0.8, 0.9])
def test_round_trip_is_exact_in_every_band(dtype, sparsity):
    w = _weight(24, 2056, sparsity, seed=2, dtype=dtype)  # odd width: a 8-input second segment
    fmt = Banded.compress(w)
    assert fmt.piece == band_of(1.0 - float((w != 0).float().mean())).piece
    assert torch.equal(fmt.to_dense(), w)
    assert torch.equal(Banded.from_parts(fmt.tensors(), fmt.shape).to_dense(), w)
    assert torch.equal(Banded.from_mask(w[w != 0], w != 0).to_dense(), w)
    assert fmt.values.dtype == dtype and fmt.deltas.dtype == torch.uint8 and fmt.starts.dtype == torch.int16
    assert fmt.starts.shape[0] % 8 == 0 and fmt.values.numel() == fmt.starts.shape[0] * fmt.piece


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_round_trip_is_exact_on_awkward_rows(dtype):
    w = _awkward(dtype)
    fmt = Banded.compress(w)
    assert torch.equal(fmt.to_dense(), w)
    assert bool((fmt.to_dense() != 0).eq(w != 0).all())
    # every delta fits four bits, columns stay inside the row and never run backwards
    cols = fmt.columns()[: fmt.pieces()]
    assert int(cols.max()) < w.shape[1] and bool((cols.diff(dim=1) >= 0).all())
    kinds = fmt.overhead()  # the long gaps of row 7 need fillers; the dense segment needs no padding
    assert kinds["nonzeros"] == int((w != 0).sum()) and kinds["fillers"] >= (2047 - 200) // 15
    assert kinds["nonzeros"] + kinds["fillers"] + kinds["padding"] == kinds["entries"] == fmt.entries()


def test_columns_above_32767_survive_the_int16_starts():
    w = torch.zeros(2, 40960, dtype=torch.float16)
    w[0, ::3] = 1.5
    w[1, 33000::2] = -2.0
    w[1, :1000:2] = 0.5
    fmt = Banded.compress(w)
    assert int(fmt.starts.min()) < 0  # unsigned columns past 32767, held in int16
    assert torch.equal(fmt.to_dense(), w)


def test_reference_product_equals_the_dense_product():
    w = _awkward(torch.float64)
    x = torch.randn(5, w.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    bias = torch.randn(w.shape[0], dtype=torch.float64)
    torch.testing.assert_close(reference_matmul(x, Banded.compress(w), bias), x @ w.T + bias, rtol=0, atol=1e-10)


def test_bands_and_what_runs_outside_them():
    assert [band_of(s).name for s in (0.5, 0.59, 0.6, 0.74, 0.75, 0.9)] == ["50-60%", "50-60%", "60-75%", "60-75%",
                                                                          "75-90%", "75-90%"]
    assert band_of(0.49) is None and band_of(0.91) is None
    assert band_of(0.59996).name == "60-75%" and band_of(0.49996).name == "50-60%"  # pruned to 60% / 50%, rounded
    for sparsity in (0.3, 0.95):
        reason = Banded.fits(_weight(8, 256, sparsity))
        assert "outside every band" in reason and "bitmap" in reason and "\n" not in reason
        with pytest.raises(UsageError, match="bitmap runs it"):
            Banded.compress(_weight(8, 256, sparsity))
    assert "multiple of 8" in Banded.fits(_weight(8, 100, 0.7))


def test_storage_bytes_per_weight_stay_near_the_bitmaps():
    """fp16 bytes per weight on random magnitude masks (the real-model numbers are in the report): within 15% of
    the bitmap's at 50% zeros, within 8% at 70%, no more than it at 80% and 90%."""
    limits = {0.5: 1.15, 0.6: 1.13, 0.7: 1.08, 0.8: 1.01, 0.9: 1.0}
    for sparsity, limit in limits.items():
        w = _weight(64, 4096, sparsity, seed=4, dtype=torch.float16)
        ratio = Banded.compress(w).nbytes() / Bitmap.compress(w).nbytes()
        assert ratio <= limit, (sparsity, ratio)


# ---- the kernels' index arithmetic, emulated bit for bit ----

def _words(t: torch.Tensor) -> list[int]:
    """The little-endian 32-bit words of a tensor's bytes."""
    raw = t.contiguous().view(torch.uint8).reshape(-1).tolist()
    return [int.from_bytes(bytes(raw[i:i + 4]), "little") for i in range(0, len(raw), 4)]


def _halves(word: int, dtype: torch.dtype) -> tuple[float, float]:
    pair = torch.tensor([word & 0xFFFF, word >> 16], dtype=torch.int32).to(torch.int16)
    low, high = pair.view(dtype).tolist()
    return low, high


def _byte(word: int, j: int) -> int:
    """__byte_perm(word, 0, 0x4440 + j): byte j, zero-extended."""
    return (word >> (8 * j)) & 0xFF


def _piece_offsets(words_d: list[int], piece: int, p: int, cur: int, mult: int, shift: int) -> list[int]:
    """banded.cu's decode of piece p's deltas: per word, the low and high nibbles as bytes, times ``mult`` (running
    sums), each entry's offset = the cursor plus its byte shifted left by ``shift``; the fourth becomes the cursor."""
    offs = []
    for g in range(piece // 8):
        d = words_d[p * piece // 8 + g]
        lo = ((d & 0x0F0F0F0F) * mult) & M32
        hi = (((d >> 4) & 0x0F0F0F0F) * mult) & M32
        for pre in (lo, hi):
            four = [(cur + (_byte(pre, j) << shift)) & M32 for j in range(4)]
            cur = four[3]
            offs += four
    return offs


def _piece_values(words_v: list[int], piece: int, p: int, dtype: torch.dtype) -> list[float]:
    """The P values lane reads for piece p: P/8 16-byte loads at piece_byte(p) + 128 c."""
    base = p * 16 + (p & ~7) * (2 * piece - 16)
    out = []
    for c in range(piece // 8):
        chunk = base + 128 * c
        assert chunk % 16 == 0
        for i in range(4):
            out += _halves(words_v[(chunk >> 2) + i], dtype)
    return out


def _emulate_gemv(x: torch.Tensor, fmt: Banded, tokens: int, rows: int, split: int) -> torch.Tensor:
    """gemvbd<BF16, T, P, R> for grid(n, rows, split) blocks of 8 warps, lane by lane: x staged per 8192/T inputs,
    a column's T tokens side by side (4T bytes a column), each warp group's R rows' pieces concatenated and dealt one
    per lane; accumulation in float64."""
    n, k = fmt.shape
    m = x.shape[0]
    piece, dtype = fmt.piece, fmt.values.dtype
    nseg = -(-k // SEG)
    stage = 8192 // tokens
    words_v, words_d = _words(fmt.values), _words(fmt.deltas)
    starts = (fmt.starts.to(torch.int64) & 0xFFFF).tolist()
    offs = fmt.offsets.tolist()
    xs_all = x.double()
    y = torch.zeros(m, n, dtype=torch.float64)
    per_block = (8 // split) * rows
    for block in range(-(-n // per_block)):
        for g in range(8 // split):
            row0 = (block * (8 // split) + g) * rows
            acc = [[0.0] * tokens for _ in range(rows)]
            for k0 in range(0, k, stage):
                kn = min(stage, k - k0)
                s0, s1 = k0 // SEG, min(k0 // SEG + stage // SEG, nseg)
                a, c = [], [0]
                for r in range(rows):
                    nn = min(row0 + r, n - 1)
                    a.append(offs[nn * nseg + s0])
                    c.append(c[-1] + (offs[nn * nseg + s1] - a[-1] if row0 + r < n else 0))
                for s in range(split):
                    for lane in range(32):
                        for i in range(s * 32 + lane, c[rows], 32 * split):
                            r, base = 0, a[0]
                            for q in range(1, rows):
                                if i >= c[q]:
                                    r, base = q, a[q] - c[q]
                            p = base + i
                            column = 4 * tokens
                            cur = (starts[p] * column - k0 * column) & M32
                            offsets = _piece_offsets(words_d, piece, p, cur, 0x01010101, column.bit_length() - 1)
                            values = _piece_values(words_v, piece, p, dtype)
                            for off, w in zip(offsets, values):
                                assert off % column == 0 and off < column * kn, "a read outside the staged inputs"
                                for t in range(tokens):  # one 4T-byte load: token t at byte off + 4t
                                    acc[r][t] += w * float(xs_all[min(t, m - 1), k0 + off // column])
            for r in range(rows):
                for t in range(min(tokens, m)):
                    if row0 + r < n:
                        y[t, row0 + r] = acc[r][t]
    return y


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("sparsity", "tokens", "rows", "split"),
                         [(0.5, 1, 1, 1), (0.5, 4, 2, 2), (0.7, 1, 2, 1), (0.7, 2, 1, 4), (0.85, 4, 1, 1), (0.85, 2, 2, 2)])
def test_gemv_index_math_equals_the_dense_product(dtype, sparsity, tokens, rows, split):
    """Every band (P = 32, 16), 1/2/4 tokens (the staged window 8192/T inputs: one, two or three stages here),
    R = 1 and 2 rows per warp group (a group whose rows straddle the end), split K across 1-4 warps."""
    w = _weight(13, 4168, sparsity, seed=5, dtype=dtype)
    w[2] = 0.0
    w[4, :SEG] = 1.0
    fmt = Banded.compress(w)
    x = torch.randn(max(1, tokens - 1), w.shape[1], generator=torch.Generator().manual_seed(6)).to(dtype)
    torch.testing.assert_close(_emulate_gemv(x, fmt, tokens, rows, split), x.double() @ w.double().T,
                               rtol=1e-12, atol=1e-12)


def _emulate_expand(fmt: Banded) -> torch.Tensor:
    """expandbd<P>: per (row, segment) unit, a zeroed u16 buffer, each piece's entries written at 2 x (start - c0)
    plus the running byte offsets (deltas times 0x02020202) where the 16-bit value is not +-0, copied out."""
    n, k = fmt.shape
    nseg = -(-k // SEG)
    words_v, words_d = _words(fmt.values), _words(fmt.deltas)
    starts = (fmt.starts.to(torch.int64) & 0xFFFF).tolist()
    offs = fmt.offsets.tolist()
    out = [0] * (n * k)
    for unit in range(n * nseg):
        row, seg = divmod(unit, nseg)
        c0 = seg * SEG
        width = min(SEG, k - c0)
        buf = [0] * width
        for p in range(offs[unit], offs[unit + 1]):
            cur = ((starts[p] - c0) * 2) & M32
            offsets = _piece_offsets(words_d, fmt.piece, p, cur, 0x02020202, 0)
            base = p * 16 + (p & ~7) * (2 * fmt.piece - 16)
            bits = []
            for c in range(fmt.piece // 8):
                for i in range(4):
                    word = words_v[((base + 128 * c) >> 2) + i]
                    bits += [word & 0xFFFF, word >> 16]
            for off, b in zip(offsets, bits):
                if b & 0x7FFF:
                    assert off % 2 == 0 and off < 2 * width
                    buf[off // 2] = b
        out[row * k + c0: row * k + c0 + width] = buf
    return torch.tensor(out, dtype=torch.int32).to(torch.int16).view(fmt.values.dtype).reshape(n, k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.85])
def test_expand_index_math_is_bit_exact(dtype, sparsity):
    w = _weight(9, 4168, sparsity, seed=7, dtype=dtype)
    w[1] = 0.0
    w[3, SEG:2 * SEG] = -1.0
    fmt = Banded.compress(w)
    assert torch.equal(_emulate_expand(fmt).view(torch.int16), fmt.to_dense().view(torch.int16))


# ---- offer, registry ----

def _gpu_like(monkeypatch) -> None:
    """Let ``cuda_candidates`` run on a CPU weight: the source is not compiled, the launches are never made."""
    monkeypatch.setattr(cuda_ops, "_module", lambda index, source=None: None)


def test_kernels_are_offered_without_the_opt_in(monkeypatch, not_opted_in):
    """Matched float64 and timed on an H100: the GEMV at 1-4 rows, the expand path from 2, the tensor-core kernel at
    5-64 after it, with no SECATEURS_UNVERIFIED_KERNELS."""
    fmt = Banded.compress(_weight(128, 4096, 0.7, dtype=torch.float16))
    _gpu_like(monkeypatch)
    names = {m: list(fmt.cuda_candidates(m)) for m in (1, 2, 3, 4, 8, 2048)}
    assert names[1] and all(name.startswith("cuda_gemvbd_p16_r") for name in names[1])
    assert names[1][0].startswith("cuda_gemvbd_p16_r1")  # 60-75%: one row per warp group first
    for m in (2, 3, 4):
        assert names[m][-1] == "expand_cublas" and names[m][:-1] == names[1]
    assert names[2048] == ["expand_cublas"]
    assert names[8][0] == "expand_cublas" and len(names[8]) > 1  # then the tensor-core kernel (test_banded_tensorcore)
    assert all(name.startswith("cuda_tcbanded_n16_s") for name in names[8][1:])
    high = Banded.compress(_weight(128, 4096, 0.85, dtype=torch.float16))
    assert next(iter(high.cuda_candidates(1))).startswith("cuda_gemvbd_p16_r2")  # 75-90%: two rows first
    low = Banded.compress(_weight(128, 4096, 0.5, dtype=torch.float16))
    assert next(iter(low.cuda_candidates(1))).startswith("cuda_gemvbd_p32_r1")


def test_registry_stores_banded_in_its_bands_and_the_bitmap_outside_them(not_opted_in):
    """The default, no opt-in: 50-90% zeros go to the banded layout and say why in one line; fewer or more zeros, and a
    width the layout refuses, go to the bitmap, saying which; 2:4 and 4:8 keep their own formats."""
    for sparsity in (0.5, 0.7, 0.85, 0.9):
        fmt_cls, why = choose_format(_weight(16, 256, sparsity), 0.5)
        assert fmt_cls is Banded and f"band {band_of(sparsity).name}" in why and "beat the bitmap's" in why
        assert "\n" not in why
    for sparsity, min_sparsity in ((0.95, 0.5), (0.4, 0.3)):
        fmt_cls, why = choose_format(_weight(16, 256, sparsity), min_sparsity)
        assert fmt_cls is Bitmap and why == f"unstructured {sparsity:.2f}, outside the banded layout's 50-90% zeros"
    wide = _weight(1, 2**16, 0.7)
    assert "below 65536" in Banded.fits(wide)
    assert choose_format(wide, 0.5) == (Bitmap, "unstructured 0.70, a width or non-zero count the banded layout does not hold")
    w24 = torch.randn(16, 256)
    assert choose_format(w24 * nm_mask(w24.abs(), 2, 4), 0.5)[0] is Sparse24
    w48 = torch.randn(16, 256)
    assert choose_format(w48 * nm_mask(w48.abs(), 4, 8), 0.5)[0] is Nm48


@pytest.fixture()
def asked_layout(monkeypatch):
    """Set SECATEURS_UNSTRUCTURED_LAYOUT for one test (the value is read once per process, so the cache is cleared
    before and after)."""
    def ask(value: str) -> None:
        monkeypatch.setenv(LAYOUT_ENV, value)
        layout.cache_clear()

    yield ask
    monkeypatch.delenv(LAYOUT_ENV, raising=False)
    layout.cache_clear()


def test_the_user_can_ask_for_the_bitmap_and_a_banded_checkpoint_reloads_onto_it(tmp_path, asked_layout, not_opted_in):
    """The banded layout costs bytes at 50% zeros (1.30 against the bitmap's 1.16 fp16 bytes per weight) and up to 23%
    per linear at 8-32 tokens there: SECATEURS_UNSTRUCTURED_LAYOUT=bitmap stores every unstructured weight as the
    bitmap, says why, and a checkpoint exported from banded layers reloads onto the bitmap with the same logits; a
    value that is no layout is one line naming the two."""
    loaded = tiny_model("llama")
    _prune(loaded, PruneConfig("wanda", 0.7), random_ids(4, 16))
    ids = random_ids(1, 12)
    expected = loaded.model(ids).logits
    stage = export_sparse(loaded)
    assert {info["kind"] for info in stage.layers.values()} == {"banded"}
    folder = save(loaded, tmp_path / "banded", stages=[stage])
    asked_layout("bitmap")
    for sparsity in (0.5, 0.7):
        assert choose_format(_weight(16, 256, sparsity), 0.5) == (
            Bitmap, f"unstructured {sparsity:.2f}, the bitmap asked for by {LAYOUT_ENV}=bitmap")
    reloaded = load_model(str(folder))
    assert {layer.kind for layer in sparse_layers(reloaded.model).values()} == {"bitmap"}
    torch.testing.assert_close(reloaded.model(ids).logits, expected)
    asked_layout("csr")
    with pytest.raises(UsageError, match=f"^{LAYOUT_ENV}='csr' is not a layout: set it to banded or bitmap$"):
        choose_format(_weight(16, 256, 0.7), 0.5)


def test_no_format_is_held_back_without_the_opt_in(not_opted_in):
    """Every registered format ran on an H100 (2:4, 4:8, 8:16, the bitmap and now the banded layout), so none says it
    is ``unavailable()``; ``fits`` stays each layout's own check (test_nm816.py holds the contract for a format held
    back)."""
    from secateurs.kernels.registry import format_classes

    assert [cls.kind for cls in format_classes() if cls.unavailable()] == []
    assert Banded.supports(_weight(16, 256, 0.7)) is None


def test_gemv_and_expand_ops_have_fake_implementations():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        y = torch.ops.secateurs.banded_gemv(torch.empty(3, 4168, dtype=torch.bfloat16), torch.empty(64 * 16, dtype=torch.bfloat16),
                                           torch.empty(64, 8, dtype=torch.uint8), torch.empty(64, dtype=torch.int16),
                                           torch.empty(5 * 3 + 1, dtype=torch.int32), 1, 1)
        torch.ops.secateurs.banded_expand(torch.empty(64 * 16, dtype=torch.bfloat16), torch.empty(64, 8, dtype=torch.uint8),
                                          torch.empty(64, dtype=torch.int16), torch.empty(16, dtype=torch.int32),
                                          torch.empty(5 * 4168, dtype=torch.bfloat16), 5, 4168)
    assert (tuple(y.shape), y.dtype) == ((3, 5), torch.bfloat16)


def test_expand_candidate_multiplies_through_the_shared_scratch(monkeypatch, not_opted_in):
    w = _weight(24, 2056, 0.7, seed=8, dtype=torch.float16)
    fmt = Banded.compress(w)
    _gpu_like(monkeypatch)
    monkeypatch.setattr(cuda_ops, "_SCRATCH", {})
    held = cuda_ops.scratch(torch.device("cpu"), torch.float16, 60000)
    held.fill_(float("nan"))
    monkeypatch.setattr(banded, "banded_expand", lambda values, deltas, starts, offsets, out, n, k: out[: n * k].copy_(
        _emulate_expand(Banded(values, deltas, starts, offsets, (n, k))).reshape(-1)))
    x = torch.randn(9, 2056, generator=torch.Generator().manual_seed(9)).half()
    got = fmt.cuda_candidates(8)["expand_cublas"](x)
    torch.testing.assert_close(got.float(), x.float() @ w.float().T, rtol=2e-3, atol=2e-3)
    assert cuda_ops.scratch(torch.device("cpu"), torch.float16, 1) is held


def test_sparse_layer_runs_the_reference_on_cpu_and_traces_whole():
    w = _weight(16, 256, 0.7)
    layer = SparseLinear(Banded.compress(w), torch.randn(16))
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    x = torch.randn(2, 3, 256)
    torch.testing.assert_close(compiled(x), torch.nn.functional.linear(x, w, layer.bias))


def _prune(loaded, config: PruneConfig, ids: torch.Tensor):
    with mock.patch.object(sparsity_prune, "calibration_ids", lambda *a, **k: ids):
        return prune(loaded, config, CalibConfig("wikitext2", len(ids), ids.shape[1]), EngineOptions(device="cpu"))


def test_a_banded_model_exports_as_a_bitmask_checkpoint_and_reloads_onto_banded(tmp_path, not_opted_in):
    loaded = tiny_model("llama")
    _prune(loaded, PruneConfig("wanda", 0.7), random_ids(4, 16))
    ids = random_ids(1, 12)
    expected = loaded.model(ids).logits
    stage = export_sparse(loaded)
    assert stage.storage == FORMAT_BITMASK
    assert {info["kind"] for info in stage.layers.values()} == {"banded"}
    reloaded = load_model(str(save(loaded, tmp_path / "banded", stages=[stage])))
    layers = sparse_layers(reloaded.model)
    assert set(layers) == set(stage.layers) and {layer.kind for layer in layers.values()} == {"banded"}
    torch.testing.assert_close(reloaded.model(ids).logits, expected)


def test_a_checkpoint_saved_from_bitmap_layers_reloads_onto_banded(tmp_path, monkeypatch, not_opted_in):
    """The disk format did not change: a sparse-bitmask checkpoint written while the bitmap held unstructured weights
    (banded held back, as before it was the default) reloads onto the banded layout with the same logits."""
    loaded = tiny_model("llama")
    _prune(loaded, PruneConfig("magnitude", 0.7), random_ids(4, 16))
    ids = random_ids(1, 12)
    expected = loaded.model(ids).logits
    with monkeypatch.context() as held_back:
        held_back.setattr(Banded, "unavailable", classmethod(lambda cls: "held back"))
        stage = export_sparse(loaded)
    assert {info["kind"] for info in stage.layers.values()} == {"bitmap"} and stage.storage == FORMAT_BITMASK
    reloaded = load_model(str(save(loaded, tmp_path / "bitmap", stages=[stage])))
    assert {layer.kind for layer in sparse_layers(reloaded.model).values()} == {"banded"}
    torch.testing.assert_close(reloaded.model(ids).logits, expected)


def test_every_kernel_the_format_launches_is_instantiated_and_the_source_compiles(nvcc_cubins):
    """banded.py names gemvbd_<dtype>_t<tokens>_p<P>_r<rows> and expandbd_p<P>; each must exist in banded.cu."""
    source = banded.SOURCE.read_text()
    made = {tuple(map(int, found)) for found in re.findall(r"GEMVBD\(DT, BF, (\d+), (\d+), (\d+)\)", source)}
    assert {(t, p, r) for t in banded.TOKENS for p in banded.PIECES for r in banded.ROWS} <= made
    assert {band.piece for band in BANDS} <= set(banded.PIECES)
    assert {r for band in BANDS for r in band.rows} <= set(banded.ROWS)
    expands = {int(p) for p in re.findall(r"^EXPANDBD\((\d+)\)$", source, re.MULTILINE)}
    assert set(banded.PIECES) <= expands
    for binary in nvcc_cubins(banded.SOURCE).values():
        assert all(f"gemvbd_{dt}_t{t}_p{p}_r{r}" in binary for dt in ("f16", "bf16") for t, p, r in made)
        assert all(f"expandbd_p{p}" in binary for p in expands)


def test_the_candidates_launch_the_source_kernels_with_their_signatures(monkeypatch, not_opted_in):
    """The Python side of every banded candidate on a CPU: cuda_ops._launch replaced by the kernels' emulations, fed
    exactly what the launchers pass (kernel name, grid, warps, tensors and integers in the order of banded.cu's entry
    points), so a wrong name, argument order, grid or output width fails here, not on a GPU."""
    source = banded.SOURCE.read_text()
    assert ("gemvbd_##DT##_t##T##_p##P##_r##R(const u16* x, const u16* vals, const u8* deltas, const u16* starts, \\\n"
            "                                         const int* offs, u16* y, int M, int N, int K, int S, int nseg)") in source
    assert ("expandbd_p##P(const u16* vals, const u8* deltas, const u16* starts, const int* offs, u16* out, int N, \\\n"
            "                      int K, int nseg)") in source
    w = _weight(37, 4168, 0.7, seed=10, dtype=torch.float16)
    fmt = Banded.compress(w)
    launched = []

    def fake_launch(name, grid, tensors, ints, warps=cuda_ops.WARPS, source=None, shared=0, int_type=None):
        launched.append(name)
        assert source == banded.SOURCE and warps == cuda_ops.WARPS and shared == 0 and int_type is None
        gemv = re.fullmatch(r"gemvbd_f16_t(\d)_p(\d+)_r(\d)", name)
        if gemv:
            tokens, piece, rows = map(int, gemv.groups())
            x, values, deltas, starts, offsets, y = tensors
            m, n, k, split, nseg = ints
            assert (m, k, nseg) == (x.shape[0], x.shape[1], -(-k // SEG)) and (n, k) == fmt.shape
            assert piece == fmt.piece and y.shape == (m, n) and x.is_contiguous() and x.data_ptr() % 16 == 0
            assert grid == -(-n // ((8 // split) * rows))  # what _emulate_gemv walks
            y.copy_(_emulate_gemv(x, Banded(values, deltas, starts, offsets, (n, k)), tokens, rows, split).to(y.dtype))
            return
        assert name == f"expandbd_p{fmt.piece}"
        values, deltas, starts, offsets, out = tensors
        n, k, nseg = ints
        assert (n, k, nseg) == (*fmt.shape, -(-k // SEG)) and grid * cuda_ops.WARPS >= n * nseg  # a warp per unit
        out[: n * k].copy_(_emulate_expand(Banded(values, deltas, starts, offsets, (n, k))).reshape(-1))

    monkeypatch.setattr(cuda_ops, "_module", lambda index, source=None: None)
    monkeypatch.setattr(cuda_ops, "_launch", fake_launch)
    monkeypatch.setattr(cuda_ops, "_SCRATCH", {})
    for m in (1, 3, 9):
        x = torch.randn(m, 4168, generator=torch.Generator().manual_seed(m)).half()
        candidates = fmt.cuda_candidates(m)
        assert candidates
        for name, call in candidates.items():
            torch.testing.assert_close(call(x).double(), x.double() @ w.double().T, rtol=2e-3, atol=2e-3, msg=name)
    assert {f"gemvbd_f16_t1_p{fmt.piece}_r1", f"gemvbd_f16_t4_p{fmt.piece}_r2", f"expandbd_p{fmt.piece}"} <= set(launched)


def test_weights_of_one_shape_in_other_bands_never_share_a_tuned_plan(monkeypatch, opted_in):
    """The first GPU run of two banded models of one shape (50%, then 70% zeros) replayed the 50% model's plan, a p32
    GEMV the 70% weight is not offered, so every 70% call ran the PyTorch reference: the plan key holds the band."""
    x = torch.randn(1, 4096).half()
    layers = {s: SparseLinear(Banded.compress(_weight(128, 4096, s, seed=i, dtype=torch.float16)))
              for i, s in enumerate((0.5, 0.7, 0.72))}
    keys = {s: layer.plan_key(layer.format(), x) for s, layer in layers.items()}
    assert keys[0.5] != keys[0.7]  # p32 in 50-60%, p16 in 60-75%
    assert keys[0.7] == keys[0.72]  # one band, one plan
    _gpu_like(monkeypatch)
    for s, layer in layers.items():  # what the key separates is what the candidates differ by
        named = {name.split("_r")[0] for name in layer.format().cuda_candidates(1)}
        assert named == {f"cuda_gemvbd_p{32 if s == 0.5 else 16}"}
    monkeypatch.delenv(cuda_ops.UNVERIFIED_ENV)
    cuda_ops.unverified_offered.cache_clear()
    assert layers[0.7].plan_key(layers[0.7].format(), x) != keys[0.7]  # the opt-in changes what is offered

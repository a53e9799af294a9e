"""The 8:16 stored format on a CPU: exact round trip and reference product, its place in the order of preference
(2:4, 4:8, 8:16, bitmap), the GEMV's decode and common.cuh's work split emulated bit for bit (for 4:8 too, whose
loop it shares), the expand kernel emulated bit for bit, the kernels' names in the compiled source, its
compressed-tensors export and reload, and one line for what does not run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_nm48 import _emulate_gemv48, _prune
from tiny_models import random_ids, tiny_model

from secateurs import UsageError, load_model, save
from secateurs.api import PruneConfig, export_sparse
from secateurs.kernels import (
    Nm48,
    Nm816,
    Sparse24,
    SparseLinear,
    choose_format,
    reference_matmul,
    sparse_layers,
)
from secateurs.kernels.banded import Banded
from secateurs.kernels.compressed import FORMAT_BITMASK
from secateurs.kernels.registry import FORMATS
from secateurs.sparsity.masks import (
    KERNEL_PATTERNS,
    Pattern,
    nm_mask,
    unstructured_mask,
)


def _w816(rows: int, cols: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    return (w * nm_mask(w.abs(), 8, 16)).to(dtype)


def _edge_groups(w: torch.Tensor) -> torch.Tensor:
    """Groups that stress the decode: none kept, one at the last position, all eight in the low half, all in the
    high half, alternating, and a negative zero (not kept: it is a zero) among them."""
    ones = torch.arange(1, 9, dtype=torch.float32).to(w.dtype)
    w[0, :16] = 0.0
    w[1, 16:32] = 0.0
    w[1, 31] = 2.5
    w[2, :16] = 0.0
    w[2, :8] = ones
    w[3, 16:32] = 0.0
    w[3, 24:32] = -ones
    w[4, :16] = 0.0
    w[4, 1:16:2] = ones
    w[5, :16] = 0.0
    w[5, 0:16:2] = ones
    w[5, 2] = -0.0
    return w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_exact_including_sparser_groups(dtype):
    w = _edge_groups(_w816(24, 96, dtype=dtype))
    fmt = Nm816.compress(w)
    assert (fmt.values.shape, fmt.meta.shape) == ((24, 48), (24, 6))
    assert fmt.meta.dtype == torch.int32 and fmt.values.dtype == dtype
    assert torch.equal(fmt.to_dense(), w)
    assert torch.equal(Nm816.from_parts(fmt.tensors(), fmt.shape).to_dense(), w)
    again = Nm816.from_mask(fmt.values, fmt.mask())
    assert all(torch.equal(a, b) for a, b in zip(again.tensors().values(), fmt.tensors().values()))
    positions = fmt.positions()
    assert bool((positions.diff(dim=2) > 0).all())  # ascending: the kernel's decode relies on it
    slot = torch.arange(8)
    assert bool(((positions >= slot) & (positions <= slot + 8)).all())
    assert bool((fmt.meta < 0).any())  # a top nibble >= 8 sets the sign bit of the int32 word, and reads back
    if dtype == torch.float16:
        assert fmt.nbytes() == 24 * 96 * 1.25  # 8 values + 8 four-bit positions per 16 weights


def test_reference_product_equals_the_dense_product():
    w = _w816(40, 160, seed=1, dtype=torch.float64)
    x = torch.randn(5, 160, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    bias = torch.randn(40, dtype=torch.float64)
    torch.testing.assert_close(reference_matmul(x, Nm816.compress(w), bias), x @ w.T + bias, rtol=0, atol=1e-12)


def _registers(t: torch.Tensor) -> list[list[int]]:
    """A 16-bit tensor's rows as lists of 32-bit registers (two halves each, low half first)."""
    return (t.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF).tolist()


def _halves(register: int, dtype: torch.dtype = torch.float16) -> tuple[float, float]:
    """The two 16-bit floats of a 32-bit register, low half first (unpack2 of common.cuh)."""
    pair = torch.tensor([register & 0xFFFF, register >> 16], dtype=torch.int32).to(torch.int16)
    low, high = pair.view(dtype).tolist()
    return low, high


def _prmt(a: int, b: int, selector: int) -> int:
    """PTX prmt.b32 in its default mode: byte i of the result is byte (nibble i & 7) of the 8 bytes b:a, or that
    byte's sign replicated (0x00 or 0xFF) where nibble i has bit 3 set; nibbles 0-3 of the selector only."""
    pool = (b << 32) | a
    out = 0
    for i in range(4):
        nibble = (selector >> (4 * i)) & 0xF
        byte = (pool >> (8 * (nibble & 7))) & 0xFF
        if nibble & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def _step816(v: list[int], p: int, xs: list[list[int]], dtype: torch.dtype = torch.float16) -> list[float]:
    """sparse816.cu's step816, word for word: v = the chunk's four value registers, p = its position word, xs[t] =
    the chunk's eight x registers of token t; returns each token's sum over the chunk's eight values."""
    rel = (p - 0x66442200) & 0xFFFFFFFF
    idx3 = (rel & 0x11111111) | ((rel >> 2) & 0x22222222) | 0x40404040
    sums = [0.0] * len(xs)
    for j in range(2):
        r, q = rel >> (16 * j), idx3 >> (16 * j)
        s1w = _prmt(0x76543210, 0x76543210, r)
        s2w = (_prmt(0x10101010, 0x54545454, r) + 0x22002200) & 0xFFFFFFFF
        s3w = _prmt(0x00541010, 0x76543232, q)
        for h in range(2):
            i = 2 * j + h
            s1, s2, s3 = s1w >> (16 * h), s2w >> (16 * h), s3w >> (16 * h)
            w0, w1 = _halves(v[i], dtype)
            for t, x in enumerate(xs):
                a = _prmt(x[i], x[i + 1], s1)
                b = _prmt(x[i + 2], x[i + 3], s1)
                xa, xb = _halves(_prmt(_prmt(a, b, s2), x[i + 4], s3), dtype)
                sums[t] += w0 * xa + w1 * xb
    return sums


def _emulate_gemv816(x: torch.Tensor, fmt: Nm816) -> torch.Tensor:
    """Every chunk of every row through the emulated step (the product without the work split)."""
    n, k = fmt.shape
    xs, values = _registers(x), _registers(fmt.values)
    words = (fmt.meta.to(torch.int64) & 0xFFFFFFFF).tolist()
    y = torch.zeros(x.shape[0], n, dtype=torch.float64)
    for row in range(n):
        for c in range(k // 16):
            sums = _step816(values[row][4 * c:4 * c + 4], words[row][c], [xr[8 * c:8 * c + 8] for xr in xs], x.dtype)
            for t, s in enumerate(sums):
                y[t, row] += s
    return y


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemv816_byte_permute_decode_equals_the_dense_product(dtype):
    w = _edge_groups(_w816(8, 64, seed=3, dtype=dtype))
    fmt = Nm816.compress(w)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(4)).to(dtype)
    torch.testing.assert_close(_emulate_gemv816(x, fmt), x.double() @ w.double().T, rtol=1e-12, atol=1e-12)


def test_every_position_pair_decodes_to_its_activations():
    """All 8:16 patterns a value pair can meet: for every ascending pair (p0, p1) at every pair slot i (positions
    of the other values filled in ascending around them), the step picks exactly x[p0] and x[p1]."""
    x = torch.arange(1, 17, dtype=torch.float16).reshape(1, 16)  # x[j] = j + 1: the picked input is visible
    xs = _registers(x)[0]
    checked = 0
    for i in range(4):
        for p0 in range(2 * i, 2 * i + 9):
            for p1 in range(p0 + 1, 2 * i + 10):
                below, above = list(range(2 * i)), list(range(p1 + 1, 16))
                if p0 < 2 * i or len(above) < 6 - 2 * i or any(b >= p0 for b in below):
                    continue
                positions = below + [p0, p1] + above[len(above) - (6 - 2 * i):]
                assert positions == sorted(positions) and len(set(positions)) == 8
                word = sum(p << (4 * e) for e, p in enumerate(positions))
                v = [0] * 4
                v[i] = 0x3C00 | (0x4000 << 16)  # w0 = 1.0, w1 = 2.0; the other pairs weigh zero
                (total,) = _step816(v, word, [xs])
                assert total == (p0 + 1) + 2 * (p1 + 1), (i, p0, p1)
                checked += 1
    assert checked > 60


def _emulate_loop(x: torch.Tensor, n: int, k: int, rows: int, split: int, unroll: int, tokens: int,
                  step) -> torch.Tensor:
    """common.cuh's gemv_nm, index for index: blocks of 8 warps, ``split`` warps sharing ``rows`` rows, lanes
    striding along K by 16-input steps (U-unrolled main loop, then the tail), rows and tokens clamped to valid
    addresses, warp sums, the split-K sum of the first warp of a group, and the guarded stores. ``step(row, j,
    xrow)`` is a format's step on (clamped) row ``row``, chunk ``j``, for x row ``xrow``."""
    from secateurs.kernels import cuda_ops

    m = x.shape[0]
    warps, lanes = cuda_ops.WARPS, 32
    groups_per_block = warps // split
    grid = cuda_ops._grid(n, rows, split)  # what gemv_launch launches
    big_w = k >> 4
    y = torch.full((m, n), float("nan"), dtype=torch.float64)
    stored = set()
    for block in range(grid):
        red = {}
        for warp in range(warps):
            g, s = warp // split, warp % split
            row0 = (block * groups_per_block + g) * rows
            clamped = [min(row0 + r, n - 1) for r in range(rows)]
            xrows = [min(t, m - 1) for t in range(tokens)]
            acc = [[0.0] * tokens for _ in range(rows)]
            stride = lanes * split
            for lane in range(lanes):
                j = s * lanes + lane
                while j + (unroll - 1) * stride < big_w:
                    for u in range(unroll):
                        for r in range(rows):
                            for t in range(tokens):
                                acc[r][t] += step(clamped[r], j + u * stride, xrows[t])
                    j += unroll * stride
                while j < big_w:
                    for r in range(rows):
                        for t in range(tokens):
                            acc[r][t] += step(clamped[r], j, xrows[t])
                    j += stride
            red[warp] = acc
        for warp in range(warps):
            g, s = warp // split, warp % split
            if s:
                continue
            row0 = (block * groups_per_block + g) * rows
            for r in range(rows):
                for t in range(tokens):
                    total = sum(red[warp + q][r][t] for q in range(split))
                    if row0 + r < n and t < m:
                        assert (t, row0 + r) not in stored
                        stored.add((t, row0 + r))
                        y[t, row0 + r] = total
    assert len(stored) == m * n
    return y


def _chunk_sums(fmt, x: torch.Tensor) -> dict[tuple[int, int, int], float]:
    """(row, chunk, x row) -> the format's emulated step on it, computed once per shape."""
    n, k = fmt.shape
    xs, values = _registers(x), _registers(fmt.values)
    out = {}
    if isinstance(fmt, Nm816):
        words = (fmt.meta.to(torch.int64) & 0xFFFFFFFF).tolist()
        for row in range(n):
            for c in range(k // 16):
                sums = _step816(values[row][4 * c:4 * c + 4], words[row][c], [xr[8 * c:8 * c + 8] for xr in xs])
                out.update({(row, c, t): s for t, s in enumerate(sums)})
        return out
    for row in range(n):
        for c in range(k // 16):
            one = Nm48(fmt.values[row:row + 1, 8 * c:8 * c + 8].contiguous(), fmt.meta[row:row + 1, 2 * c:2 * c + 2].contiguous(),
                       fmt.high[row:row + 1, c:c + 1].contiguous(), (1, 16))
            sums = _emulate_gemv48(x[:, 16 * c:16 * c + 16], one)
            out.update({(row, c, t): float(sums[t, 0]) for t in range(x.shape[0])})
    return out


@pytest.mark.parametrize("kind", ["8:16", "4:8"])
@pytest.mark.parametrize(("n", "k"), [(37, 1040), (5, 2064)])
def test_the_shared_gemv_loop_covers_every_output_once_at_every_variant(kind, n, k):
    """The GEMV as launched (every instantiated rows-per-warp variant, every split-K choice, 1-4 tokens
    on the instantiated token buckets) on odd shapes: 37 rows (a partial warp group and block), K of 65 and 129
    chunks (main loop plus tail, and a split whose warps get no full unrolled step), equals the dense product."""
    import re

    from secateurs.kernels import cuda_ops, nm48, nm816

    base = torch.randn(n, k, generator=torch.Generator().manual_seed(7))
    if kind == "8:16":
        module, macro, fmt = nm816, "GEMV816", Nm816.compress(base.half() * nm_mask(base.abs(), 8, 16))
    else:
        module, macro, fmt = nm48, "GEMV48", Nm48.compress(base.half() * nm_mask(base.abs(), 4, 8))
    w = fmt.to_dense()
    unrolls = {(int(t), int(r)): int(u) for t, r, u in
               re.findall(rf"{macro}\(DT, BF, (\d+), (\d+), (\d+)\)", module.SOURCE.read_text())}
    x = torch.randn(4, k, generator=torch.Generator().manual_seed(8)).half()
    sums = _chunk_sums(fmt, x)
    for m in (1, 2, 3, 4):
        tokens = next(t for t in module.TOKENS if t >= m)
        expected = x[:m].double() @ w.double().T
        for rows in module.ROWS[tokens]:
            for split in cuda_ops.SPLITS:
                got = _emulate_loop(x[:m], n, k, rows, split, unrolls[tokens, rows], tokens,
                                    lambda row, j, t: sums[row, j, t])
                torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9, msg=f"m={m} r={rows} s={split}")


def _emulate_expand816(fmt: Nm816, chunks: int) -> torch.Tensor:
    """sparse816.cu's expand816<C> on raw 16-bit patterns, flat over units of C 16-input chunks: per chunk value e
    at 16 x (position & 3) of 64-bit word position >> 2, selected among words e >> 2 .. min(3, (e + 8) >> 2),
    stored as two 16-byte vectors."""
    n, k = fmt.shape
    vals = [v & 0xFFFFFFFF for v in fmt.values.contiguous().view(torch.int32).reshape(-1).tolist()]
    words = [w & 0xFFFFFFFF for w in fmt.meta.reshape(-1).tolist()]
    units = n * k // 16 // chunks
    assert units * chunks * 16 == n * k
    out = [0] * (n * k)
    for i in range(units):
        pw = [words[i * chunks + c] for c in range(chunks)]  # C == 4: one 16-byte load of four words
        for c in range(chunks):
            chunk = i * chunks + c
            v = vals[4 * chunk: 4 * chunk + 4]
            g = [0, 0, 0, 0]
            for e in range(8):
                p = (pw[c] >> (4 * e)) & 15
                w = ((v[e >> 1] >> (16 * (e & 1))) & 0xFFFF) << (16 * (p & 3))
                for q in range(e >> 2, min((e + 8) >> 2, 3) + 1):
                    g[q] |= w if (p >> 2) == q else 0
            for q in range(4):
                for e in range(4):
                    out[16 * chunk + 4 * q + e] = (g[q] >> (16 * e)) & 0xFFFF
    return torch.tensor(out, dtype=torch.int32).to(torch.int16).view(fmt.values.dtype).reshape(n, k)


@pytest.mark.parametrize("chunks", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_expand816_index_math_is_bit_exact(chunks, dtype):
    from secateurs.kernels import nm816

    assert chunks in nm816.EXPAND_CHUNKS
    w = _edge_groups(_w816(6, 128, seed=21, dtype=dtype))
    fmt = Nm816.compress(w)
    got = _emulate_expand816(fmt, chunks)
    assert torch.equal(got.view(torch.int16), fmt.to_dense().view(torch.int16))
    assert torch.equal(got, w)


def test_supports_names_why_a_weight_is_not_8of16(opted_in):
    assert Nm816.supports(_w816(8, 64)) is None
    assert "more than 8 non-zeros" in Nm816.supports(torch.randn(8, 64))
    assert "multiple of 16" in Nm816.supports(_w816(8, 24 * 16)[:, :40])
    sparse = torch.zeros(8, 64)
    sparse[:, ::4] = 1.0  # 4 of 16: fits 8:16, but the bitmap is far smaller
    assert "bitmap" in Nm816.supports(sparse)
    with pytest.raises(UsageError, match="--pattern 8:16"):
        Nm816.compress(torch.randn(8, 64))
    with pytest.raises(ValueError, match="exactly 8"):
        Nm816.from_mask(torch.zeros(8, 32), torch.zeros(8, 64, dtype=torch.bool))


def test_an_8of16_weight_is_stored_as_8of16_without_the_opt_in(not_opted_in):
    """Its GEMV and expand path matched float64 on an H100 (benchmarks/gpu_kernel_check.py), so no opt-in is needed."""
    w = _w816(16, 256)
    assert Nm816.unavailable() is None and Nm816.supports(w) is None
    assert choose_format(w, 0.5) == (Nm816, "8:16")


def test_an_nm_format_whose_gemv_never_ran_on_a_gpu_is_stored_unstructured_and_says_why(monkeypatch, not_opted_in):
    """The rule a new N:M layout starts under: without a GPU-run GEMV only the reference would read its weights, so
    they are held unstructured (banded, at 8:16's 50% zeros), and compress still builds the format on request."""
    monkeypatch.setattr(Nm816, "gemv_verified", False)
    w = _w816(16, 256)
    assert "SECATEURS_UNVERIFIED_KERNELS=1" in Nm816.supports(w) and Nm816.fits(w) is None
    assert choose_format(w, 0.5)[0] is Banded
    assert torch.equal(Nm816.compress(w).to_dense(), w)
    assert Nm48.unavailable() is None  # the 4:8 GEMV was measured on an H100: 4:8 is stored either way
    base = torch.randn(16, 256)
    assert choose_format(base * nm_mask(base.abs(), 4, 8), 0.5)[0] is Nm48


def test_the_order_of_preference_is_2of4_4of8_8of16_then_bitmap(opted_in):
    """A 2:4 weight is also 4:8 and 8:16, a 4:8 weight also 8:16: each stays in the most structured format."""
    kinds = list(FORMATS)
    assert kinds.index("2:4") < kinds.index("4:8") < kinds.index("8:16") < kinds.index("bitmap") == len(kinds) - 1
    base = torch.randn(16, 256)
    assert choose_format(base * nm_mask(base.abs(), 2, 4), 0.5) == (Sparse24, "2:4")
    assert choose_format(base * nm_mask(base.abs(), 4, 8), 0.5) == (Nm48, "4:8")
    assert choose_format(_w816(16, 256), 0.5) == (Nm816, "8:16")
    assert choose_format(base * nm_mask(base.abs(), 6, 16), 0.5) == (Nm816, "8:16")  # 62.5% zeros: still 8:16
    structured = (Sparse24, Nm48, Nm816)  # the rest go to the unstructured formats (the bitmap, or another opt-in one)
    for sparsity in (0.5, 0.9):
        assert choose_format(base * unstructured_mask(base.abs(), sparsity), 0.5)[0] not in structured
    assert choose_format(base * nm_mask(base.abs(), 3, 16), 0.5)[0] not in structured  # 81% zeros: smaller there


@pytest.mark.parametrize("other", [Sparse24, Nm48])
def test_an_8of16_weight_asked_for_as_2of4_or_4of8_says_it_is_8of16_in_one_line(other, opted_in):
    with pytest.raises(UsageError, match="it is 8:16") as caught:
        other.compress(_w816(8, 64))
    assert "\n" not in str(caught.value)


def test_the_4of8_refusal_names_8of16_without_the_opt_in_too(not_opted_in):
    with pytest.raises(UsageError, match="it is 8:16; prune with --pattern 4:8"):
        Nm48.compress(_w816(8, 64))


def test_the_kernel_patterns_are_the_registrys_and_a_bad_pattern_names_them():
    assert KERNEL_PATTERNS == tuple(kind for kind in FORMATS if ":" in kind)
    with pytest.raises(UsageError, match="2:4, 4:8, 8:16") as caught:
        Pattern.parse("16:8")
    assert "\n" not in str(caught.value)


def test_sparse_layer_traces_whole_under_torch_compile_and_runs_the_reference_on_cpu():
    w = _w816(16, 256)
    layer = SparseLinear(Nm816.compress(w), torch.randn(16))
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    x = torch.randn(2, 3, 256)
    torch.testing.assert_close(compiled(x), F.linear(x, w, layer.bias))


def test_gemv816_and_expand816_ops_have_fake_implementations():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        y = torch.ops.secateurs.nm816_gemv(torch.empty(3, 64, dtype=torch.bfloat16), torch.empty(24, 32, dtype=torch.bfloat16),
                                           torch.empty(24, 4, dtype=torch.int32), 2, 1)
        torch.ops.secateurs.nm816_expand(torch.empty(24, 32, dtype=torch.bfloat16), torch.empty(24, 4, dtype=torch.int32),
                                         torch.empty(24 * 64, dtype=torch.bfloat16), 4)
    assert (tuple(y.shape), y.dtype) == ((3, 24), torch.bfloat16)


def test_8of16_kernels_are_offered_without_the_opt_in_and_only_under_it_while_unverified(monkeypatch, not_opted_in):
    """The GEMV at 1-4 rows and the expand path from row bucket 8 on (four chunks per thread where the words are
    aligned), with no opt-in since both ran correctly on an H100, and at 8-64 rows the tensor-core kernel and its
    ring form at the depth timed fastest there (3 at a 16-token tile); a format whose GEMV never ran on a GPU offers
    nothing at any row count without SECATEURS_UNVERIFIED_KERNELS=1."""
    from secateurs.kernels import cuda_ops, nm

    fmt = Nm816.compress(_w816(128, 256, dtype=torch.float16))
    monkeypatch.setattr(cuda_ops, "_module", lambda index, source=None: None)
    names = {m: list(fmt.cuda_candidates(m)) for m in (1, 2, 3, 4, 8, 16, 2048)}
    with monkeypatch.context() as unverified:
        unverified.setattr(Nm816, "gemv_verified", False)
        assert all(fmt.cuda_candidates(m) == {} for m in (1, 2, 4, 8, 512))
    for m in (1, 2, 3, 4):
        assert names[m] and all(name.startswith("cuda_gemv816_r") for name in names[m])
    assert names[1] == ["cuda_gemv816_r2_s1", "cuda_gemv816_r1_s1", "cuda_gemv816_r4_s1"]  # K = 256: no split-K
    tensor_core = ("cuda_tc816_", "cuda_tcr816_")  # after the expand path at 8-64 rows (tests/test_nm_tensorcore.py)
    for m in (8, 16, 2048):
        assert [n for n in names[m] if not n.startswith(tensor_core)] == ["expand_cublas_c1", "expand_cublas_c4"]
    for m in (8, 16):
        assert [n for n in names[m] if n.startswith("cuda_tcr816_")] == [
            f"cuda_tcr816_n16_d3_s{s}" for s in nm.tc_splits(128, 256)]
    assert names[2048] == ["expand_cublas_c1", "expand_cublas_c4"]
    odd = Nm816.compress(_w816(5, 48, dtype=torch.float16))  # 15 chunks: no whole four-chunk units
    assert [n for n in odd.cuda_candidates(8) if not n.startswith(tensor_core)] == ["expand_cublas_c1"]


def test_expand_candidate_multiplies_through_the_shared_scratch(monkeypatch):
    from secateurs.kernels import cuda_ops, nm816

    w = _w816(24, 64, seed=5, dtype=torch.float16)
    fmt = Nm816.compress(w)
    monkeypatch.setattr(cuda_ops, "_module", lambda index, source=None: None)
    monkeypatch.setattr(cuda_ops, "unverified_offered", lambda: True)
    monkeypatch.setattr(cuda_ops, "_SCRATCH", {})
    held = cuda_ops.scratch(torch.device("cpu"), torch.float16, 5000)
    held.fill_(float("nan"))
    monkeypatch.setattr(nm816, "nm816_expand", lambda values, meta, out, chunks: out[: w.numel()].copy_(
        _emulate_expand816(Nm816(values, meta, tuple(w.shape)), chunks).reshape(-1)))
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(6)).half()
    for name, call in fmt.cuda_candidates(8).items():
        if name.startswith("expand_cublas"):  # the tensor-core kernel beside it: tests/test_nm_tensorcore.py
            torch.testing.assert_close(call(x).float(), x.float() @ w.float().T, rtol=2e-3, atol=2e-3, msg=name)
    assert cuda_ops.scratch(torch.device("cpu"), torch.float16, 1) is held


def test_an_8of16_model_exports_as_a_bitmask_checkpoint_and_reloads_onto_8of16(tmp_path, opted_in):
    loaded = tiny_model("llama")
    _prune(loaded, PruneConfig("wanda", None, "8:16"), random_ids(4, 16))
    ids = random_ids(1, 12)
    expected = loaded.model(ids).logits
    stage = export_sparse(loaded)
    assert stage.storage == FORMAT_BITMASK
    kinds = {info["kind"] for info in stage.layers.values()}
    assert "8:16" in kinds and kinds <= {"8:16", "4:8", "2:4"}  # a tiny layer's 8:16 mask may also be 4:8
    reloaded = load_model(str(save(loaded, tmp_path / "s816", stages=[stage])))
    layers = sparse_layers(reloaded.model)
    assert {name: layer.kind for name, layer in layers.items()} == {name: info["kind"] for name, info in stage.layers.items()}
    torch.testing.assert_close(reloaded.model(ids).logits, expected)


def test_every_kernel_the_format_launches_is_instantiated_and_the_source_compiles(nvcc_cubins):
    """nm816.py names kernels gemv816_<dtype>_t<tokens>_r<rows> and expand816_c<chunks>; each must exist in
    sparse816.cu (NVRTC compiles it on users' GPUs; where nvcc is installed it is compiled here for Hopper and
    Ampere)."""
    import re

    from secateurs.kernels import nm816

    source = nm816.SOURCE.read_text()
    made = {(int(t), int(r)) for t, r in re.findall(r"GEMV816\(DT, BF, (\d+), (\d+), \d+\)", source)}
    assert {(t, r) for t in nm816.TOKENS for r in nm816.ROWS[t]} <= made
    expands = {int(c) for c in re.findall(r"^EXPAND816\((\d+)\)$", source, re.MULTILINE)}
    assert set(nm816.EXPAND_CHUNKS) <= expands
    for binary in nvcc_cubins(nm816.SOURCE).values():
        assert all(f"gemv816_{dtype}_t{t}_r{r}" in binary for dtype in ("f16", "bf16") for t, r in made)
        assert all(f"expand816_c{c}" in binary for c in expands)


@pytest.mark.parametrize("verified", [True, False])
def test_prune_export_says_what_an_8of16_model_runs_as(tmp_path, tiny_folder, monkeypatch, not_opted_in, verified):
    from typer.testing import CliRunner

    from secateurs.cli import app

    monkeypatch.setattr(Nm816, "gemv_verified", verified)
    result = CliRunner().invoke(app, ["prune", str(tiny_folder), "--out", str(tmp_path / "out"), "--device", "cpu",
                                      "--method", "magnitude", "--pattern", "8:16", "--export", "sparse"])
    assert result.exit_code == 0, result.output
    kinds = {layer.kind for layer in sparse_layers(load_model(str(tmp_path / "out")).model).values()}
    said = " ".join(result.output.split())
    if verified:
        assert "8:16" in kinds and kinds <= {"8:16", "4:8", "2:4"} and "stored and run as" not in said
    else:
        assert kinds == {"banded"}
        assert "8:16 linears are stored and run as banded: the 8:16 kernels are not yet verified on a GPU" in said
        assert "SECATEURS_UNVERIFIED_KERNELS=1 stores 8:16 weights as 8:16" in said


def test_the_candidates_launch_the_source_kernels_with_their_signatures(monkeypatch, opted_in):
    """The Python side of every 8:16 candidate on a CPU: cuda_ops._launch replaced by the kernels' emulations, fed
    exactly what the launcher passes (kernel name, grid, tensors, integers, in the order of sparse816.cu's entry
    points), so a wrong name, argument order, grid or unit count fails here, not on a GPU."""
    import re

    from secateurs.kernels import cuda_ops, nm816

    source = nm816.SOURCE.read_text()
    unrolls = {(int(t), int(r)): int(u) for t, r, u in re.findall(r"GEMV816\(DT, BF, (\d+), (\d+), (\d+)\)", source)}
    assert "gemv816_##DT##_t##T##_r##R(const u16* x, const u16* vals, const u32* pos, u16* y, int M, int N," in source
    assert "expand816_c##C(const u16* vals, const u32* pos, u16* out, long long units)" in source
    w = _w816(37, 1040, seed=9, dtype=torch.float16)
    fmt = Nm816.compress(w)
    launched = []

    def fake_launch(name, grid, tensors, ints, warps=cuda_ops.WARPS, source=None, shared=0, int_type=None):
        launched.append(name)
        assert source == nm816.SOURCE
        gemv = re.fullmatch(r"gemv816_f16_t(\d)_r(\d)", name)
        if gemv:
            tokens, rows = int(gemv.group(1)), int(gemv.group(2))
            x, values, meta, y = tensors
            m, n, k, split = ints
            assert m == x.shape[0]
            assert grid == cuda_ops._grid(n, rows, split) and warps == cuda_ops.WARPS
            sums = _chunk_sums(Nm816(values, meta, (n, k)), x)
            y.copy_(_emulate_loop(x, n, k, rows, split, unrolls[tokens, rows], tokens,
                                  lambda row, j, t: sums[row, j, t]).to(y.dtype))
            return
        chunks = int(re.fullmatch(r"expand816_c(\d)", name).group(1))
        values, meta, out = tensors
        (units,) = ints
        assert units * chunks * 16 == w.numel() and int_type is not None
        out[: w.numel()].copy_(_emulate_expand816(Nm816(values, meta, fmt.shape), chunks).reshape(-1))

    monkeypatch.setattr(cuda_ops, "_module", lambda index, source=None: None)
    monkeypatch.setattr(cuda_ops, "_launch", fake_launch)
    monkeypatch.setattr(cuda_ops, "_SCRATCH", {})
    for m in (1, 3, 9):
        x = torch.randn(m, 1040, generator=torch.Generator().manual_seed(m)).half()
        candidates = fmt.cuda_candidates(m)
        assert candidates
        for name, call in candidates.items():
            if name.startswith(("cuda_tc816_", "cuda_tcr816_")):  # nm_tc.cu's, emulated in tests/test_nm_tensorcore.py
                continue
            torch.testing.assert_close(call(x).double(), x.double() @ w.double().T, rtol=2e-3, atol=2e-3, msg=name)
    assert {"gemv816_f16_t1_r2", "gemv816_f16_t4_r1", "expand816_c1"} <= set(launched)


def test_bench_and_generate_run_an_8of16_export_on_its_format(tmp_path, tiny_folder, opted_in):
    """`prune --export sparse` writes 8:16 layers, `generate` greedy-decodes them like the dense-equivalent model
    and says they run as 8:16, and `bench` runs the export with only its stored bytes (CPU: the reference path)."""
    import json

    from typer.testing import CliRunner

    import secateurs
    from secateurs.cli import app

    out = tmp_path / "s816"
    done = CliRunner().invoke(app, ["prune", str(tiny_folder), "--out", str(out), "--device", "cpu", "--method", "magnitude",
                                    "--pattern", "8:16", "--export", "sparse"])
    assert done.exit_code == 0, done.output
    loaded = load_model(str(out))
    kinds = [layer.kind for layer in sparse_layers(loaded.model).values()]
    expected = secateurs.generate(loaded, "the quick brown", 6, device="cpu").text
    done = CliRunner().invoke(app, ["generate", str(out), "--prompt", "the quick brown", "--max-new-tokens", "6"])
    assert done.exit_code == 0, done.output
    assert done.stdout.startswith(expected + "\n")
    assert f"8:16 × {kinds.count('8:16')} on sparse kernels" in done.stdout
    report = tmp_path / "bench.json"
    done = CliRunner().invoke(app, ["bench", str(out), "--baseline", str(tiny_folder), "--device", "cpu", "--prompt-lengths",
                                    "8", "--batches", "1", "--new-tokens", "2", "--warmup", "0", "--repeats", "1",
                                    "--json", str(report)])
    assert done.exit_code == 0, done.output
    sparse = json.loads(report.read_text())["results"][1]
    assert sparse["extra_mib"] == 0
    assert json.loads(report.read_text())["ratios"]["sparse"]["weight_fraction"]["all"] < 1.0

"""The bitmap tensor-core kernel (``kernels/cuda/bitmap_tc.cu`` on ``tc_tile.cuh``'s engine, 5-64 tokens) on a CPU: the
bitmap unit's index math emulated lane by lane (which bit words and segment offset a thread reads, the first value's
index, which 16-byte value vectors it loads and how it shifts them, where each value lands in the swizzled shared
tile), inside test_nm_tensorcore's emulation of the shared engine (tiles, ldmatrix, mma fragments, split-K), run
through the real launcher with ``cuda_ops._launch`` replaced and compared with the float64 dense product. A broken
start index, window shift or scatter address fails it. Also: the candidates (cleared on an H100) are offered with or
without ``SECATEURS_UNVERIFIED_KERNELS=1``, only at 5-64 rows and after the expand path; a module that does not build
offers none; NVRTC gets the engine header; nvcc builds the source with no spills."""

from __future__ import annotations

import hashlib
import re

import pytest
import test_nm_tensorcore as engine
import torch

from secateurs.kernels import Bitmap, bitmap, cuda_ops, nm

ROWS = 64


def _popc(t: torch.Tensor) -> torch.Tensor:
    """Popcount of each 32-bit pattern held in an int64 tensor."""
    return ((t.unsqueeze(-1) >> torch.arange(32)) & 1).sum(-1)


def bitmap_chunks(tables: list[torch.Tensor], vals: torch.Tensor, row: torch.Tensor, j: torch.Tensor, n: int, k: int,
                  broken: str = "") -> torch.Tensor:
    """(units, 16) float64: what TcBitmap::load reads for (row, chunk j) and TcBitmap::store writes, as logical inputs
    of the chunk. ``broken`` replaces one step by a plausible mistake (the sensitivity test)."""
    bits, offs = tables
    nnz = len(vals)
    seg = j.clamp(max=k // 16 - 1) >> 3
    words = bits[(row * (k // 32) + seg * 4).unsqueeze(1) + torch.arange(4)]  # the segment's 16-byte load
    off = offs[row * (k // 128) + seg]
    q, half = (j >> 1) & 3, j & 1
    word = words.gather(1, q.unsqueeze(1)).squeeze(1)
    before = (_popc(words) * (torch.arange(4) < q.unsqueeze(1))).sum(1)
    if broken != "start without the lower half's popcount":
        before = before + torch.where(half == 1, _popc(word & 0xFFFF), 0)
    start = off + before
    ubits = torch.where(half == 1, word >> 16, word & 0xFFFF)
    o = start & 7
    a0, vecs = start - o, (o + _popc(ubits) + 7) >> 3
    index = a0.unsqueeze(1) + torch.arange(24)  # the three vectors, halves 8i..8i+7 of vector i
    loaded = (torch.arange(24) // 8 < vecs.unsqueeze(1)) & (index < nnz)  # only needed vectors, never past the end
    window = torch.where(loaded, vals[index.clamp(max=nnz - 1)], 0.0)
    # the shift by o halves: registers (two halves each) by o / 2 (two selects), then a byte-permute by o % 2
    shift = torch.zeros_like(o) if broken == "window not shifted" else o
    regs = window.view(-1, 12, 2)
    a = (shift >> 1).view(-1, 1, 1)
    t2 = torch.where((a & 2) != 0, regs[:, 2:12], regs[:, 0:10])
    s1 = torch.where((a & 1) != 0, t2[:, 1:10], t2[:, 0:9])
    odd = ((shift & 1) != 0).view(-1, 1)
    lo = torch.where(odd, s1[:, :8, 1], s1[:, :8, 0])  # __byte_perm(s1[k], s1[k + 1], 0x5432 or 0x3210)
    hi = torch.where(odd, s1[:, 1:9, 0], s1[:, :8, 1])
    value = torch.stack([lo, hi], dim=2).reshape(-1, 16)  # value e of the chunk: half e
    # the scatter, values from the highest down: value e (e < popcount) to the highest bit left, then cleared;
    # byte (2p) ^ (32c ^ (r & 7) << 4) of tile row r
    c, r7 = j & 3, row & 7  # row0 is a multiple of 64: the tile row's r & 7 is the weight row's
    key = 32 * c ^ (0 if broken == "scatter without the swizzle" else r7 << 4)
    dense = torch.zeros(len(row), 16, dtype=torch.float64)
    count, rest = _popc(ubits), ubits.clone()
    for e in reversed(range(16)):
        on = e < count
        p = torch.where(on, torch.log2(rest.clamp(min=1).double()).floor().long(), 0)  # bfind
        byte = (2 * p) ^ key
        chunk, within = (byte >> 4) ^ r7, (byte & 15) >> 1  # the logical 8-input chunk and input tc_at reads it as
        at = chunk * 8 + within - 16 * c
        inside = (at >= 0) & (at < 16)
        assert broken or bool((inside | ~on).all()), "a value stored outside its unit's two tile chunks"
        dense[on & inside, at[on & inside]] = value[on & inside, e]  # (broken: one outside is lost)
        rest = torch.where(on, rest & ((1 << p) - 1), rest)  # bmsk: the bits below p
    return dense


class Emulated(engine.Emulated):
    """``cuda_ops._launch`` replaced by the emulation (test_nm_tensorcore's launcher checks, split-K sum and stores),
    with the bitmap kernel's launch contract and decode; ``broken`` names a deliberate fault in the decode."""

    source = bitmap.TC_SOURCE

    def __init__(self, broken: str = "") -> None:
        super().__init__()
        self.broken = broken

    def product(self, name, grid, tensors, ints, warps):
        dtype, tokens = re.fullmatch(r"tcbm_(f16|bf16)_n(\d+)", name).groups()
        x, values, bits, offsets, y, work = tensors
        m, n, k, splits, nnz = ints
        assert cuda_ops._SUFFIX[x.dtype] == dtype and warps == 4 and int(tokens) in nm.TC_TOKENS
        assert grid == -(-n // ROWS) * splits * -(-m // int(tokens)) and nnz == values.numel()
        assert x.data_ptr() % 16 == 0 and tuple(x.shape) == (m, k) and tuple(y.shape) == (m, n)
        assert values.data_ptr() % 16 == 0 and bits.data_ptr() % 16 == 0 and offsets.dtype == torch.int32
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(engine, "_dense_chunks", lambda kind, tables, vals, row, j, n_, k_: bitmap_chunks(
                tables, vals, row, j, n_, k_, self.broken))
            out = engine.emulate_tc("bitmap", grid, tensors, ints[:4], int(tokens))
        return y, work, splits, out


def _weight(rows: int, cols: int, sparsity: float, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Unstructured: each weight kept with probability 1 - sparsity; row 1 entirely empty, row 2 entirely full
    (a chunk of 16 values, the widest window); non-zeros not a multiple of 8 (the last vector runs past the end)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen)
    w = w * (torch.rand(rows, cols, generator=gen) >= sparsity)
    w[1] = 0.0
    w[2] = torch.randn(cols, generator=gen)
    w[-1, -3:] = torch.tensor([1.0, 2.0, 3.0])  # the last values of the array in the last unit
    if int((w != 0).sum()) % 8 == 0:  # one non-zero more or fewer
        w[-1, -4] = 4.0 if w[-1, -4] == 0 else 0.0
    return w.to(dtype)


def _run(rows: int, cols: int, m: int, splits: int, sparsity: float = 0.7, dtype=torch.float16,
         tokens: int | None = None, emulated: Emulated | None = None):
    w = _weight(rows, cols, sparsity, seed=rows + cols + m, dtype=dtype)
    fmt = Bitmap.compress(w)
    assert fmt.values.numel() % 8 != 0
    x = torch.randn(m, cols, generator=torch.Generator().manual_seed(m)).to(dtype)
    emulated = emulated or Emulated()
    tokens = tokens or next(t for t in nm.TC_TOKENS if t >= m)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cuda_ops, "_launch", emulated)
        y = bitmap.bitmap_tc(x, fmt.values, fmt.bits, fmt.offsets, tokens, splits)
    return y, emulated.results[-1], x.double() @ w.double().T


@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.9])
@pytest.mark.parametrize("m", [5, 17, 64])
@pytest.mark.parametrize("splits", [1, 4])
def test_the_emulated_kernel_equals_the_dense_product_in_float64(sparsity, m, splits):
    """72 features (a partial second tile), K = 512 (4 segments, 8 stages), whole K and four K-slices: every output
    stored once, equal to the float64 product up to the order of the sums, and y is that product in fp16."""
    y, result, reference = _run(72, 512, m, splits, sparsity)
    assert not result.isnan().any()
    torch.testing.assert_close(result, reference, rtol=1e-12, atol=1e-12)
    assert torch.equal(y, result.to(y.dtype))


@pytest.mark.parametrize("m", [8, 33])
def test_bf16_more_rows_than_the_token_tile_and_three_slices(m):
    """bf16 at 50% zeros; rows of x on 16-token tiles (token tiles as blocks); 136 features x 384 inputs in 3 slices."""
    y, result, reference = _run(136, 384, m, 3, 0.5, dtype=torch.bfloat16, tokens=16)
    torch.testing.assert_close(result, reference, rtol=1e-12, atol=1e-12)
    assert torch.equal(y, result.to(torch.bfloat16))


def test_fewer_features_than_a_tile_and_one_segment():
    """37 features (one partial tile), K = 128 (one segment, two stages), 64 tokens in two slices of one stage."""
    y, result, reference = _run(37, 128, 64, 2, 0.7)
    torch.testing.assert_close(result, reference, rtol=1e-12, atol=1e-12)
    assert torch.equal(y, result.to(y.dtype))


@pytest.mark.parametrize("broken", ["start without the lower half's popcount", "window not shifted",
                                    "scatter without the swizzle"])
def test_a_broken_start_window_or_scatter_fails(broken):
    """The emulation is sensitive to the unit's index math: a first value index that skips the popcount of the word's
    lower half, a window left unshifted by start % 8, or a scatter address without the tile's swizzle gives another
    product."""
    _, result, reference = _run(72, 256, 9, 1, 0.5, emulated=Emulated(broken))
    assert not torch.allclose(result, reference, rtol=1e-3, atol=1e-3)


def test_the_source_has_the_index_math_the_emulation_checks():
    """The formulas the emulation follows, as written in bitmap_tc.cu (a change there must change the emulation)."""
    source = bitmap.TC_SOURCE.read_text()
    for line in ("const int seg = min(j, (K >> 4) - 1) >> 3;",
                 "ld_nc_v4(t.bits + row * (K >> 5) + (size_t)seg * 4, u.w);",
                 "u.off = ld_nc_s32(t.offs + row * (K >> 7) + seg);",
                 "const int q = (j >> 1) & 3, half = j & 1;",
                 "(q > 2 ? __popc(u.w[2]) : 0) + (half ? __popc(word & 0xffffu) : 0);",
                 "u.bits = half ? word >> 16 : word & 0xffffu;",
                 "const int a0 = start - (int)u.o, vecs = ((int)u.o + __popc(u.bits) + 7) >> 3;",
                 "if (a0 + 24 <= t.nnz) {",
                 "if (i < vecs) ld_stream_v4(vals + a0 + 8 * i, u.v[i]);",
                 "if (h < 8 * vecs && a0 + h < t.nnz)",
                 "u.v[h >> 3][(h >> 1) & 3] |= ld_stream_u16(vals + a0 + h) << (16 * (h & 1));",
                 "const u32 a = u.o >> 1, sel = (u.o & 1u) ? 0x5432u : 0x3210u;",
                 "for (int k = 0; k < 10; ++k) t2[k] = (a & 2u) ? u.v[(k + 2) >> 2][(k + 2) & 3] : u.v[k >> 2][k & 3];",
                 "for (int k = 0; k < 9; ++k) s1[k] = (a & 1u) ? t2[k + 1] : t2[k];",
                 "for (int k = 0; k < 8; ++k) w[k] = __byte_perm(s1[k], s1[k + 1], sel);",
                 "const u32 rowkey = (at + (u32)r * 128u) | (u32)((32 * c) ^ ((r & 7) << 4));",
                 "const u16 h = (u16)(w[e >> 1] >> (16 * (e & 1)));",
                 '" setp.lt.u32 q, %3, %4;\\n"',
                 '" bfind.u32 p, %0;\\n"',
                 '" shl.b32 a, p, 1;\\n"',
                 '" xor.b32 a, a, %2;\\n"',
                 '" @q st.shared.u16 [a], %1;\\n"',
                 '" bmsk.clamp.b32 p, 0, p;\\n"',
                 '" @q and.b32 %0, %0, p; }"',
                 "case 16: slot(15); [[fallthrough]];",
                 "case 1: slot(0); [[fallthrough]];",
                 "meta(t, row, K, j + 4, u);",
                 "tc_gemm<TcBitmap, BF, TN>(x, vals, {bits, offs, nnz}, y, work, M, N, K, S);"):
        assert line in source, line


def _gpu_like(monkeypatch) -> None:
    monkeypatch.setattr(cuda_ops, "_module", lambda index, source=None: None)


def _fmt(rows: int = 128, cols: int = 1024) -> Bitmap:
    return Bitmap.compress(_weight(rows, cols, 0.7, 0, torch.float16))


@pytest.mark.parametrize("opted", [False, True])
def test_offered_at_5_to_64_rows_after_the_expand_path(monkeypatch, opted):
    """Cleared on an H100, so with or without SECATEURS_UNVERIFIED_KERNELS=1 row buckets 8-64 offer the smallest token
    tile holding the rows at each split-K choice, after the expand path; 1-4 rows and 128 on do not."""
    monkeypatch.setattr(cuda_ops, "unverified_offered", lambda: opted)
    fmt = _fmt()
    _gpu_like(monkeypatch)
    for m in (1, 2, 4, 128, 512, 2048):
        assert not any(name.startswith("cuda_tcbitmap") for name in fmt.cuda_candidates(m))
    for m, tile in ((5, 16), (8, 16), (16, 16), (17, 32), (32, 32), (64, 64)):
        names = list(fmt.cuda_candidates(m))
        assert names == ["expand_cublas"] + [f"cuda_tcbitmap_n{tile}_s{s}" for s in nm.tc_splits(128, 1024)], names


def test_the_offered_candidates_launch_the_emulated_kernel(monkeypatch, opted_in):
    """The candidates the dispatcher times (their bound token tile and split) run the emulated kernel to the float64
    product: 37 rows of x at row bucket 64, a 200 x 384 weight (4 feature tiles, 6 stages: 6 slices of one)."""
    w = _weight(200, 384, 0.7, 3, torch.float16)
    fmt = Bitmap.compress(w)
    _gpu_like(monkeypatch)
    emulated = Emulated()
    monkeypatch.setattr(cuda_ops, "_launch", emulated)
    x = torch.randn(37, 384, generator=torch.Generator().manual_seed(4)).half()
    offered = {name: call for name, call in fmt.cuda_candidates(64).items() if name.startswith("cuda_tc")}
    assert list(offered) == [f"cuda_tcbitmap_n64_s{s}" for s in nm.tc_splits(200, 384)] == ["cuda_tcbitmap_n64_s6"]
    for name, call in offered.items():
        y = call(x)
        torch.testing.assert_close(emulated.results[-1], x.double() @ w.double().T, rtol=1e-12, atol=1e-12, msg=name)
        assert torch.equal(y, emulated.results[-1].half())
    assert emulated.names == ["tcbm_f16_n64", "tcsum_f16"]


def test_a_module_that_does_not_build_leaves_the_expand_path(monkeypatch, opted_in):
    """A failing build of bitmap_tc.cu offers no tensor-core kernel and says so once; the expand path stays."""
    from secateurs.kernels import linear

    fmt = _fmt()

    def build(index, source=None):
        if source == bitmap.TC_SOURCE:
            raise RuntimeError("NVRTC 13.0 failed to compile bitmap_tc.cu: an error")

    monkeypatch.setattr(cuda_ops, "_module", build)
    said = []
    monkeypatch.setattr(linear, "note", said.append)
    assert list(fmt.cuda_candidates(16)) == ["expand_cublas"]
    assert said == [("the bitmap tensor-core kernel was not built (NVRTC 13.0 failed to compile bitmap_tc.cu: an "
                     "error): 5-64 tokens use the expand path")]


def test_unaligned_bits_offer_no_tensor_core_kernel(monkeypatch, opted_in):
    """A segment's four bit words are one 16-byte load: bits at an address that is not 16-byte aligned get none."""
    fmt = _fmt()
    _gpu_like(monkeypatch)
    store = torch.empty(fmt.bits.numel() + 1, dtype=torch.int32)
    fmt.bits = store[1:].view(fmt.bits.shape).copy_(fmt.bits)
    assert list(fmt.cuda_candidates(16)) == ["expand_cublas"]


def test_the_op_has_a_fake_implementation():
    """torch.compile(fullgraph=True) and CUDA graphs trace the custom op through its fake implementation."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        y = torch.ops.secateurs.bitmap_tc(torch.empty(9, 256, dtype=torch.bfloat16),
                                          torch.empty(100, dtype=torch.bfloat16), torch.empty(24, 8, dtype=torch.int32),
                                          torch.empty(24, 2, dtype=torch.int32), 16, 2)
    assert (tuple(y.shape), y.dtype) == ((9, 24), torch.bfloat16)


def test_nvrtc_gets_the_engine_header_and_other_sources_keep_their_cache_keys(fake_nvrtc, tmp_path):
    """Sources that include tc_tile.cuh get it (and common.cuh) as in-memory headers and a cache key that covers it;
    a source that includes only common.cuh gets only that, under the key it always had."""
    created = fake_nvrtc.created
    for source in (bitmap.TC_SOURCE, nm.TC_SOURCE, cuda_ops.SOURCE):
        cuda_ops._compile((9, 0), source)
    common, tile = cuda_ops.COMMON.read_bytes(), cuda_ops.TC_TILE.read_bytes()
    assert created == [("bitmap_tc.cu", 2, [b"common.cuh", b"tc_tile.cuh"], [common, tile]),
                       ("nm_tc.cu", 2, [b"common.cuh", b"tc_tile.cuh"], [common, tile]),
                       ("sparse_gemv.cu", 1, [b"common.cuh"], [common])]
    options = ("--gpu-architecture=sm_90", *cuda_ops.OPTIONS)
    names = {p.name for p in tmp_path.iterdir()}
    for source, included in ((bitmap.TC_SOURCE, common + tile), (cuda_ops.SOURCE, common)):
        digest = hashlib.sha256(source.read_bytes() + b"\0" + included + "\0".join(options).encode()).hexdigest()[:16]
        assert f"{source.stem}-{digest}-sm90-nvrtc13.5.cubin" in names


def test_the_source_compiles_for_ampere_and_hopper_with_every_launched_kernel_and_no_spills(nvcc_builds_without_spills):
    """NVRTC compiles bitmap_tc.cu on users' GPUs; where nvcc is installed it is compiled here with ptxas's report:
    every kernel the launcher names exists and none spills registers."""
    names = [f"tcbm_{dtype}_n{tokens}" for dtype in ("f16", "bf16") for tokens in nm.TC_TOKENS] + \
        ["tcsum_f16", "tcsum_bf16"]
    nvcc_builds_without_spills(bitmap.TC_SOURCE, names)

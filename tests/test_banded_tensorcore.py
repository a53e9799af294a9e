"""The banded tensor-core kernel (``kernels/cuda/banded_tc.cu`` on ``tc_tile.cuh``'s engine, 5-64 tokens) on a CPU: its
decode step emulated lane by lane (the K-slice's first cursor found by the 9-ary search over piece starts, the grains
each lane loads per round, their base columns and running delta offsets, the window and non-zero tests, the swizzled
scatter address, the quad's ballot of consumed grains and the warp's extra rounds), inside test_nm_tensorcore's
emulation of the shared engine (tiles, ldmatrix, mma fragments, split-K), run through the real launcher with
``cuda_ops._launch`` replaced and compared with the float64 dense product at 50/60/70/80% zeros, fp16 and bf16, on
shapes with partial segments, partial feature tiles and a partial last stage. A broken search, base, value address,
swizzle or non-zero test fails it. Also: offered without any opt-in (it matched float64 on an H100), at 5-64 rows,
after the expand path, never where K is not a multiple of 16; a module that does not build offers none; nvcc builds the
source with no spills."""

from __future__ import annotations

import re

import pytest
import test_nm_tensorcore as engine
import torch

from secateurs.kernels import banded, cuda_ops, nm
from secateurs.kernels.banded import SEG, Banded
from secateurs.sparsity.masks import unstructured_mask

ROWS, THREADS, ROUNDS = 64, 128, 2
BIG = 0x40000000  # banded_tc.cu's base for a grain past the row or a row past N: no entry lands in a window
M32 = 0xFFFFFFFF


def _bytes_sum(word: torch.Tensor) -> torch.Tensor:
    return sum((word >> (8 * i)) & 0xFF for i in range(4))


class BandedDecode:
    """``engine._dense_chunks`` for the banded unit: TcBanded's first / load / store for the 128 threads of one unit
    (the engine stores unit 0, then unit 1, every stage), keeping each tile row's cursor from stage to stage of a
    K-slice as the kernel's registers do. ``broken`` replaces one step by a plausible mistake."""

    def __init__(self, piece: int, n: int, k: int, splits: int, broken: str = "") -> None:
        self.piece, self.ch, self.n, self.k, self.broken = piece, piece // 8, n, k, broken
        self.nseg = -(-k // SEG)
        stages = -(-(k // 16) // 4)
        self.slice_starts = [s * stages // splits for s in range(splits)]
        self.calls, self.row0 = 0, 0
        self.cursor: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.extra_rounds = 0  # rounds past the ROUNDS loaded ahead (a window of more than 8 grains)

    def first(self, tables, row, x) -> tuple[torch.Tensor, torch.Tensor]:
        """The slice's first cursor: the row's pieces of x's segment, the last starting at or before x (or the
        segment's first) by the kernel's 9-ary search; and the row's end, in grains."""
        _, starts, offs = tables
        unit = row * self.nseg + (x >> 11)
        lo, hi = offs[unit].clone(), offs[unit + 1].clone()
        end = offs[(row + 1) * self.nseg] * self.ch
        search = (x & 2047) != 0
        while bool((search & (hi - lo > 1)).any()):
            go = search & (hi - lo > 1)
            step = (hi - lo + 8) // 9
            count = torch.zeros_like(lo)
            for i in range(8):
                q = lo + step * (i + 1)
                count += (q < hi) & ((starts[torch.minimum(q, hi - 1).clamp(min=0)] & 0xFFFF) <= x)
            hi = torch.where(go, torch.minimum(hi, lo + step * (count + 1)), hi)
            lo = torch.where(go, lo + step * count, lo)
        if self.broken == "search one piece too far":
            lo = torch.where(search, torch.minimum(lo + 1, hi), lo)
        return lo * self.ch, end

    def grain(self, tables, vals, g, end) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Grain g (clamped into the row, as the kernel clamps its address): 8 values, the piece's delta words and
        its start."""
        deltas, starts, _ = tables
        q = torch.minimum(g, end - 1).clamp(min=0)
        p, ch = q // self.ch, q % self.ch
        if self.broken == "values not interleaved":
            first = (p * self.ch + ch) * 8
        else:
            first = ((p >> 3) * self.ch + ch) * 64 + (p & 7) * 8
        values = vals[first.unsqueeze(1) + torch.arange(8)]
        raw = deltas[(p * (self.piece // 2)).unsqueeze(1) + torch.arange(self.piece // 2)]
        words = sum(raw[:, i::4] << (8 * i) for i in range(4))  # (threads, P/8) little-endian u32
        return values, words, starts[p] & 0xFFFF

    def scatter(self, data, g, end, x, live, r, dense) -> torch.Tensor:
        """One round: each thread's grain g to its tile row (dense, (threads / 4, 64) logical inputs of each quad's
        row), its entries non-zero and in the window only; whether each grain is consumed."""
        values, words, start = data
        ch = g % self.ch
        sum16 = torch.zeros_like(g)
        for i in range(1, self.ch):  # dp4a: 16 x the nibble sums of the words before the grain's
            before = torch.where(i <= ch, words[:, i - 1], 0)
            sum16 = sum16 + 16 * _bytes_sum(before & 0x0F0F0F0F) + _bytes_sum(before & 0xF0F0F0F0)
        if self.broken == "base without the earlier words":
            sum16 = torch.zeros_like(sum16)
        w = words.gather(1, ch.unsqueeze(1)).squeeze(1)
        plo = ((w & 0x0F0F0F0F) * 0x02020202) & M32
        phi = (((w >> 4) & 0x0F0F0F0F) * 0x02020202 + ((plo >> 24) * 0x01010101)) & M32
        b2 = torch.where(live & (g < end), 2 * (start + (sum16 >> 4) - x), BIG)
        key = torch.zeros_like(r) if self.broken == "scatter without the swizzle" else (r & 7) << 4
        quad = torch.arange(len(g)) >> 2
        for e in range(8):
            byte = ((plo if e < 4 else phi) >> (8 * (e & 3))) & 0xFF
            l_ = (b2 + byte) & M32
            value = values[:, e]
            on = l_ < 128
            if self.broken != "padding stored":
                on &= value != 0  # setp.neu.f16x2: bits & 0x7fff (padding and fillers are +0)
            address = l_ ^ key  # rowkey ^ l: tile row r, byte l with the chunk bits keyed by r & 7
            assert bool((address[on] % 2 == 0).all())
            logical = ((address >> 4) ^ (r & 7)) * 8 + ((address & 15) >> 1)  # what tc_at's reader sees there
            written = dense[quad[on], logical[on]]
            assert self.broken or bool(written.isnan().all()), "two entries stored at one input"
            dense[quad[on], logical[on]] = value[on]
        return (b2 + (phi >> 24)) < 128

    def __call__(self, kind, tables, vals, row, j, n, k) -> torch.Tensor:
        assert kind == "banded" and (n, k) == (self.n, self.k)
        i = self.calls % 2
        self.calls += 1
        if i == 0:
            self.row0 = int(row[0])  # unit 0's first row is the tile's first (never clamped)
        tid = torch.arange(THREADS)
        c, r = tid & 3, (tid + THREADS * i) >> 2
        live = self.row0 + r < self.n  # the kernel's ballot of z: a row past N has every z = 0
        x = (j >> 2) << 6
        kb = int(j[0]) >> 2  # lane c = 0's chunk is never clamped
        if kb == max(s for s in self.slice_starts if s <= kb):  # a block's first stage: first()
            self.cursor[(self.row0, i)] = self.first(tables, row, x)
        cur, end = self.cursor[(self.row0, i)]
        loaded = [self.grain(tables, vals, cur + c + 4 * rr, end) for rr in range(ROUNDS)]  # load(): a stage ahead
        dense = torch.full((THREADS // 4, 64), float("nan"), dtype=torch.float64)  # NaN: not written this stage
        done = torch.zeros_like(cur)
        warp = tid >> 5
        more = torch.ones(4, dtype=torch.bool)
        rnd = 0
        while bool(more.any()):
            g = cur + c + 4 * rnd
            data = loaded[rnd] if rnd < ROUNDS else self.grain(tables, vals, g, end)
            self.extra_rounds += rnd >= ROUNDS
            run = more[warp]
            ate = self.scatter(data, g, end, x, live & run, r, dense) & run
            ate_quad = ate.view(-1, 4).all(1).repeat_interleave(4)
            done += torch.where(run, ate.view(-1, 4).sum(1).repeat_interleave(4), 0)
            need = run & ate_quad & (cur + 4 * (rnd + 1) < end)
            more = torch.stack([need[w * 32:(w + 1) * 32].any() for w in range(4)])
            rnd += 1
        self.cursor[(self.row0, i)] = (cur + done, end)
        rows_dense = torch.where(dense.isnan(), 0.0, dense)  # each lane zeroed its two chunks before the scatter
        return rows_dense[tid >> 2].gather(1, (16 * c).unsqueeze(1) + torch.arange(16))


class Emulated(engine.Emulated):
    """``cuda_ops._launch`` replaced by the emulation (test_nm_tensorcore's launcher checks, split-K sum and stores),
    with the banded kernel's launch contract and decode; ``broken`` names a deliberate fault in the decode."""

    source = banded.TC_SOURCE

    def __init__(self, broken: str = "") -> None:
        super().__init__()
        self.broken = broken
        self.decodes: list[BandedDecode] = []

    def product(self, name, grid, tensors, ints, warps):
        dtype, piece, tokens = re.fullmatch(r"tcbd_(f16|bf16)_p(16|32)_n(\d+)", name).groups()
        x, values, deltas, starts, offsets, y, work = tensors
        m, n, k, splits, nseg = ints
        assert cuda_ops._SUFFIX[x.dtype] == dtype and warps == 4 and int(tokens) in nm.TC_TOKENS
        assert int(piece) == deltas.shape[1] * 2 and nseg == -(-k // SEG) and offsets.numel() == n * nseg + 1
        assert grid == -(-n // ROWS) * splits * -(-m // int(tokens))
        assert x.data_ptr() % 16 == 0 and tuple(x.shape) == (m, k) and tuple(y.shape) == (m, n)
        assert values.data_ptr() % 16 == 0 and deltas.data_ptr() % (int(piece) // 2) == 0
        assert (starts.dtype, offsets.dtype, deltas.dtype) == (torch.int16, torch.int32, torch.uint8)
        decode = BandedDecode(int(piece), n, k, splits, self.broken)
        self.decodes.append(decode)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(engine, "_dense_chunks", decode)
            out = engine.emulate_tc("banded", grid, tensors, ints[:4], int(tokens))
        return y, work, splits, out


def _weight(rows: int, cols: int, sparsity: float, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Unstructured at ``sparsity`` (magnitude), plus: row 1 empty, row 2 fully dense (eight grains and more in every
    window: the rounds past the two loaded ahead), row 3 one value every 40 inputs (fillers), row 4 empty in its
    first segment (a segment of no pieces), the last row's last input kept."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen)
    w = w * unstructured_mask(w.abs(), sparsity)
    w[1] = 0.0
    w[2] = torch.randn(cols, generator=gen) + 4.0
    w[3] = 0.0
    w[3, ::40] = 1.0 + torch.rand(len(range(0, cols, 40)), generator=gen)
    w[4, :SEG] = 0.0
    w[-1, -1] = 2.5
    return w.to(dtype)


def _run(rows: int, cols: int, m: int, splits: int, sparsity: float = 0.7, dtype=torch.float16,
         tokens: int | None = None, emulated: Emulated | None = None):
    w = _weight(rows, cols, sparsity, seed=rows + cols + m, dtype=dtype)
    fmt = Banded.compress(w)
    x = torch.randn(m, cols, generator=torch.Generator().manual_seed(m)).to(dtype)
    emulated = emulated or Emulated()
    tokens = tokens or next(t for t in nm.TC_TOKENS if t >= m)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cuda_ops, "_launch", emulated)
        y = banded.banded_tc(x, fmt.values, fmt.deltas, fmt.starts, fmt.offsets, tokens, splits)
    return y, emulated, x.double() @ w.double().T


@pytest.mark.parametrize("sparsity", [0.5, 0.6, 0.7, 0.8])
@pytest.mark.parametrize("m, splits, dtype", [(5, 1, torch.float16), (17, 3, torch.bfloat16), (64, 4, torch.float16)])
def test_the_emulated_kernel_equals_the_dense_product_in_float64(sparsity, m, splits, dtype):
    """72 features (a partial second tile), K = 2096 (a 48-input second segment: a partial last stage of three
    chunks), whole K and slices that start inside a segment (the cursor's search): every output stored once, equal to
    the float64 product up to the order of the sums, and y is that product in the input dtype."""
    y, emulated, reference = _run(72, 2096, m, splits, sparsity, dtype=dtype)
    result = emulated.results[-1]
    assert not result.isnan().any()
    torch.testing.assert_close(result, reference, rtol=1e-12, atol=1e-12)
    assert torch.equal(y, result.to(y.dtype))
    assert emulated.decodes[-1].extra_rounds > 0  # the dense row's windows went past the rounds loaded ahead


def test_bf16_more_rows_than_the_token_tile_three_segments_and_five_slices():
    """bf16 at 80% zeros; 20 rows of x on 16-token tiles (token tiles as blocks); 136 features x 4160 inputs (a
    64-input third segment) in 5 slices."""
    y, emulated, reference = _run(136, 4160, 20, 5, 0.8, dtype=torch.bfloat16, tokens=16)
    torch.testing.assert_close(emulated.results[-1], reference, rtol=1e-12, atol=1e-12)
    assert torch.equal(y, emulated.results[-1].to(torch.bfloat16))


def test_fewer_features_than_a_tile_and_a_16_input_tail():
    """37 features (one partial tile), K = 1040 (one segment, 16 inputs in its last stage), 64 tokens in 2 slices."""
    y, emulated, reference = _run(37, 1040, 64, 2, 0.6)
    torch.testing.assert_close(emulated.results[-1], reference, rtol=1e-12, atol=1e-12)
    assert torch.equal(y, emulated.results[-1].to(y.dtype))


@pytest.mark.parametrize("broken", ["search one piece too far", "base without the earlier words",
                                    "values not interleaved", "scatter without the swizzle", "padding stored"])
def test_a_broken_search_base_address_swizzle_or_value_test_fails(broken):
    """The emulation is sensitive to the unit's index math: a slice's cursor a piece too far, a base column without
    the piece's earlier delta words, values read without the 8-piece interleave, a scatter address without the tile's
    swizzle, or padding entries written over their column's value give another product."""
    sparsity = 0.5 if broken == "base without the earlier words" else 0.7  # P = 32: grains 1-3 have earlier words
    _, emulated, reference = _run(72, 2096, 9, 3, sparsity, emulated=Emulated(broken))
    assert not torch.allclose(emulated.results[-1], reference, rtol=1e-3, atol=1e-3)


def test_the_source_has_the_index_math_the_emulation_checks():
    """The formulas the emulation follows, as written in banded_tc.cu (a change there must change the emulation)."""
    source = banded.TC_SOURCE.read_text()
    for line in ("const u32 q = (u32)max(min(G, end - 1), 0), p = q / CH, ch = q % CH;",
                 "ld_nc_v4(vals + (((p >> 3) * CH + ch) * 64 + (p & 7) * 8), g.v);",
                 "ld_nc_v4(t.deltas + p * 16u, w);",
                 '"=r"(g.d[0]), "=r"(g.d[CH - 1]) : "l"(t.deltas + p * 8u));',
                 "g.start = ld_nc_u16(t.starts + p);",
                 "const int x = (j >> 2) << 6, seg = x >> 11;",
                 "int lo = ld_nc_s32(t.offs + unit), hi = ld_nc_s32(t.offs + unit + 1);",
                 "u.end = ld_nc_s32(t.offs + (row + 1) * t.nseg) * CH;",
                 "if (x & 2047) {",
                 "const int step = (hi - lo + 8) / 9;",
                 "count += (q < hi && (int)ld_nc_u16(t.starts + min(q, hi - 1)) <= x) ? 1 : 0;",
                 "hi = min(hi, lo + step * (count + 1));",
                 "lo += step * count;",
                 "u.cur = lo * CH;",
                 "for (int k = 0; k < R; ++k) grain(vals, t, u.cur + c + 4 * k, u.end, u.g[k]);",
                 "const u32 before = (u32)i <= ch ? g.d[i - 1] : 0u;",
                 "sum16 = bd_dp4a(before & 0xf0f0f0f0u, 0x01010101u, bd_dp4a(before & 0x0f0f0f0fu, 0x10101010u, sum16));",
                 "const u32 plo = (w & 0x0f0f0f0fu) * 0x02020202u;",
                 "const u32 phi = ((w >> 4) & 0x0f0f0f0fu) * 0x02020202u + __byte_perm(plo, 0u, 0x3333u);",
                 "const int b2 = (live && G < u.end) ? 2 * ((int)g.start + (int)(sum16 >> 4) - u.x) : 0x40000000;",
                 "const u32 pre = m < 2 ? plo : phi, e = 2 * (m & 1);",
                 "const u32 l0 = (u32)b2 + __byte_perm(pre, 0u, 0x4440u + e);",
                 "const u32 l1 = (u32)b2 + (e == 2 ? pre >> 24 : __byte_perm(pre, 0u, 0x4441u));",
                 '" setp.neu.f16x2 p|q, %0, %4;\\n"',
                 '" setp.lt.and.u32 p, %1, 128, p;\\n"',
                 '" xor.b32 a, %1, %3;\\n"',
                 '" @p st.shared.u16 [a], %0;\\n"',
                 '" shr.b32 h, %0, 16;\\n"',
                 "return b2 + (int)(phi >> 24) < 128;",
                 "const bool live = (__ballot_sync(FULL, z != 0u) >> quad & 15u) != 0u;",
                 "const u32 rowkey = (at + (u32)r * 128u) | (u32)((r & 7) << 4);",
                 "more = __any_sync(FULL, ate == 15u && u.cur + 4 * (k + 1) < u.end);",
                 "u.cur += done;",
                 "tc_gemm<TcBanded<P, 2>, BF, TN>(x, vals, {deltas, starts, offs, nseg}, y, work, M, N, K, S);"):
        assert line in source, line


def _gpu_like(monkeypatch) -> None:
    monkeypatch.setattr(cuda_ops, "_module", lambda index, source=None: None)


def _fmt(rows: int = 128, cols: int = 4096, sparsity: float = 0.7) -> Banded:
    return Banded.compress(_weight(rows, cols, sparsity, 0, torch.float16))


def test_offered_without_the_opt_in_at_5_to_64_rows_after_the_expand_path(monkeypatch, not_opted_in):
    """Row buckets 8-64 offer the smallest token tile holding the rows at each split-K choice, after the expand path;
    1-4 rows and 128 on do not; no SECATEURS_UNVERIFIED_KERNELS needed."""
    fmt = _fmt()
    _gpu_like(monkeypatch)
    for m in (1, 2, 4, 128, 512, 2048):
        assert not any(name.startswith("cuda_tcbanded") for name in fmt.cuda_candidates(m))
    for m, tile in ((5, 16), (8, 16), (16, 16), (17, 32), (32, 32), (64, 64)):
        names = list(fmt.cuda_candidates(m))
        assert names == ["expand_cublas"] + [f"cuda_tcbanded_n{tile}_s{s}" for s in nm.tc_splits(128, 4096)], names


def test_no_tensor_core_kernel_where_k_is_not_a_multiple_of_16(monkeypatch, not_opted_in):
    """The engine's stages are whole 16-input chunks: a width of 8 mod 16 (which the layout holds) keeps the expand
    path only."""
    fmt = _fmt(64, 1048)
    _gpu_like(monkeypatch)
    assert list(fmt.cuda_candidates(16)) == ["expand_cublas"]


def test_the_offered_candidates_launch_the_emulated_kernel(monkeypatch, not_opted_in):
    """The candidates the dispatcher times (their bound token tile and split) run the emulated kernel to the float64
    product: 37 rows of x at row bucket 64, a 200 x 2112 weight at 50% zeros (p32; 4 feature tiles, 33 stages in 16
    slices of two or three)."""
    w = _weight(200, 2112, 0.5, 3, torch.float16)
    fmt = Banded.compress(w)
    _gpu_like(monkeypatch)
    emulated = Emulated()
    monkeypatch.setattr(cuda_ops, "_launch", emulated)
    x = torch.randn(37, 2112, generator=torch.Generator().manual_seed(4)).half()
    offered = {name: call for name, call in fmt.cuda_candidates(64).items() if name.startswith("cuda_tc")}
    assert list(offered) == [f"cuda_tcbanded_n64_s{s}" for s in nm.tc_splits(200, 2112)] == ["cuda_tcbanded_n64_s16"]
    for name, call in offered.items():
        y = call(x)
        torch.testing.assert_close(emulated.results[-1], x.double() @ w.double().T, rtol=1e-12, atol=1e-12, msg=name)
        assert torch.equal(y, emulated.results[-1].half())
    assert emulated.names[0] == "tcbd_f16_p32_n64"


def test_a_module_that_does_not_build_leaves_the_expand_path(monkeypatch, not_opted_in):
    """A failing build of banded_tc.cu offers no tensor-core kernel and says so once; the expand path stays."""
    from secateurs.kernels import linear

    fmt = _fmt()

    def build(index, source=None):
        if source == banded.TC_SOURCE:
            raise RuntimeError("NVRTC 13.0 failed to compile banded_tc.cu: an error")

    monkeypatch.setattr(cuda_ops, "_module", build)
    said = []
    monkeypatch.setattr(linear, "note", said.append)
    assert list(fmt.cuda_candidates(16)) == ["expand_cublas"]
    assert said == [("the banded tensor-core kernel was not built (NVRTC 13.0 failed to compile banded_tc.cu: an "
                     "error): 5-64 tokens use the expand path")]


def test_the_op_has_a_fake_implementation():
    """torch.compile(fullgraph=True) and CUDA graphs trace the custom op through its fake implementation."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        y = torch.ops.secateurs.banded_tc(torch.empty(9, 4160, dtype=torch.bfloat16),
                                          torch.empty(1024, dtype=torch.bfloat16), torch.empty(64, 8, dtype=torch.uint8),
                                          torch.empty(64, dtype=torch.int16), torch.empty(24 * 3 + 1, dtype=torch.int32),
                                          16, 2)
    assert (tuple(y.shape), y.dtype) == ((9, 24), torch.bfloat16)


def test_the_source_compiles_for_ampere_and_hopper_with_every_launched_kernel_and_no_spills(nvcc_builds_without_spills):
    """NVRTC compiles banded_tc.cu on users' GPUs; where nvcc is installed it is compiled here with ptxas's report:
    every kernel the launcher names exists and none spills registers."""
    names = [f"tcbd_{dtype}_p{piece}_n{tokens}" for dtype in ("f16", "bf16") for piece in banded.PIECES
             for tokens in nm.TC_TOKENS] + ["tcsum_f16", "tcsum_bf16"]
    nvcc_builds_without_spills(banded.TC_SOURCE, names)

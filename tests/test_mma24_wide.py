"""The wide 2:4 decode kernel (``wide24`` in kernels/cuda/sparse_gemv.cu, 17-64 tokens) on a CPU: its index math
emulated lane by lane (which stored values, position bytes and x elements each thread loads; where each 8-byte x copy
lands in the swizzled shared tile; what each ``ldmatrix`` gives each lane; the ``mma.sp.m16n8k32`` fragments as the
decode kernel builds them and as PTX defines them; the K-groups' sum in shared memory; where each partial sum lands and
the last block's split-order sum), run through the real launcher with ``cuda_ops._launch`` replaced by the emulation
and compared with the float64 dense product; a broken index fails it; the candidates are offered by default (checked
and timed on an H100), last, at row buckets 32 and 64 on sm_80 on, the configuration never near the fastest only under
``SECATEURS_UNVERIFIED_KERNELS=1``; nvcc builds every entry point with no spills and keeps each weight load in flight
across MMAs."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import test_nm_tensorcore as engine
import torch
from test_kernels import _meta24_word

from secateurs.kernels import Sparse24, cuda_ops, wgmma
from secateurs.sparsity.masks import nm_mask

LANE = torch.arange(32)
G, T = LANE >> 2, LANE & 3


@dataclass(frozen=True)
class Layout:
    """The formulas of the kernel the emulation follows, one field each, so a test can break one."""

    x_offset: Callable[[int, int], int] = cuda_ops.wide_x_offset
    """Byte offset in a step's x tile of 4-input group g of token row r (wide_x_at)."""
    b_address: Callable[[torch.Tensor, int], torch.Tensor] = (
        lambda lane, mma: (lane & 7) * 128 + ((((4 * mma) + (lane >> 3)) ^ (lane & 7)) << 4))
    """The ldmatrix row address of a lane in an 8-token tile, for MMA 0 (xa0) or 1 (xa1)."""
    a_registers: tuple[tuple[str, int], ...] = (("a", 0), ("b", 0), ("a", 1), ("b", 1))
    """A fragment registers a0-a3 of MMA 0: (row g's load "a" or row g + 8's "b", 32-bit word); MMA 1 adds 2."""
    token_of: Callable[[int, int, int], int] = lambda nt, t, i: nt * 8 + 2 * t + (i & 1)
    """The token of accumulator i of lane (g, t) in 8-token tile nt."""


def _weight(n: int, k: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    w = w * nm_mask(w.abs(), 2, 4)
    w[1, :8] = 0.0  # a group with fewer than two non-zeros: stored positions padded with unkept ones
    return w.to(dtype)


def _dense_a(a: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """mma.sp's sparse A as PTX defines it for 16-bit types: compressed (16, 16), two values per group of four
    inputs; meta (16, 8) the group's 4-bit code (first position | second << 2) -> the dense (16, 32) operand."""
    dense = torch.zeros(16, 32, dtype=torch.float64)
    group = torch.arange(8).view(1, 8)
    for v in range(2):
        dense.scatter_add_(1, 4 * group.expand(16, 8) + ((meta >> (2 * v)) & 3), a[:, v::2])
    return dense


def emulate_wide(config: str, grid: int, tensors: tuple[torch.Tensor, ...], ints: tuple[int, ...], shared: int,
                 layout: Layout, order: Callable[[range], list[int]]) -> torch.Tensor:
    """wide24 for every block of ``grid``, in the block order ``order`` gives (any order: the last block of a row
    tile sums the splits in split order), lane by lane: the (M, N) float64 result it stores into y. Shared memory
    starts as NaN (a read of a place no copy wrote shows), each output is stored once, the counters end at zero."""
    x, vals, meta, _, _, count = tensors
    m, n, k, splits = ints
    nt_count, r_count, wk, u_count = cuda_ops.WIDE_CONFIGS[config]
    wr, tn, threads = cuda_ops.WARPS // wk, 8 * nt_count, cuda_ops.WARPS * 32
    step_x, slot = tn * 128, wk * u_count * tn * 128
    xs, vs = x.double().reshape(-1), vals.double()
    rows_blk, kb_total = wr * r_count * 16, k // 64
    tiles = -(-n // rows_blk)
    counts = count[:tiles].clone()
    partial = torch.full((splits, m, n), float("nan"), dtype=torch.float64)
    y = torch.full((m, n), float("nan"), dtype=torch.float64)
    for block in order(range(grid)):
        tile, s = block % tiles, block // tiles
        kb0, kb1 = s * kb_total // splits, (s + 1) * kb_total // splits
        iters = -(-(kb1 - kb0) // (wk * u_count))
        smem = torch.full((shared // 2,), float("nan"), dtype=torch.float64)

        def load_x(buf: int, i: int, kb0: int = kb0, kb1: int = kb1, smem: torch.Tensor = smem) -> None:
            for tid in range(threads):
                gi, r0 = tid & 15, tid >> 4
                for qu in range(wk * u_count):
                    kb = kb0 + i * wk * u_count + qu
                    for jr in range(tn // (threads // 16)):
                        r = r0 + threads // 16 * jr
                        src = min(r, m - 1) * k + gi * 4 + min(kb, kb1 - 1) * 64
                        dst = buf * slot + qu * step_x + layout.x_offset(r, gi)
                        assert dst % 8 == 0 and dst + 8 <= shared
                        live = r < m and kb < kb1  # else zero-filled
                        smem[dst // 2: dst // 2 + 4] = xs[src: src + 4] if live else 0.0

        acc = torch.zeros(cuda_ops.WARPS, r_count, nt_count, 16, 8, dtype=torch.float64)
        held = [[min(kb0 + (warp // wr) * u_count + u, kb1 - 1) for u in range(u_count)]
                for warp in range(cuda_ops.WARPS)]  # the step in each register set (loads clamped into the slice)
        if iters > 0:
            load_x(0, 0)
        for i in range(iters):
            if i + 1 < iters:
                load_x((i + 1) & 1, i + 1)
            for warp in range(cuda_ops.WARPS):
                q, rw = warp // wr, warp % wr
                row0 = (tile * wr + rw) * r_count * 16
                base = (i & 1) * slot + q * u_count * step_x
                for u in range(u_count):
                    kb = held[warp][u]
                    for r in range(r_count):
                        rg = [min(row0 + r * 16 + g, n - 1) for g in range(8)]
                        rg8 = [min(row0 + r * 16 + g + 8, n - 1) for g in range(8)]
                        # lane (g, t): 16 bytes (4 words of 2 halves) at input 16t of the step, rows g and g + 8
                        loads = {"a": torch.stack([vs[rg[g], kb * 32 + 8 * t: kb * 32 + 8 * t + 8].view(4, 2)
                                                   for g, t in zip(G.tolist(), T.tolist())]),
                                 "b": torch.stack([vs[rg8[g], kb * 32 + 8 * t: kb * 32 + 8 * t + 8].view(4, 2)
                                                   for g, t in zip(G.tolist(), T.tolist())])}
                        words = [_meta24_word(meta, rg[g], rg8[g], kb, t) for g, t in zip(G.tolist(), T.tolist())]
                        for mma in range(2):
                            a = torch.full((16, 16), float("nan"), dtype=torch.float64)
                            codes = torch.zeros(16, 8, dtype=torch.int64)
                            for reg, (which, word) in enumerate(layout.a_registers):
                                rows = G + 8 * (reg & 1)
                                cols = 2 * T.view(32, 1) + 8 * (reg >> 1) + torch.arange(2)
                                a[rows.view(32, 1), cols] = loads[which][:, word + 2 * mma]
                            for lane in range(32):  # lanes t = 2 mma, 2 mma + 1 give selector mma's positions
                                g, t = lane >> 2, lane & 3
                                if t in (2 * mma, 2 * mma + 1):
                                    for half, row in ((0, g), (1, g + 8)):
                                        bits = (words[lane] >> (16 * half)) & 0xFFFF
                                        for j in range(4):
                                            codes[row, 4 * (t - 2 * mma) + j] = (bits >> (4 * j)) & 15
                            dense = _dense_a(a, codes)
                            for nt in range(nt_count):
                                address = base + u * step_x + nt * 1024 + layout.b_address(LANE, mma)
                                regs = engine._ldmatrix_x4(smem, (address // 2).view(1, 32))[0]  # (32, 4, 2)
                                b = torch.full((32, 8), float("nan"), dtype=torch.float64)  # k x tokens
                                kk = 8 * torch.arange(4).view(1, 4, 1) + 2 * T.view(32, 1, 1) + torch.arange(2)
                                b[kk, G.view(32, 1, 1).expand(32, 4, 2)] = regs
                                acc[warp, r, nt] += dense @ b
                    held[warp][u] = min(kb0 + ((i + 1) * wk + q) * u_count + u, kb1 - 1)
        for warp in range(wr):  # K-group 0's warps add the others' sums in K-group order, then store
            total = acc[warp].clone()
            for qq in range(1, wk):
                total += acc[qq * wr + warp]
            row0 = (tile * wr + warp) * r_count * 16
            for r in range(r_count):
                for nt in range(nt_count):
                    for lane in range(32):
                        g, t = lane >> 2, lane & 3
                        for i in range(4):
                            row, token = row0 + r * 16 + g + (i >> 1) * 8, layout.token_of(nt, t, i)
                            if row < n and token < m:
                                target = y if splits == 1 else partial[s]
                                assert target[token, row].isnan(), "an output stored twice"
                                target[token, row] = total[r, nt, g + (i >> 1) * 8, 2 * t + (i & 1)]
        if splits > 1:
            counts[tile] += 1
            if counts[tile] == splits:  # the last block of the tile: the splits in split order, then reset
                rows = slice(tile * rows_blk, min((tile + 1) * rows_blk, n))
                assert not partial[:, :, rows].isnan().any(), "a split's partial sum read before it was stored"
                total = partial[0, :, rows].clone()
                for split in range(1, splits):
                    total += partial[split, :, rows]
                y[:, rows] = total
                counts[tile] = 0
    assert (counts == 0).all(), "a counter left non-zero for the next launch"
    return y


class Emulated:
    """``cuda_ops._launch`` replaced by the emulation: checks what the launcher passes (name, grid, warps, source,
    shared memory, tensors and integers in the entry point's order) and keeps each launch's float64 result."""

    def __init__(self, layout: Layout = Layout(), order: Callable[[range], list[int]] = lambda r: list(reversed(r))):
        self.layout, self.order = layout, order
        self.results: list[torch.Tensor] = []
        self.names: list[str] = []

    def __call__(self, name, grid, tensors, ints, warps=cuda_ops.WARPS, source=None, shared=0, int_type=None):
        dtype, config = re.fullmatch(r"wide24_(f16|bf16)_(n\d+_r\d+_k\d+_u\d+)", name).groups()
        x, values, meta, y, work, count = tensors
        m, n, k, splits = ints
        self.names.append(name)
        assert source == cuda_ops.SOURCE and warps == cuda_ops.WARPS and int_type is None
        assert shared == cuda_ops.wide_shared_bytes(config) and cuda_ops._SUFFIX[x.dtype] == dtype
        assert x.is_contiguous() and x.data_ptr() % 16 == 0 and tuple(x.shape) == (m, k) and m <= 8 * int(config[1])
        assert tuple(values.shape) == (n, k // 2) and tuple(meta.shape) == (n, k // 8) and tuple(y.shape) == (m, n)
        tiles = -(-n // cuda_ops.wide_rows(config))
        assert grid == tiles * splits
        assert count.dtype == torch.int32 and count.numel() >= tiles and not count.any()
        if splits == 1:
            assert work.data_ptr() == y.data_ptr()
        else:
            assert tuple(work.shape) == (splits, m, n) and work.dtype == torch.float32
        result = emulate_wide(config, grid, tensors, ints, shared, self.layout, self.order)
        y.copy_(result.to(y.dtype))
        self.results.append(result)


def _run(config: str, n: int, k: int, m: int, splits: int, dtype=torch.float16, emulated: Emulated | None = None):
    w = _weight(n, k, seed=n + k + m, dtype=dtype)
    fmt = Sparse24.compress(w)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    emulated = emulated or Emulated()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cuda_ops, "_launch", emulated)
        y = cuda_ops.sparse24_wide(x, fmt.values, fmt.meta, config, splits)
    return y, emulated.results[-1], x.double() @ w.double().T


CASES = [(config, m) for config in cuda_ops.WIDE_CONFIGS
         for m in ((17, 32) if cuda_ops.wide_tokens(config) == 32 else (33, 64))]


@pytest.mark.parametrize(("config", "m"), CASES)
@pytest.mark.parametrize("splits", [1, 3])
def test_the_emulated_kernel_equals_the_dense_product_in_float64(config, m, splits):
    """136 features (a partial second row tile of 128, or a third of 64), K = 640 (10 steps: three splits of 3, 3 and
    4 steps, so the last iteration of a K-group runs steps past its slice against zeroed x), whole K and three splits:
    every output stored once, equal to the float64 product up to the order of the sums, and y is that product in the
    input dtype."""
    y, result, reference = _run(config, 136, 640, m, splits)
    assert not result.isnan().any()
    torch.testing.assert_close(result, reference, rtol=1e-12, atol=1e-12)
    assert torch.equal(y, result.to(y.dtype))


@pytest.mark.parametrize("config", ["n4_r1_k2_u2", "n8_r1_k1_u4"])
def test_bf16_and_a_block_order_where_the_first_split_finishes_last(config):
    """bf16, 200 features x 1024 inputs in five splits; blocks run in launch order, so split 0 is never the last of its
    tile: the sum does not depend on which block adds it."""
    emulated = Emulated(order=list)
    y, result, reference = _run(config, 200, 1024, cuda_ops.wide_tokens(config) - 3, 5, torch.bfloat16, emulated)
    torch.testing.assert_close(result, reference, rtol=1e-12, atol=1e-12)
    assert torch.equal(y, result.to(torch.bfloat16))


def _natural_x(r: int, group: int) -> int:
    return r * 128 + (((group >> 1) ^ (r & 7)) << 4) + (group & 1) * 8


BROKEN = {
    "x copies in natural order": Layout(x_offset=_natural_x),
    "ldmatrix without the swizzle": Layout(
        b_address=lambda lane, mma: (lane & 7) * 128 + ((4 * mma + (lane >> 3)) << 4)),
    "MMA 1 reading MMA 0's chunks": Layout(
        b_address=lambda lane, mma: (lane & 7) * 128 + (((lane >> 3) ^ (lane & 7)) << 4)),
    "rows g and g + 8 swapped in A": Layout(a_registers=(("b", 0), ("a", 0), ("b", 1), ("a", 1))),
    "A words 0 and 1 swapped": Layout(a_registers=(("a", 1), ("b", 1), ("a", 0), ("b", 0))),
    "tokens 2t and 2t + 1 swapped": Layout(token_of=lambda nt, t, i: nt * 8 + 2 * t + 1 - (i & 1)),
}


@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_a_broken_index_fails(broken):
    """The emulation is sensitive: each of the kernel's formulas replaced by a plausible wrong one gives a different
    (or unwritten, NaN) product."""
    _, result, reference = _run("n4_r1_k1_u2", 136, 640, 29, 3, emulated=Emulated(layout=BROKEN[broken]))
    assert not torch.allclose(result, reference, rtol=1e-3, atol=1e-3, equal_nan=False)


def test_one_ldmatrix_gives_the_decode_kernels_b_fragment():
    """The x tile layout made ldmatrix deliver what mma24 loads from memory: lane (g, t) register i of MMA mma holds
    word t & 1 of 4-input group 8 (i & 1) + 4 (t >> 1) + 2 mma + (i >> 1) of token g (mma24's b0 / b1 order); every
    8-row ldmatrix phase and every quarter-warp of 8-byte copies falls in distinct 16-byte bank groups."""
    layout = Layout()
    for mma in range(2):
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            for i in range(4):
                row_lane = 8 * i + g  # lane whose address names matrix i's row g
                address = int(layout.b_address(torch.tensor(row_lane), mma)) + 4 * t
                group = 8 * (i & 1) + 4 * (t >> 1) + 2 * mma + (i >> 1)
                assert address == layout.x_offset(g, group) + 4 * (t & 1), (mma, lane, i)
        for i in range(4):
            addresses = [int(layout.b_address(torch.tensor(8 * i + r), mma)) for r in range(8)]
            assert len({a // 16 % 8 for a in addresses}) == 8
    for first in range(0, 256, 16):  # a half-warp's 8-byte copies: one token row, 16 distinct 8-byte bank pairs
        spots = [cuda_ops.wide_x_offset(tid >> 4, tid & 15) for tid in range(first, first + 16)]
        assert len({s // 8 % 16 for s in spots}) == 16


def test_the_source_has_the_index_math_the_emulation_checks():
    """The formulas the emulation follows, as written in sparse_gemv.cu (a change there must change the emulation)."""
    source = cuda_ops.SOURCE.read_text()
    for line in ("const int c = 2 * (gi & 3) + (gi >> 3);",
                 "return (u32)(r * 128 + ((c ^ (r & 7)) << 4) + ((gi >> 2) & 1) * 8);",
                 "constexpr int STEP_X = TN * 128;",
                 "constexpr int SLOT = WK * U * STEP_X;",
                 "const int q = warp / WR, rw = warp % WR;",
                 "const int tile = blockIdx.x % tiles, s = blockIdx.x / tiles;",
                 "const int kb0 = (int)((long long)s * KB / S), kb1 = (int)((long long)(s + 1) * KB / S);",
                 "const int iters = (kb1 - kb0 + WK * U - 1) / (WK * U);",
                 "const int row0 = (tile * WR + rw) * R * 16;",
                 "const size_t rg = min(row0 + r * 16 + g, N - 1), rg8 = min(row0 + r * 16 + g + 8, N - 1);",
                 "va[r] = (const char*)(vals + rg * (K >> 1)) + t * 16;",
                 "ma[r] = (const char*)(meta + rg * (K >> 3));",
                 "const size_t k = (size_t)min(kb, kb1 - 1);",
                 "ld_stream_v4(va[r] + k * 64, wa[u][r]);",
                 "ld_stream_v4(vb[r] + k * 64, wb[u][r]);",
                 "ld_nc_v2(ma[r] + k * 8, ea[u][r][0], ea[u][r][1]);",
                 "ld_nc_v2(mb[r] + k * 8, eb[u][r][0], eb[u][r][1]);",
                 "constexpr int RT = THREADS / 16, RJ = TN / RT;",
                 "const int gi = threadIdx.x & 15, r_0 = threadIdx.x >> 4;",
                 "const int r = r_0 + RT * jr;",
                 "xrow[jr] = x + (size_t)min(r, M - 1) * K + gi * 4;",
                 "xlen[jr] = r < M ? 8u : 0u;",
                 "const int kb = kb0 + i * WK * U + qu;",
                 "const size_t k = (size_t)min(kb, kb1 - 1) * 64;",
                 "wide_cp_async8(xdst[jr] + buf * SLOT + qu * STEP_X, xrow[jr] + k, kb < kb1 ? xlen[jr] : 0u);",
                 "for (int u = 0; u < U; ++u) load_w(u, kb0 + q * U + u);",
                 "const u32 xa0 = (u32)((lane & 7) * 128 + (((lane >> 3) ^ (lane & 7)) << 4));",
                 "const u32 xa1 = (u32)((lane & 7) * 128 + (((4 + (lane >> 3)) ^ (lane & 7)) << 4));",
                 "const u32 xs = base + (i & 1) * SLOT + q * U * STEP_X;",
                 "e[r] = __byte_perm(meta24_nibbles(ea[u][r][0], ea[u][r][1], t),",
                 "meta24_nibbles(eb[u][r][0], eb[u][r][1], t), 0x6420u);",
                 "ldmatrix_x4(b0, xs + u * STEP_X + nt * 1024 + xa0);",
                 "ldmatrix_x4(b1, xs + u * STEP_X + nt * 1024 + xa1);",
                 "const u32 a0[4] = {wa[u][r][0], wb[u][r][0], wa[u][r][1], wb[u][r][1]};",
                 "mma_sp<BF16>(c[r][nt], a0, b0, e[r], 0);",
                 "const u32 a1[4] = {wa[u][r][2], wb[u][r][2], wa[u][r][3], wb[u][r][3]};",
                 "mma_sp<BF16>(c[r][nt], a1, b1, e[r], 1);",
                 "load_w(u, kb0 + ((i + 1) * WK + q) * U + u);",
                 "red[(warp * R * NT * 4 + (r * NT + nt) * 4 + i) * 32 + lane] = c[r][nt][i];",
                 "c[r][nt][i] += red[((qq * WR + rw) * R * NT * 4 + (r * NT + nt) * 4 + i) * 32 + lane];",
                 "const int row = row0 + r * 16 + g + (i >> 1) * 8, token = nt * 8 + 2 * t + (i & 1);",
                 "else work[((size_t)s * M + token) * N + row] = c[r][nt][i];",
                 "if (threadIdx.x == 0) last = wide_arrive(count + tile) == (u32)S - 1u;",
                 "for (int k = 0; k < S; ++k) sum += wide_ld_cg(work + ((size_t)k * M + token) * N + row);",
                 "if (threadIdx.x == 0) count[tile] = 0u;",
                 "wide24<BF, NT, R, WARPS / WK, WK, U>(x, vals, meta, y, work, count, M, N, K, S);"):
        assert line in source, line
    made = re.findall(r"WIDE24\(DT, BF, (\d+), (\d+), (\d+), (\d+)\)", source)
    assert [f"n{nt}_r{r}_k{wk}_u{u}" for nt, r, wk, u in made] == list(cuda_ops.WIDE_CONFIGS)
    assert all(cuda_ops.WIDE_CONFIGS[f"n{nt}_r{r}_k{wk}_u{u}"] == (int(nt), int(r), int(wk), int(u))
               for nt, r, wk, u in made)


def test_shared_memory_holds_both_buffers_and_the_k_group_sums():
    """Two x buffers of U steps per K-group, or the K-groups' fp32 sums (8 warps x R NT 4 x 32 lanes) where larger;
    two blocks an SM fit an A100's (164 KB) and an H100's shared memory."""
    assert {c: cuda_ops.wide_shared_bytes(c) for c in cuda_ops.WIDE_CONFIGS} == {
        "n4_r1_k1_u2": 16384, "n4_r1_k1_u4": 32768, "n4_r1_k1_u6": 49152, "n4_r1_k2_u2": 32768,
        "n8_r1_k1_u2": 32768, "n8_r1_k1_u4": 65536, "n8_r1_k2_u2": 65536}
    for config, (nt, r, wk, _) in cuda_ops.WIDE_CONFIGS.items():
        assert cuda_ops.wide_shared_bytes(config) >= (8 * r * nt * 4 * 32 * 4 if wk > 1 else 0)
        assert cuda_ops.WIDE_BLOCKS_PER_SM * (cuda_ops.wide_shared_bytes(config) + 1024) <= 163 * 1024


def test_split_k_fills_the_gpu_and_keeps_a_buffer_of_steps_per_split():
    """132 SMs x 2 blocks: the fewest splits that give every place a block, and half as many; a row tile count that
    fills the GPU alone gets no split; each split keeps WK U steps."""
    assert cuda_ops.wide_splits("n4_r1_k1_u2", 4096, 4096, 132) == [9, 4]  # 32 tiles of 128 rows
    assert cuda_ops.wide_splits("n4_r1_k2_u2", 11008, 4096, 132) == [2, 1]  # 172 tiles of 64 rows
    assert cuda_ops.wide_splits("n4_r1_k1_u4", 1024, 8192, 132) == [16, 8]  # the 70B k/v shape: the cap
    assert cuda_ops.wide_splits("n8_r1_k1_u4", 1024, 512, 132) == [2, 1]  # 8 steps: two buffers of 4
    assert cuda_ops.wide_splits("n4_r1_k1_u2", 40000, 4096, 132) == [1]


def _gpu_like(monkeypatch) -> None:
    monkeypatch.setattr(cuda_ops, "_module", lambda *args, **kwargs: None)
    monkeypatch.setattr(wgmma, "capability", lambda device: (9, 0))
    monkeypatch.setattr(wgmma, "sm_count", lambda device: 132)


def _wide(fmt: Sparse24, m: int) -> list[str]:
    return [name for name in fmt.cuda_candidates(m) if "wide24" in name]


def _opt_in(monkeypatch) -> None:
    """SECATEURS_UNVERIFIED_KERNELS=1 from here on (not_opted_in clears the cached answer after the test)."""
    monkeypatch.setenv(cuda_ops.UNVERIFIED_ENV, "1")
    cuda_ops.unverified_offered.cache_clear()


def test_offered_by_default_last_and_only_at_row_buckets_32_and_64(monkeypatch, not_opted_in):
    """Without SECATEURS_UNVERIFIED_KERNELS=1 (checked on an H100: 636 checks, 0 failures; the fastest stored-format
    path at 32 rows on six of seven Llama shapes) row bucket 32 offers the cleared 32-token configurations and 64 the
    cleared 64-token ones, each at its split-K choices, after every other candidate; no other bucket, no K % 64 != 0
    weight, no pre-Ampere GPU, no CPU weight."""
    fmt = Sparse24.compress(_weight(256, 1024, 0, torch.float16))
    on_cpu = wgmma.capability
    _gpu_like(monkeypatch)
    for m in (1, 2, 4, 8, 16, 128, 512):
        assert not _wide(fmt, m), m
    for m in (32, 64):
        names = list(fmt.cuda_candidates(m))
        wide = _wide(fmt, m)
        assert wide == [f"cuda_wide24_{c}_s{s}" for c in cuda_ops.WIDE_CONFIGS
                        if c in cuda_ops.WIDE_CLEARED and cuda_ops.wide_tokens(c) == m
                        for s in cuda_ops.wide_splits(c, 256, 1024, 132)]
        assert len(wide) >= 4 and names[-len(wide):] == wide and names[0].startswith("cuda_gemm24")
    assert not _wide(Sparse24.compress(_weight(256, 96, 1, torch.float16)), 32)
    for capability in ((8, 0), (8, 9), (10, 0)):  # mma.sp: every GPU from sm_80 on, not only the H100 it ran on
        monkeypatch.setattr(wgmma, "capability", lambda device, c=capability: c)
        assert _wide(fmt, 32) and _wide(fmt, 64), capability
    monkeypatch.setattr(wgmma, "capability", lambda device: (7, 5))
    assert not _wide(fmt, 32) and not _wide(fmt, 64)
    monkeypatch.setattr(wgmma, "capability", on_cpu)  # a CPU weight, with or without the opt-in: none, no error
    assert not _wide(fmt, 32) and not _wide(fmt, 64)
    _opt_in(monkeypatch)
    assert not _wide(fmt, 32) and not _wide(fmt, 64)


def test_the_configuration_never_near_the_fastest_only_under_the_opt_in(monkeypatch, not_opted_in):
    """The H100 timing cleared the configurations within 3% of the fastest stored-format path on some shape and bucket
    (:data:`cuda_ops.WIDE_CLEARED`); the other (:data:`cuda_ops.WIDE_DOMINATED`, as wgmma's) and one added later are
    offered only under SECATEURS_UNVERIFIED_KERNELS=1, where the benchmarks time every configuration."""
    assert cuda_ops.WIDE_CLEARED.isdisjoint(cuda_ops.WIDE_DOMINATED)
    assert cuda_ops.WIDE_CLEARED | cuda_ops.WIDE_DOMINATED == set(cuda_ops.WIDE_CONFIGS)
    assert {cuda_ops.wide_tokens(c) for c in cuda_ops.WIDE_CLEARED} == {32, 64}  # both buckets keep a configuration
    fmt = Sparse24.compress(_weight(256, 1024, 0, torch.float16))
    _gpu_like(monkeypatch)

    def configs(m: int) -> list[str]:
        return list(dict.fromkeys(name.removeprefix("cuda_wide24_").rsplit("_s", 1)[0] for name in _wide(fmt, m)))

    assert cuda_ops.wide_configs() == [c for c in cuda_ops.WIDE_CONFIGS if c in cuda_ops.WIDE_CLEARED]
    for m in (32, 64):
        assert configs(m) == [c for c in cuda_ops.wide_configs() if cuda_ops.wide_tokens(c) == m]
        assert not set(configs(m)) & cuda_ops.WIDE_DOMINATED
    monkeypatch.setattr(cuda_ops, "WIDE_CLEARED", cuda_ops.WIDE_CLEARED - {"n8_r1_k2_u2"})  # one added later
    assert "n8_r1_k2_u2" not in configs(64)
    _opt_in(monkeypatch)
    assert cuda_ops.wide_configs() == list(cuda_ops.WIDE_CONFIGS)
    for m in (32, 64):
        assert configs(m) == [c for c in cuda_ops.WIDE_CONFIGS if cuda_ops.wide_tokens(c) == m]


def test_the_offered_candidates_launch_the_emulated_kernel(monkeypatch, opted_in):
    """The candidates the dispatcher times, their bound configuration and split, run the emulated kernel to the
    float64 product: 21 rows of x at row bucket 32 and 50 at 64, a 72 x 512 weight (one partial row tile; 8 steps)."""
    w = _weight(72, 512, 3, torch.float16)
    fmt = Sparse24.compress(w)
    _gpu_like(monkeypatch)
    emulated = Emulated()
    monkeypatch.setattr(cuda_ops, "_launch", emulated)
    for m, rows in ((32, 21), (64, 50)):
        x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows)).half()
        offered = {name: call for name, call in fmt.cuda_candidates(m).items() if "wide24" in name}
        splits = {int(name.rsplit("_s", 1)[1]) for name in offered}
        assert 1 in splits and max(splits) > 1
        for name, call in offered.items():
            y = call(x)
            torch.testing.assert_close(emulated.results[-1], x.double() @ w.double().T, rtol=1e-12, atol=1e-12,
                                       msg=name)
            assert torch.equal(y, emulated.results[-1].half())
            assert emulated.names[-1] == "wide24_f16_" + name.removeprefix("cuda_wide24_").rsplit("_s", 1)[0]


def test_bad_input_is_refused_with_the_fix():
    fmt = Sparse24.compress(_weight(64, 256, 5, torch.float16))
    with pytest.raises(ValueError, match="1-32 rows of x, not 33"):
        cuda_ops.sparse24_wide(torch.zeros(33, 256, dtype=torch.float16), fmt.values, fmt.meta, "n4_r1_k1_u2", 1)
    narrow = Sparse24.compress(_weight(64, 96, 5, torch.float16))
    with pytest.raises(ValueError, match="K % 64 == 0"):
        cuda_ops.sparse24_wide(torch.zeros(8, 96, dtype=torch.float16), narrow.values, narrow.meta, "n4_r1_k1_u2", 1)


def test_the_counters_are_shared_zeroed_and_never_grown_inside_capture(monkeypatch):
    device = torch.device("cpu")
    monkeypatch.setattr(cuda_ops, "_WIDE_COUNTS", {})
    first = cuda_ops.wide_counts(device, 10)
    assert first.dtype == torch.int32 and first.numel() >= 10 and not first.any()
    assert cuda_ops.wide_counts(device, 20) is first
    grown = cuda_ops.wide_counts(device, first.numel() + 1)
    assert grown.numel() > first.numel() and not grown.any()


def test_the_op_has_a_fake_implementation():
    """torch.compile(fullgraph=True) and CUDA graphs trace the custom op through its fake implementation."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        y = torch.ops.secateurs.sparse24_wide(torch.empty(20, 128, dtype=torch.bfloat16),
                                              torch.empty(48, 64, dtype=torch.bfloat16),
                                              torch.empty(48, 16, dtype=torch.uint8), "n4_r1_k1_u2", 3)
    assert (tuple(y.shape), y.dtype) == ((20, 48), torch.bfloat16)


ENTRY_MACROS = {"MMA24": "mma24_{dt}_n{0}_r{1}_w{2}", "GEMM24": "gemm24_{dt}_m{0}_n{1}_s{4}",
                "GEMV24": "gemv24_{dt}_t{0}_r{1}", "GEMVBM": "gemvbm_{dt}_t{0}_r{1}",
                "WIDE24": "wide24_{dt}_n{0}_r{1}_k{2}_u{3}"}


def _entry_points() -> list[str]:
    """Every kernel of sparse_gemv.cu, from its instantiation macros (the source compiles them for both dtypes)."""
    source = cuda_ops.SOURCE.read_text()
    names = ["expand24", "expandbm"]
    for macro, pattern in ENTRY_MACROS.items():
        for args in re.findall(rf"^\s*{macro}\(DT, BF, ([\d, ]+)\)", source, flags=re.MULTILINE):
            values = [a.strip() for a in args.split(",")]
            names += [pattern.format(*values, dt=dt) for dt in ("f16", "bf16")]
    return names


def test_the_source_compiles_for_ampere_and_hopper_with_every_kernel_and_no_spills(nvcc_builds_without_spills):
    """NVRTC compiles sparse_gemv.cu on users' GPUs; where nvcc is installed it is compiled here with ptxas's report:
    every kernel, the wide ones included, exists and none spills registers."""
    names = _entry_points()
    assert sum(name.startswith("wide24_") for name in names) == 2 * len(cuda_ops.WIDE_CONFIGS)
    nvcc_builds_without_spills(cuda_ops.SOURCE, names)


def _loop_load_distances(sass: str, name: str) -> list[int]:
    """For each weight load (LDG.E.EF.128) of the kernel's main loop (the longest loop holding an HMMA): the HMMAs
    issued between it and the first instruction reading its registers, around the back edge."""
    from sass_count import functions, load_uses, mma_loop

    return [mmas for mmas, _ in load_uses(mma_loop(functions(sass)[name]), r"LDG\.E\.EF\.(128) R(\d+),")]


def test_every_weight_load_stays_in_flight_across_mmas(tmp_path):
    """What the kernel is for, checked in the SASS nvcc makes for sm_90: between each weight load of the main loop and
    the first instruction that reads it, the warp issues at least 5 MMAs (the decode kernel at 32 rows issues at most 2:
    its loads are waited for almost at once)."""
    import shutil
    import sys

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc here")
    sys.path.insert(0, str(cuda_ops.SOURCE.parents[4] / "benchmarks"))
    from sass_count import cuobjdump

    cubin = tmp_path / "sparse_gemv.cubin"
    subprocess.run([nvcc, "-std=c++17", "-arch=sm_90", "-cubin", "-o", str(cubin), str(cuda_ops.SOURCE)], check=True)
    sass = subprocess.run([cuobjdump(), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    for config in cuda_ops.WIDE_CONFIGS:
        distances = _loop_load_distances(sass, f"wide24_f16_{config}")
        assert len(distances) == 2 * cuda_ops.WIDE_CONFIGS[config][3] and min(distances) >= 5, (config, distances)
    assert max(_loop_load_distances(sass, "mma24_f16_n4_r2_w8")) <= 2


@pytest.mark.parametrize(("shared", "static", "raised"), [(49152, 4, True), (49152, 0, False), (65536, 0, True),
                                                          (1024, 4, False)])
def test_the_launcher_raises_the_shared_limit_counting_static_shared_memory(monkeypatch, shared, static, raised):
    """wide24_n4_r1_k1_u6 asks for exactly 48 KB of dynamic shared memory, and its split-K flag is 4 static bytes:
    the H100 refused the launch (CUDA_ERROR_INVALID_VALUE) because the launcher raised the limit only above 48 KB
    of dynamic memory. The limit is raised whenever dynamic and static shared memory together pass 48 KB."""
    from types import SimpleNamespace

    calls: list[str] = []
    attribute = SimpleNamespace(CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES="static",
                                CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES="max dynamic")
    driver = SimpleNamespace(CUfunction_attribute=attribute,
                             cuFuncGetAttribute=lambda what, function: (0, static),
                             cuFuncSetAttribute=lambda function, what, value: calls.append(f"{what}={value}") or (0,),
                             cuLaunchKernel=lambda *args: calls.append("launch") or (0,))
    monkeypatch.setattr(cuda_ops, "_bindings", lambda: (driver, None))
    monkeypatch.setattr(cuda_ops, "_function", lambda index, name, source: "function")
    monkeypatch.setattr(cuda_ops, "_SHARED_SET", set())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: None)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: SimpleNamespace(cuda_stream=0))
    cuda_ops._launch("wide24_f16_n4_r1_k1_u6", 1, (torch.zeros(1),), (1,), shared=shared)
    cuda_ops._launch("wide24_f16_n4_r1_k1_u6", 1, (torch.zeros(1),), (1,), shared=shared)
    assert calls == ([f"max dynamic={shared}"] if raised else []) + ["launch", "launch"]

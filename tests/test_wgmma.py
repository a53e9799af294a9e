"""The Hopper ``wgmma.mma_async.sp`` 2:4 GEMM (kernels/cuda/sparse24_wgmma.cu) on a CPU: a model of its data
movement, step by step as the kernel does it, checked against the dense product; its ring schedule; its gating.

The model has two halves:

- the kernel's side, read off its source (the same expressions: tests below check the source still holds them):
  which global bytes each thread's cp.async copies to which shared-memory byte, the descriptors it builds, which
  shared bytes each lane reads into its metadata register, and where the epilogue stores each accumulator;
- the hardware's side, from the PTX ISA (section "Asynchronous Warpgroup Level Matrix Multiply-Accumulate
  Instructions"): how a wgmma reads A and B through a descriptor ("Matrix Descriptor Format", "Shared Memory
  Matrix Layout": K-major canonical layouts, 8-row core-matrix groups ``stride byte offset`` apart, rows of the
  swizzle width, the 64-byte / 128-byte swizzles XOR address bits 4-5 / 4-6 with bits 7-8 / 7-9 as CUTLASS's
  Swizzle<2,4,3> / Swizzle<3,4,3> write them), which metadata bits name which kept values ("Sparse matrix storage";
  "Matrix fragments for warpgroup-level multiply-accumulate operation with sparse matrix A": warp ``%warpid % 4``
  gives rows 16w..16w+15; for m64nNk32 f16/bf16 the figure is mma.sp m16n8k32's: lane 4g+2i holds row g's and
  row g+8's positions of the instruction's inputs 0-15, lane 4g+2i+1 of inputs 16-31, selector i), and which
  accumulator register holds which (feature, token) ("Matrix Fragments for wgmma.mma_async.m64nNk16" /
  m64nNk32, register D: row 16w + g (+8 for registers 2, 3 of each four), column 8(i/4) + 2t + (i%2)).

What only a GPU run can confirm: that these readings are the hardware's (the descriptor's leading byte offset
being ignored for swizzled K-major layouts; the start address advanced by 32/64 bytes inside a swizzle row for
the second 32-input step; the sparse A tile being read as M x K/2 compressed values in the same canonical
layout), and that the cp.async -> fence.proxy.async -> barrier -> wgmma order is enough. One H100 run confirmed
them for m128_n128_s4 (relative error 2.1e-4 fp16, 1.7e-3 bf16); four earlier configurations that rewrote the
metadata register while the previous stage's wgmma was in flight passed this model but multiplied wrongly there
(relative error 0.11-0.57): a CPU model cannot see the hazard of rewriting a register that a wgmma in flight still
reads. They were removed. That hazard is checked here where nvcc is installed, in the SASS itself
(:func:`test_no_metadata_register_is_written_while_its_wgmma_is_in_flight`); the configurations that leave a stage in
flight (``_f1``) have not yet run on a GPU.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import numpy
import pytest
import torch

from secateurs.kernels import Sparse24, cuda_ops, wgmma
from secateurs.sparsity.masks import nm_mask

SOURCE_TEXT = wgmma.SOURCE.read_text()


def _weight(n: int, k: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    w = w * nm_mask(w.abs(), 2, 4)
    w[0, :4] = torch.tensor([0.0, 0.0, 0.0, 1.5])  # a group with one non-zero, at the last position
    w[1, 4:8] = 0.0  # a group with none
    w[3, 8:12] = torch.tensor([2.0, 0.0, 0.0, -3.0])
    return w.to(dtype)


# ---- the hardware's side (PTX ISA readings) ----
def _swizzle(address: int, mode: int) -> int:
    """The swizzled byte address of an unswizzled one: 128 B XORs bits 4-6 with bits 7-9, 64 B bits 4-5 with 7-8."""
    if mode == wgmma.SWIZZLE_128B:
        return address ^ (((address >> 7) & 7) << 4)
    if mode == wgmma.SWIZZLE_64B:
        return address ^ (((address >> 7) & 3) << 4)
    raise AssertionError(f"swizzle mode {mode} not modelled")


def _read_k_major(smem: bytes, desc: int, rows: int, k_bytes: int) -> torch.Tensor:
    """(rows, k_bytes / 2) 16-bit words a wgmma reads through a K-major swizzled descriptor: row r of 8-row group
    r // 8 at stride byte offset * (r // 8) + swizzle width * (r % 8), then the swizzle of the absolute address."""
    start = (desc & 0x3FFF) << 4
    stride = ((desc >> 32) & 0x3FFF) << 4
    mode = desc >> 62
    assert (desc >> 49) & 7 == 0, "base offset: the kernel aligns every atom"
    width = 128 if mode == wgmma.SWIZZLE_128B else 64
    out = [[0] * (k_bytes // 2) for _ in range(rows)]  # lists: element-wise tensor indexing is slow
    for r in range(rows):
        for c in range(k_bytes // 2):
            a = _swizzle(start + (r // 8) * stride + (r % 8) * width + 2 * c, mode)
            out[r][c] = smem[a] | (smem[a + 1] << 8)
    return torch.tensor(out, dtype=torch.int64)


def _as_float(words: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return words.to(torch.int32).to(torch.int16).view(dtype).double()


def _wgmma_sp(smem: bytes, da: int, db: int, meta_regs: list[list[int]], selector: int, bn: int,
              dtype: torch.dtype) -> torch.Tensor:
    """D (64, bn) of one wgmma.mma_async.sp.m64n{bn}k32: A (64 rows x 16 kept values) and B (bn tokens x 32 inputs)
    through their descriptors, the kept values placed by the metadata of lanes 4g + 2*selector (+1)."""
    kept = _as_float(_read_k_major(smem, da, 64, 32), dtype).tolist()  # 16 kept values per row
    b = _as_float(_read_k_major(smem, db, bn, 64), dtype)  # 32 inputs per token
    dense = [[0.0] * 32 for _ in range(64)]
    for row in range(64):
        w, g, high = row // 16, row % 8, (row % 16) >= 8
        for j in range(8):  # 4-input chunk j of the instruction's 32
            reg = meta_regs[w][4 * g + 2 * selector + j // 4]
            bits = (reg >> (16 * high + 4 * (j % 4))) & 0xF
            first, second = bits & 3, bits >> 2
            assert first != second, "metadata 0b0000/0b0101/0b1010/0b1111 is undefined behaviour"
            dense[row][4 * j + first] += kept[row][2 * j]
            dense[row][4 * j + second] += kept[row][2 * j + 1]
    return torch.tensor(dense, dtype=torch.float64) @ b.T


def _accumulator_index(row: int, token: int) -> tuple[int, int, int]:
    """(warp, lane, register) holding D[row, token] of an m64nN f32 accumulator."""
    w, g, high = row // 16, row % 8, (row % 16) >= 8
    j, t, odd = token // 8, (token % 8) // 2, token % 2
    return w, 4 * g + t, 4 * j + 2 * high + odd


# ---- the kernel's side (sparse24_wgmma.cu, expression for expression) ----
def _block(pid: int, ftiles: int, ttiles: int) -> tuple[int, int]:
    per_group = 8 * ttiles
    first = (pid // per_group) * 8
    size = min(8, ftiles - first)
    return first + (pid % per_group) % size, (pid % per_group) // size


def _load_stage(smem: bytearray, slot_base: int, kb: int, vals: bytes, meta: bytes, x: bytes, row0: int, tok0: int,
                n: int, m: int, k: int, config: str) -> None:
    """Every thread's cp.async of one stage: (destination, source) pairs as the kernel's load lambda forms them."""
    bm, bn = wgmma.block_features(config), wgmma.block_tokens(config)
    ks = wgmma.stage_k(config)
    kh, a_row, e_row = ks // 64, wgmma.a_row_bytes(config), wgmma.e_row_bytes(config)
    b_part = wgmma.b_part_bytes(config)
    sa = slot_base
    se = sa + wgmma.a_bytes(config)
    sb = se + wgmma.e_bytes(config)
    for tid in range(wgmma.THREADS):
        for i in range(tid, bm * 4 * kh, wgmma.THREADS):
            r, c = i >> (1 + kh), i & (4 * kh - 1)
            row = min(row0 + r, n - 1)
            src = row * k + kb * ks + c * 16
            dst = sa + r * a_row + ((c ^ ((r >> 1) & 3) if kh == 1 else c ^ (r & 7)) << 4)
            assert dst - sa == wgmma.a_offset(r, c, a_row)
            smem[dst:dst + 16] = vals[src:src + 16]
        for i in range(tid, bm * kh, wgmma.THREADS):
            r, h = i >> (kh - 1), i & (kh - 1)
            row = min(row0 + r, n - 1)
            src = row * (k >> 3) + kb * e_row + h * 8
            dst = se + r * e_row + h * 8
            smem[dst:dst + 8] = meta[src:src + 8]
        for i in range(tid, bn * 8 * kh, wgmma.THREADS):
            r, c = i >> (2 + kh), i & (8 * kh - 1)
            tok = min(tok0 + r, m - 1)
            src = tok * k * 2 + kb * (2 * ks) + c * 16
            dst = sb + (c >> 3) * b_part + r * 128 + (((c & 7) ^ (r & 7)) << 4)
            assert dst - sb == wgmma.b_offset(r, c, bn)
            smem[dst:dst + 16] = x[src:src + 16]


def _one_per_tile() -> list[str]:
    """The first configuration of each tile and stage (MW, BN, inputs a stage): the model's arithmetic depends on
    these alone (the ring, the in-flight count and the blocks an SM are checked apart), so the slow model tests run
    once per tile and stage."""
    tiles: dict[tuple[int, int, int], str] = {}
    for config, (mw, bn, ks, *_ring) in wgmma.CONFIGS.items():
        tiles.setdefault((mw, bn, ks), config)
    return list(tiles.values())


TILE_CONFIGS = _one_per_tile()


def emulate(x: torch.Tensor, fmt: Sparse24, config: str, splits: int = 1) -> torch.Tensor:
    """y as the kernel computes it, block by block and stage by stage (one slot is enough for the arithmetic; the
    ring's schedule is checked by :func:`test_ring_schedule`); with ``splits`` > 1 each block's K range and its
    split's workspace, then the launcher's sum over splits."""
    mw, bn = wgmma.CONFIGS[config][0], wgmma.block_tokens(config)
    bm = wgmma.block_features(config)
    m, k = x.shape
    n = fmt.shape[0]
    vals = fmt.values.contiguous().view(torch.uint8).numpy().tobytes()
    meta = fmt.meta.contiguous().numpy().tobytes()
    xb = x.contiguous().view(torch.uint8).numpy().tobytes()
    # y, or the splits' workspace; numpy arrays and lists below, as element-wise tensor indexing is slow
    out = numpy.full((splits, m, n), numpy.nan)
    ftiles, ttiles = -(-n // bm), -(-m // bn)
    tiles = ftiles * ttiles
    seen = set()
    base = 1024 * 5  # the kernel aligns the ring to 1024 bytes
    for block in range(tiles * splits):
        split, pid = block // tiles, block % tiles
        ft, tt = _block(pid, ftiles, ttiles)
        seen.add((split, ft, tt))
        row0, tok0 = ft * bm, tt * bn
        ks = wgmma.stage_k(config)
        kb0 = (k // ks) * split // splits
        stages = (k // ks) * (split + 1) // splits - kb0
        d = numpy.zeros((2 * mw, 128, bn // 2))  # [64-feature tile][thread of its warpgroup][register]
        for kb in range(kb0, kb0 + stages):
            smem = bytearray(base + wgmma.stage_bytes(config))
            _load_stage(smem, base, kb, vals, meta, xb, row0, tok0, n, m, k, config)
            sa = base
            se = sa + wgmma.a_bytes(config)
            sb = se + wgmma.e_bytes(config)
            e_part = torch.tensor(list(smem[se:sb]), dtype=torch.uint8).reshape(bm, wgmma.e_row_bytes(config))
            db = wgmma.descriptor(sb, wgmma.B_STRIDE, wgmma.SWIZZLE_128B)
            for tile in range(2 * mw):  # the tile of warpgroup tile // mw
                da = wgmma.descriptor(sa + tile * 64 * wgmma.a_row_bytes(config), wgmma.a_stride(config),
                                      wgmma.a_swizzle(config))
                for h in range(ks // 64):  # half h: A 64 bytes on, B part h, position word 4h + t
                    regs = [[wgmma.metadata_register(e_part, tile, w, lane, h) for lane in range(32)]
                            for w in range(4)]
                    dah, dbh = da + h * 4, db + h * (wgmma.b_part_bytes(config) >> 4)
                    part = (_wgmma_sp(bytes(smem), dah, dbh, regs, 0, bn, x.dtype)
                            + _wgmma_sp(bytes(smem), dah + 2, dbh + 4, regs, 1, bn, x.dtype)).tolist()
                    for row in range(64):
                        for token in range(bn):
                            w, lane, i = _accumulator_index(row, token)
                            d[tile, 32 * w + lane, i] += part[row][token]
        # the epilogue: register i of thread (w, g, t) of a tile -> feature fbase + 8 ((i >> 1) & 1), token
        # 8 (i >> 2) + 2t + (i & 1)
        for tile in range(2 * mw):
            for thread in range(128):
                w, lane = thread // 32, thread % 32
                g, t = lane >> 2, lane & 3
                fbase = row0 + tile * 64 + w * 16 + g
                for i in range(bn // 2):
                    row, token = fbase + 8 * ((i >> 1) & 1), tok0 + 8 * (i >> 2) + 2 * t + (i & 1)
                    if row < n and token < m:
                        assert numpy.isnan(out[split, token, row]), "an output stored twice"
                        out[split, token, row] = d[tile, thread, i]
    assert seen == {(s, f, t) for s in range(splits) for f in range(ftiles) for t in range(ttiles)}
    return torch.from_numpy(out).sum(dim=0)


@pytest.mark.parametrize("config", TILE_CONFIGS)
@pytest.mark.parametrize(("dtype", "n", "m"), [(torch.float16, 136, 70), (torch.bfloat16, 200, 33)])
def test_emulated_kernel_equals_the_dense_product(config, dtype, n, m):
    """Every tile: odd token counts (a partial token tile; the 256-token tile mostly empty), feature counts past a
    whole 128-feature tile (clamped rows never stored; the 256-feature tile's second warpgroup's tiles partly or
    wholly clamped), K of two stages (128 or 256 inputs); every output written exactly once; the product exact to
    float64 rounding."""
    k = 2 * wgmma.stage_k(config)
    w = _weight(n, k, seed=1, dtype=dtype)
    fmt = Sparse24.compress(w)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(2)).to(dtype)
    got = emulate(x, fmt, config)
    torch.testing.assert_close(got, x.double() @ w.double().T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("config", "n", "m"), [("m128_n256_s4_f1", 136, 300), ("m256_n128_s4_f1", 300, 40)])
def test_emulated_large_tile_over_two_tiles(config, n, m):
    """A tile larger than 128 x 128 over two tiles along its larger side, the second partial: the block order, and
    for 256 tokens the B part of 256 rows and the accumulators of m64n256 (registers 64-127: tokens 128-255 of the
    tile); for 256 features the A and E parts of 256 rows, the second 256-feature tile's rows (row0 = 256) and each
    warpgroup's two 64-feature tiles, descriptors and metadata rows."""
    w = _weight(n, 64, seed=13, dtype=torch.float16)
    fmt = Sparse24.compress(w)
    x = torch.randn(m, 64, generator=torch.Generator().manual_seed(14)).half()
    got = emulate(x, fmt, config)
    torch.testing.assert_close(got, x.double() @ w.double().T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("config", TILE_CONFIGS)
@pytest.mark.parametrize("splits", [2, 3])
def test_emulated_split_k_equals_the_dense_product(config, splits):
    """Split K: three stages over 2 or 3 splits (uneven shares included); every workspace element of every split
    written once; their sum the dense product."""
    k = 3 * wgmma.stage_k(config)
    w = _weight(136, k, seed=7, dtype=torch.float16)
    fmt = Sparse24.compress(w)
    x = torch.randn(41, k, generator=torch.Generator().manual_seed(8)).half()
    got = emulate(x, fmt, config, splits)
    torch.testing.assert_close(got, x.double() @ w.double().T, rtol=1e-12, atol=1e-12)


def test_split_k_only_where_the_tiles_leave_the_gpu_idle():
    """132 SMs: the 1024 x 8192 k/v projection at 128 tokens (8 blocks) splits K 8 ways, at 512 tokens (32 blocks)
    4 ways; at 2048 tokens (128 blocks), 4096 x 4096 at 2048 tokens and 11008 x 4096 at 512 tokens (over half the
    SMs busy) it does not; a short K keeps at least 4 stages per split."""
    config = "m128_n128_s4"
    assert wgmma.splits_for(config, (1024, 8192), 128, 132) == 8
    assert wgmma.splits_for(config, (1024, 8192), 512, 132) == 4
    assert wgmma.splits_for(config, (1024, 8192), 2048, 132) == 1
    assert wgmma.splits_for(config, (4096, 4096), 2048, 132) == 1
    assert wgmma.splits_for(config, (11008, 4096), 512, 132) == 1
    assert wgmma.splits_for(config, (576, 512), 40, 132) == 2
    assert wgmma.splits_for("m128_n128_s5_f1", (1024, 8192), 512, 132) == 4  # the same tile: the same splits
    # 256 tokens a block: half the blocks of the 128-token tile, so more splits where the tiles are few
    assert wgmma.splits_for("m128_n256_s4_f1", (1024, 8192), 512, 132) == 8
    assert wgmma.splits_for("m128_n256_s4_f1", (1024, 8192), 2048, 132) == 2  # 64 blocks: two per SM
    assert wgmma.splits_for("m128_n256_s4_f1", (4096, 4096), 2048, 132) == 1
    # 256 features a block: half the blocks of the 128-feature tile as well
    assert wgmma.splits_for("m256_n128_s4_f1", (1024, 8192), 512, 132) == 8
    assert wgmma.splits_for("m256_n128_s4_f1", (1024, 8192), 2048, 132) == 2
    # two blocks an SM: 264 places, so the 128-block k/v projection at 2048 tokens splits where one a SM does not
    assert wgmma.splits_for("m128_n128_s4_f1", (1024, 8192), 512, 132) == 8
    assert wgmma.splits_for("m128_n128_s4_f1", (1024, 8192), 2048, 132) == 2
    assert wgmma.splits_for("m128_n128_s4_f1", (4096, 4096), 2048, 132) == 1
    # 128-input stages: the same 4 stages a split are twice the inputs
    assert wgmma.splits_for("m128_n128_s4_sk128", (1024, 8192), 512, 132) == 4
    assert wgmma.splits_for("m128_n128_s4_sk128", (576, 512), 40, 132) == 1


def test_every_configuration_tiles_tokens_and_features_exactly_once():
    """The block order (feature tiles grouped by 8) covers every (feature tile, token tile) once, for every config."""
    for config in wgmma.CONFIGS:
        bn = wgmma.block_tokens(config)
        for n, m in ((200, 37), (11008, 2048), (1024, 8192), (4096, 33)):
            ftiles, ttiles = -(-n // wgmma.block_features(config)), -(-m // bn)
            blocks = [_block(pid, ftiles, ttiles) for pid in range(ftiles * ttiles)]
            assert sorted(blocks) == [(f, t) for f in range(ftiles) for t in range(ttiles)]


def _ring_faults(stages: int, in_flight: int, ahead: int, kb_total: int) -> list[str]:
    """The kernel's pipeline, replayed for one block: the prologue copies ``ahead`` stages; iteration kb waits until
    at most ahead - 1 copy groups are pending, passes the barrier, multiplies slot kb % stages and commits its wgmma
    group, then (one group in flight) waits until one group is pending, copies stage kb + ahead into its slot and
    (none in flight) waits for all. What can still be reading shared memory when a thread copies: its own pending
    groups, and the other warpgroup's, which the barrier of stage kb bounds only by that warpgroup's end of
    iteration kb - 1 (groups it had not retired then) plus the group of stage kb it may have issued since."""
    faults = []
    holds: list[int | None] = [None] * stages  # slot -> stage copied there
    groups: list[int | None] = []  # cp.async groups in commit order: the stage each copies (None: empty)
    for s in range(ahead):
        if s < kb_total:
            holds[s % stages] = s
        groups.append(s if s < kb_total else None)

    def pending_at_end(j: int) -> set[int]:  # wgmma groups of iteration j and before not retired at its end
        return set(range(max(0, j - in_flight + 1), j + 1))

    for kb in range(kb_total):
        done = groups[: len(groups) - (ahead - 1)]  # cp.async.wait_group ahead - 1: all older groups are complete
        if kb not in done or holds[kb % stages] != kb:
            faults.append(f"stage {kb} multiplied before its copy completed")
        own = {kb}  # at the copy: in flight both after wait_group 1 and before wait_group 0
        other = (pending_at_end(kb - 1) if kb else set()) | {kb}
        nxt = kb + ahead
        if nxt < kb_total:
            if holds[nxt % stages] in own | other:
                faults.append(f"stage {nxt} copied over stage {holds[nxt % stages]}, which a wgmma may still read")
            holds[nxt % stages] = nxt
        groups.append(nxt if nxt < kb_total else None)
    return faults


@pytest.mark.parametrize("config", list(wgmma.CONFIGS))
def test_ring_schedule(config):
    """Every configuration's ring: each multiply reads a slot holding its stage, complete; no copy overwrites a slot
    that a wgmma of either warpgroup may still read; the ring fits the H100/H200 per-block shared memory (227 KB),
    and the rings of the blocks an SM it is built for fit the SM's 228 KB with the 1 KB reserved per block."""
    stages, in_flight, ahead = wgmma.stages(config), wgmma.in_flight(config), wgmma.copies_ahead(config)
    assert ahead >= 1 and in_flight in (0, 1)
    for kb_total in (1, 2, 3, 5, 64, 172):
        assert _ring_faults(stages, in_flight, ahead, kb_total) == [], (config, kb_total)
    assert wgmma.shared_bytes(config) <= 227 * 1024
    assert wgmma.blocks_per_sm(config) in (1, 2)
    assert wgmma.blocks_per_sm(config) * (wgmma.shared_bytes(config) + 1024) <= 228 * 1024


def test_ring_model_catches_a_copy_one_stage_too_far_ahead():
    """The model is not vacuous: with one group in flight, copying STAGES - 1 stages ahead (into the slot of stage
    kb - 1) would overwrite a slot the other warpgroup's wgmma of stage kb - 1 may still be reading; so would two
    groups in flight with copies STAGES - 2 ahead."""
    assert any("may still read" in f for f in _ring_faults(5, 1, 4, 64))
    assert any("may still read" in f for f in _ring_faults(5, 2, 3, 64))
    assert _ring_faults(5, 1, 3, 64) == [] and _ring_faults(4, 0, 3, 64) == []


def test_the_source_holds_the_modelled_expressions():
    """The model above restates the kernel's index arithmetic; if the source changes, these fail first."""
    for expression in ("const int r = i >> (1 + KH), c = i & (4 * KH - 1);",
                       "sa + r * A_ROW + ((KH == 1 ? c ^ ((r >> 1) & 3) : c ^ (r & 7)) << 4),",
                       "(const char*)vals + row * K + kb * KS + c * 16",
                       "const int r = i >> (KH - 1), h = i & (KH - 1);",
                       "cp_async8(se + r * E_ROW + h * 8, meta + row * (K >> 3) + kb * E_ROW + h * 8)",
                       "const int r = i >> (2 + KH), c = i & (8 * KH - 1);",
                       "sb + (c >> 3) * B_PART + r * 128 + (((c & 7) ^ (r & 7)) << 4),",
                       "(const char*)x + tok * K * 2 + kb * (2 * KS) + c * 16",
                       "for (int i = tid; i < BM * 4 * KH; i += WG_THREADS)",
                       "for (int i = tid; i < BM * KH; i += WG_THREADS)",
                       "for (int i = tid; i < BN * 8 * KH; i += WG_THREADS)",
                       "constexpr int BM = 128 * MW, KH = KS / 64, KS_LOG = 5 + KH;",
                       "constexpr int A_ROW = KS, E_ROW = KS / 8, B_PART = BN * 128;",
                       "constexpr int A_BYTES = BM * A_ROW, E_BYTES = BM * E_ROW, B_BYTES = KH * B_PART;",
                       "constexpr unsigned long long A_SWIZZLE = KH == 1 ? 2ull : 1ull;",
                       "se = sa + A_BYTES, sb = se + E_BYTES;",
                       "const int er = (wg * MW + mt) * 64 + wq * 16 + g;",
                       ("lds_u16(se + er * E_ROW + h * 8 + t * 2) |\n"
                        "                           (lds_u16(se + (er + 8) * E_ROW + h * 8 + t * 2) << 16)"),
                       "wg_desc(sa + (wg * MW + mt) * (64 * A_ROW), 8 * A_ROW, A_SWIZZLE)", "wg_desc(sb, 1024, 1ull)",
                       "wgmma_pair<BF16, BN>(d[mt], da + h * 4, db + h * (B_PART >> 4), e[mt][h]);",
                       "<0>(d, da, db, e)", "<1>(d, da + 2, db + 4, e)",
                       "const int row = fbase + 8 * ((i >> 1) & 1), token = tok0 + 8 * (i >> 2) + 2 * t + (i & 1);",
                       "const int fbase = row0 + (wg * MW + mt) * 64 + wq * 16 + g;",
                       "constexpr int AHEAD = STAGES - 1 - INFLIGHT;",
                       "wg_cp_wait<AHEAD - 1>();", "const int next = kb + AHEAD;",
                       "const int split = blockIdx.x / tiles, pid = blockIdx.x % tiles, per_group = 8 * ttiles;",
                       "const int kb0 = (int)((long long)(K >> KS_LOG) * split / splits);",
                       "const int KB = (int)((long long)(K >> KS_LOG) * (split + 1) / splits) - kb0;",
                       "if (s < KB) load(s, kb0 + s);", "if (next < KB) load(next % STAGES, kb0 + next);",
                       "else ws[((size_t)split * M + token) * N + row] = d[mt][i];"):
        assert expression in SOURCE_TEXT, expression
    # the descriptor encoding the model decodes
    assert "((addr & 0x3FFFFu) >> 4) | (1ull << 16) | ((unsigned long long)(stride >> 4) << 32)" in SOURCE_TEXT
    assert wgmma.descriptor(0x1400, 512, 2) == (0x140 | (1 << 16) | (32 << 32) | (2 << 62))
    # every configuration is instantiated, for both dtypes (WG_ALL), with the MW/BN/KS/STAGES/INFLIGHT/MINB the
    # launcher and the model assume, under its own name
    for name, (mw, bn, ks, stages, in_flight, blocks) in wgmma.CONFIGS.items():
        assert f"WGMMA24(DT, BF, {mw}, {bn}, {ks}, {stages}, {in_flight}, {blocks}, {name})" in SOURCE_TEXT, name
        # the instruction for this tile width: the macro's text, then its use for both input types
        assert f'"wgmma.mma_async.sp.sync.aligned.m64n{bn}k32.f32." TY "." TY' in SOURCE_TEXT
        assert f'WGMMA_SP_N{bn}("f16")' in SOURCE_TEXT and f'WGMMA_SP_N{bn}("bf16")' in SOURCE_TEXT
        assert name == f"m{128 * mw}_n{bn}_s{stages}" + ("_f1" if in_flight else "") + ("_sk128" if ks == 128 else "")
        assert ks in (64, 128)
    assert SOURCE_TEXT.count("WGMMA24(") == 1 + len(wgmma.CONFIGS)  # the macro, then one line per configuration
    assert "WG_ALL(f16, false)\nWG_ALL(bf16, true)" in SOURCE_TEXT
    # the blocks an SM reach the entry point's launch bounds and the template's checks of registers and shared memory
    assert "extern \"C\" __global__ void __launch_bounds__(WG_THREADS, B)" in SOURCE_TEXT
    assert "wgmma24<BF, MW, BN, KS, S, F, B>(x, vals, meta, y, ws, M, N, K, splits);" in SOURCE_TEXT
    assert "static_assert(MINB == 1 || (MINB == 2 && MW * BN <= 128)" in SOURCE_TEXT
    assert "static_assert(MINB * (STAGES * STAGE_BYTES + 1024 + 1024) <= 228 * 1024" in SOURCE_TEXT
    # the waits: none in flight after a stage (0), or one (1: the previous stage's group retired, the slot two stages
    # back refilled after it), the last stage's products before the epilogue; with one in flight the body is
    # unrolled twice and the metadata registers of the stage retired are kept alive up to its wait
    assert re.findall(r"wgmma_wait<(\w+)>\(\)", SOURCE_TEXT) == ["1", "0", "0"]
    assert "#pragma unroll(INFLIGHT + 1)\n    for (int kb = 0; kb < KB; ++kb) {" in SOURCE_TEXT
    assert ("wgmma_wait<1>();  // stage kb - 1's products are finished, stage kb's still in flight\n#pragma unroll\n"
            "            for (int mt = 0; mt < MW; ++mt) {\n#pragma unroll\n                for (int h = 0; h < KH; ++h) {\n"
            "                    keep_alive(e_prev[mt][h], K, base);") in SOURCE_TEXT


def test_stored_position_words_are_the_metadata_registers():
    """The stored meta bytes, read as a lane's two 16-bit words, are the positions PTX expects in that register:
    group q of word 4h + t at bits 4q (first | second << 2) is inputs 64h + 16t + 4q .. + 3 of the stage (h: the
    64-input half of a 128-input stage; 0 for a 64-input one)."""
    w = _weight(128, 128, seed=3, dtype=torch.float16)
    fmt = Sparse24.compress(w)
    positions = fmt.positions()  # (128, 32, 2)
    for half in range(2):
        for tile in range(2):
            for warp in range(4):
                for lane in range(32):
                    reg = wgmma.metadata_register(fmt.meta, tile, warp, lane, half)
                    g, t = lane >> 2, lane & 3
                    for high, row in ((0, tile * 64 + warp * 16 + g), (1, tile * 64 + warp * 16 + g + 8)):
                        for q in range(4):
                            bits = (reg >> (16 * high + 4 * q)) & 0xF
                            assert (bits & 3, bits >> 2) == tuple(positions[row, 16 * half + 4 * t + q].tolist())


def test_ptx_readings_agree_with_cute_layouts():
    """A second source for the two register layouts the model reads off PTX figures: CUTLASS's CuTe layouts
    (thread, value) -> index m + 64 k of the 64 x K tile. The accumulator (CLayout_64xN): thread shape (4, 8, 4)
    strides (128, 1, 16), value shape (2, 2, N/8) strides (64, 8, 512). The m64nNk32 f16 metadata (ELayout_64x32,
    one bit per input): thread shape (2, 2, 8, 4) strides (1024, 0, 1, 16), value shape (16, 2) strides (64, 8)
    (lanes 4g+2, 4g+3 repeat lanes 4g, 4g+1: the selector picks which pair the hardware reads)."""
    def split(index: int, shape: tuple[int, ...]) -> list[int]:
        out = []
        for size in shape:
            out.append(index % size)
            index //= size
        return out

    for n in (64, 128, 256):
        for thread in range(128):
            for value in range(n // 2):
                t0, g, w = split(thread, (4, 8, 4))
                v0, v1, v2 = split(value, (2, 2, n // 8))
                index = 128 * t0 + g + 16 * w + 64 * v0 + 8 * v1 + 512 * v2
                row, token = index % 64, index // 64
                assert _accumulator_index(row, token) == (w, thread % 32, value)
    for thread in range(128):
        t0, t1, g, w = split(thread, (2, 2, 8, 4))
        for value in range(32):
            v0, v1 = split(value, (16, 2))
            index = 1024 * t0 + 0 * t1 + g + 16 * w + 64 * v0 + 8 * v1
            row, k = index % 64, index // 64
            # the model: the nibble of chunk k // 4 of row ``row`` sits in lane 4g + 2 * selector + (k // 16),
            # bits 16 * (row % 16 >= 8) + 4 * ((k // 4) % 4); one ELayout bit per input of that nibble
            assert (w, g, k // 16, (row % 16) >= 8) == (row // 16, row % 8, t0, v1)
            assert 16 * v1 + v0 == 16 * ((row % 16) >= 8) + 4 * ((k // 4) % 4) + k % 4


def _gpu_like(monkeypatch, capability=(9, 0), unverified=True) -> None:
    monkeypatch.setattr(cuda_ops, "_module", lambda *args, **kwargs: None)
    monkeypatch.setattr(cuda_ops, "unverified_offered", lambda: unverified)
    monkeypatch.setattr(wgmma, "capability", lambda device: capability)
    monkeypatch.setattr(wgmma, "sm_count", lambda device: 132)


def test_offered_only_on_hopper_and_uncleared_configurations_only_on_request(monkeypatch):
    """Prompts (32 tokens on) on a 9.0 GPU get the cleared wgmma configuration beside the mma.sp GEMM and the expand
    path, with or without SECATEURS_UNVERIFIED_KERNELS=1; not on an sm_80 or sm_100 GPU, not below 32 tokens, not
    where K % 64 != 0; a configuration not yet cleared on a GPU only under the opt-in."""
    fmt = Sparse24.compress(_weight(256, 256, seed=4, dtype=torch.float16))
    _gpu_like(monkeypatch)
    names = {m: list(fmt.cuda_candidates(m)) for m in (8, 32, 128, 512, 2048, 8192)}
    assert not any("wgmma" in name for name in names[8])
    every = [f"cuda_wgmma24_{c}" for c in wgmma.CONFIGS]
    for m in (32, 128, 512, 2048, 8192):
        assert [n for n in names[m] if "wgmma" in n] == every, m
        assert any(n.startswith("cuda_gemm24") for n in names[m]) and "expand_cublas" in names[m]
        assert names[m].index("expand_cublas") > max(i for i, n in enumerate(names[m]) if "wgmma" in n)
    long_k = Sparse24.compress(_weight(256, 1024, seed=9, dtype=torch.float16))  # 8 blocks of 128 x 128 on 132 SMs
    names_long = [n for n in long_k.cuda_candidates(512) if "wgmma" in n]
    # at least 4 stages a split: 1024 inputs are 16 stages of 64, 8 of 128
    assert names_long == [split for c in wgmma.CONFIGS for split in
                          (f"cuda_wgmma24_{c}", f"cuda_wgmma24_{c}_k{4 if wgmma.stage_k(c) == 64 else 2}")]
    narrow = Sparse24.compress(_weight(256, 96, seed=5, dtype=torch.float16))  # K % 64 != 0
    assert not any("wgmma" in n for n in narrow.cuda_candidates(512))
    odd = Sparse24.compress(_weight(256, 192, seed=5, dtype=torch.float16))  # K % 128 != 0: 64-input stages only
    assert [n for n in odd.cuda_candidates(512) if "wgmma" in n] == [
        f"cuda_wgmma24_{c}" for c in wgmma.CONFIGS if wgmma.stage_k(c) == 64]
    with pytest.raises(ValueError, match="K % 128 == 0"):
        wgmma.sparse24_wgmma(torch.zeros(40, 192, dtype=torch.float16), odd.values, odd.meta, "m128_n128_s4_sk128", 1)
    for capability in ((8, 0), (8, 9), (10, 0)):
        _gpu_like(monkeypatch, capability=capability)
        assert not any("wgmma" in n for n in fmt.cuda_candidates(512)), capability
    _gpu_like(monkeypatch, unverified=False)  # the configurations that were the fastest path somewhere on an H100
    assert [n for n in fmt.cuda_candidates(512) if "wgmma" in n] == [
        f"cuda_wgmma24_{c}" for c in wgmma.CONFIGS if c in wgmma.CLEARED]
    assert wgmma.CLEARED.isdisjoint(wgmma.DOMINATED) and wgmma.CLEARED | wgmma.DOMINATED == set(wgmma.CONFIGS)
    monkeypatch.setattr(wgmma, "CLEARED", frozenset({"m128_n128_s4"}))  # one added later stays behind the opt-in
    assert [n for n in fmt.cuda_candidates(512) if "wgmma" in n] == ["cuda_wgmma24_m128_n128_s4"]
    monkeypatch.undo()  # a CPU weight under the opt-in alone (as other formats' tests run): nothing, no error
    monkeypatch.setattr(cuda_ops, "_module", lambda *args, **kwargs: None)
    monkeypatch.setattr(cuda_ops, "unverified_offered", lambda: True)
    assert not any("wgmma" in n for n in fmt.cuda_candidates(512))


def test_the_candidates_launch_the_source_kernel_with_its_signature(monkeypatch):
    """The Python side of every wgmma candidate on a CPU, whole and split K: cuda_ops._launch replaced by the CPU model,
    fed exactly what the launcher passes (kernel name, blocks, warps, dynamic shared memory, tensors and integers in
    the order of sparse24_wgmma.cu's entry points), and the launcher's sum of the split workspace; so a wrong name,
    argument order, grid, shared size or reduction fails here, not on a GPU. Every candidate multiplies the same x,
    so the model's product is computed once per tile, stage and split count (configurations differing only in their
    ring share it)."""
    source = wgmma.SOURCE.read_text()
    assert ("wgmma24_##DT##_##NAME(const u16* x, const u16* vals, const u8* meta, u16* y, float* ws, int M, int N,"
            "\\\n                              int K, int splits)") in source
    w = _weight(100, 512, seed=11, dtype=torch.float16)
    fmt = Sparse24.compress(w)
    _gpu_like(monkeypatch)
    launched = []
    products: dict[tuple[int, ...], torch.Tensor] = {}  # (MW, BN, inputs a stage, splits) -> the model's product

    def fake_launch(name, grid, tensors, ints, warps=cuda_ops.WARPS, source=None, shared=0, int_type=None):
        config = name.removeprefix("wgmma24_f16_")
        x, values, meta, y, ws = tensors
        m, n, k, splits = ints
        launched.append((config, splits))
        key = (*wgmma.CONFIGS[config][:3], splits)
        if key not in products:
            products[key] = emulate(x, fmt, config, splits)
        assert source == wgmma.SOURCE and warps == wgmma.THREADS // 32 and shared == wgmma.shared_bytes(config)
        assert (m, k) == tuple(x.shape) and (n, k) == fmt.shape and x.is_contiguous() and x.data_ptr() % 16 == 0
        assert values is fmt.values and meta is fmt.meta and y.shape == (m, n) and y.dtype == x.dtype
        tiles = -(-n // wgmma.block_features(config)) * -(-m // wgmma.block_tokens(config))
        assert grid == tiles * splits and int_type is None
        if splits == 1:
            assert ws is y
            y.copy_(products[key].to(y.dtype))
        else:
            assert ws.shape == (splits, m, n) and ws.dtype == torch.float32
            ws.zero_()
            ws[0].copy_(products[key].float())

    monkeypatch.setattr(cuda_ops, "_launch", fake_launch)
    x = torch.randn(33, 512, generator=torch.Generator().manual_seed(12)).half()
    candidates = {name: call for name, call in fmt.cuda_candidates(64).items() if "wgmma" in name}
    assert any(name.endswith("_k2") for name in candidates) and any("_k" not in name for name in candidates)
    for name, call in candidates.items():
        got = call(x)
        assert got.dtype == torch.float16 and got.shape == (33, 100)
        torch.testing.assert_close(got.double(), x.double() @ w.double().T, rtol=2e-3, atol=2e-3, msg=name)
    assert {splits for _, splits in launched} == {1, 2}
    assert {config for config, _ in launched} == set(wgmma.CONFIGS)


def test_a_build_failure_offers_nothing(monkeypatch):
    fmt = Sparse24.compress(_weight(256, 256, seed=6, dtype=torch.float16))
    _gpu_like(monkeypatch)

    def fail(*args, **kwargs):
        raise RuntimeError("NVRTC cannot target sm_90a")

    monkeypatch.setattr(cuda_ops, "_module", fail)
    assert wgmma.candidates(fmt.values, fmt.meta, fmt.shape, 512) == {}
    from secateurs.kernels.linear import fallback_notes

    assert any("wgmma.sp GEMM was not built (NVRTC cannot target sm_90a)" in line for line in fallback_notes())


def test_sm90a_target_only_for_the_wgmma_source_and_cache_keys_unchanged(fake_nvrtc, tmp_path):
    """``_compile`` asks NVRTC for sm_90a only for the source registered with the suffix; the other sources'
    options and cache file names are what they were (their cached cubins stay valid)."""
    fake_nvrtc.archs = [80, 90, 100]
    calls = fake_nvrtc.options
    cuda_ops._compile((9, 0), cuda_ops.SOURCE)
    cuda_ops._compile((9, 0), wgmma.SOURCE, cuda_ops.ARCH_SUFFIX[wgmma.SOURCE])
    with pytest.raises(RuntimeError, match="sm_103a"):
        cuda_ops._compile((10, 3), wgmma.SOURCE, "a")  # no native target: no PTX fallback for sm_XYa
    assert calls[0] == ["--gpu-architecture=sm_90", *cuda_ops.OPTIONS] and calls[1][0] == "--gpu-architecture=sm_90a"
    names = sorted(p.name for p in tmp_path.iterdir())
    assert sorted(n.split("-")[0] + " " + n.rsplit("-", 2)[1] for n in names) == ["sparse24_wgmma sm90a", "sparse_gemv sm90"]
    # the key of a source without a suffix, computed as _compile did before ARCH_SUFFIX existed
    text, common = cuda_ops.SOURCE.read_bytes(), cuda_ops.COMMON.read_bytes()
    options = ("--gpu-architecture=sm_90", *cuda_ops.OPTIONS)
    digest = hashlib.sha256(text + b"\0" + common + "\0".join(options).encode()).hexdigest()[:16]
    assert f"sparse_gemv-{digest}-sm90-nvrtc13.5.cubin" in names
    assert cuda_ops.ARCH_SUFFIX == {wgmma.SOURCE: "a"}


def test_gpu_check_withholds_a_configuration_whose_first_launch_fails(monkeypatch):
    """benchmarks/gpu_kernel_check.py makes the wgmma first launches in a child process: all in one; when that one
    dies (a fault), one child per configuration, and the one that dies again is reported and never offered
    afterwards in the checking process."""
    monkeypatch.setenv(cuda_ops.UNVERIFIED_ENV, "0")  # the script defaults it to 1 for its own process only
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    check = importlib.import_module("gpu_kernel_check")
    monkeypatch.setattr(wgmma, "WITHHELD", set())
    monkeypatch.setattr(wgmma, "offered", lambda device: True)
    children = []

    def child(command, **kwargs):
        children.append(command[-1])
        faults = command[-1] in ("all", "m128_n256_s4_f1")
        return subprocess.CompletedProcess(command, -11 if faults else 0, "" if faults else f"{command[-1]}: ok\n",
                                           "CUDA error: an illegal instruction was encountered\n" if faults else "")

    monkeypatch.setattr(check.subprocess, "run", child)
    assert check.first_launches() == 1
    assert children == ["all", *wgmma.CONFIGS]
    assert wgmma.WITHHELD == {"m128_n256_s4_f1"}
    assert wgmma.configs() == [c for c in wgmma.CONFIGS if c in wgmma.CLEARED and c != "m128_n256_s4_f1"]
    children.clear()
    monkeypatch.setattr(check.subprocess, "run", lambda command, **kwargs: (
        children.append(command[-1]), subprocess.CompletedProcess(command, 0, "ok\n", ""))[1])
    assert check.first_launches() == 0 and children == ["all"]  # all right: one child only


def test_gpu_check_only_takes_comma_separated_prefixes(monkeypatch):
    """``--only wgmma,expand_pipelined`` picks the candidates of either prefix (with or without ``cuda_``) and no
    other, so one call checks the new kernels of several formats; an empty ``--only`` picks every candidate."""
    monkeypatch.setenv(cuda_ops.UNVERIFIED_ENV, "0")
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    check = importlib.import_module("gpu_kernel_check")
    only = "wgmma,expand_pipelined"
    assert check.selected("cuda_wgmma24_m128_n128_s4", only) and check.selected("expand_pipelined_c2", only)
    assert not check.selected("expand_cublas", only) and not check.selected("cuda_gemm24_m128_n128_s4", only)
    assert check.selected("expand_cublas", "")


def _tool(name: str) -> str | None:
    """A CUDA toolkit program: on PATH, in /usr/local/bin or /usr/local/cuda/bin, or (cuobjdump) the copy Triton
    ships with its NVIDIA backend; None where there is none (CI has no toolkit)."""
    found = shutil.which(name)
    places = [Path("/usr/local/bin") / name, Path("/usr/local/cuda/bin") / name]
    triton = importlib.util.find_spec("triton")
    if triton is not None and triton.submodule_search_locations:
        places += [Path(where) / "backends" / "nvidia" / "bin" / name for where in triton.submodule_search_locations]
    return found or next((str(place) for place in places if place.exists()), None)


def _build_sm90a(source: Path, out: Path) -> subprocess.CompletedProcess:
    """nvcc's sm_90a cubin of a kernel source (common.cuh beside it), with ptxas's resource report on stderr."""
    nvcc = _tool("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc here")
    return subprocess.run([nvcc, "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-cubin", "-Xptxas", "-v",
                           "-o", str(out), str(source)], capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def sm90a_cubin(tmp_path_factory) -> tuple[Path, str]:
    """The source as it is, built once for the tests below: (cubin, ptxas's report)."""
    out = tmp_path_factory.mktemp("wgmma") / "wgmma.cubin"
    done = _build_sm90a(wgmma.SOURCE, out)
    assert done.returncode == 0, done.stderr[-2000:]
    return out, done.stderr


def test_nvcc_builds_every_entry_point_for_sm90a_without_serialized_wgmma(sm90a_cubin):
    """nvcc (where a toolkit is installed) assembles the source for sm_90a: every entry point present, no register
    spills, registers for the blocks an SM it is built for (two blocks of 256 threads: 128 a thread of the
    64K-register file), and no ptxas C7515 note (wgmma serialized because other instructions touch the accumulators
    between a wgmma and its wait, which would cost the overlap the ring is built for)."""
    out, report = sm90a_cubin
    cubin = out.read_bytes()
    used = dict(re.findall(r"Compiling entry function '(\w+)'.*?Used (\d+) registers", report, re.DOTALL))
    for dtype in ("f16", "bf16"):
        for config in wgmma.CONFIGS:
            assert f"wgmma24_{dtype}_{config}".encode() in cubin
            registers = int(used[f"wgmma24_{dtype}_{config}"])
            assert registers * wgmma.THREADS * wgmma.blocks_per_sm(config) <= 65536, (config, registers)
    assert "C7515" not in report and "serialized" not in report
    assert re.findall(r"(\d+) bytes spill stores", report) and all(
        count == "0" for count in re.findall(r"(\d+) bytes spill stores", report))


# ---- the metadata register of a wgmma in flight, in the SASS ----
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P(?:T|\d+)\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
# Opcodes whose first register operand is read, not written (after any leading predicate operands).
_NO_REGISTER_RESULT = ("ISETP", "FSETP", "DSETP", "HSETP2", "PSETP", "PLOP3", "R2P", "WARPSYNC", "BAR", "BRA",
                       "BRX", "JMX", "CALL", "RET", "EXIT", "BSSY", "BSYNC", "WARPGROUP", "DEPBAR")


def _sass(cubin: Path) -> dict[str, list[tuple[int, str, str, list[str]]]]:
    """cuobjdump -sass of a cubin: entry point -> its instructions (address, predicate, opcode, operands)."""
    cuobjdump = _tool("cuobjdump")
    if cuobjdump is None:
        pytest.skip("no cuobjdump here")
    text = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    functions = {}
    for chunk in re.split(r"\n\s*Function : ", text)[1:]:
        name, body = chunk.split("\n", 1)
        functions[name.strip()] = [(int(a, 16), (p or "").strip(), op, [o.strip() for o in args.split(",") if o.strip()])
                                   for a, p, op, args in _SASS_LINE.findall(body)]
    return functions


def _registers_written(op: str, args: list[str]) -> set[int]:
    """The general registers an instruction writes: its first register operand after any predicate results, over
    the instruction's width (.64 / .WIDE: 2, .128: 4; an HGMMA's accumulators: N/2 of 64xNxK)."""
    if op.split(".")[0] in _NO_REGISTER_RESULT:
        return set()
    operands = [a for a in args if not re.fullmatch(r"!?U?P(T|\d+)", a)]
    first = re.fullmatch(r"R(\d+)(\.reuse)?", operands[0]) if operands else None
    if first is None:
        return set()
    width = 1
    if op.startswith("HGMMA"):
        width = int(re.search(r"\.64x(\d+)x", op).group(1)) // 2
    elif ".128" in op:
        width = 4
    elif ".64" in op or ".WIDE" in op:
        width = 2
    return set(range(int(first.group(1)), int(first.group(1)) + width))


def _metadata_writes_in_flight(code: list[tuple[int, str, str, list[str]]]) -> list[str]:
    """Every write of a sparse HGMMA's metadata register (its fourth operand) on any path from that HGMMA to the
    WARPGROUP.DEPBAR that retires its group. Groups: an HGMMA marked gsb0 closes one (wgmma.commit_group), taking
    the unmarked HGMMAs before it; ``WARPGROUP.DEPBAR.LE gsb0, N`` retires every group but the newest N. The walk
    follows branches both ways and calls into their callees, so it sees every instruction that may run meanwhile."""
    at = {address: i for i, (address, *_rest) in enumerate(code)}
    faults = []
    for i, (address, _, op, args) in enumerate(code):
        if not op.startswith("HGMMA") or ".SP." not in op:
            continue
        meta = int(re.fullmatch(r"R(\d+)(\.reuse)?", args[3]).group(1))
        seen, todo = set(), [(i + 1, "gsb0" in args, 0)]  # (next instruction, its group committed, groups after)
        while todo:
            state = todo.pop()
            j, committed, after = state
            if state in seen or j >= len(code):
                continue
            seen.add(state)
            at_j, pred, op_j, args_j = code[j]
            if pred == "@!PT":  # never executed
                todo.append((j + 1, committed, after))
                continue
            if op_j.startswith("HGMMA") and "gsb0" in args_j:
                committed, after = True, after + committed
            if op_j.startswith("WARPGROUP.DEPBAR") and committed and after >= int(args_j[-1], 16):
                continue  # retired on this path
            if meta in _registers_written(op_j, args_j):
                faults.append(f"{op} at {address:#x} reads R{meta}, written at {at_j:#x} ({op_j}) before its wait")
            base = op_j.split(".")[0]
            assert base not in ("BRX", "JMX"), "indirect branches are not followed"
            if base in ("EXIT", "RET") and not pred:
                continue
            if base in ("BRA", "CALL"):
                todo.append((at[int(args_j[-1], 16)], committed, after))
                if base == "BRA" and not pred and len(args_j) == 1:
                    continue
            todo.append((j + 1, committed, after))
    return faults


def test_no_metadata_register_is_written_while_its_wgmma_is_in_flight(sm90a_cubin):
    """The hazard that made four earlier in-flight configurations multiply wrongly on an H100, checked in nvcc's SASS
    of every entry point: no instruction writes a sparse HGMMA's metadata register between that HGMMA and the wait
    that retires its group. The in-flight configurations do leave a group running (a wait for all but one), the
    others wait for all."""
    functions = _sass(sm90a_cubin[0])
    for config in wgmma.CONFIGS:
        for dtype in ("f16", "bf16"):
            code = functions[f"wgmma24_{dtype}_{config}"]
            assert sum(op.startswith("HGMMA") and ".SP." in op for _, _, op, _ in code) >= 2, config
            waits = {args[-1] for _, _, op, args in code if op.startswith("WARPGROUP.DEPBAR")}
            assert waits == ({"0x0", "0x1"} if wgmma.in_flight(config) else {"0x0"}), (config, waits)
            assert _metadata_writes_in_flight(code) == [], (config, dtype)


def test_the_sass_check_catches_a_loop_with_one_wgmma_instruction(tmp_path):
    """The check above is not vacuous: without the loop unrolled twice, the loop's one HGMMA reads one physical
    register every trip, and ptxas writes the next stage's metadata into it while the previous stage's group is in
    flight (keep_alive keeps the value, which ptxas then moves to another register), as in the four configurations
    that multiplied wrongly on an H100; the configuration that waits for every group stays clean."""
    source = SOURCE_TEXT.replace("#pragma unroll(INFLIGHT + 1)\n", "").replace("WG_ALL(bf16, true)\n", "")
    assert source != SOURCE_TEXT
    (tmp_path / "sparse24_wgmma.cu").write_text(source)
    shutil.copy(cuda_ops.COMMON, tmp_path / "common.cuh")
    done = _build_sm90a(tmp_path / "sparse24_wgmma.cu", tmp_path / "variant.cubin")
    assert done.returncode == 0, done.stderr[-2000:]
    functions = _sass(tmp_path / "variant.cubin")
    for config in wgmma.CONFIGS:
        faults = _metadata_writes_in_flight(functions[f"wgmma24_f16_{config}"])
        assert bool(faults) == bool(wgmma.in_flight(config)), (config, faults)

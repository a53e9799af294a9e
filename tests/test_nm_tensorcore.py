"""The N:M tensor-core kernel (``kernels/cuda/nm_tc.cu``, 4:8 and 8:16 at 5-64 tokens) and its ring form
(``tc_gemm_ring``: stages of stored values and positions in a register ring) on a CPU: their index math
emulated lane by lane (which stored values and positions each thread loads, where it writes them in the swizzled
shared tile, what each ``ldmatrix`` gives each lane, the ``mma.m16n8k16`` fragment ownership of the PTX ISA, the
split-K workspace and its fixed-order sum), run through the real launcher with ``cuda_ops._launch`` replaced by the
emulation and compared with the float64 dense product; a broken swizzle or fragment map fails it; the candidates
are offered (by default: they matched float64 on an H100) only at 5-64 rows, the ring candidates last (by default
the depth timed fastest on an H100, every depth under the opt-in; never for a CPU weight); the source compiles with
nvcc where it is installed, with no spills, and in the ring kernels' SASS every load of stored bytes is issued stages
ahead of its first use."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch

from secateurs.kernels import Nm48, Nm816, cuda_ops, nm
from secateurs.sparsity.masks import nm_mask

THREADS, ROWS, WARPS = 128, 64, 4
LANE = torch.arange(32)
G, T = LANE >> 2, LANE & 3


def swizzled(row: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
    """The kernel's tc_at: 16-byte chunk ``chunk`` of 128-byte row ``row`` sits at chunk ``chunk ^ (row & 7)``."""
    return chunk ^ (row & 7)


def plain(row: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
    return chunk


A_MAP = ((0, 0), (8, 0), (0, 8), (8, 8))
"""PTX ISA m16n8k16 A fragment: register i of lane (g, t) holds row g + A_MAP[i][0], columns 2t + A_MAP[i][1] + (0, 1)."""


def _weight(kind: str, rows: int, cols: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    n, m = (4, 8) if kind == "4:8" else (8, 16)
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    w = w * nm_mask(w.abs(), n, m)
    if kind == "8:16":  # some groups that 4:8 could not hold: all eight kept values in one half
        w[0, :16] = 0.0
        w[0, 8:16] = torch.arange(1, 9, dtype=torch.float32)
    return w.to(dtype)


def _fmt(kind: str, w: torch.Tensor):
    return (Nm48 if kind == "4:8" else Nm816).compress(w)


def _dense_chunks(kind: str, tables: list[torch.Tensor], vals: torch.Tensor, row: torch.Tensor, j: torch.Tensor,
                  n: int, k: int) -> torch.Tensor:
    """(units, 16) float64: what F::load reads for (row, chunk j) and F::expand writes: the chunk's eight values
    (one 16-byte load at halves row * K/2 + 8j) at the positions decoded from the stored bytes."""
    e = torch.arange(8)
    v = vals[(row * (k // 2) + 8 * j).unsqueeze(1) + e]
    if kind == "4:8":
        meta, high = tables
        word = meta[row * (k // 8) + 2 * j] | (meta[row * (k // 8) + 2 * j + 1] << 8)
        h = high[row * (k // 16) + j]
        pair, second = e >> 1, e & 1
        p = ((word.unsqueeze(1) >> (2 * pair + 8 * second)) & 3) | (((h.unsqueeze(1) >> (pair + 4 * second)) & 1) << 2)
        where = 8 * (pair >> 1) + p
    else:
        (pos,) = tables
        where = (pos[row * (k // 16) + j].unsqueeze(1) >> (4 * e)) & 15
    return torch.zeros(len(row), 16, dtype=torch.float64).scatter_(1, where, v)


def _ldmatrix_x4(memory: torch.Tensor, address: torch.Tensor) -> torch.Tensor:
    """(warps, 32 lanes, 4 registers, 2 halves): lane 8i + r names row r of matrix i (8 halves at ``address``);
    register i of lane l holds matrix i's row l / 4, halves 2 (l % 4), +1."""
    rows = memory[address.unsqueeze(-1) + torch.arange(8)]  # (warps, 32, 8)
    matrix_row = 8 * torch.arange(4).view(1, 4, 1) + (LANE >> 2).view(32, 1, 1)
    half = 2 * (LANE & 3).view(32, 1, 1) + torch.arange(2).view(1, 1, 2)
    return rows[:, matrix_row, half]


def _a_matrix(a: torch.Tensor, a_map) -> torch.Tensor:
    """(warps, 16, 16) A operand of mma.m16n8k16 from the lanes' four registers (warps, 32, 4, 2) by the PTX ISA's
    ownership (``a_map``); NaN where no lane supplies an element."""
    rows = G.view(32, 1, 1) + torch.tensor([r for r, _ in a_map]).view(1, 4, 1)
    cols = 2 * T.view(32, 1, 1) + torch.tensor([c for _, c in a_map]).view(1, 4, 1) + torch.arange(2).view(1, 1, 2)
    matrix = torch.full((a.shape[0], 16, 16), float("nan"), dtype=torch.float64)
    matrix[:, rows, cols] = a
    return matrix


def _b_matrix(b: torch.Tensor) -> torch.Tensor:
    """(16, 8) B operand (k x n) from the lanes' two registers (32, 2, 2): b0 = k 2t, 2t+1 of column g, b1 = k 2t+8,
    2t+9."""
    rows = 2 * T.view(32, 1, 1) + 8 * torch.arange(2).view(1, 2, 1) + torch.arange(2).view(1, 1, 2)
    matrix = torch.full((16, 8), float("nan"), dtype=torch.float64)
    matrix[rows, G.view(32, 1, 1).expand(32, 2, 2)] = b
    return matrix


def ring_slot(q: int, depth: int) -> int:
    """tc_gemm_ring's slot for the load issued at unrolled step q: the one stage k - 1 left, ``(q + D - 1) % D``."""
    return (q + depth - 1) % depth


def _stages(kb0: int, kb1: int, load: Callable[[int], list], depth: int, slot: Callable[[int, int], int]):
    """(stage, its units) in the order the kernel stores them. depth 0: tc_gemm (stage kb's units loaded one stage
    ahead into the one register set); depth D: tc_gemm_ring's register ring, its prologue (stages kb0 .. kb0 + D - 2
    into slots 0 .. D - 2) and its loop unrolled D times (step q stores slot q after loading stage k + D - 1 into
    ``slot(q, D)``), so a load into a slot still to be stored shows as a wrong product."""
    if not depth:
        yield from ((kb, load(kb)) for kb in range(kb0, kb1))
        return
    ring: list = [None] * depth
    for p in range(depth - 1):
        if kb0 + p < kb1:
            ring[p] = load(kb0 + p)
    for kb in range(kb0, kb1, depth):
        for q in range(depth):
            k = kb + q
            if k < kb1:
                if k + depth - 1 < kb1:
                    ring[slot(q, depth)] = load(k + depth - 1)
                yield k, ring[q]


def emulate_tc(kind: str, grid: int, tensors: tuple[torch.Tensor, ...], ints: tuple[int, ...], tokens: int,
               read: Callable = swizzled, a_map=A_MAP, b_regs=(0, 1), depth: int = 0,
               slot: Callable[[int, int], int] = ring_slot) -> torch.Tensor:
    """nm_tc.cu's tc_nm (``depth`` 0) or its ring form (``depth`` stages in registers, ``slot`` the ring's load slot)
    for every block of ``grid``, lane by lane: (S, M, N) float64 of what each block stores
    (split s's partial sums; NaN where nothing is stored). Shared memory starts as NaN, so a read of a place no
    thread wrote shows. ``read``, ``a_map``, ``b_regs`` and ``slot`` are the ldmatrix swizzle, the A fragment map,
    which ldmatrix registers are b0, b1 of the first k16 step and the ring's slot (broken on purpose by the
    sensitivity tests)."""
    x, vals, *tables = (t.reshape(-1) for t in tensors[:-2])
    m, n, k, splits = ints
    x, vals = x.double(), vals.double()
    tables = [t.to(torch.int64) & 0xFFFFFFFF for t in tables]
    nt = tokens // 8
    out = torch.full((splits, m, n), float("nan"), dtype=torch.float64)
    tiles, chunks = -(-n // ROWS), k // 16
    stages = -(-chunks // 4)
    tid = torch.arange(THREADS)
    warp = torch.arange(WARPS).unsqueeze(1)
    c = tid & 3
    units = range(ROWS * 4 // THREADS)  # unit i of each thread: tile row (tid + 128 i) / 4, chunk c
    for block in range(grid):
        tile, rest = block % tiles, block // tiles
        s, tt = rest % splits, rest // splits
        row0, tok0 = tile * ROWS, tt * tokens
        kb0, kb1 = s * stages // splits, (s + 1) * stages // splits
        sw = torch.full((2, ROWS * 64), float("nan"), dtype=torch.float64)
        sx = torch.full((2, tokens * 64), float("nan"), dtype=torch.float64)
        d = torch.zeros(nt, WARPS, 16, 8, dtype=torch.float64)

        def load_w(kb: int, row0: int = row0) -> list[torch.Tensor]:
            """F::load of stage kb's units (a clamped chunk past K): the dense chunks their stored bytes give."""
            return [_dense_chunks(kind, tables, vals, (row0 + ((tid + THREADS * i) >> 2)).clamp(max=n - 1),
                                  (kb * 4 + c).clamp(max=chunks - 1), n, k) for i in units]

        for kb, loaded in _stages(kb0, kb1, load_w, depth, slot):
            cur = (kb - kb0) & 1
            for i in units:  # store_w: zeros for a row past N or a chunk past K
                r = (tid + THREADS * i) >> 2
                live = (row0 + r < n) & (kb * 4 + c < chunks)
                dense = torch.where(live.unsqueeze(1), loaded[i], torch.zeros_like(loaded[i]))
                for half in range(2):
                    at = r * 64 + 8 * swizzled(r, 2 * c + half)
                    sw[cur][at.unsqueeze(1) + torch.arange(8)] = dense[:, 8 * half: 8 * half + 8]
            for i in range(tokens * 8 // THREADS):  # load_x: cp.async, zero-filled past M and K
                idx = tid + THREADS * i
                r, cx = idx >> 3, idx & 7
                token, start = tok0 + r, kb * 64 + cx * 8
                ok = (token < m) & (start < k)
                src = token.clamp(max=m - 1) * k + torch.where(ok, start, 0)
                data = torch.where(ok.unsqueeze(1), x[src.unsqueeze(1) + torch.arange(8)], torch.zeros(1, dtype=torch.float64))
                sx[cur][(r * 64 + 8 * swizzled(r, cx)).unsqueeze(1) + torch.arange(8)] = data
            ra = warp * 16 + (LANE & 7) + ((LANE >> 3) & 1) * 8
            rb = LANE & 7
            for h in range(2):  # mma.m16n8k16: d (warps, 16 features, 8 tokens) += A @ B, k16 steps 2h and 2h + 1
                a = [_a_matrix(_ldmatrix_x4(sw[cur], ra * 64 + 8 * read(ra, 4 * h + 2 * kk + (LANE >> 4))), a_map)
                     for kk in range(2)]
                for j in range(nt):  # every warp reads the same x fragments
                    b = _ldmatrix_x4(sx[cur], ((j * 8 + rb) * 64 + 8 * read(j * 8 + rb, 4 * h + (LANE >> 3))).unsqueeze(0))[0]
                    first, second = list(b_regs), [2 + r for r in b_regs]
                    d[j] += a[0] @ _b_matrix(b[:, first]) + a[1] @ _b_matrix(b[:, second])
        for j in range(nt):  # the epilogue: c_q of lane (g, t) is row g + 8 (q / 2), token 2t + q % 2
            for q in range(4):
                row = row0 + warp * 16 + G + (q >> 1) * 8
                token = (tok0 + j * 8 + 2 * T + (q & 1)).expand(WARPS, 32)
                acc = d[j][:, G + (q >> 1) * 8, 2 * T + (q & 1)]
                keep = (row < n) & (token < m)
                assert out[s, token[keep], row[keep]].isnan().all(), "an output stored twice"
                out[s, token[keep], row[keep]] = acc[keep]
    return out


class Emulated:
    """``cuda_ops._launch`` replaced by the emulation: checks what the launcher passes and keeps each launch's
    float64 result (``results``, the product before the cast to the input dtype)."""

    def __init__(self, read: Callable = swizzled, a_map=A_MAP, b_regs=(0, 1),
                 slot: Callable[[int, int], int] = ring_slot) -> None:
        self.read, self.a_map, self.b_regs, self.slot = read, a_map, b_regs, slot
        self.partials: dict[int, torch.Tensor] = {}
        self.results: list[torch.Tensor] = []
        self.names: list[str] = []

    source = nm.TC_SOURCE

    def __call__(self, name, grid, tensors, ints, warps=cuda_ops.WARPS, source=None, shared=0, int_type=None):
        assert source == self.source and shared == 0
        self.names.append(name)
        if name.startswith("tcsum_"):
            work, y = tensors
            count, splits = ints
            assert warps == cuda_ops.WARPS and grid * warps * 32 >= count > (grid - 1) * warps * 32
            assert work.dtype == torch.float32 and work.numel() == splits * count == splits * y.numel()
            partial = self.partials.pop(work.data_ptr())
            total = partial[0].clone()
            for s in range(1, splits):  # tc_sum's order
                total += partial[s]
            y.copy_(total.to(y.dtype))
            self.results.append(total)
            return
        y, work, splits, out = self.product(name, grid, tensors, ints, warps)
        m, n = y.shape
        if splits == 1:
            assert work.data_ptr() == y.data_ptr()
            y.copy_(out[0].to(y.dtype))
            self.results.append(out[0])
        else:
            assert tuple(work.shape) == (splits, m, n) and work.dtype == torch.float32
            work.copy_(out.float())
            self.partials[work.data_ptr()] = out

    def product(self, name, grid, tensors, ints, warps):
        """The kernel launch checked against the launcher's contract and emulated: (y, work, splits, the float64
        product per split); a format's kernel overrides it, the tcsum reduction and the stores stay shared."""
        ring, kind, dtype, tokens, depth = re.fullmatch(r"tc(r?)(48|816)_(f16|bf16)_n(\d+)(?:_d(\d+))?", name).groups()
        assert bool(ring) == (depth is not None) and (not ring or int(depth) in nm.TC_RING_DEPTHS[int(tokens)])
        x, *_, y, work = tensors
        m, n, k, splits = ints
        assert cuda_ops._SUFFIX[x.dtype] == dtype and warps == WARPS and int(tokens) in nm.TC_TOKENS
        assert grid == -(-n // ROWS) * splits * -(-m // int(tokens))
        assert x.data_ptr() % 16 == 0 and tuple(x.shape) == (m, k) and tuple(y.shape) == (m, n)
        out = emulate_tc("4:8" if kind == "48" else "8:16", grid, tensors, ints, int(tokens), self.read, self.a_map,
                         self.b_regs, int(depth or 0), self.slot)
        return y, work, splits, out


def _run(kind: str, rows: int, cols: int, m: int, splits: int, dtype=torch.float16, emulated: Emulated | None = None,
         tokens: int | None = None, depth: int = 0):
    """The launcher (``depth`` > 0: the ring kernel's) on an emulated GPU: (y, the float64 result, x @ W.T in
    float64)."""
    w = _weight(kind, rows, cols, seed=rows + cols + m, dtype=dtype)
    fmt = _fmt(kind, w)
    x = torch.randn(m, cols, generator=torch.Generator().manual_seed(m)).to(dtype)
    emulated = emulated or Emulated()
    tokens = tokens or next(t for t in nm.TC_TOKENS if t >= m)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cuda_ops, "_launch", emulated)
        y = fmt._tc_ring(x, tokens, depth, splits) if depth else fmt._tc(x, tokens, splits)
    return y, emulated.results[-1], x.double() @ w.double().T


@pytest.mark.parametrize("kind", ["4:8", "8:16"])
@pytest.mark.parametrize("m", [5, 9, 17, 33, 64])
@pytest.mark.parametrize("splits", [1, 3])
def test_the_emulated_kernel_equals_the_dense_product_in_float64(kind, m, splits):
    """72 features (a partial second tile), K = 208 (13 chunks: four stages, the last holding one chunk), whole K
    and three K-slices (of 1, 1 and 2 stages): every output stored once, equal to the float64 product up to the
    order of the sums, and y is that product in the input dtype."""
    y, result, reference = _run(kind, 72, 208, m, splits)
    assert not result.isnan().any()
    torch.testing.assert_close(result, reference, rtol=1e-12, atol=1e-12)
    assert torch.equal(y, result.to(y.dtype))


@pytest.mark.parametrize("kind", ["4:8", "8:16"])
def test_bf16_more_rows_than_the_token_tile_and_two_slices(kind):
    """bf16; 40 rows of x on 16-token tiles (three token tiles as blocks); 136 features x 400 inputs in two slices."""
    y, result, reference = _run(kind, 136, 400, 40, 2, dtype=torch.bfloat16, tokens=16)
    torch.testing.assert_close(result, reference, rtol=1e-12, atol=1e-12)
    assert torch.equal(y, result.to(torch.bfloat16))


@pytest.mark.parametrize("kind", ["4:8", "8:16"])
@pytest.mark.parametrize("broken", ["unswizzled reads", "a1 and a2 swapped", "b0 and b1 swapped"])
def test_a_broken_swizzle_or_fragment_map_fails(kind, broken):
    """The emulation is sensitive: ldmatrix reading the tile without the swizzle the stores used, or an A fragment
    or B fragment map other than the ISA's, gives a different (or unwritten, NaN) product."""
    emulated = {"unswizzled reads": Emulated(read=plain),
                "a1 and a2 swapped": Emulated(a_map=(A_MAP[0], A_MAP[2], A_MAP[1], A_MAP[3])),
                "b0 and b1 swapped": Emulated(b_regs=(1, 0))}[broken]
    _, result, reference = _run(kind, 72, 208, 9, 1, emulated=emulated)
    assert not torch.allclose(result, reference, rtol=1e-3, atol=1e-3, equal_nan=False)


def test_the_swizzle_spreads_every_ldmatrix_phase_and_store_over_all_bank_groups():
    """Each ldmatrix phase (eight 16-byte rows: one logical chunk of eight consecutive rows) and each quarter-warp's
    16-byte stores of the decoded tile hit eight distinct 16-byte bank groups of a 128-byte line; unswizzled they
    would all hit one."""
    rows = torch.arange(ROWS)
    for r0 in range(0, ROWS, 8):
        for chunk in range(8):
            r = rows[r0: r0 + 8]
            assert len(set(swizzled(r, torch.full_like(r, chunk)).tolist())) == 8
            assert len(set(plain(r, torch.full_like(r, chunk)).tolist())) == 1
    tid = torch.arange(THREADS)
    for half in range(2):
        r, c = tid >> 2, tid & 3
        group = (r * 128 + 16 * swizzled(r, 2 * c + half)) // 16 % 8
        assert all(len(set(group[q: q + 8].tolist())) == 8 for q in range(0, THREADS, 8))


def test_the_source_has_the_index_math_the_emulation_checks():
    """The formulas the emulation follows, as written in nm_tc.cu and the tensor-core engine it shares with
    bitmap_tc.cu, tc_tile.cuh (a change there must change the emulation)."""
    source = nm.TC_SOURCE.read_text() + cuda_ops.TC_TILE.read_text()
    for line in ("return (u32)(r * 128 + ((c ^ (r & 7)) << 4));",
                 "const int r = (tid + TC_THREADS * i) >> 2;",
                 "const int idx = tid + TC_THREADS * i, r = idx >> 3, cx = idx & 7;",
                 "const int ra = warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, ca = lane >> 4;",
                 "const int rb = lane & 7, cb = lane >> 3;",
                 "tc_ldmatrix_x4(a[k], aw + tc_at(ra, 4 * h + 2 * k + ca));",
                 "tc_ldmatrix_x4(b, ax + tc_at(n * 8 + rb, 4 * h + cb));",
                 "tc_mma<BF16>(acc[n], a[0], b[0], b[1]);",
                 "tc_mma<BF16>(acc[n], a[1], b[2], b[3]);",
                 "const int row = row0 + warp * 16 + g + (q >> 1) * 8, token = tok0 + n * 8 + 2 * t + (q & 1);",
                 "const int tile = blockIdx.x % tiles, rest = blockIdx.x / tiles, s = rest % S, tt = rest / S;",
                 "const int kb0 = (int)((long long)s * KB / S), kb1 = (int)((long long)(s + 1) * KB / S);"):
        assert line in source, line


def _gpu_like(monkeypatch) -> None:
    monkeypatch.setattr(cuda_ops, "_module", lambda index, source=None: None)


@pytest.mark.parametrize("kind", ["4:8", "8:16"])
def test_offered_by_default_and_only_at_5_to_64_rows(kind, monkeypatch, not_opted_in):
    """Cleared on an H100, so without SECATEURS_UNVERIFIED_KERNELS=1 row buckets 8-64 offer the smallest token tile
    holding the rows, after the expand path; 1-4 rows (the GEMV) and 128 on (the expand path) do not."""
    fmt = _fmt(kind, _weight(kind, 128, 1024, 0, torch.float16))
    _gpu_like(monkeypatch)
    tc = f"cuda_{fmt.tc_name}"
    for m in (1, 2, 4, 128, 512, 2048):
        assert not any(name.startswith(tc) for name in fmt.cuda_candidates(m))
    for m, tile in ((5, 16), (8, 16), (16, 16), (17, 32), (32, 32), (64, 64)):
        names = list(fmt.cuda_candidates(m))
        assert names[0].startswith("expand_cublas_c")
        offered = [name for name in names if name.startswith(tc)]
        assert offered == [f"{tc}_n{tile}_s{s}" for s in nm.tc_splits(128, 1024)], names


def test_split_k_choices_fill_the_gpu_and_keep_a_stage_per_split():
    """The fewest splits that give 264 blocks (two per H100 SM) and the next choice; no split without a 64-input stage."""
    assert nm.tc_splits(28672, 4096) == [1, 2]  # 448 feature tiles fill it alone
    assert nm.tc_splits(11008, 4096) == [2, 3]  # 172 tiles
    assert nm.tc_splits(4096, 4096) == [6, 8]
    assert nm.tc_splits(1024, 4096) == [16]  # the k/v shape: the most splits there are
    assert nm.tc_splits(72, 208) == [4]  # four stages: at most four slices


def test_the_ops_have_fake_implementations():
    """torch.compile(fullgraph=True) and CUDA graphs trace the custom ops through their fake implementations."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(9, 64, dtype=torch.float16)
        y48 = torch.ops.secateurs.nm48_tc(x, torch.empty(24, 32, dtype=torch.float16), torch.empty(24, 8, dtype=torch.uint8),
                                          torch.empty(24, 4, dtype=torch.uint8), 16, 1)
        y816 = torch.ops.secateurs.nm816_tc(x.bfloat16(), torch.empty(24, 32, dtype=torch.bfloat16),
                                            torch.empty(24, 4, dtype=torch.int32), 16, 2)
    assert (tuple(y48.shape), y48.dtype, tuple(y816.shape), y816.dtype) == ((9, 24), torch.float16, (9, 24), torch.bfloat16)


def test_the_source_compiles_for_ampere_and_hopper_with_every_launched_kernel_and_no_spills(nvcc_builds_without_spills):
    """NVRTC compiles nm_tc.cu on users' GPUs; where nvcc is installed it is compiled here (as the nvcc_cubins fixture
    of conftest.py does, skipping without a toolkit) with ptxas's report: every kernel the launcher names exists and
    none spills registers."""
    names = [f"tc{kind}_{dtype}_n{tokens}" for kind in ("48", "816") for dtype in ("f16", "bf16")
             for tokens in nm.TC_TOKENS] + ["tcsum_f16", "tcsum_bf16"] + _ring_kernels()
    nvcc_builds_without_spills(nm.TC_SOURCE, names)


def _ring_kernels(dtypes=("f16", "bf16")) -> list[str]:
    """Every ring kernel the candidates launch: each format, dtype, token tile and its depths."""
    return [f"tcr{kind}_{dtype}_n{tokens}_d{depth}" for kind in ("48", "816") for dtype in dtypes
            for tokens, depths in nm.TC_RING_DEPTHS.items() for depth in depths]


def _run_offered(kind: str, k: int, seed: int, rows: int, bucket: int, keep: Callable[[str, object], bool],
                 monkeypatch) -> tuple[object, Emulated, list[str]]:
    """Runs every candidate the dispatcher times at row bucket ``bucket`` that ``keep`` (its name, the format) picks,
    through the emulated kernel, on ``rows`` rows of x against a 200 x ``k`` weight (seed ``seed``, x's ``seed + 1``):
    each must give the float64 product, which the op returns in fp16. Returns the format, the emulation (its
    launches) and the names run, for the tests of the old and the ring kernels to check."""
    w = _weight(kind, 200, k, seed, torch.float16)
    fmt = _fmt(kind, w)
    _gpu_like(monkeypatch)
    emulated = Emulated()
    monkeypatch.setattr(cuda_ops, "_launch", emulated)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed + 1)).half()
    offered = {name: call for name, call in fmt.cuda_candidates(bucket).items() if keep(name, fmt)}
    for name, call in offered.items():
        y = call(x)
        torch.testing.assert_close(emulated.results[-1], x.double() @ w.double().T, rtol=1e-12, atol=1e-12, msg=name)
        assert torch.equal(y, emulated.results[-1].half())
    return fmt, emulated, list(offered)


@pytest.mark.parametrize("kind", ["4:8", "8:16"])
def test_the_offered_candidates_launch_the_emulated_kernel(kind, monkeypatch, opted_in):
    """The candidates the dispatcher times (their bound token tile and split) run the emulated kernel to the float64
    product: 37 rows of x at row bucket 64, a 200 x 320 weight (4 feature tiles, 5 stages: 4 slices of 1, 1, 1 and 2
    stages)."""
    fmt, emulated, offered = _run_offered(kind, 320, 3, 37, 64,
                                          lambda name, fmt: name.startswith(f"cuda_{fmt.tc_name}_"), monkeypatch)
    assert offered == [f"cuda_{fmt.tc_name}_n64_s{s}" for s in nm.tc_splits(200, 320)] == [f"cuda_{fmt.tc_name}_n64_s4"]
    assert emulated.names == [f"{fmt.tc_name}_f16_n64", "tcsum_f16"]


def test_a_tensor_core_module_that_does_not_build_leaves_the_expand_path(monkeypatch, not_opted_in):
    """A failing build of nm_tc.cu (an NVRTC that refuses it) offers no tensor-core kernel and says so,
    but the layer keeps its GPU-checked expand path instead of losing every CUDA candidate."""
    from secateurs.kernels import linear

    fmt = _fmt("4:8", _weight("4:8", 128, 1024, 0, torch.float16))

    def build(index, source=None):
        if source == nm.TC_SOURCE:
            raise RuntimeError("NVRTC 13.0 failed to compile nm_tc.cu: an error")

    monkeypatch.setattr(cuda_ops, "_module", build)
    said = []
    monkeypatch.setattr(linear, "note", said.append)
    assert list(fmt.cuda_candidates(16)) == ["expand_cublas_c1", "expand_cublas_c4"]
    assert said == [("the 4:8 tensor-core kernel was not built (NVRTC 13.0 failed to compile nm_tc.cu: an error): "
                     "5-64 tokens use the expand path")]


RING = [(tokens, depth) for tokens, depths in nm.TC_RING_DEPTHS.items() for depth in depths]


@pytest.mark.parametrize("kind", ["4:8", "8:16"])
@pytest.mark.parametrize(("tokens", "depth"), RING)
@pytest.mark.parametrize("splits", [1, 3])
def test_the_emulated_ring_kernel_equals_the_dense_product_in_float64(kind, tokens, depth, splits):
    """The ring form at each token tile and depth: 72 features (a partial second tile), K = 720 (45 chunks: twelve
    stages, the last holding one chunk) whole (the ring wraps around its slots three or more times) and in three
    K-slices of four stages (a slice ending mid-ring); as many rows as the tile holds less three."""
    y, result, reference = _run(kind, 72, 720, tokens - 3, splits, depth=depth)
    assert not result.isnan().any()
    torch.testing.assert_close(result, reference, rtol=1e-12, atol=1e-12)
    assert torch.equal(y, result.to(y.dtype))


@pytest.mark.parametrize("kind", ["4:8", "8:16"])
@pytest.mark.parametrize(("tokens", "depth"), RING)
def test_the_ring_kernel_in_bf16_with_odd_shapes_and_short_slices(kind, tokens, depth):
    """bf16; 40 rows on 16-token tiles where that is the tile (three token tiles as blocks); 136 features x 400
    inputs (seven stages) in five slices of one or two stages: a slice shorter than the ring's prologue."""
    m = 40 if tokens == 16 else tokens - 1
    y, result, reference = _run(kind, 136, 400, m, 5, dtype=torch.bfloat16, tokens=tokens, depth=depth)
    torch.testing.assert_close(result, reference, rtol=1e-12, atol=1e-12)
    assert torch.equal(y, result.to(torch.bfloat16))


@pytest.mark.parametrize("kind", ["4:8", "8:16"])
@pytest.mark.parametrize(("tokens", "depth"), RING)
@pytest.mark.parametrize("broken", ["into the slot stored now", "into the next stage's slot"])
def test_a_broken_ring_slot_fails(kind, tokens, depth, broken):
    """The emulation is sensitive to the ring's index: a load into the slot this step stores (so a stage is stored
    with the units of one D - 1 stages later) or, at depth 3 and more, into the slot of the stage stored next, gives
    a different product. At depth 2 the next stage's slot is the one stage k - 1 left: the right slot."""
    slot = {"into the slot stored now": lambda q, d: q % d, "into the next stage's slot": lambda q, d: (q + 1) % d}
    _, result, reference = _run(kind, 72, 720, tokens - 3, 1, emulated=Emulated(slot=slot[broken]), depth=depth)
    if broken == "into the next stage's slot" and depth == 2:
        torch.testing.assert_close(result, reference, rtol=1e-12, atol=1e-12)
    else:
        assert not torch.allclose(result, reference, rtol=1e-3, atol=1e-3, equal_nan=False)


def test_the_source_has_the_ring_index_math_the_emulation_checks():
    """The ring's formulas as written in tc_tile.cuh's tc_gemm_ring (a change there must change the emulation); the
    rest of the engine is the helpers tc_gemm calls too (tc_load_x, tc_mma_stage, tc_store_y)."""
    source = cuda_ops.TC_TILE.read_text()
    ring = source[source.index("__device__ __forceinline__ void tc_gemm_ring"):]
    for line in ("if (kb0 + p < kb1) load_w(ring[p], kb0 + p);",
                 "for (int kb = kb0; kb < kb1; kb += D) {",
                 "const int k = kb + q, cur = (k - kb0) & 1;",
                 "if (k + D - 1 < kb1) load_w(ring[(q + D - 1) % D], k + D - 1);",
                 "store_w(ring[q], cur, k);",
                 "if (k + 1 < kb1) tc_load_x<TN>(x, base_x, cur ^ 1, k + 1, tid, tok0, M, K);",
                 "tc_store_y<BF16, NT>(acc, y, work, row0, warp, g, t, tok0, M, N, S, s);"):
        assert line in ring, line
    assert "tc_mma_stage<BF16, NT>(acc, base_w + cur * (TC_ROWS * 128), base_x + cur * (TN * 128), ra, ca, rb," in ring


RING_OFFERED = {False: {16: (3,), 32: (3,), 64: (2,)}, True: {16: (3, 4), 32: (3, 4), 64: (2,)}}
"""Ring depths offered per token tile, without and with SECATEURS_UNVERIFIED_KERNELS=1: by default the depth that was
the fastest ring candidate on every row of the H100 run (sparse48.py --part tc), depth 4 (never the fastest) only
opted in."""


@pytest.mark.parametrize("opt_in", [False, True], ids=["default", "opted-in"])
@pytest.mark.parametrize("kind", ["4:8", "8:16"])
def test_ring_candidates_offered_last_and_at_5_to_64_rows(kind, opt_in, monkeypatch, request):
    """At row buckets 8-64, for the smallest token tile holding the rows, after every other candidate (the old
    kernel's at that tile among them): the depths of RING_OFFERED at tc_splits; none at 1-4 rows or 128 on."""
    request.getfixturevalue("opted_in" if opt_in else "not_opted_in")
    fmt = _fmt(kind, _weight(kind, 128, 1024, 0, torch.float16))
    _gpu_like(monkeypatch)
    ring = f"cuda_{fmt.tc_ring_name}"
    for m in (1, 2, 4, 128, 512):
        assert not any(name.startswith(ring) for name in fmt.cuda_candidates(m))
    for m, tile in ((5, 16), (8, 16), (16, 16), (17, 32), (32, 32), (33, 64), (64, 64)):
        names = list(fmt.cuda_candidates(m))
        expected = [f"{ring}_n{tile}_d{d}_s{s}" for d in RING_OFFERED[opt_in][tile] for s in nm.tc_splits(128, 1024)]
        assert names[-len(expected):] == expected and sum(name.startswith(ring) for name in names) == len(expected)
        assert any(name.startswith(f"cuda_{fmt.tc_name}_n{tile}_s") for name in names[:-len(expected)])


def test_the_cleared_and_dominated_ring_depths_split_the_compiled_ones():
    """Every compiled (token tile, depth) is either cleared (offered by default) or dominated (opted in only)."""
    compiled = {(tokens, depth) for tokens, depths in nm.TC_RING_DEPTHS.items() for depth in depths}
    assert nm.TC_RING_CLEARED.isdisjoint(nm.TC_RING_DOMINATED)
    assert nm.TC_RING_CLEARED | nm.TC_RING_DOMINATED == compiled


@pytest.mark.parametrize("kind", ["4:8", "8:16"])
def test_a_ring_depth_not_cleared_stays_behind_the_opt_in(kind, monkeypatch, not_opted_in):
    """A depth added later (here: every depth but 16 tokens' 3 taken out of the cleared set) is not offered
    without SECATEURS_UNVERIFIED_KERNELS=1 until a GPU run clears it."""
    fmt = _fmt(kind, _weight(kind, 128, 1024, 0, torch.float16))
    _gpu_like(monkeypatch)
    monkeypatch.setattr(nm, "TC_RING_CLEARED", frozenset({(16, 3)}))
    ring = f"cuda_{fmt.tc_ring_name}"
    assert [name for name in fmt.cuda_candidates(16) if name.startswith(ring)] == [
        f"{ring}_n16_d3_s{s}" for s in nm.tc_splits(128, 1024)]
    for m in (32, 64):
        assert not any(name.startswith(ring) for name in fmt.cuda_candidates(m))


@pytest.mark.parametrize("opt_in", [False, True], ids=["default", "opted-in"])
@pytest.mark.parametrize("kind", ["4:8", "8:16"])
def test_the_ring_is_never_offered_for_a_cpu_weight(kind, opt_in, monkeypatch, request):
    """The dispatcher asks cuda_ops.candidates, which offers no CUDA kernel for a weight on the CPU: the ring
    candidates the format itself lists (its module faked as built) never reach it there."""
    request.getfixturevalue("opted_in" if opt_in else "not_opted_in")
    fmt = _fmt(kind, _weight(kind, 128, 1024, 0, torch.float16))
    _gpu_like(monkeypatch)
    for m in (8, 16, 32, 64):
        assert any(name.startswith(f"cuda_{fmt.tc_ring_name}_") for name in fmt.cuda_candidates(m))
        assert cuda_ops.candidates(fmt, m) == {}


@pytest.mark.parametrize("opt_in", [False, True], ids=["default", "opted-in"])
@pytest.mark.parametrize("kind", ["4:8", "8:16"])
def test_the_offered_ring_candidates_launch_the_emulated_kernel(kind, opt_in, monkeypatch, request):
    """The ring candidates the dispatcher times at row bucket 16 (9 rows) launch their kernel (its depth, the bound
    split) to the float64 product: a 200 x 1024 weight (4 feature tiles, 16 stages: 4 slices of four); depth 3 by
    default, 3 and 4 opted in."""
    request.getfixturevalue("opted_in" if opt_in else "not_opted_in")
    fmt, emulated, offered = _run_offered(kind, 1024, 5, 9, 16, lambda name, fmt: name.startswith("cuda_tcr"),
                                          monkeypatch)
    depths = RING_OFFERED[opt_in][16]
    assert offered == [f"cuda_{fmt.tc_ring_name}_n16_d{d}_s{s}" for d in depths for s in nm.tc_splits(200, 1024)]
    launched = [name for name in emulated.names if not name.startswith("tcsum_")]
    assert launched == [f"{fmt.tc_ring_name}_f16_n16_d{d}" for d in depths for _ in nm.tc_splits(200, 1024)]


def test_the_ring_ops_have_fake_implementations():
    """torch.compile(fullgraph=True) and CUDA graphs trace the ring ops through their fake implementations."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(9, 64, dtype=torch.float16)
        y48 = torch.ops.secateurs.nm48_tc_ring(x, torch.empty(24, 32, dtype=torch.float16),
                                               torch.empty(24, 8, dtype=torch.uint8),
                                               torch.empty(24, 4, dtype=torch.uint8), 16, 3, 1)
        y816 = torch.ops.secateurs.nm816_tc_ring(x.bfloat16(), torch.empty(24, 32, dtype=torch.bfloat16),
                                                 torch.empty(24, 4, dtype=torch.int32), 64, 2, 2)
    assert (tuple(y48.shape), y48.dtype) == ((9, 24), torch.float16)
    assert (tuple(y816.shape), y816.dtype) == ((9, 24), torch.bfloat16)


def _stored_load_distances(body: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """For each load of stored bytes (LDG.E.EF: the streamed values and positions; x goes by LDGSTS) of the kernel's
    main loop (the longest loop holding an HMMA): (HMMAs, instructions) issued between it and the first instruction
    reading its registers, around the back edge."""
    from sass_count import load_uses, mma_loop

    return [(mmas, steps) for mmas, steps in load_uses(mma_loop(body), r"LDG\.E\.EF(?:\.(\w+))? R(\d+),")
            if steps is not None]


def test_every_stored_load_of_the_ring_kernels_is_issued_stages_ahead(tmp_path):
    """What the ring is for, checked in the SASS nvcc makes for sm_90: between each load of stored values or positions
    in the main loop and the first instruction reading it, the warp issues the MMAs of D - 1 whole stages (4 TN / 8
    each) and at least 150 instructions per stage ahead; tc_gemm's loads are read within its one stage (at most its
    4 TN / 8 MMAs, 34-218 instructions at 16-64 tokens when this was written). D x 2 units x the format's loads per
    unit are in the loop (4:8: values, low and high position bits; 8:16: values, positions)."""
    import subprocess
    import sys

    from conftest import _nvcc

    nvcc = _nvcc()
    sys.path.insert(0, str(nm.TC_SOURCE.parents[4] / "benchmarks"))
    from sass_count import cuobjdump, functions

    cubin = tmp_path / "nm_tc.cubin"
    subprocess.run([nvcc, "-std=c++17", "-arch=sm_90", "-cubin", "-o", str(cubin), str(nm.TC_SOURCE)], check=True)
    bodies = functions(subprocess.run([cuobjdump(), "-sass", str(cubin)], capture_output=True, text=True,
                                      check=True).stdout)
    for kind, loads in (("48", 3), ("816", 2)):
        for tokens, depths in nm.TC_RING_DEPTHS.items():
            per_stage = 4 * tokens // 8
            old = _stored_load_distances(bodies[f"tc{kind}_f16_n{tokens}"])
            assert len(old) == 2 * loads and max(mmas for mmas, _ in old) <= per_stage, (kind, tokens, old)
            for depth in depths:
                ring = _stored_load_distances(bodies[f"tcr{kind}_f16_n{tokens}_d{depth}"])
                assert len(ring) == depth * 2 * loads, (kind, tokens, depth, ring)
                assert min(mmas for mmas, _ in ring) >= (depth - 1) * per_stage, (kind, tokens, depth, ring)
                assert min(steps for _, steps in ring) >= 150 * (depth - 1), (kind, tokens, depth, ring)

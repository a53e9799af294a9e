"""The N:M tensor-core kernel (``kernels/cuda/nm_tc.cu``, 4:8 and 8:16 at 5-64 tokens) on a CPU: its index math
emulated lane by lane (which stored values and positions each thread loads, where it writes them in the swizzled
shared tile, what each ``ldmatrix`` gives each lane, the ``mma.m16n8k16`` fragment ownership of the PTX ISA, the
split-K workspace and its fixed-order sum), run through the real launcher with ``cuda_ops._launch`` replaced by the
emulation and compared with the float64 dense product; a broken swizzle or fragment map fails it; the candidates
are offered (by default: they matched float64 on an H100) only at 5-64 rows; the source compiles with nvcc where it is installed,
with no spills."""

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


def emulate_tc(kind: str, grid: int, tensors: tuple[torch.Tensor, ...], ints: tuple[int, ...], tokens: int,
               read: Callable = swizzled, a_map=A_MAP, b_regs=(0, 1)) -> torch.Tensor:
    """nm_tc.cu's tc_nm for every block of ``grid``, lane by lane: (S, M, N) float64 of what each block stores
    (split s's partial sums; NaN where nothing is stored). Shared memory starts as NaN, so a read of a place no
    thread wrote shows. ``read``, ``a_map`` and ``b_regs`` are the ldmatrix swizzle, the A fragment map and which
    ldmatrix registers are b0, b1 of the first k16 step (broken on purpose by the sensitivity test)."""
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
    for block in range(grid):
        tile, rest = block % tiles, block // tiles
        s, tt = rest % splits, rest // splits
        row0, tok0 = tile * ROWS, tt * tokens
        kb0, kb1 = s * stages // splits, (s + 1) * stages // splits
        sw = torch.full((2, ROWS * 64), float("nan"), dtype=torch.float64)
        sx = torch.full((2, tokens * 64), float("nan"), dtype=torch.float64)
        d = torch.zeros(nt, WARPS, 16, 8, dtype=torch.float64)
        for kb in range(kb0, kb1):
            cur = (kb - kb0) & 1
            c = tid & 3
            for i in range(ROWS * 4 // THREADS):  # store_w: unit i of each thread
                r = (tid + THREADS * i) >> 2
                row = (row0 + r).clamp(max=n - 1)
                live = (row0 + r < n) & (kb * 4 + c < chunks)
                dense = _dense_chunks(kind, tables, vals, row, (kb * 4 + c).clamp(max=chunks - 1), n, k)
                dense = torch.where(live.unsqueeze(1), dense, torch.zeros_like(dense))
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

    def __init__(self, read: Callable = swizzled, a_map=A_MAP, b_regs=(0, 1)) -> None:
        self.read, self.a_map, self.b_regs = read, a_map, b_regs
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
        kind, dtype, tokens = re.fullmatch(r"tc(48|816)_(f16|bf16)_n(\d+)", name).groups()
        x, *_, y, work = tensors
        m, n, k, splits = ints
        assert cuda_ops._SUFFIX[x.dtype] == dtype and warps == WARPS and int(tokens) in nm.TC_TOKENS
        assert grid == -(-n // ROWS) * splits * -(-m // int(tokens))
        assert x.data_ptr() % 16 == 0 and tuple(x.shape) == (m, k) and tuple(y.shape) == (m, n)
        out = emulate_tc("4:8" if kind == "48" else "8:16", grid, tensors, ints, int(tokens), self.read, self.a_map,
                         self.b_regs)
        return y, work, splits, out


def _run(kind: str, rows: int, cols: int, m: int, splits: int, dtype=torch.float16, emulated: Emulated | None = None,
         tokens: int | None = None):
    w = _weight(kind, rows, cols, seed=rows + cols + m, dtype=dtype)
    fmt = _fmt(kind, w)
    x = torch.randn(m, cols, generator=torch.Generator().manual_seed(m)).to(dtype)
    emulated = emulated or Emulated()
    tokens = tokens or next(t for t in nm.TC_TOKENS if t >= m)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cuda_ops, "_launch", emulated)
        y = fmt._tc(x, tokens, splits)
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
             for tokens in nm.TC_TOKENS] + ["tcsum_f16", "tcsum_bf16"]
    nvcc_builds_without_spills(nm.TC_SOURCE, names)


@pytest.mark.parametrize("kind", ["4:8", "8:16"])
def test_the_offered_candidates_launch_the_emulated_kernel(kind, monkeypatch, opted_in):
    """The candidates the dispatcher times (their bound token tile and split) run the emulated kernel to the float64
    product: 37 rows of x at row bucket 64, a 200 x 320 weight (4 feature tiles, 5 stages: 4 slices of 1, 1, 1 and 2
    stages)."""
    w = _weight(kind, 200, 320, 3, torch.float16)
    fmt = _fmt(kind, w)
    _gpu_like(monkeypatch)
    emulated = Emulated()
    monkeypatch.setattr(cuda_ops, "_launch", emulated)
    x = torch.randn(37, 320, generator=torch.Generator().manual_seed(4)).half()
    offered = {name: call for name, call in fmt.cuda_candidates(64).items() if name.startswith("cuda_tc")}
    assert list(offered) == [f"cuda_{fmt.tc_name}_n64_s{s}" for s in nm.tc_splits(200, 320)] == \
        [f"cuda_{fmt.tc_name}_n64_s4"]
    for name, call in offered.items():
        y = call(x)
        torch.testing.assert_close(emulated.results[-1], x.double() @ w.double().T, rtol=1e-12, atol=1e-12, msg=name)
        assert torch.equal(y, emulated.results[-1].half())
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

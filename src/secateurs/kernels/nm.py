"""What every N:M stored format beyond 2:4 shares (4:8 in ``nm48.py``, 8:16 in ``nm816.py``): at most N kept
weights in every run of M inputs, stored as N values per group in column order (``values`` (out, in * N / M),
a kept value may be zero) and their positions in position tables of the format's own layout.

Everything but that layout lives here: which weights fit (``fits``: groups of M with at most N non-zeros, a
width of whole 16-input chunks, the sparsity ceiling past which the unstructured layouts are smaller; ``supports`` adds that a
format whose GEMV never ran on a GPU is stored only under the opt-in), building from a weight
or a keep-mask, the mask and the exact expansion, and the CUDA candidates (the format's GEMV for 1-4 rows at
the rows-per-warp and split-K choices, the expand path into the shared scratch from row bucket 8). A format
file says how its positions are packed (``_pack``) and read back (``positions``), which tensors its kernels
need aligned how (``_tables_ready``, ``_wide_positions``), and launches its two kernels (``_gemv``,
``_expand``); its CUDA source instantiates common.cuh's ``gemv_nm`` loop with a step of its own.

Tensor cores for 5-64 tokens (``cuda/nm_tc.cu``, both formats in one module): "load as sparse, compute as dense".
A block of 4 warps owns 64 output features, a tile of 16, 32 or 64 tokens (:data:`TC_TOKENS`) and a K-slice
(split-K over blocks, fp32 partial sums added in a fixed order by a second kernel); it streams the stored values
and positions of its rows in 16-byte loads, expands them in registers (the format's decode step, the expand
kernel's) into a swizzled shared-memory dense tile, and multiplies it by the activation tile with dense
``mma.sync.m16n8k16`` (``ldmatrix`` fragments, fp32 accumulation). Its candidates (``cuda_tc48_n<tokens>_s<split>``,
``cuda_tc816_...``) are offered beside the expand path at row buckets 8-64: on one H100 (2026-12-06,
``gpu_kernel_check.py --part cuda --formats 4:8,8:16 --only cuda_tc``) every one matched float64 in 468 checks (fp16
and bf16, 10 shapes, m = 1-8192; worst 1.9e-3, bf16 rounding), also under ``torch.compile`` in a CUDA graph, so
none faults; timed there on its own (``sparse48.py --part tc``, the three Llama-2-7B shapes at 8-64 tokens) at
0.60-0.88x cuBLAS, it took 4:8 decode at batch 8 from 0.48x dense end to end (the expand path) to 0.80x. Its ring form
(``cuda_tcr48_n<tokens>_d<depth>_s<split>``, ``cuda_tcr816_...``: tc_tile.cuh's ``tc_gemm_ring``, stages of stored
bytes loaded ``depth - 1`` stages ahead of their decode) matched float64 on one H100 (2026-12-06,
``gpu_kernel_check.py --part cuda --formats 4:8,8:16 --only tcr48,tcr816``: 832 checks, fp16 and bf16, 10 shapes,
m = 1-8192, 0 failures, worst 1.8e-3; under ``torch.compile(fullgraph=True)`` in a CUDA graph relative error 2.1e-4)
and was timed there against the old kernel (``sparse48.py --part tc``): the depth that was the fastest ring candidate
at each token tile (:data:`TC_RING_CLEARED`) is offered by default, the one never the fastest
(:data:`TC_RING_DOMINATED`) only under ``SECATEURS_UNVERIFIED_KERNELS=1``; either comes after every other candidate.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch

from . import cuda_ops, registry
from .formats import SparseFormat

if TYPE_CHECKING:
    from typing import Self

CHUNK = 16  # inputs per 16-byte load of values (8 fp16 values at N/M = 1/2): the kernels' step and the width unit
TC_SOURCE = Path(__file__).with_name("cuda") / "nm_tc.cu"
TC_TOKENS = (16, 32, 64)  # token tiles the tensor-core kernel is instantiated for (tc<kind>_<dtype>_n<tokens>)
TC_ROWS = 64  # output features per block of the tensor-core kernel
TC_WARPS = 4
TC_RING_DEPTHS = {16: (3, 4), 32: (3, 4), 64: (2,)}
"""Stages in registers of the ring kernels per token tile (``tcr<kind>_<dtype>_n<tokens>_d<depth>``): as many as
compile without a spill on sm_80 and sm_90 (at 64 tokens the accumulators leave room for two). Which of them are
offered without the opt-in: :data:`TC_RING_CLEARED`."""
TC_RING_CLEARED: frozenset[tuple[int, int]] = frozenset({(16, 3), (32, 3), (64, 2)})
"""(token tile, depth) of the ring kernels offered without ``SECATEURS_UNVERIFIED_KERNELS=1``: correct on an H100,
timed there, and the fastest ring candidate on every row (the others: :data:`TC_RING_DOMINATED`). On one NVIDIA H100
80GB HBM3 (``sparse48.py --part tc --formats 4:8,8:16 --shapes 3``, 2026-12-06: the three Llama-2-7B shapes 4096x4096,
11008x4096 and 4096x11008 at 8, 16, 32 and 64 tokens), the best ring candidate against the best old ``tc48`` /
``tc816`` one (time ratio old / ring): 4:8 faster on all 12 rows, by 1.006-1.159x (8 and 16 tokens 1.074-1.159x, 32
tokens 1.006-1.038x, 64 tokens 1.050-1.113x), the best ring 0.70-1.02x cuBLAS; 8:16 faster at 8-32 tokens on all 9
rows, by 1.005-1.038x, and slower at 64 tokens on all 3 (0.969-0.988x), where the dispatcher's timing keeps the old
kernel. End to end (a Llama-2-7B-shaped model pruned 8:16, opted in) the dispatcher picked
``cuda_tcr816_n32_d3_s8`` / ``_s3`` at rows <= 32 for all three shapes. A depth added later stays opt-in until it
has run and been timed on a GPU."""
TC_RING_DOMINATED: frozenset[tuple[int, int]] = frozenset({(16, 4), (32, 4)})
"""Correct on the H100 but never the fastest ring candidate on any of that run's rows (depth 3 was, every time):
offered only under ``SECATEURS_UNVERIFIED_KERNELS=1``, where the benchmarks time every depth, because each candidate
offered adds to the dispatcher's first-call tuning (every shape and row bucket times each one)."""
TC_SPLITS = (1, 2, 3, 4, 6, 8, 12, 16)  # blocks sharing one feature tile (split-K over whole 64-input stages)
TC_BLOCKS = 264  # blocks that keep an H100's 132 SMs busy twice over: the split-K choice aims at this many
MAX_SPARSITY = 0.625
"""An N:M format is kept for its GEMV although the bitmap's bytes are a little fewer already at 50% zeros (fp16
bytes per weight: bitmap 1.16, 4:8 1.19, 8:16 1.25); past 3:8's fraction of zeros the gap is wide (the bitmap
0.91 at 62.5%, and falling; the banded layout 0.80 at 70%), so a very sparse weight that happens to fit an N:M format
goes to the banded layout (or, outside its 50-90% zeros, the bitmap)."""


class NmFormat(SparseFormat):
    """An N:M weight: ``kept`` values per group of ``group`` inputs and their positions (subclasses are
    dataclasses whose first field is ``values`` and the rest their position tables)."""

    group: ClassVar[int]
    kept: ClassVar[int]
    source: ClassVar[Path]
    tokens: ClassVar[tuple[int, ...]]
    """Token counts the GEMV is instantiated for (m = 3 runs the 4 variant)."""
    rows: ClassVar[dict[int, tuple[int, ...]]]
    """Rows per warp group instantiated for each token count, the default first."""
    expand_chunks: ClassVar[tuple[int, ...]]
    """16-input chunks per thread of the expand kernel, in the order offered."""
    gemv_name: ClassVar[str]
    """The GEMV's candidate names: ``cuda_<gemv_name>_r<rows>_s<split>``."""
    tc_name: ClassVar[str]
    """The tensor-core kernel's candidate names: ``cuda_<tc_name>_n<tokens>_s<split>`` (row buckets 8-64)."""
    tc_ring_name: ClassVar[str]
    """The ring kernel's candidate names: ``cuda_<tc_ring_name>_n<tokens>_d<depth>_s<split>`` (row buckets 8-64)."""
    gemv_verified: ClassVar[bool]
    """Whether the GEMV was run on a GPU; if not it (and the format's expand path) is offered only with
    ``SECATEURS_UNVERIFIED_KERNELS=1``."""
    any_sparsity = True
    values: torch.Tensor

    @classmethod
    def unavailable(cls) -> str | None:
        """A format whose GEMV was never run on a GPU stores weights only under the opt-in: without it the
        reference would run at every token count (no other path reads it), far slower than the banded layout or
        the bitmap that holds them otherwise."""
        if cls.gemv_verified or cuda_ops.unverified_offered():
            return None
        return (f"the {cls.kind} kernels are not yet verified on a GPU ({cuda_ops.UNVERIFIED_ENV}=1 stores "
                f"{cls.kind} weights as {cls.kind})")

    @classmethod
    def fits(cls, weight: torch.Tensor) -> str | None:
        """None when ``weight`` fits the format, else the reason it does not."""
        rows, cols = weight.shape
        if cols % CHUNK:
            return f"{cls.kind} storage needs the input dimension to be a multiple of {CHUNK} (got {cols})"
        nonzero = (weight != 0).reshape(rows, cols // cls.group, cls.group).sum(dim=2)
        if bool((nonzero > cls.kept).any()):
            return f"some group of {cls.group} inputs has more than {cls.kept} non-zeros"
        if 1.0 - float(nonzero.sum()) / weight.numel() > MAX_SPARSITY:
            return f"more than {MAX_SPARSITY:.1%} zeros: the banded layout or the bitmap stores it in fewer bytes"
        return None

    @classmethod
    def compress(cls, weight: torch.Tensor) -> Self:
        reason = cls.fits(weight)
        if reason:
            raise registry.refusal(cls, weight, reason)
        rows, cols = weight.shape
        groups = weight.reshape(rows, cols // cls.group, cls.group)
        positions = cls._first_kept(groups != 0)
        values = groups.gather(2, positions).reshape(rows, cols * cls.kept // cls.group).contiguous()
        return cls(values, *cls._pack(positions), (rows, cols))

    @classmethod
    def from_mask(cls, values: torch.Tensor, mask: torch.Tensor) -> Self:
        """The format from exactly ``kept`` positions per group (``mask``) and their values in row-major order."""
        rows, cols = mask.shape
        groups = mask.reshape(rows, cols // cls.group, cls.group)
        if not bool((groups.sum(dim=2) == cls.kept).all()):
            raise ValueError(f"some group of {cls.group} inputs does not keep exactly {cls.kept} positions")
        values = values.reshape(rows, cols * cls.kept // cls.group).contiguous()
        return cls(values, *cls._pack(cls._first_kept(groups)), (rows, cols))

    def mask(self) -> torch.Tensor:
        """(out, in) bool: the stored positions of every group (a stored value may be zero)."""
        rows, cols = self.shape
        kept = torch.zeros(rows, cols // self.group, self.group, dtype=torch.bool, device=self.values.device)
        return kept.scatter_(2, self.positions(), True).reshape(rows, cols)

    def to_dense(self) -> torch.Tensor:
        rows, cols = self.shape
        dense = torch.zeros(rows, cols // self.group, self.group, dtype=self.values.dtype, device=self.values.device)
        dense.scatter_(2, self.positions(), self.values.reshape(rows, cols // self.group, self.kept))
        return dense.reshape(rows, cols)

    @classmethod
    def _first_kept(cls, groups: torch.Tensor) -> torch.Tensor:
        """(out, in/M, N) ascending positions of the first N kept entries of each group of a bool (out, in/M, M)
        tensor, padded with unkept ones; a stable sort keeps the choice deterministic."""
        return (~groups).to(torch.int8).argsort(dim=2, stable=True)[:, :, :cls.kept].sort(dim=2).values

    @classmethod
    def _pack(cls, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The position tables of (out, in/M, N) ascending positions, in the order of ``parts[1:]``."""
        raise NotImplementedError

    def positions(self) -> torch.Tensor:
        """(out, in/M, N) int64 ascending positions of the kept values inside each group."""
        raise NotImplementedError

    def _tables_ready(self) -> bool:
        """Whether the kernels can read every stored tensor as it is (contiguous, shaped, aligned)."""
        raise NotImplementedError

    def _wide_positions(self) -> bool:
        """Whether the four-chunk expand can load four chunks' positions at once."""
        raise NotImplementedError

    def _gemv(self, x: torch.Tensor, rows: int, split: int) -> torch.Tensor:
        raise NotImplementedError

    def _expand(self, out: torch.Tensor, chunks: int) -> None:
        raise NotImplementedError

    def _tc(self, x: torch.Tensor, tokens: int, split: int) -> torch.Tensor:
        raise NotImplementedError

    def _tc_ring(self, x: torch.Tensor, tokens: int, depth: int, split: int) -> torch.Tensor:
        raise NotImplementedError

    def expand_rows(self, start: int, stop: int, out: torch.Tensor, variant: int) -> None:
        """Rows ``[start, stop)`` of the dense weight into the first ``(stop - start) * K`` elements of ``out`` (the
        pipelined expand path's chunk): the values and position tables are per-row, so the expand kernel runs on their
        row slices as on a whole weight, ``variant`` 16-input chunks per thread (rows from a multiple of
        ``cuda_ops.PIPELINE_ALIGN`` keep the four-chunk kernel's 8- and 16-byte position loads aligned)."""
        chunk = self.from_parts([t[start:stop] for t in self.tensors().values()], (stop - start, self.shape[1]))
        chunk._expand(out, variant)

    def _tc_candidates(self, m: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """The tensor-core kernel at ``m`` rows (the smallest token tile that holds them, each split-K choice of
        :func:`tc_splits`); the caller offers it only where its module builds (:func:`tc_built`)."""
        n, k = self.shape
        tokens = next(t for t in TC_TOKENS if t >= m)
        return {f"cuda_{self.tc_name}_n{tokens}_s{split}": (lambda x, s=split: self._tc(x, tokens, s))
                for split in tc_splits(n, k)}

    def _tc_ring_candidates(self, m: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """The ring kernel (``tc_gemm_ring`` of ``cuda/tc_tile.cuh``) at ``m`` rows, for the smallest token tile
        holding them: its depths of :data:`TC_RING_DEPTHS` that were the fastest ring candidate on an H100
        (:data:`TC_RING_CLEARED`: 3 at 16 and 32 tokens, 2 at 64), every depth under
        ``SECATEURS_UNVERIFIED_KERNELS=1``, each at :func:`tc_splits`; the caller offers them only where the module
        builds (:func:`tc_built`). Why it exists: at 8 tokens the tensor-core kernel's block linears read 1.22 TB/s
        on an H100, its stored bytes waited for ~30-130 instructions after their load with one 64-input stage in
        flight per block; this one keeps ``depth - 1`` stages in flight (on the Llama-2-7B shapes 1.006-1.159x
        faster than the old kernel for 4:8 at 8-64 tokens, 1.005-1.038x for 8:16 at 8-32)."""
        n, k = self.shape
        tokens = next(t for t in TC_TOKENS if t >= m)
        depths = [d for d in TC_RING_DEPTHS[tokens] if (tokens, d) in TC_RING_CLEARED or cuda_ops.unverified_offered()]
        return {f"cuda_{self.tc_ring_name}_n{tokens}_d{depth}_s{split}":
                (lambda x, d=depth, s=split: self._tc_ring(x, tokens, d, s))
                for depth in depths for split in tc_splits(n, k)}

    def cuda_candidates(self, m: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """The format's GEMV for 1-4 rows: each row count's instantiated rows per warp group (default first), at
        the split-K choices of :func:`cuda_ops.splits`; above 4 rows (row bucket 8 on) the expand path (the weight
        expanded into the scratch every layer shares, then cuBLAS) at each chunks-per-thread choice the tables'
        alignment allows; at 5-64 rows also the tensor-core kernel (the smallest token tile that holds ``m`` rows, at
        the split-K choices of :func:`tc_splits`; correct on an H100, its speed left to the dispatcher's timing),
        after the expand path, and its ring form (:meth:`_tc_ring_candidates`: the depths timed fastest on an H100,
        every depth under the opt-in) last; at prompt sizes the pipelined expand path
        (:func:`cuda_ops.pipelined_candidates`, with the widest chunks per thread the tables allow). The ring comes
        after every other candidate so that offering it changes nothing it does not win: the untimed default (the
        first candidate, run where a bucket is first met inside CUDA-graph capture) stays the expand path, and a tie
        in the dispatcher's timing keeps the earlier path. A format whose GEMV was never run on a GPU is offered only
        under ``SECATEURS_UNVERIFIED_KERNELS=1`` (4:8's and 8:16's GEMV and expand paths matched float64 on an
        H100). Compiled on first offer (an error there offers nothing)."""
        n, k = self.shape
        if m < 1 or k % CHUNK or not cuda_ops.ready(self.values, 16, n, k * self.kept // self.group) \
                or not self._tables_ready():
            return {}
        if not self.gemv_verified and not cuda_ops.unverified_offered():
            return {}
        expanding = m > self.tokens[-1]  # row bucket 8 on
        cuda_ops._module(self.values.device.index, self.source)  # compiled once; raises where it cannot be
        if expanding:
            usable = [c for c in self.expand_chunks if c == 1 or self._wide_positions()]
            paths = {f"expand_cublas_c{c}": (lambda x, c=c: cuda_ops.scratch_matmul(
                         x, self.shape, lambda out: self._expand(out, c)))
                     for c in usable}
            tc = m <= TC_TOKENS[-1] and tc_built(self.values.device, TC_SOURCE, self.kind)  # checked (and said) once
            if tc:
                paths.update(self._tc_candidates(m))
            paths.update(cuda_ops.pipelined_candidates(self, m, max(usable)))  # prompts
            if tc:
                paths.update(self._tc_ring_candidates(m))  # after every other candidate: ties keep those
            return paths
        tokens = next(t for t in self.tokens if t >= m)
        return {f"cuda_{self.gemv_name}_r{rows}_s{split}": (lambda x, r=rows, s=split: self._gemv(x, r, s))
                for split in cuda_ops.splits(n, k // CHUNK // 32) for rows in self.rows[tokens]}


def gemv_launch(kernel: str, source: Path, tokens: tuple[int, ...], x: torch.Tensor, tables: tuple[torch.Tensor, ...],
                rows: int, split: int) -> torch.Tensor:
    """Launch an N:M GEMV of common.cuh's ``gemv_nm`` (``<kernel>_<dtype>_t<tokens>_r<rows>``) on x (1-4 rows) and
    the stored tensors ``tables`` (values first): its arguments are (x, tables..., y, M, N, K, split)."""
    x = cuda_ops._aligned(x)
    m, k = x.shape
    n = tables[0].shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    name = f"{kernel}_{cuda_ops._SUFFIX[x.dtype]}_t{next(t for t in tokens if t >= m)}_r{rows}"
    cuda_ops._launch(name, cuda_ops._grid(n, rows, split), (x, *tables, y), (m, n, k, split), source=source)
    return y


def expand_launch(kernel: str, source: Path, tables: tuple[torch.Tensor, ...], out: torch.Tensor, chunks: int) -> None:
    """Launch an N:M expand kernel (``<kernel>_c<chunks>``: tables (values first), out, units of ``chunks``
    16-input chunks) writing the dense weight into the first N*K elements of ``out``."""
    units = tables[0].numel() // (CHUNK // 2) // chunks
    blocks = min((units + 255) // 256, 65535 * 8)
    cuda_ops._launch(f"{kernel}_c{chunks}", blocks, (*tables, out), (units,), 8, source=source,
                     int_type=ctypes.c_longlong)


def tc_built(device: torch.device, source: Path, kind: str) -> bool:
    """Whether a tensor-core module (``source``) builds for ``device``; where it does not (NVRTC refusing the source,
    a driver that cannot load it) it says so, once, and the caller offers none of its kernels: that must not cost
    the layer the expand path offered beside them."""
    try:
        cuda_ops._module(device.index, source)
    except Exception as exc:  # noqa: BLE001
        from .linear import note  # linear imports the formats, which import this module

        note(f"the {kind} tensor-core kernel was not built ({str(exc).splitlines()[0][:120]}): 5-64 tokens use the "
             "expand path")
        return False
    return True


def tc_splits(n: int, k: int) -> list[int]:
    """Split-K choices of the tensor-core kernel, the default first: the fewest blocks per feature tile that reach
    :data:`TC_BLOCKS` blocks (where the feature tiles alone do not), and the next larger choice; each split keeps at
    least one 64-input stage."""
    tiles, stages = -(-n // TC_ROWS), -(-k // (4 * CHUNK))
    usable = [s for s in TC_SPLITS if s <= stages]
    preferred = next((s for s in usable if tiles * s >= TC_BLOCKS), usable[-1])
    return usable[usable.index(preferred): usable.index(preferred) + 2]


def tc_launch(kernel: str, x: torch.Tensor, tables: tuple[torch.Tensor, ...], tokens: int, split: int,
              depth: int = 0) -> torch.Tensor:
    """Launch the tensor-core kernel ``<kernel>_<dtype>_n<tokens>`` (a ring kernel with ``depth``:
    ``..._n<tokens>_d<depth>``, same arguments) of ``nm_tc.cu`` on x (any number of rows: token
    tiles are blocks too) and the stored tensors ``tables`` (values first): its arguments are (x, tables..., y, work,
    M, N, K, split). With ``split`` > 1 every block writes fp32 partial sums to its slice of ``work`` (split, M, N)
    and ``tcsum_<dtype>`` adds them into y in split order (deterministic, no atomics)."""
    x = cuda_ops._aligned(x)
    m, k = x.shape
    n = tables[0].shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    work = y if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    suffix = cuda_ops._SUFFIX[x.dtype]
    blocks = -(-n // TC_ROWS) * split * -(-m // tokens)
    name = f"{kernel}_{suffix}_n{tokens}" + (f"_d{depth}" if depth else "")
    cuda_ops._launch(name, blocks, (x, *tables, y, work), (m, n, k, split), TC_WARPS,
                     source=TC_SOURCE)
    if split > 1:
        threads = cuda_ops.WARPS * 32
        cuda_ops._launch(f"tcsum_{suffix}", -(-m * n // threads), (work, y), (m * n, split), source=TC_SOURCE)
    return y

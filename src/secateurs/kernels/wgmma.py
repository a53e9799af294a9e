"""The 2:4 prompt GEMM on Hopper's ``wgmma.mma_async.sp`` (sm_90a), reading the stored 2:4 tensors as they are.

Why: the tiled ``mma.sp`` GEMM (sm_80 form) reaches 0.19-0.67x cuBLAS on an H100 and the ``mma.sp`` instruction
itself peaks near 956 TFLOP/s (benchmarks/mma_peak.py), so it cannot give the issue's >= 1.2x; cuSPARSELt, which
uses ``wgmma.sp``, reaches 1.15-1.69x. The kernel (``kernels/cuda/sparse24_wgmma.cu``) is compiled by NVRTC for
``sm_90a`` (``cuda_ops.ARCH_SUFFIX``) and offered only on compute capability 9.0. Every configuration of
:data:`CONFIGS` multiplied correctly on an H100 and was timed there; the three that were the fastest path somewhere
(:data:`CLEARED`) are offered by default and the dispatcher's timing picks among them per shape, the three never near
the fastest (:data:`DOMINATED`) only under ``SECATEURS_UNVERIFIED_KERNELS=1``, as is a configuration added later until
a GPU run checks and times it. Four earlier ones that left one stage's products
in flight while the next stage's metadata was written into the register the wgmma in flight reads multiplied wrongly
there (relative error 0.11-0.57) and were removed; the in-flight configurations of :data:`CONFIGS` keep that register
apart (the kernel's header says how; tests/test_wgmma.py checks it in the SASS) and matched float64 on the H100.

The layout, described here for the CPU model of the kernel (tests/test_wgmma.py) as well as for readers:

- the weight is the sparse A operand (output features on M), the activations B (tokens on N); a block of two
  warpgroups owns ``BM = 128 MW`` features x ``BN`` tokens, warpgroup ``wg`` the ``MW`` 64-feature tiles
  ``wg MW .. wg MW + MW - 1`` (one m64nBNk32 instruction each per 32 inputs); K runs in 64-input stages (128-input
  ones: below);
- a stage's shared-memory slot is ``A`` (BM rows x 64 bytes: the stage's 32 stored values of each row, 64-byte
  swizzle: row ``r`` at ``64 r``, 16-byte chunk ``c`` at chunk ``c ^ ((r >> 1) & 3)``), ``E`` (BM rows x 8 bytes:
  the stage's four stored 16-bit position words of each row, as stored) and ``B`` (``BN`` tokens x 128 bytes: the
  stage's 64 activations, 128-byte swizzle: chunk ``c`` of token ``r`` at chunk ``c ^ (r & 7)``);
- the descriptors: A of 64-feature tile ``j`` starts at ``A + 4096 j``, stride byte offset 512, 64-byte swizzle;
  B at ``B``, stride byte offset 1024, 128-byte swizzle; the second 32-input step of a stage 32 bytes (A) and 64
  bytes (B) further;
- metadata: for 64-feature tile ``j``, lane ``(g, t)`` of warp ``w`` of its warpgroup passes stored position word
  ``t`` of the stage for row ``64 j + 16 w + g`` (bits 0-15) and row ``+ 8`` (bits 16-31); the stage's first 32
  inputs run under sparsity selector 0 (lanes ``t = 0, 1``), the next 32 under selector 1 (lanes ``t = 2, 3``). No
  derived metadata table: the positions stay the one table in memory (``meta``, K/8 bytes per row, 1/8 of the value
  bytes);
- a 128-input stage: ``A`` rows of 128 bytes (64 stored values, 128-byte swizzle: chunk ``c`` of row ``r`` at chunk
  ``c ^ (r & 7)``; tile ``j`` at ``A + 8192 j``, stride byte offset 1024), ``E`` rows of 16 bytes (8 words), ``B``
  two 64-input parts of ``BN`` tokens x 128 bytes; half ``h`` of the stage runs as a 64-input stage from A byte
  ``64 h`` of the rows, B part ``h`` and position word ``4 h + t``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import cuda_ops

SOURCE = cuda_ops.SOURCE.with_name("sparse24_wgmma.cu")
cuda_ops.ARCH_SUFFIX[SOURCE] = "a"  # wgmma exists only on sm_90a

STAGE_K = 64  # inputs of the shorter shared-memory stage (a configuration's own: stage_k), so K % 64 == 0
THREADS = 256  # two warpgroups
SWIZZLE_128B, SWIZZLE_64B = 1, 2  # descriptor bits 62-63 (PTX ISA, "Matrix Descriptor Format")
B_STRIDE = 1024  # descriptor stride byte offset of B: between 8-row groups of 128-byte rows

CONFIGS: dict[str, tuple[int, int, int, int, int, int]] = {
    "m128_n128_s4": (1, 128, 64, 4, 0, 1),
    "m128_n128_s5_f1": (1, 128, 64, 5, 1, 1),
    "m128_n256_s4_f1": (1, 256, 64, 4, 1, 1),
    "m256_n128_s4_f1": (2, 128, 64, 4, 1, 1),
    "m128_n128_s4_f1": (1, 128, 64, 4, 1, 2),
    "m128_n128_s4_sk128": (1, 128, 128, 4, 0, 1),
}
"""name -> (64-feature tiles per warpgroup MW, tokens per block BN, inputs a stage (64 or 128), stages, wgmma groups
left in flight across a stage, blocks an SM), the order of the kernel's entry-point macro; the name is
``m<128 MW>_n<BN>_s<stages>``, then ``_f1`` for one group in flight, then ``_sk128`` for 128-input stages. Blocks an SM
is the entry point's ``__launch_bounds__`` minimum: 2 holds ptxas to 128 registers a thread (two blocks of 256
threads fill the 64K-register file) and needs two rings in an SM's shared memory.

- ``m128_n128_s4``: 128 features x 128 tokens a block, a 4-slot ring (3 stages copied ahead), each stage's products
  waited for before the next stage. On one NVIDIA H100 80GB HBM3 (``gpu_kernel_check.py --part cuda --formats 2:4
  --only wgmma``, named ``m128_n128_s4_i0`` then) its first launch gave relative error 2.1e-4 (fp16) and 1.7e-3
  (bf16), split K the same, and all 360 checks of it (fp16/bf16, 10 shapes, m = 1-8192, whole and split K) passed,
  worst 1.7e-3 (bf16 rounding); timed there (:data:`CLEARED`).
- ``m128_n128_s5_f1``: the same tile, a 5-slot ring (3 stages copied ahead, one multiplied, one whose products
  are still in flight while the next stage's barrier, metadata loads and wgmma issue): 126 KB of shared memory,
  116 registers a thread (nvcc 13.0, no spill).
- ``m128_n256_s4_f1``: 128 features x 256 tokens (one m64n256k32 per warpgroup and 32 inputs: 128 accumulator
  registers a thread), a 4-slot ring (2 ahead, one in flight): 41 KB of operands per stage for twice the products
  of the 128 x 128 tile's 25 KB; 165 KB of shared memory, 220 registers a thread (nvcc 13.0, no spill).
- ``m256_n128_s4_f1``: 256 features x 128 tokens (each warpgroup two 64-feature tiles: 4 m64n128k32 a stage
  between barriers instead of 2, 128 accumulator registers a thread), a 4-slot ring (2 ahead, one in flight): 34 KB
  of operands per stage for twice the products of the 128 x 128 tile; 137 KB of shared memory, 244 registers a
  thread (nvcc 13.0, no spill).
- ``m128_n128_s4_f1``: the 128 x 128 tile with one group in flight and two blocks an SM, so one block's barrier and
  metadata loads can overlap the other's wgmma: a 4-slot ring (2 ahead, one in flight), 101 KB of shared memory a
  block (two blocks and the 1 KB each reserved: 204 of the SM's 228 KB), 116 registers a thread under the cap of
  128 (nvcc 13.0, no spill).
- ``m128_n128_s4_sk128``: the 128 x 128 tile of ``m128_n128_s4`` (a 4-slot ring, 3 ahead, each stage's products
  waited for) with 128-input stages: half the barriers and waits per K, 4 m64n128k32 a warpgroup between them; A in
  the 128-byte swizzle (:func:`a_offset`), 50 KB a stage, 201 KB of shared memory, 167 registers a thread (nvcc
  13.0, no spill); offered only where K % 128 == 0.

All six matched float64 on one NVIDIA H100 80GB HBM3 (``gpu_kernel_check.py --part cuda --formats 2:4 --only wgmma``,
2026-12-06: 2,104 checks, fp16/bf16, 10 shapes, m = 1-8192, whole and split K, 0 failures, worst 1.7e-3 in bf16) and
were timed there (:data:`CLEARED`). The CPU model of tests/test_wgmma.py passed the four removed in-flight
configurations as well: only a GPU run tells whether a configuration multiplies correctly."""

CLEARED: frozenset[str] = frozenset({"m128_n128_s4_sk128", "m128_n256_s4_f1", "m256_n128_s4_f1"})
"""Configurations offered without ``SECATEURS_UNVERIFIED_KERNELS=1``: correct on a Hopper GPU, timed there, and the
fastest path somewhere (the others: :data:`DOMINATED`). On an
H100 (``sparse_kernels.py --part gemm --wgmma``, 2026-12-06, seven Llama shapes at 512-8192 tokens) the first,
``m128_n128_s4``, ran at 0.61-0.76x cuBLAS (454-505 dense-equivalent TFLOP/s); in a later run the in-flight and
128-input ones lifted the best wgmma time to 0.70-0.91x cuBLAS (319-673 TFLOP/s, 1.41-3.30x the mma.sp GEMM):
``m128_n128_s4_sk128`` fastest at 512 tokens on the three Llama-2-7B shapes and the 1024-output one,
``m128_n256_s4_f1`` at 512 tokens on the three others and at 2048 tokens on six of seven, ``m256_n128_s4_f1`` at 8192
tokens on the three 8192 x 8192 and larger shapes. The dispatcher's timing picks among them per shape; where
expand + cuBLAS is faster (most shapes at 8192 tokens) it takes that. A configuration added later stays opt-in until
it has run and been timed on a GPU."""

DOMINATED: frozenset[str] = frozenset({"m128_n128_s4", "m128_n128_s5_f1", "m128_n128_s4_f1"})
"""Correct and timed on the H100 but never within 3% of the fastest stored-format path on any of the 21 (shape, tokens)
rows of that run (the best of them 0.92x the fastest): offered only under ``SECATEURS_UNVERIFIED_KERNELS=1``, where the
benchmark times every configuration, because each candidate offered adds to the dispatcher's first-call tuning
(every shape and row bucket times each one; the 2:4 Llama-2-7B model's warm-up took 35 s with all six offered and the
pipelined path, 4 s with one configuration)."""


def block_features(config: str) -> int:
    return 128 * CONFIGS[config][0]


def block_tokens(config: str) -> int:
    return CONFIGS[config][1]


def stage_k(config: str) -> int:
    """Inputs a stage: 64, or 128 (two 64-input halves, each one metadata register and one wgmma pair a tile)."""
    return CONFIGS[config][2]


def stages(config: str) -> int:
    return CONFIGS[config][3]


def in_flight(config: str) -> int:
    """wgmma groups a configuration leaves running across a stage (0 or 1)."""
    return CONFIGS[config][4]


def blocks_per_sm(config: str) -> int:
    """The blocks an SM the entry point is built for (its ``__launch_bounds__`` minimum: 1 or 2)."""
    return CONFIGS[config][5]


def copies_ahead(config: str) -> int:
    """Stages being copied while one is multiplied: the ring less the stage multiplied and the one in flight."""
    return stages(config) - 1 - in_flight(config)


def a_row_bytes(config: str) -> int:
    """A stage's values of one feature row: stage_k / 2 stored (kept) values of 2 bytes."""
    return stage_k(config)


def a_stride(config: str) -> int:
    """A's descriptor stride byte offset: between 8-row groups."""
    return 8 * a_row_bytes(config)


def a_swizzle(config: str) -> int:
    """A's descriptor swizzle mode: the swizzle as wide as A's rows."""
    return SWIZZLE_64B if a_row_bytes(config) == 64 else SWIZZLE_128B


def e_row_bytes(config: str) -> int:
    """A stage's positions of one feature row: stage_k / 16 words of 16 bits."""
    return stage_k(config) // 8


def b_part_bytes(config: str) -> int:
    """One 64-input part of B: BN tokens x 128 bytes (a 128-input stage has two)."""
    return block_tokens(config) * 128


def a_bytes(config: str) -> int:
    return block_features(config) * a_row_bytes(config)


def e_bytes(config: str) -> int:
    return block_features(config) * e_row_bytes(config)


def b_bytes(config: str) -> int:
    return stage_k(config) // 64 * b_part_bytes(config)


def stage_bytes(config: str) -> int:
    return a_bytes(config) + e_bytes(config) + b_bytes(config)


def shared_bytes(config: str) -> int:
    """Dynamic shared memory of a launch: the ring plus 1024 bytes to align it to the 128-byte swizzle atom."""
    return stages(config) * stage_bytes(config) + 1024


WITHHELD: set[str] = set()
"""Configurations this process never offers: the GPU check (benchmarks/gpu_kernel_check.py) withholds one whose first
launch, made in a child process, faulted or gave a wrong product, so the rest of the check survives it."""


def configs() -> list[str]:
    """The configurations offered at every prompt size: the cleared ones (all of :data:`CONFIGS` under
    ``SECATEURS_UNVERIFIED_KERNELS=1``) but those withheld."""
    return [c for c in CONFIGS if c not in WITHHELD and (c in CLEARED or cuda_ops.unverified_offered())]


# ---- the layout, as the kernel computes it (the CPU model in tests/test_wgmma.py reads these) ----
def a_offset(r: int, chunk: int, row_bytes: int = 64) -> int:
    """Byte offset inside a slot's A part of 16-byte chunk ``chunk`` of feature row ``r`` of the block: rows of 64
    bytes (chunks 0-3, 64-byte swizzle) or 128 (chunks 0-7, 128-byte swizzle)."""
    if row_bytes == 64:
        return r * 64 + ((chunk ^ ((r >> 1) & 3)) << 4)
    return r * 128 + ((chunk ^ (r & 7)) << 4)


def b_offset(r: int, chunk: int, tokens: int = 128) -> int:
    """Byte offset inside a slot's B part of 16-byte chunk ``chunk`` (0-7, 8-15 for a 128-input stage's second
    64-input part, ``tokens`` x 128 bytes on) of token row ``r``."""
    return (chunk >> 3) * tokens * 128 + r * 128 + (((chunk & 7) ^ (r & 7)) << 4)


def descriptor(address: int, stride: int, swizzle: int) -> int:
    """A wgmma shared-memory matrix descriptor: start address >> 4 (bits 0-13), leading byte offset 1 (bits 16-29,
    unused by swizzled K-major layouts), stride byte offset >> 4 (bits 32-45), base offset 0, swizzle (bits 62-63)."""
    return ((address & 0x3FFFF) >> 4) | (1 << 16) | ((stride >> 4) << 32) | (swizzle << 62)


def metadata_register(meta_stage: torch.Tensor, tile: int, warp: int, lane: int, half: int = 0) -> int:
    """The 32-bit metadata register of ``lane`` of ``warp`` (0-3) for 64-feature tile ``tile`` of the block and 64-input
    half ``half`` of one stage, from the slot's E part (``meta_stage``: (BM, 8 or 16) uint8, the stage's stored
    position bytes of each row): position word ``4 half + t`` of two rows."""
    g, t = lane >> 2, lane & 3
    r = tile * 64 + warp * 16 + g
    byte = 8 * half + 2 * t
    words = [int(meta_stage[row, byte]) | (int(meta_stage[row, byte + 1]) << 8) for row in (r, r + 8)]
    return words[0] | (words[1] << 16)


def capability(device: torch.device) -> tuple[int, int]:
    """The compute capability of a GPU; (0, 0) for any other device (tests offer kernels on CPU weights)."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)


def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


MIN_SPLIT_STAGES = 4  # each split of K keeps at least this many stages


def splits_for(config: str, shape: tuple[int, int], m: int, sms: int) -> int:
    """Split-K for a weight whose tiles fill less than half the GPU's block places (SMs x the configuration's blocks
    an SM; the 1024-row k/v projection, short prompts on 4096-wide weights): enough splits for about one block per
    place, at most 8, each keeping MIN_SPLIT_STAGES stages; 1 where the tiles alone fill the GPU."""
    n, k = shape
    blocks = -(-n // block_features(config)) * -(-m // block_tokens(config))
    places = sms * blocks_per_sm(config)
    if 2 * blocks > places:
        return 1
    return max(1, min(8, places // blocks, k // stage_k(config) // MIN_SPLIT_STAGES))


def offered(device: torch.device) -> bool:
    """Whether the wgmma kernel may be offered on ``device`` (a GPU the CUDA kernels run on): a Hopper GPU (9.0:
    sm_90a code runs on no other); which configurations, :func:`configs` says."""
    return capability(device) == (9, 0)


def candidates(values: torch.Tensor, meta: torch.Tensor, shape: tuple[int, int],
               m: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """name -> ``x -> y`` for a 2:4 weight and ``m`` tokens (K % 64 == 0, 32 tokens and more); ``{}`` where not
    offered. Compiled on first offer (an error there offers nothing)."""
    k = shape[1]
    if m < cuda_ops.GEMM_TOKENS or k % STAGE_K or not offered(values.device) or not configs():
        return {}
    try:
        cuda_ops._module(values.device.index, SOURCE)
    except Exception as exc:  # noqa: BLE001  (an NVRTC without sm_90a, a driver that cannot load it)
        from .linear import note  # linear imports the formats, which import this module

        note(f"the wgmma.sp GEMM was not built ({str(exc).splitlines()[0][:120]}): prompts use the mma.sp GEMM "
             "or the expand path")
        return {}
    sms = sm_count(values.device)
    offered_: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    for c in configs():
        if k % stage_k(c):
            continue
        offered_[f"cuda_wgmma24_{c}"] = lambda x, c=c: sparse24_wgmma(x, values, meta, c, 1)
        splits = splits_for(c, shape, m, sms)
        if splits > 1:
            offered_[f"cuda_wgmma24_{c}_k{splits}"] = lambda x, c=c, s=splits: sparse24_wgmma(x, values, meta, c, s)
    return offered_


@torch.library.custom_op("secateurs::sparse24_wgmma", mutates_args=())
def sparse24_wgmma(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, config: str, splits: int) -> torch.Tensor:
    """``x @ W.T`` for a 2:4 weight (values (N, K/2), meta (N, K/8) uint8, K a multiple of the configuration's
    stage) and any number of rows of x, by ``wgmma.mma_async.sp`` (sm_90a); ``config`` names a :data:`CONFIGS`
    entry; ``splits`` > 1 splits K, the blocks' fp32 sums added by one reduction (no atomics: deterministic) and
    rounded once."""
    x = cuda_ops._aligned(x)
    m, k = x.shape
    if k % stage_k(config):  # the kernel would drop the inputs past the last whole stage
        raise ValueError(f"{config} needs K % {stage_k(config)} == 0, not K = {k}")
    n = values.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    ws = torch.empty(splits, m, n, dtype=torch.float32, device=x.device) if splits > 1 else y
    bm, bn = block_features(config), block_tokens(config)
    blocks = ((n + bm - 1) // bm) * ((m + bn - 1) // bn) * splits
    cuda_ops._launch(f"wgmma24_{cuda_ops._SUFFIX[x.dtype]}_{config}", blocks, (x, values, meta, y, ws),
                     (m, n, k, splits), THREADS // 32, source=SOURCE, shared=shared_bytes(config))
    return ws.sum(dim=0).to(x.dtype) if splits > 1 else y


@sparse24_wgmma.register_fake
def _(x, values, meta, config, splits):
    return x.new_empty(x.shape[0], values.shape[0])

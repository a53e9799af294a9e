"""CUDA C++ sparse kernels, compiled at run time through NVRTC: no CUDA toolkit needed.

The sources (``kernels/cuda/*.cu``, one module each, all including ``common.cuh``; shipped as package data) are
compiled on first use for the GPU's architecture by NVRTC through NVIDIA's ``cuda-python`` bindings
(``pip install 'secateurs[kernels]'``; NVRTC itself comes with PyTorch's CUDA wheels) and each binary is cached on
disk under ``~/.cache/secateurs/kernels`` (``SECATEURS_KERNEL_CACHE`` overrides), keyed by the hash of the source,
``common.cuh`` and the options, the target architecture (``sm_90a`` for a source in :data:`ARCH_SUFFIX`) and the
NVRTC version. Kernels launch on PyTorch's current stream.

Every kernel reads the stored tensors as they are (one position table in memory, no derived copy):

- 2:4 GEMV (1-4 tokens): one warp per output row, one byte-permute per group of four inputs picks the two
  activations, split-K across warps for narrow weights (bound by memory: a Hopper SM receives only 13-18
  bytes from memory per clock, so the instructions per weight decide the speed);
- 2:4 on tensor cores (1-32 tokens): ``mma.sp.m16n8k32`` with the weight as the sparse operand, tokens on
  the N side, warps splitting K; values read in the stored layout (K is permuted inside each MMA instead),
  each lane's metadata register assembled from the stored positions by two byte-permutes;
- 2:4 wide decode (17-64 tokens, :func:`sparse24_wide`): the decode kernel's fragments with several 64-input steps of
  weights in flight a warp, x staged once per block in shared memory by ``cp.async``, split-K over blocks with an
  in-kernel fixed-order sum; correct on an H100 (636 checks, 0 failures) and the fastest stored-format path at 32
  tokens on six of seven Llama shapes and at 64 on four there, so offered by default at row buckets 32 and 64 but
  for the one configuration never within 3% of the fastest (:data:`WIDE_DOMINATED`: only under the opt-in);
- 2:4 GEMM (prompts, 32-8192 tokens): block tiles over (features x tokens), a multi-stage ``cp.async`` ring
  of value, position and activation tiles, ``ldmatrix`` fragments, ``mma.sp`` in natural K order (where each
  lane's metadata register is two stored position words); a few tile shapes the dispatcher times; on Hopper
  (compute capability 9.0) also ``wgmma.mma_async.sp`` (``kernels/wgmma.py``, ``sparse24_wgmma.cu``, built for
  ``sm_90a`` through :data:`ARCH_SUFFIX`; its six configurations matched float64 on an H100 and were timed there,
  0.70-0.91x cuBLAS at best; the three fastest somewhere are offered by default);
- expand: the stored 2:4 weight into one dense scratch buffer per device and dtype, shared by all layers
  (:func:`scratch`), then cuBLAS: a prompt path with no persistent copy; the 4:8 and 8:16 formats
  (``kernels/nm48.py``, ``kernels/nm816.py``, from 8 rows) and the bitmap (from 2 rows: a warp per 32 words,
  a popcount scan, its values staged in shared memory by 16-byte loads) expand into the same buffer
  (:func:`scratch_matmul`);
- pipelined expand (prompts, 32 tokens on; 2:4, 4:8, 8:16, bitmap): the output rows in 2 or 4 chunks, a side stream
  expanding chunk j + 1 into one of two chunk slots of the same scratch while cuBLAS multiplies chunk j from the
  other into its columns of y (:func:`pipelined_candidates`); correct on an H100 and timed there (0.41-1.01x
  cuBLAS, the fastest stored-format path on two of 21 prompt shapes, by 0.1% and 1.1%);
- bitmap GEMV (1 token): a lane walks the set bits of a 32-input word;
- N:M GEMVs (1-4 tokens; ``kernels/nm.py``): one loop (``common.cuh``'s ``gemv_nm``) with a decode step per format:
  4:8 (``sparse48.cu``: three byte-permutes per value pair and token) and 8:16 (``sparse816.cu``: one 16-byte
  load of values and one 32-bit position word per 16 inputs, four byte-permutes per value pair and token);
- N:M on tensor cores (5-64 tokens; ``kernels/nm.py``, its own module ``nm_tc.cu``, 4:8 and 8:16 alike): "load as
  sparse, compute as dense": a block of 64 output features streams its rows' stored values and positions, expands
  them in registers (the format's decode step) into a swizzled shared dense tile and runs dense ``mma.sync.m16n8k16``
  against 16-64 tokens, split-K over blocks with a fixed-order fp32 sum; correct on an H100, offered beside the
  expand path (the bitmap's form, ``bitmap_tc.cu`` on the same engine, too: 0.35-0.77x cuBLAS there at 8-64
  tokens, against its expand path's 0.36-0.67x);
- banded GEMV (1-4 tokens) and expand (``kernels/banded.py``, its own module ``banded.cu``): unstructured weights of
  50-90% zeros as pieces of a band-fixed number of (value, 4-bit delta) entries, one piece per lane with a fixed
  trip count, x staged in shared memory, and its tensor-core kernel for 5-64 tokens (``banded_tc.cu``); correct and
  timed on an H100 (at 1 token faster than the bitmap GEMV on every shape and band), so ``choose_format`` stores
  unstructured weights of 50-90% zeros in it ahead of the bitmap.

Interface (the dispatcher in ``kernels/linear.py`` times what ``candidates`` offers):

- ``status()``: None when the kernels can run on the current GPU, else one line saying why not.
- ``candidates(fmt, m)``: name -> callable ``x (m, K) -> y (m, N)`` for a weight on the GPU, in the order
  to try them (the first is the untimed default: the measured best where the kernel has run on a GPU); ``{}``
  where no kernel applies. Each format says which of these kernels it offers (``cuda_candidates`` in
  ``kernels/sparse24.py``, ``kernels/bitmap.py``, ``kernels/nm.py`` for the N:M formats, ``kernels/banded.py``).
- Every kernel is a ``torch.library.custom_op`` (``secateurs::sparse24_gemv``, ``sparse24_mma``, ``sparse24_wide``,
  ``sparse24_gemm``, ``sparse24_expand``, ``bitmap_gemv``, ``bitmap_expand``, ``pipelined_expand_matmul``;
  ``sparse24_wgmma`` in ``kernels/wgmma.py``;
  the N:M ones in ``kernels/nm48.py`` and ``kernels/nm816.py``; ``banded_gemv`` and ``banded_expand`` in
  ``kernels/banded.py``) with a fake implementation, so CUDA graphs and
  ``torch.compile`` run over it without graph breaks.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from ..files import write_atomic
from .registry import format_class
if TYPE_CHECKING:
    from .formats import SparseFormat

SOURCE = Path(__file__).with_name("cuda") / "sparse_gemv.cu"
COMMON = SOURCE.with_name("common.cuh")  # the helpers every source includes, handed to NVRTC in memory
TC_TILE = SOURCE.with_name("tc_tile.cuh")  # the tensor-core engine of nm_tc.cu and bitmap_tc.cu
HEADERS = (COMMON, TC_TILE)
"""Headers handed to NVRTC in memory; a source's cache key covers common.cuh and each other header it includes
(so the keys of sources that include only common.cuh are what they always were)."""
OPTIONS = ("-std=c++17",)
WARPS = 8  # warps per block, as #defined in the source
MIN_CAPABILITY = (8, 0)  # cvt.rn.bf16.f32 and the L2 cache hints the kernels use
TOKENS_24 = (1, 2, 4)  # token counts the 2:4 kernel is instantiated for (m = 3 runs the 4 variant)
TOKENS_BITMAP = (1, 2)
MMA_TOKENS = (1, 32)  # the tensor-core 2:4 kernel: one, two or four 8-token MMA tiles
BITMAP_OFFERED = 1  # the 2-token bitmap kernel measured 0.27-0.86x of cuBLAS on an H200: never offered
SPLITS = (1, 2, 4, 8)  # warps sharing one output row group (split-K inside a block)
_SUFFIX = {torch.float16: "f16", torch.bfloat16: "bf16"}

_STATUS: dict[int, str | None] = {}
_MODULES: dict[tuple[int, Path], object] = {}
_FUNCTIONS: dict[tuple[int, str], object] = {}
_SHARED_SET: set[tuple[int, str, int]] = set()


@cache
def cache_dir() -> Path:
    """Where compiled kernels are kept (SECATEURS_KERNEL_CACHE, else the XDG cache), read once."""
    if os.environ.get("SECATEURS_KERNEL_CACHE"):
        return Path(os.environ["SECATEURS_KERNEL_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "secateurs" / "kernels"


def _bindings():
    from cuda.bindings import driver, nvrtc

    return driver, nvrtc


def _check(result, what: str):
    """cuda-python returns (error, *values); raise on a non-zero error, else return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"{what} failed: {getattr(err, 'name', err)}")
    return values[0] if len(values) == 1 else values


@cache
def enabled() -> bool:
    """SECATEURS_CUDA_KERNELS=0 turns the kernels off; read once, on first use, since ``status`` is asked
    on every call that runs a CUDA kernel."""
    return os.environ.get("SECATEURS_CUDA_KERNELS", "1") != "0"


UNVERIFIED_ENV = "SECATEURS_UNVERIFIED_KERNELS"


@cache
def unverified_offered() -> bool:
    """Whether kernels not yet cleared on a GPU (never run there, or run correctly but never timed) are offered
    (to the dispatcher's timed, reference-checked choice, like any other): only with
    ``SECATEURS_UNVERIFIED_KERNELS=1``, because a reference check catches a wrong product but not a kernel that
    faults and takes the CUDA context with it. ``benchmarks/gpu_kernel_check.py`` turns it on to validate them."""
    return os.environ.get(UNVERIFIED_ENV) == "1"


def status(device: torch.device | int | None = None) -> str | None:
    """None when the CUDA kernels can run on ``device`` (default: the current GPU), else why not, in one line."""
    if not enabled():
        return "the CUDA sparse kernels are turned off (SECATEURS_CUDA_KERNELS=0)"
    if not torch.cuda.is_available():
        return "no CUDA GPU: the CUDA sparse kernels are off"
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device or "cuda")
    if device.type != "cuda":
        return f"{device} is not a CUDA device: the CUDA sparse kernels are off"
    index = torch.cuda.current_device() if device.index is None else device.index
    if index not in _STATUS:
        _STATUS[index] = _probe(index)
    return _STATUS[index]


def _probe(index: int) -> str | None:
    try:
        _bindings()
    except ImportError:
        return "cuda-python is not installed (pip install 'secateurs[kernels]'): the CUDA sparse kernels are off"
    capability = torch.cuda.get_device_capability(index)
    if capability < MIN_CAPABILITY:
        return (f"{torch.cuda.get_device_name(index)} has compute capability {capability[0]}.{capability[1]}; "
                f"the CUDA sparse kernels need {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer")
    try:
        _module(index)
    except Exception as exc:  # noqa: BLE001  (no NVRTC library, a driver too old for the binary, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"the CUDA sparse kernels could not be built or loaded ({first[:200]})"
    return None


ARCH_SUFFIX: dict[Path, str] = {}
"""Sources that need an architecture-specific target (``"a"``: ``sm_90a`` for ``wgmma``), registered by the module
that owns them (``kernels/wgmma.py``); every other source compiles for plain ``sm_XY``."""


def _compile(capability: tuple[int, int], source: Path = SOURCE, arch_suffix: str = "") -> bytes:
    """NVRTC: a cubin of ``source`` for this architecture, or PTX for the newest one NVRTC knows if the GPU is newer.
    ``arch_suffix`` ``"a"`` targets the architecture-specific ``sm_XYa`` (``wgmma``, ``setmaxnreg``): a cubin only,
    for exactly this GPU (such code runs on no other architecture, so there is no PTX fallback). Without a suffix
    the options, cache key and file name are what they always were."""
    _, nvrtc = _bindings()
    arch = capability[0] * 10 + capability[1]
    version = ".".join(map(str, _check(nvrtc.nvrtcVersion(), "nvrtcVersion")))
    supported = list(_check(nvrtc.nvrtcGetSupportedArchs(), "nvrtcGetSupportedArchs"))
    target = max((a for a in supported if a <= arch), default=None)
    if target is None:
        raise RuntimeError(f"NVRTC {version} cannot target sm_{arch}")
    native = target == arch
    if arch_suffix and not native:
        raise RuntimeError(f"NVRTC {version} cannot target sm_{arch}{arch_suffix}")
    text = source.read_bytes()
    headers = [h for h in HEADERS if h == COMMON or f'#include "{h.name}"'.encode() in text]
    included = b"".join(h.read_bytes() for h in headers)
    options = (f"--gpu-architecture={'sm' if native else 'compute'}_{target}{arch_suffix}", *OPTIONS)
    digest = hashlib.sha256(text + b"\0" + included + "\0".join(options).encode()).hexdigest()[:16]
    path = cache_dir() / (f"{source.stem}-{digest}-{'sm' if native else 'compute'}{target}{arch_suffix}-nvrtc{version}."
                          f"{'cubin' if native else 'ptx'}")
    if path.exists():
        return path.read_bytes()
    program = _check(nvrtc.nvrtcCreateProgram(text, source.name.encode(), len(headers), [h.read_bytes() for h in headers],
                                              [h.name.encode() for h in headers]), "nvrtcCreateProgram")
    try:
        encoded = [o.encode() for o in options]
        err, = nvrtc.nvrtcCompileProgram(program, len(encoded), encoded)
        if int(err) != 0:
            size = _check(nvrtc.nvrtcGetProgramLogSize(program), "nvrtcGetProgramLogSize")
            log = b" " * size
            nvrtc.nvrtcGetProgramLog(program, log)
            raise RuntimeError(f"NVRTC {version} failed to compile {source.name}: {log.decode(errors='replace').strip()}")
        if native:
            size = _check(nvrtc.nvrtcGetCUBINSize(program), "nvrtcGetCUBINSize")
            binary = b" " * size
            _check(nvrtc.nvrtcGetCUBIN(program, binary), "nvrtcGetCUBIN")
        else:
            size = _check(nvrtc.nvrtcGetPTXSize(program), "nvrtcGetPTXSize")
            binary = b" " * size
            _check(nvrtc.nvrtcGetPTX(program, binary), "nvrtcGetPTX")
    finally:
        nvrtc.nvrtcDestroyProgram(program)
    try:  # the cache is an optimisation: a read-only home still runs
        write_atomic(path, binary)
    except OSError:
        pass
    return binary


def _module(index: int, source: Path = SOURCE):
    """The loaded module of ``source`` (another format's kernels live in a file of their own) on GPU ``index``."""
    if (index, source) not in _MODULES:
        driver, _ = _bindings()
        binary = _compile(torch.cuda.get_device_capability(index), source, ARCH_SUFFIX.get(source, ""))
        with torch.cuda.device(index):
            torch.empty(1, device=f"cuda:{index}")  # PyTorch makes the primary context current
            _check(driver.cuInit(0), "cuInit")
            _MODULES[index, source] = _check(driver.cuModuleLoadData(binary), "cuModuleLoadData")
    return _MODULES[index, source]


def _function(index: int, name: str, source: Path = SOURCE):
    key = (index, name)
    if key not in _FUNCTIONS:
        driver, _ = _bindings()
        _FUNCTIONS[key] = _check(driver.cuModuleGetFunction(_module(index, source), name.encode()), f"loading kernel {name}")
    return _FUNCTIONS[key]


def _launch(name: str, grid: int, tensors: tuple[torch.Tensor, ...], ints: tuple[int, ...], warps: int = WARPS,
            source: Path = SOURCE, shared: int = 0, int_type=ctypes.c_int) -> None:
    driver, _ = _bindings()
    device = tensors[0].device
    if device.index != torch.cuda.current_device():  # the kernel lives in that device's context
        with torch.cuda.device(device):
            return _launch(name, grid, tensors, ints, warps, source, shared, int_type)
    params = (tuple(t.data_ptr() for t in tensors) + ints,
              (ctypes.c_void_p,) * len(tensors) + (int_type,) * len(ints))
    stream = torch.cuda.current_stream(device).cuda_stream
    function = _function(device.index, name, source)
    if shared and (device.index, name, shared) not in _SHARED_SET:  # the 48 KB limit counts static shared too
        static = _check(driver.cuFuncGetAttribute(
            driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, function), f"reading {name}'s shared size")
        if shared + static > 48 * 1024:
            _check(driver.cuFuncSetAttribute(
                function, driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared),
                f"raising the shared-memory limit of {name}")
        _SHARED_SET.add((device.index, name, shared))
    _check(driver.cuLaunchKernel(function, grid, 1, 1, warps * 32, 1, 1, shared, stream, params, 0),
           f"launching {name}")


def _tokens(m: int, instantiated: tuple[int, ...]) -> int:
    return next(t for t in instantiated if t >= m)


def _grid(n: int, rows: int, split: int) -> int:
    per_block = (WARPS // split) * rows
    return (n + per_block - 1) // per_block


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """The kernels read x in 16-byte vectors; a view at an odd offset is copied once."""
    if not x.is_contiguous():
        return x.contiguous()
    return x if x.data_ptr() % 16 == 0 else x.clone()


@torch.library.custom_op("secateurs::sparse24_gemv", mutates_args=())
def sparse24_gemv(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, rows: int, split: int) -> torch.Tensor:
    """``x @ W.T`` for a 2:4 weight (values (N, K/2), meta (N, K/8) uint8) and 1-4 rows of x."""
    x = _aligned(x)
    m, k = x.shape
    n = values.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    name = f"gemv24_{_SUFFIX[x.dtype]}_t{_tokens(m, TOKENS_24)}_r{rows}"
    _launch(name, _grid(n, rows, split), (x, values, meta, y), (m, n, k, split))
    return y


@sparse24_gemv.register_fake
def _(x, values, meta, rows, split):
    return x.new_empty(x.shape[0], values.shape[0])


@torch.library.custom_op("secateurs::bitmap_gemv", mutates_args=())
def bitmap_gemv(x: torch.Tensor, values: torch.Tensor, bits: torch.Tensor, offsets: torch.Tensor, rows: int,
                split: int) -> torch.Tensor:
    """``x @ W.T`` for a bitmap weight (values, bits (N, K/32) int32, offsets (N, K/128) int32), 1-2 rows of x."""
    x = _aligned(x)
    m, k = x.shape
    n = bits.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    name = f"gemvbm_{_SUFFIX[x.dtype]}_t{_tokens(m, TOKENS_BITMAP)}_r{rows}"
    _launch(name, _grid(n, rows, split), (x, values, bits, offsets, y), (m, n, k, split))
    return y


@bitmap_gemv.register_fake
def _(x, values, bits, offsets, rows, split):
    return x.new_empty(x.shape[0], bits.shape[0])


MMA_SHAPES = {1: ((1, 8), (2, 8), (1, 16), (1, 32)), 2: ((2, 8), (1, 8), (4, 8), (1, 16), (1, 32)),
              4: ((1, 8), (2, 8), (1, 16))}  # token tiles -> (row tiles, warps)


@torch.library.custom_op("secateurs::sparse24_mma", mutates_args=())
def sparse24_mma(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, row_tiles: int,
                 warps: int) -> torch.Tensor:
    """``x @ W.T`` for a 2:4 weight on tensor cores (``mma.sp``), 1-32 rows of x, reading the stored ``meta``
    (N, K/8) itself; a block of ``warps`` warps owns ``row_tiles`` tiles of 16 rows."""
    x = _aligned(x)
    m, k = x.shape
    n = values.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    tiles8 = (m + 7) // 8
    name = f"mma24_{_SUFFIX[x.dtype]}_n{4 if tiles8 > 2 else tiles8}_r{row_tiles}_w{warps}"
    tiles = (n + 15) // 16
    _launch(name, (tiles + row_tiles - 1) // row_tiles, (x, values, meta, y), (m, n, k), warps)
    return y


@sparse24_mma.register_fake
def _(x, values, meta, row_tiles, warps):
    return x.new_empty(x.shape[0], values.shape[0])


# The wide 2:4 decode kernel (sparse_gemv.cu's wide24, 17-64 rows), offered at row buckets 32 and 64
# (kernels/sparse24.py): correct on one NVIDIA H100 80GB HBM3 (benchmarks/gpu_kernel_check.py --part cuda --formats
# 2:4 --only wide24: 636 checks, fp16/bf16, 10 shapes, m = 1..8192, 0 failures, worst relative error 1.7e-3; its first
# try could not launch n4_r1_k1_u6, exactly 48 KB of dynamic shared memory beside a 4-byte static flag, until _launch
# counted the static part) and timed there (WIDE_CLEARED, WIDE_DOMINATED). Why it exists: on an H100 the block linears
# of a batch-32 decode step read their stored bytes at 1.34 TB/s against 2.25 at batch 8; the kernel the dispatcher
# picked there (cuda_mma24_r2_w8) uses each step's weight loads within 2 MMAs of issuing them and issues the next
# step's only after its loop's back edge, and its registers allow 16 warps an SM of one 2.3 KB step each, half the
# bytes in flight of its batch-8 form (32 warps, two 1.15 KB steps each). This one keeps U (2-6) steps a warp in
# flight, each load issued 5 MMAs or more before its first use (tests/test_mma24_wide.py reads it in the SASS), stages
# x once per block in shared memory, and splits K over blocks so that every SM streams weights on narrow shapes.
WIDE_CONFIGS: dict[str, tuple[int, int, int, int]] = {
    "n4_r1_k1_u2": (4, 1, 1, 2),
    "n4_r1_k1_u4": (4, 1, 1, 4),
    "n4_r1_k1_u6": (4, 1, 1, 6),
    "n4_r1_k2_u2": (4, 1, 2, 2),
    "n8_r1_k1_u2": (8, 1, 1, 2),
    "n8_r1_k1_u4": (8, 1, 1, 4),
    "n8_r1_k2_u2": (8, 1, 2, 2),
}
"""name -> (8-token tiles NT, 16-row tiles a warp R, K-groups a block WK, 64-input steps in flight a warp U), the
entry points' order (``wide24_<dtype>_<name>``); a block is :data:`WARPS` warps, ``WARPS / WK`` a K-group."""
WIDE_CLEARED: frozenset[str] = frozenset({"n4_r1_k1_u4", "n4_r1_k1_u6", "n4_r1_k2_u2", "n8_r1_k1_u2", "n8_r1_k1_u4",
                                          "n8_r1_k2_u2"})
"""Configurations offered without ``SECATEURS_UNVERIFIED_KERNELS=1``: correct on an H100 and within 3% of the fastest
stored-format path on some (shape, tokens) row of its timing there (``SECATEURS_UNVERIFIED_KERNELS=1 sparse_kernels.py
--part kernels``, seven Llama shapes at 32 and 64 tokens, benchmarks/results/sparse_kernels_kernels_wide24_h100.json).
wide24 was the fastest stored-format path at 32 tokens on six shapes (all but 4096 x 4096, where its best took 1.19x
the time of cuda_mma24_r2_w8), e.g. 28672 x 8192 1.55x cuBLAS (n4_r1_k1_u4), 8192 x 28672 1.44x, 11008 x 4096 1.32x,
1024 x 8192 0.89x (n4_r1_k2_u2, split 8), and at 64 tokens on four (28672 x 8192 1.14x with n8_r1_k1_u4,
8192 x 28672 1.04x, 8192 x 8192 0.95x, 11008 x 4096 0.82x; a wgmma configuration on the other three). The winners:
n4_r1_k1_u4, n4_r1_k2_u2, n8_r1_k1_u4, n8_r1_k2_u2; n4_r1_k1_u6 (0.99x the fastest on 8192 x 28672 at 32 tokens) and
n8_r1_k1_u2 (0.99x on 28672 x 8192 at 64) came as near as timing noise. A configuration added later stays opt-in until
it has run and been timed on a GPU."""
WIDE_DOMINATED: frozenset[str] = frozenset({"n4_r1_k1_u2"})
"""Correct and timed on the H100 but never within 3% of the fastest stored-format path on any of the 14 rows of that run
(the best of it 0.96x the fastest, on 28672 x 8192 at 32 tokens): offered only under ``SECATEURS_UNVERIFIED_KERNELS=1``
(as :data:`wgmma.DOMINATED`), since each candidate offered adds to the dispatcher's first-call tuning."""
WIDE_TOKENS = (16, 64)
"""Offered above the first and up to the second row count (row buckets 32 and 64): one token tile of 32 or 64."""
WIDE_BLOCKS_PER_SM = 2  # the entry points' __launch_bounds__ minimum (at most 128 registers a thread)
WIDE_MAX_SPLITS = 16
WIDE_STEP = 64  # inputs of one step, so K % 64 == 0


def wide_configs() -> list[str]:
    """The configurations offered: the cleared ones (all of :data:`WIDE_CONFIGS` under
    ``SECATEURS_UNVERIFIED_KERNELS=1``), in :data:`WIDE_CONFIGS`' order."""
    return [c for c in WIDE_CONFIGS if c in WIDE_CLEARED or unverified_offered()]


def wide_tokens(config: str) -> int:
    """Tokens of the configuration's one token tile: it takes up to this many rows of x."""
    return 8 * WIDE_CONFIGS[config][0]


def wide_rows(config: str) -> int:
    """Output rows of one block: its ``WARPS / WK`` warps of ``R`` 16-row tiles each."""
    _, r, wk, _ = WIDE_CONFIGS[config]
    return WARPS // wk * r * 16


def wide_step_bytes(config: str) -> int:
    """Bytes of one 64-input step's x tile in shared memory: a 128-byte row per token."""
    return wide_tokens(config) * 128


def wide_slot_bytes(config: str) -> int:
    """One of the two x buffers: ``U`` steps of each of the ``WK`` K-groups."""
    _, _, wk, u = WIDE_CONFIGS[config]
    return wk * u * wide_step_bytes(config)


def wide_shared_bytes(config: str) -> int:
    """Dynamic shared memory of a block: the two x buffers, or (if more) the K-groups' fp32 sums that reuse them."""
    nt, r, wk, _ = WIDE_CONFIGS[config]
    return max(2 * wide_slot_bytes(config), WARPS * r * nt * 4 * 32 * 4 if wk > 1 else 0)


def wide_x_offset(row: int, group: int) -> int:
    """Byte offset in a step's x tile of 4-input group ``group`` (0-15) of token ``row``: 16-byte chunk
    ``2 (group % 4) + group // 8`` holds groups ``8j + s`` and ``8j + 4 + s``, swizzled by the row (the kernel's
    wide_x_at; one ldmatrix.x4 over chunks 0-3 or 4-7 then gives each lane the decode kernel's B fragment)."""
    chunk = 2 * (group & 3) + (group >> 3)
    return row * 128 + ((chunk ^ (row & 7)) << 4) + ((group >> 2) & 1) * 8


def wide_splits(config: str, n: int, k: int, sms: int) -> list[int]:
    """Split-K choices over blocks, the default first: the fewest splits whose blocks fill every block place (SMs x
    :data:`WIDE_BLOCKS_PER_SM`) where the row tiles alone do not, and half as many (fewer partial sums through L2);
    each split keeps at least one x buffer of steps per K-group, at most :data:`WIDE_MAX_SPLITS`."""
    _, _, wk, u = WIDE_CONFIGS[config]
    tiles = -(-n // wide_rows(config))
    most = max(1, min(WIDE_MAX_SPLITS, k // WIDE_STEP // (wk * u)))
    fill = min(most, -(-sms * WIDE_BLOCKS_PER_SM // tiles))
    return [fill] if fill == 1 else [fill, max(1, fill // 2)]


# Per-tile arrival counters of the wide kernel's split-K, one buffer per device: every launch leaves them at zero (the
# last block of a tile resets its counter), so launches one after another on a stream share it. Zeroed when made, and
# made or grown only outside CUDA-graph capture.
_WIDE_COUNTS: dict[torch.device, torch.Tensor] = {}


def wide_counts(device: torch.device, tiles: int) -> torch.Tensor:
    """At least ``tiles`` zeroed int32 counters on ``device`` (the shared buffer, grown outside capture only)."""
    held = _WIDE_COUNTS.get(device)
    if held is None or held.numel() < tiles:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the wide kernel's split-K counters cannot grow inside CUDA-graph capture")
        held = _WIDE_COUNTS[device] = torch.zeros(max(tiles, 1024), dtype=torch.int32, device=device)
    return held


@torch.library.custom_op("secateurs::sparse24_wide", mutates_args=())
def sparse24_wide(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, config: str, splits: int) -> torch.Tensor:
    """``x @ W.T`` for a 2:4 weight (values (N, K/2), meta (N, K/8) uint8, K % 64 == 0) and up to the configuration's
    token tile of rows of x (:data:`WIDE_CONFIGS`), reading the stored tensors as they are; ``splits`` blocks share
    each row tile's K, their fp32 partial sums added in split order by the last of them (deterministic)."""
    x = _aligned(x)
    m, k = x.shape
    if not 1 <= m <= wide_tokens(config):
        raise ValueError(f"wide24_{config} takes 1-{wide_tokens(config)} rows of x, not {m}: pick a configuration "
                         "with more token tiles")
    if k % WIDE_STEP or splits < 1:
        raise ValueError(f"wide24 needs K % {WIDE_STEP} == 0 and splits >= 1, not K = {k}, splits = {splits}")
    n = values.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    tiles = -(-n // wide_rows(config))
    work = torch.empty(splits, m, n, dtype=torch.float32, device=x.device) if splits > 1 else y
    _launch(f"wide24_{_SUFFIX[x.dtype]}_{config}", tiles * splits, (x, values, meta, y, work,
            wide_counts(x.device, tiles)), (m, n, k, splits), WARPS, source=SOURCE, shared=wide_shared_bytes(config))
    return y


@sparse24_wide.register_fake
def _(x, values, meta, config, splits):
    return x.new_empty(x.shape[0], values.shape[0])


# The prompt GEMM's instantiations: name -> (features per block, tokens per block, warps, stages); each stage
# holds 64 inputs: BM x 64 bytes of values, BM x 8 of positions, BN x 128 of activations.
GEMM_CONFIGS = {
    "m128_n128_s4": (128, 128, 8, 4),
    "m256_n128_s3": (256, 128, 8, 3),
    "m128_n256_s3": (128, 256, 8, 3),
    "m128_n64_s4": (128, 64, 8, 4),
    "m64_n64_s4": (64, 64, 4, 4),
    "m64_n32_s4": (64, 32, 4, 4),
}
GEMM_TOKENS = 32  # the GEMM and the expand path are offered from this row bucket on (prompts)


def gemm_shared_bytes(config: str) -> int:
    bm, bn, _, stages = GEMM_CONFIGS[config]
    return stages * (bm * 64 + bm * 8 + bn * 128)


@torch.library.custom_op("secateurs::sparse24_gemm", mutates_args=())
def sparse24_gemm(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, config: str) -> torch.Tensor:
    """``x @ W.T`` for a 2:4 weight (values (N, K/2), meta (N, K/8) uint8, K % 64 == 0) and any number of rows
    of x, by the tiled ``mma.sp`` GEMM reading the stored tensors; ``config`` names a :data:`GEMM_CONFIGS` entry."""
    x = _aligned(x)
    m, k = x.shape
    n = values.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    bm, bn, warps, _ = GEMM_CONFIGS[config]
    blocks = ((n + bm - 1) // bm) * ((m + bn - 1) // bn)
    _launch(f"gemm24_{_SUFFIX[x.dtype]}_{config}", blocks, (x, values, meta, y), (m, n, k), warps,
            shared=gemm_shared_bytes(config))
    return y


@sparse24_gemm.register_fake
def _(x, values, meta, config):
    return x.new_empty(x.shape[0], values.shape[0])


@torch.library.custom_op("secateurs::sparse24_expand", mutates_args=("out",))
def sparse24_expand(values: torch.Tensor, meta: torch.Tensor, out: torch.Tensor) -> None:
    """Write the dense 2:4 weight (N, K) into the first N*K elements of ``out`` (a scratch buffer)."""
    n, half = values.shape
    chunks = n * half // 8
    blocks = min((chunks + 255) // 256, 65535 * 8)
    _launch("expand24", blocks, (values, meta, out), (chunks,), 8, int_type=ctypes.c_longlong)


@sparse24_expand.register_fake
def _(values, meta, out):
    return None


# One dense scratch per (device, dtype), sized to the largest weight it served, shared by every layer of every format:
# layers run one after another on one stream, so each expands into it and multiplies before the next
# starts (inside a CUDA graph too; the pipelined path's side stream forks from that stream and joins it again within
# the call). A buffer that grew is kept (a captured graph may still point into it).
_SCRATCH: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}


def scratch(device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """The shared expansion buffer, at least ``numel`` elements; grown only outside CUDA-graph capture."""
    held = _SCRATCH.setdefault((device, dtype), [])
    if not held or held[-1].numel() < numel:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the expansion scratch cannot grow inside CUDA-graph capture")
        held.append(torch.empty(numel, dtype=dtype, device=device))
    return held[-1]


def scratch_bytes() -> int:
    """Bytes of every expansion scratch held (all devices and dtypes), counted once for a whole model."""
    return sum(t.numel() * t.element_size() for held in _SCRATCH.values() for t in held)


def release_scratch() -> None:
    """Drop the expansion scratch (a later expand allocates it again); never while a graph that uses it lives."""
    _SCRATCH.clear()


def scratch_matmul(x: torch.Tensor, shape: tuple[int, int], expand: Callable[[torch.Tensor], None],
                   reserve: int = 0) -> torch.Tensor:
    """``x @ W.T`` by ``expand`` writing the dense W (``shape``) into the shared scratch, then cuBLAS
    (``F.linear``) on it: the prompt path of every stored format, with no copy kept per layer."""
    n, k = shape
    buffer = scratch(x.device, x.dtype, max(n * k, reserve))
    expand(buffer)
    return torch.nn.functional.linear(x, buffer[: n * k].view(n, k))


def expand_matmul(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, shape: tuple[int, int],
                  reserve: int = 0) -> torch.Tensor:
    """``x @ W.T`` for a 2:4 weight by expanding it into the shared scratch, then cuBLAS."""
    return scratch_matmul(x, shape, lambda out: sparse24_expand(values, meta, out), reserve)


@torch.library.custom_op("secateurs::bitmap_expand", mutates_args=("out",))
def bitmap_expand(values: torch.Tensor, bits: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor) -> None:
    """Write the dense bitmap weight (N, K) into the first N*K elements of ``out`` (a scratch buffer); ``values``
    16-byte aligned, ``bits`` (N, K/32) and ``offsets`` (N, K/128) int32 as stored."""
    words = bits.numel()
    blocks = min((words + WARPS * 32 - 1) // (WARPS * 32), 65535 * 8)
    _launch("expandbm", blocks, (values, bits, offsets, out), (words, values.numel()), WARPS,
            int_type=ctypes.c_longlong)


@bitmap_expand.register_fake
def _(values, bits, offsets, out):
    return None


# ---- the pipelined expand path: the expansion hidden behind cuBLAS ----
# At prompt sizes the GEMM is bound by the tensor cores and the expansion by memory, yet ``scratch_matmul`` runs
# them one after the other. ``expand_pipelined_c<chunks>`` splits the output rows into chunks: a side stream expands
# chunk j + 1 into one slot of a two-slot chunk scratch while the caller's stream multiplies chunk j from the other
# slot, straight into the columns of y that chunk owns. The order lives in a pure schedule (:func:`pipeline_schedule`)
# so it is tested exactly on a CPU; a GPU runs it on two streams ordered by events.

PIPELINE_CHUNKS = (2, 4)
"""Row chunks of the pipelined expand path's candidates (``expand_pipelined_c<chunks>``)."""
PIPELINE_ALIGN = 64
"""Chunk boundaries fall on multiples of 64 rows: every format's row slices then keep the alignment their expand
kernel's vector loads need (the widest, 8:16's four position words, is 16 bytes: 64 rows x K/16 words x 4 bytes) and
each scratch slot starts 16-byte aligned."""
PIPELINE_MIN_ROWS = 512
"""Offered only where every chunk holds at least this many rows (N >= 1024 for two chunks, 2048 for four): a narrower
chunk's GEMM leaves SMs idle even at thousands of tokens (512 x 2048 outputs are 64 tiles of 128 x 128 for an H100's
132 SMs), and a small weight's expansion leaves little to hide. A guess, not a measurement: the one H100 timing of the
path kept it fixed."""
PIPELINE_TOKENS = GEMM_TOKENS
"""The pipelined candidates start at the prompt row buckets: below them the GEMM is bound by memory too."""


class Step(NamedTuple):
    """One step of the pipelined product, in the order the host issues it."""

    lane: str
    """``"main"``: the caller's stream (the GEMMs); ``"side"``: the stream of the expansions."""
    action: str
    """``"record"`` or ``"wait"`` (an event), ``"expand"`` or ``"gemm"`` (a chunk)."""
    target: str | int
    """The event's name (``forked``, ``expanded<j>``, ``multiplied<j>``) or the chunk's index."""


def pipeline_rows(n: int, chunks: int) -> list[tuple[int, int]]:
    """The output rows ``[start, stop)`` of each chunk: near-equal runs with every boundary on a multiple of
    :data:`PIPELINE_ALIGN`, the last one shorter where N is not a multiple (fewer than ``chunks`` runs where N is
    too small to give each one)."""
    step = -(-n // chunks)
    step = -(-step // PIPELINE_ALIGN) * PIPELINE_ALIGN
    return [(start, min(start + step, n)) for start in range(0, n, step)]


def pipeline_slot(chunk: int) -> int:
    """The half of the two-slot chunk scratch that chunk ``chunk`` is expanded into and multiplied from."""
    return chunk % 2


def pipeline_slot_rows(rows: list[tuple[int, int]]) -> tuple[int, int]:
    """Rows each slot of the chunk scratch holds: its largest chunk. Two chunks then take exactly the whole weight's
    rows (the second slot only the shorter last chunk), more chunks about ``2 / chunks`` of them, so the scratch the
    dispatcher reserves for the largest weight before timing is never outgrown."""
    return tuple(max((stop - start for j, (start, stop) in enumerate(rows) if pipeline_slot(j) == slot), default=0)
                 for slot in (0, 1))


def pipeline_schedule(chunks: int) -> list[Step]:
    """The steps of a pipelined product of ``chunks`` chunks in host issue order. The side stream forks from the
    caller's stream (so it starts after everything before the call, the previous layer's use of the shared scratch
    included), expands chunks 0 and 1 ahead, and expands chunk j + 2 into chunk j's slot only after chunk j's GEMM
    (``multiplied<j>``); GEMM j waits for its expansion (``expanded<j>``). An event is recorded before any wait on it
    is issued (a wait issued first would wait for nothing). The last expansion is the side stream's last work and the
    caller's stream waits for it, so the side stream joins back (CUDA-graph capture requires it) and anything after
    the call is ordered after all of it."""
    steps = [Step("main", "record", "forked"), Step("side", "wait", "forked")]

    def expand(chunk: int) -> None:
        if chunk >= 2:
            steps.append(Step("side", "wait", f"multiplied{chunk - 2}"))
        steps.extend((Step("side", "expand", chunk), Step("side", "record", f"expanded{chunk}")))

    for chunk in range(min(2, chunks)):
        expand(chunk)
    for chunk in range(chunks):
        steps.extend((Step("main", "wait", f"expanded{chunk}"), Step("main", "gemm", chunk)))
        if chunk + 2 < chunks:
            steps.append(Step("main", "record", f"multiplied{chunk}"))
            expand(chunk + 2)
    return steps


class Lanes:
    """Where the schedule runs on a CPU (the tests): one sequence in schedule order, which that order makes correct
    without streams; :class:`CudaLanes` is the GPU's."""

    def on(self, lane: str) -> AbstractContextManager:
        return nullcontext()

    def record(self, lane: str, event: str) -> None:
        """Nothing to record: every step runs in issue order."""

    def wait(self, lane: str, event: str) -> None:
        """Nothing to wait for: every step runs in issue order."""


_PIPELINE_STREAMS: dict[int, torch.cuda.Stream] = {}
_PIPELINE_EVENTS: dict[int, dict[str, torch.cuda.Event]] = {}


class CudaLanes(Lanes):
    """The caller's current stream (``main``) and one side stream per device (``side``), ordered by one set of events
    per device. Stream and events are made on the first (eager: the dispatcher calls a candidate before it captures
    one) call and reused, so a capture creates nothing; a wait binds to the record issued before it, so a later record
    of the same event disturbs no earlier wait, and inside CUDA-graph capture the events become graph edges. The side
    stream runs no cuBLAS call, so it holds no cuBLAS workspace (``linear.side_stream`` says why that matters)."""

    def __init__(self, device: torch.device) -> None:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _PIPELINE_STREAMS:
            _PIPELINE_STREAMS[index] = torch.cuda.Stream(index)
        self.streams = {"main": torch.cuda.current_stream(index), "side": _PIPELINE_STREAMS[index]}
        self.events = _PIPELINE_EVENTS.setdefault(index, {})

    def on(self, lane: str) -> AbstractContextManager:
        return torch.cuda.stream(self.streams[lane])

    def record(self, lane: str, event: str) -> None:
        if event not in self.events:
            self.events[event] = torch.cuda.Event()
        self.events[event].record(self.streams[lane])

    def wait(self, lane: str, event: str) -> None:
        self.streams[lane].wait_event(self.events[event])


def run_pipeline(x: torch.Tensor, shape: tuple[int, int], chunks: int,
                 expand_rows: Callable[[int, int, torch.Tensor], None], lanes: Lanes) -> torch.Tensor:
    """``x @ W.T`` by :func:`pipeline_schedule`: ``expand_rows(start, stop, out)`` writes rows ``[start, stop)`` of W
    into a slot of the shared scratch (:func:`pipeline_slot_rows` rows each, :func:`scratch`, taken before the side
    stream forks: it never grows inside capture), and each GEMM writes ``y[:, start:stop]`` in place. cuBLAS writes that
    column slice with no copy: PyTorch's addmm path (``cublasCommonArgs`` / ``prepare_matrix_for_cublas`` in
    aten/src/ATen/native/cuda) takes an output whose column stride is 1 and row stride at least its width as is, a
    transposed column-major matrix with leading dimension N, and copies back only an output it had to clone."""
    n, k = shape
    rows = pipeline_rows(n, chunks)
    first, second = pipeline_slot_rows(rows)
    buffer = scratch(x.device, x.dtype, (first + second) * k)
    slots = [buffer[: first * k], buffer[first * k: (first + second) * k]]
    y = x.new_empty(x.shape[0], n)
    for step in pipeline_schedule(len(rows)):
        if step.action == "record":
            lanes.record(step.lane, step.target)
        elif step.action == "wait":
            lanes.wait(step.lane, step.target)
        else:
            start, stop = rows[step.target]
            slot = slots[pipeline_slot(step.target)]
            with lanes.on(step.lane):
                if step.action == "expand":
                    expand_rows(start, stop, slot)
                else:
                    torch.mm(x, slot[: (stop - start) * k].view(stop - start, k).t(), out=y[:, start:stop])
    return y


@torch.library.custom_op("secateurs::pipelined_expand_matmul", mutates_args=())
def pipelined_expand_matmul(x: torch.Tensor, parts: list[torch.Tensor], kind: str, n: int, k: int, chunks: int,
                            variant: int) -> torch.Tensor:
    """``x @ W.T`` for a stored weight (``parts`` of format ``kind``, shape (n, k)) by the pipelined expand path in
    ``chunks`` row chunks: one op, opaque to ``torch.compile``, so the streams and events never reach a tracer. The
    format expands a row range itself (``expand_rows``; ``variant`` picks among its expand kernels)."""
    fmt = format_class(kind).from_parts(parts, (n, k))
    lanes = CudaLanes(x.device) if x.device.type == "cuda" else Lanes()
    return run_pipeline(x, (n, k), chunks, lambda start, stop, out: fmt.expand_rows(start, stop, out, variant), lanes)


@pipelined_expand_matmul.register_fake
def _(x, parts, kind, n, k, chunks, variant):
    return x.new_empty(x.shape[0], n)


def pipelined_candidates(fmt: SparseFormat, m: int,
                         variant: int = 0) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The pipelined expand path at ``m`` rows (``expand_pipelined_c<chunks>``, each of :data:`PIPELINE_CHUNKS` whose
    chunks keep :data:`PIPELINE_MIN_ROWS` rows), from :data:`PIPELINE_TOKENS` on. It matched float64 on an H100 (every
    format, bucket and dtype of ``gpu_kernel_check.py``, and tests/test_pipelined_expand.py's GPU test of its streams
    inside a CUDA graph), so it is offered by default. The format offers it after its other expand candidates, having
    checked its tensors as for those."""
    if m < PIPELINE_TOKENS:
        return {}
    n, k = fmt.shape
    parts = list(fmt.tensors().values())
    return {f"expand_pipelined_c{c}": (lambda x, c=c: pipelined_expand_matmul(x, parts, fmt.kind, n, k, c, variant))
            for c in PIPELINE_CHUNKS if n >= c * PIPELINE_MIN_ROWS}


def extra_bytes(fmt: SparseFormat) -> int:
    """Bytes of derived tensors cached for this weight beside its stored ones (the format says which)."""
    return fmt.cuda_extra_bytes()


def splits(n: int, steps: int) -> list[int]:
    """Split-K choices, the default first: one warp per row group where there are enough rows to fill
    the GPU (N >= 2048 on an H200), else the smallest split that fills it, and the next larger one;
    each lane keeps at least one K step (``steps`` = K steps per row for a whole warp)."""
    usable = [s for s in SPLITS if s == 1 or steps >= s]
    preferred = next((s for s in usable if n * s >= 2048), usable[-1])
    return [s for s in usable if s in (preferred, 2 * preferred)]


def _on_gpu(fmt: SparseFormat) -> bool:
    return fmt.device.type == "cuda" and fmt.dtype in _SUFFIX and status(fmt.device) is None


def candidates(fmt: SparseFormat, m: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The CUDA kernel paths for this weight and ``m`` activation rows (name -> ``x -> y``), first = default."""
    return fmt.cuda_candidates(m) if _on_gpu(fmt) else {}


def ready(t: torch.Tensor, alignment: int, rows: int, cols: int) -> bool:
    """Whether the kernels can read ``t`` as it is: contiguous, of the expected shape, aligned for their
    vector loads."""
    return t.is_contiguous() and tuple(t.shape) == (rows, cols) and t.data_ptr() % alignment == 0

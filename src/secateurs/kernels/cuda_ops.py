"""CUDA C++ sparse kernels for decode, compiled at run time through NVRTC: no CUDA toolkit needed.

The source (``kernels/cuda/sparse_gemv.cu``, shipped as package data) is compiled on first use for the
GPU's architecture by NVRTC through NVIDIA's ``cuda-python`` bindings (``pip install 'secateurs[kernels]'``;
NVRTC itself comes with PyTorch's CUDA wheels) and the binary is cached on disk under
``~/.cache/secateurs/kernels`` (``SECATEURS_KERNEL_CACHE`` overrides), keyed by the source and options
hash, the target architecture and the NVRTC version. Kernels launch on PyTorch's current stream.

Three kernels, all reading each compressed weight byte once (decode is bound by memory, and a Hopper SM
receives only 13-18 bytes from memory per clock, so the instructions per weight decide the speed):

- 2:4 GEMV (1-4 tokens): one warp per output row, one byte-permute per group of four inputs picks the two
  activations, split-K across warps for narrow weights;
- 2:4 on tensor cores (1-16 tokens): ``mma.sp.m16n8k32`` with the weight as the sparse operand, tokens on
  the N side; values are read in the stored layout (K is permuted inside each MMA instead) and the
  positions from a derived fragment-order table (:func:`fragment_metadata`, the same size as ``meta``);
- bitmap GEMV (1 token): a lane walks the set bits of a 32-input word.

Interface (the dispatcher in ``kernels/linear.py`` times what ``candidates`` offers against dense):

- ``status()``: None when the kernels can run on the current GPU, else one line saying why not.
- ``candidates(fmt, m)``: name -> callable ``x (m, K) -> y (m, N)`` for a weight on the GPU, in the order
  to try them (the first is the measured default); ``{}`` where no kernel applies. Each format says which
  of these kernels it offers (``cuda_candidates`` in ``kernels/sparse24.py`` and ``kernels/bitmap.py``),
  from the wrappers, shapes and tables here. The only derived tensor is the tensor-core kernel's position
  table, built when the kernel is first offered for a weight and cached, keyed on the ``meta`` tensor
  (address, version, shape; the cache keeps that tensor alive); the GEMVs read the stored tensors as they
  are (2:4 positions as the little-endian 16-bit words their byte pairs form).
- Every kernel is a ``torch.library.custom_op`` (``secateurs::sparse24_gemv``, ``secateurs::sparse24_mma``,
  ``secateurs::bitmap_gemv``) with a fake implementation, so CUDA graphs and ``torch.compile`` run over it
  without graph breaks.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import weakref
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..files import write_atomic
if TYPE_CHECKING:
    from .formats import SparseFormat

SOURCE = Path(__file__).with_name("cuda") / "sparse_gemv.cu"
OPTIONS = ("-std=c++17",)
WARPS = 8  # warps per block, as #defined in the source
MIN_CAPABILITY = (8, 0)  # cvt.rn.bf16.f32 and the L2 cache hints the kernels use
TOKENS_24 = (1, 2, 4)  # token counts the 2:4 kernel is instantiated for (m = 3 runs the 4 variant)
TOKENS_BITMAP = (1, 2)
MMA_TOKENS = (1, 16)  # the tensor-core 2:4 kernel: one or two 8-token MMA tiles
BITMAP_OFFERED = 1  # the 2-token bitmap kernel measured 0.27-0.86x of cuBLAS on an H200: never offered
SPLITS = (1, 2, 4, 8)  # warps sharing one output row group (split-K inside a block)
_SUFFIX = {torch.float16: "f16", torch.bfloat16: "bf16"}

_STATUS: dict[int, str | None] = {}
_MODULES: dict[tuple[int, Path], object] = {}
_FUNCTIONS: dict[tuple[int, str], object] = {}


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


def _compile(capability: tuple[int, int], source: Path = SOURCE) -> bytes:
    """NVRTC: a cubin of ``source`` for this architecture, or PTX for the newest one NVRTC knows if the GPU is newer."""
    _, nvrtc = _bindings()
    arch = capability[0] * 10 + capability[1]
    version = ".".join(map(str, _check(nvrtc.nvrtcVersion(), "nvrtcVersion")))
    supported = list(_check(nvrtc.nvrtcGetSupportedArchs(), "nvrtcGetSupportedArchs"))
    target = max((a for a in supported if a <= arch), default=None)
    if target is None:
        raise RuntimeError(f"NVRTC {version} cannot target sm_{arch}")
    native = target == arch
    text = source.read_bytes()
    options = (f"--gpu-architecture={'sm' if native else 'compute'}_{target}", *OPTIONS)
    digest = hashlib.sha256(text + "\0".join(options).encode()).hexdigest()[:16]
    path = cache_dir() / f"{source.stem}-{digest}-{'sm' if native else 'compute'}{target}-nvrtc{version}.{'cubin' if native else 'ptx'}"
    if path.exists():
        return path.read_bytes()
    program = _check(nvrtc.nvrtcCreateProgram(text, source.name.encode(), 0, [], []), "nvrtcCreateProgram")
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
        binary = _compile(torch.cuda.get_device_capability(index), source)
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
            source: Path = SOURCE) -> None:
    driver, _ = _bindings()
    device = tensors[0].device
    if device.index != torch.cuda.current_device():  # the kernel lives in that device's context
        with torch.cuda.device(device):
            return _launch(name, grid, tensors, ints, warps, source)
    params = (tuple(t.data_ptr() for t in tensors) + ints,
              (ctypes.c_void_p,) * len(tensors) + (ctypes.c_int,) * len(ints))
    stream = torch.cuda.current_stream(device).cuda_stream
    _check(driver.cuLaunchKernel(_function(device.index, name, source), grid, 1, 1, warps * 32, 1, 1, 0, stream, params, 0),
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


MMA_SHAPES = {1: ((1, 8), (2, 8), (1, 16), (1, 32)), 2: ((2, 8), (1, 8), (4, 8), (1, 16), (1, 32))}  # token tiles -> (row tiles, warps)


@torch.library.custom_op("secateurs::sparse24_mma", mutates_args=())
def sparse24_mma(x: torch.Tensor, values: torch.Tensor, fragment_meta: torch.Tensor, row_tiles: int,
                 warps: int) -> torch.Tensor:
    """``x @ W.T`` for a 2:4 weight on tensor cores (``mma.sp``), 1-16 rows of x; ``fragment_meta`` from
    :func:`fragment_metadata`; a block of ``warps`` warps owns ``row_tiles`` tiles of 16 rows."""
    x = _aligned(x)
    m, k = x.shape
    n = values.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    name = f"mma24_{_SUFFIX[x.dtype]}_n{(m + 7) // 8}_r{row_tiles}_w{warps}"
    tiles = (n + 15) // 16
    _launch(name, (tiles + row_tiles - 1) // row_tiles, (x, values, fragment_meta, y), (m, n, k), warps)
    return y


@sparse24_mma.register_fake
def _(x, values, fragment_meta, row_tiles, warps):
    return x.new_empty(x.shape[0], values.shape[0])


def fragment_metadata(meta: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The 2:4 positions re-laid for ``mma.sp``: (ceil(N/16), K/64, 32) int32, one word per lane and 64-input block.

    For 16-row tile i, block b and lane l = 4g + t, the word holds, for row 16i + g in its low 16 bits and row
    16i + g + 8 in its high 16 bits, nibble t of each of the block's four 16-input position words (nibble j of
    the 16 bits from word j). That is the metadata sparsity selector 0 (t = 0, 1) and 1 (t = 2, 3) expect once K
    is permuted as the kernel permutes it (see sparse_gemv.cu). Rows past N repeat the last row."""
    n, k = shape
    words = meta.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF  # (N, K/16)
    tiles = (n + 15) // 16
    if tiles * 16 != n:
        words = torch.cat([words, words[-1:].expand(tiles * 16 - n, -1)])
    words = words.reshape(tiles, 2, 8, k // 64, 4)  # tile, row half, g, block, word j
    shifts = 4 * torch.arange(4, device=meta.device)
    nibbles = (words.unsqueeze(-1) >> shifts) & 15  # ..., word j, nibble t
    half = (nibbles << shifts.view(4, 1)).sum(dim=4)  # tile, half, g, block, t: nibble j of word j
    packed = half[:, 0] | (half[:, 1] << 16)  # tile, g, block, t
    packed = packed.permute(0, 2, 1, 3).reshape(tiles, k // 64, 32)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32).contiguous()


_FRAGMENT_META: dict[tuple, tuple[weakref.ref, torch.Tensor]] = {}


def cached_fragment_metadata(meta: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """:func:`fragment_metadata` built once per 2:4 weight, keyed on its ``meta`` tensor (address, version,
    shape) and dropped when that tensor is freed, so a released layer leaves nothing behind."""
    key = (meta.data_ptr(), meta._version, tuple(meta.shape), meta.device)
    entry = _FRAGMENT_META.get(key)
    if entry is None or entry[0]() is not meta:
        _FRAGMENT_META[key] = (weakref.ref(meta), fragment_metadata(meta, shape))
        weakref.finalize(meta, _FRAGMENT_META.pop, key, None)
    return _FRAGMENT_META[key][1]


def extra_bytes(fmt: SparseFormat) -> int:
    """Bytes of derived tensors cached for this weight beside its stored ones (the format says which)."""
    return fmt.cuda_extra_bytes()


def fragment_bytes(meta: torch.Tensor) -> int:
    """Bytes of the MMA position table cached for the 2:4 weight of ``meta``, 0 where none was built."""
    entry = _FRAGMENT_META.get((meta.data_ptr(), meta._version, tuple(meta.shape), meta.device))
    return entry[1].numel() * entry[1].element_size() if entry and entry[0]() is meta else 0


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

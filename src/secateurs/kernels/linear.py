"""``SparseLinear``: a drop-in for a pruned ``nn.Linear`` that stores only the compressed weight,
and the dispatcher that makes it never slower than the dense layer it replaces.

For each (format, shape, power-of-two row bucket, dtype, device, and what else decides the candidates: the
format's ``plan_variant`` and the opt-in below; :meth:`SparseLinear.plan_key`) the first call times every path
that can compute the product and caches the fastest correct one:

- ``cuda:<name>``: the CUDA kernels compiled at run time (``cuda_ops``; 2:4 GEMV, ``mma.sp`` decode kernel and its
  wide form for 17-64 rows, tiled ``mma.sp`` prompt GEMM and the Hopper ``wgmma.sp`` one, 4:8, 8:16, bitmap and banded
  GEMVs, the tensor-core kernels for 4:8 and 8:16 (each also in a ring form), the bitmap and the banded layout, every
  format's expand path, plain and pipelined; what is not cleared on a GPU, today the wgmma configurations never the
  fastest, the wide decode configuration never within 3% of the fastest and the 4:8 / 8:16 ring depth never the
  fastest, only under ``SECATEURS_UNVERIFIED_KERNELS=1``), when
  ``cuda_ops.status()`` says they can run here; all read the stored tensors, and the expand path's dense scratch
  is one buffer per device and dtype shared by every layer (:func:`shared_bytes`), not a copy per layer;
- ``triton``: our Triton kernels, one entry per launch configuration;
- ``cusparselt``: cuSPARSELt through ``torch.sparse.to_sparse_semi_structured`` (2:4 only; a copy, so only
  under the ``sparse`` or ``dense`` copy policy); its packed copy is built once per weight, and the call
  is timed inside a CUDA graph, where its per-call host cost is gone;
- ``dense``: cuBLAS ``F.linear`` on a dense copy of the weight, expanded once per layer (``dense`` policy).

Every candidate is timed as a CUDA graph of calls over enough weight copies to overflow L2 (the
way the weight is read while decoding), median of replays. ``SECATEURS_SPARSE_COPIES`` sets which
run-time copies a layer may keep beside its compressed weight (``copy_policy``): by default
(``none``) none, so a pruned model takes the stored bytes only; ``sparse`` allows a cuSPARSELt copy and
``dense`` a dense or cuSPARSELt copy where one is faster (memory for speed; ``extra_bytes`` / ``bench``
report those bytes). The environment is read once, on first use (:func:`policies`;
:func:`reread_policies` after changing it), never per call.

Which paths exist is the format's to say (``kernels/registry.py`` names the formats): its Triton
K blocks and kernel, its CUDA kernels, whether cuSPARSELt can hold it. A layer builds its format
object once and keeps it (rebuilt only when its buffers are replaced, e.g. by ``.to()``).

Timing never runs inside CUDA-graph capture: warm up (one eager call per shape) first. A bucket
met for the first time during capture runs an untimed default and is not cached. Given the cache
(``plans()``) the choice is deterministic. Without CUDA, or for an input whose dtype differs from
the weight's, the exact PyTorch reference runs; every such fallback says so once, in one line
(``fallback_notes()``, and the ``secateurs.kernels`` logger).
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from . import triton_ops
from .formats import SparseFormat, reference_matmul
from .registry import format_class

try:  # written by the CUDA-kernel work; the package runs without it
    from . import cuda_ops
except ImportError:
    cuda_ops = None

LOG = logging.getLogger("secateurs.kernels")
Plan = tuple[str, "triton_ops.Config | None"]
_PLANS: dict[tuple, Plan] = {}
_NOTES: dict[str, None] = {}
_STATIC: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # shared in/out buffers of the cuSPARSELt graphs
_POOL: list = []
_LAYERS: weakref.WeakValueDictionary[int, SparseLinear] = weakref.WeakValueDictionary()


COPY_POLICIES = ("none", "sparse", "dense")
DEFAULT_COPY_POLICY = "none"


@dataclass(frozen=True)
class Policies:
    """What the environment decides for the dispatcher. ``tune``: time the candidates of a new shape
    (seconds per shape; SECATEURS_KERNEL_TUNE=0 takes the untimed default). ``copies``: which run-time copies
    a layer may keep beside its compressed weight (SECATEURS_SPARSE_COPIES): ``none`` (default) the stored
    format only; ``sparse`` a cuSPARSELt copy too (0.56 of the dense bytes more); ``dense`` a dense or a
    cuSPARSELt copy, wherever one is faster than every stored-format path."""

    tune: bool
    copies: str


@cache
def policies() -> Policies:
    """The environment's policies, read on first use and kept: a forward call never reads ``os.environ``."""
    copies = os.environ.get("SECATEURS_SPARSE_COPIES", DEFAULT_COPY_POLICY)
    if copies not in COPY_POLICIES:
        note(f"SECATEURS_SPARSE_COPIES={copies!r} is not one of {', '.join(COPY_POLICIES)}: "
             f"using {DEFAULT_COPY_POLICY}")
        copies = DEFAULT_COPY_POLICY
    return Policies(tune=os.environ.get("SECATEURS_KERNEL_TUNE", "1") != "0", copies=copies)


def reread_policies() -> Policies:
    """Read the environment again, for a caller that changes it between runs (the kernel benchmark does)."""
    policies.cache_clear()
    if cuda_ops is not None:
        cuda_ops.unverified_offered.cache_clear()
    return policies()


def tuning_enabled() -> bool:
    return policies().tune


def copy_policy() -> str:
    return policies().copies


def clear_plans() -> None:
    _PLANS.clear()


def plans() -> dict[tuple, Plan]:
    """The cached choices, for reports: key -> (path, Triton config or None)."""
    return dict(_PLANS)


def note(message: str) -> None:
    """Say once, in one line, which path runs instead of the one that cannot."""
    if message not in _NOTES:
        _NOTES[message] = None
        LOG.warning(message)


def fallback_notes() -> list[str]:
    return list(_NOTES)


def _graph_pool():
    """One memory pool for every layer's cuSPARSELt graph: each capture frees all it allocates, so they can share it."""
    if not _POOL:
        _POOL.append(torch.cuda.graph_pool_handle())
    return _POOL[0]


def bucket(m: int) -> int:
    return 1 << max(m - 1, 0).bit_length()


def shared_bytes() -> int:
    """Bytes the sparse layers share rather than keep one each (the expand path's scratch), to be counted
    once per process beside the layers' own ``extra_bytes``."""
    if cuda_ops is None or not hasattr(cuda_ops, "scratch_bytes"):
        return 0
    return cuda_ops.scratch_bytes()


def _reserve_scratch(device: torch.device, dtype: torch.dtype) -> None:
    """Size the expand path's shared scratch to the largest weight of any live sparse layer on ``device`` in
    ``dtype`` (every stored format offers an expand path for prompts) before timing, so it never grows later
    (inside a caller's CUDA graph it cannot)."""
    if cuda_ops is None or not hasattr(cuda_ops, "scratch"):
        return
    sizes = [layer.out_features * layer.in_features for layer in list(_LAYERS.values())
             if layer.parts()[0].device == device and layer.parts()[0].dtype == dtype]
    if sizes:
        cuda_ops.scratch(device, dtype, max(sizes))


def _drop_unused_scratch() -> None:
    """Free the scratch after timing when no cached plan runs the expand path."""
    if cuda_ops is not None and hasattr(cuda_ops, "release_scratch") and not any(
            path.startswith("cuda:expand") for path, _ in _PLANS.values()):
        cuda_ops.release_scratch()


def cuda_candidates(fmt: SparseFormat, m: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The run-time-compiled CUDA kernels for this weight and row count; {} (and a note) where they cannot run."""
    if cuda_ops is None:
        note("CUDA sparse kernels not installed (secateurs.kernels.cuda_ops missing): "
             "sparse layers use Triton, cuSPARSELt or dense instead")
        return {}
    reason = cuda_ops.status()
    if reason is not None:
        note(f"CUDA sparse kernels unavailable ({reason}): sparse layers use Triton, cuSPARSELt or dense instead")
        return {}
    try:
        return cuda_ops.candidates(fmt, m)
    except Exception as exc:  # e.g. a weight whose tensors the kernels cannot read: the other paths still run
        note(f"CUDA sparse kernels refused a {fmt.kind} {fmt.shape[0]}x{fmt.shape[1]} weight "
             f"({str(exc).splitlines()[0][:120]}): it uses Triton, cuSPARSELt or dense instead")
        return {}


def choose(options: list[tuple[Plan, Callable[[], torch.Tensor]]], expected: torch.Tensor,
           timer: Callable[[Plan], float]) -> tuple[Plan, dict[str, float]]:
    """The fastest option whose result matches ``expected``; a crash or a wrong result is no candidate.

    Returns the plan and every timing (ms by path label), for reports. Options are tried in order
    and ties keep the earlier one, so the result depends only on the timings.
    """
    scale = expected.abs().max().clamp_min(1e-3)
    best, best_ms, timings = None, math.inf, {}
    for plan, call in options:
        try:
            got = call().float()
        except Exception:  # a config the compiler or the device refuses is simply not a candidate
            continue
        if got.shape != expected.shape or not torch.allclose(got, expected, rtol=2e-2, atol=2e-2 * float(scale)):
            continue
        try:
            ms = timer(plan)
        except Exception:  # it ran once but not over the timing copies or in a graph: not a candidate either
            continue
        timings[label(plan)] = ms
        if ms < best_ms:
            best, best_ms = plan, ms
    return (best or ("reference", None)), timings


def label(plan: Plan) -> str:
    path, config = plan
    if config is None:
        return path
    return f"triton {config.block_m}x{config.block_n}x{config.block_k}/s{config.split_k}/w{config.num_warps}" + (
        " gemv" if config.gemv else "")


class SparseLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` held only in a compressed format (its tensors are buffers, so
    they move with ``.to()`` and are saved in the state dict under ``<name>.values`` etc.)."""

    def __init__(self, fmt: SparseFormat, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.kind = fmt.kind
        self.format_class = type(fmt)
        self.out_features, self.in_features = fmt.shape
        for name, tensor in fmt.tensors().items():
            self.register_buffer(name, tensor)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self._dense: torch.Tensor | None = None
        self._semi: torch.Tensor | None = None
        self._semi_graphs: dict[int, tuple[torch.cuda.CUDAGraph | None, torch.Tensor, torch.Tensor]] = {}
        self._format = fmt  # over the very tensors just registered as buffers
        _LAYERS[self.parts()[0].data_ptr()] = self

    @classmethod
    def from_module(cls, weight: torch.Tensor, bias: torch.Tensor | None, fmt_cls: type[SparseFormat]) -> SparseLinear:
        return cls(fmt_cls.compress(weight.detach()), bias)

    def parts(self) -> list[torch.Tensor]:
        """The stored tensors in the format's order (what the ``torch.compile`` op receives)."""
        return [self._buffers[name] for name in self.format_class.parts]

    def _build_format(self) -> SparseFormat:
        return self.format_class.from_parts(self.parts(), (self.out_features, self.in_features))

    def format(self) -> SparseFormat:
        """The weight's format object over this layer's buffers, built once; rebuilt only where a buffer
        was replaced (``.to()``, ``load_state_dict(assign=True)``), so it never reads stale tensors."""
        fmt = self._format
        if any(fmt_part is not part for fmt_part, part in zip(fmt.tensors().values(), self.parts())):
            fmt = self._format = self._build_format()
        return fmt

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.kind}"

    def dense_weight(self) -> torch.Tensor:
        return self.format().to_dense()

    def extra_bytes(self) -> int:
        """Bytes of the run-time copies this layer keeps beside its compressed weight (dense, cuSPARSELt,
        tables the CUDA kernels derive from it)."""
        total = 0
        if cuda_ops is not None and hasattr(cuda_ops, "extra_bytes") and self.format().device.type == "cuda":
            try:
                total += cuda_ops.extra_bytes(self.format())
            except Exception:  # nothing derived that can be measured: nothing counted
                pass
        if self._dense is not None:
            total += self._dense.numel() * self._dense.element_size()
        if self._semi is not None:
            total += _semi_bytes(self._semi)
        return total

    def release(self) -> None:
        """Drop the run-time copies (they are rebuilt where a plan needs them)."""
        self._dense = self._semi = None
        self._semi_graphs = {}

    def _apply(self, fn, recurse=True):
        self.release()  # a copy on the old device or in the old dtype is stale
        moved = super()._apply(fn, recurse)
        _LAYERS[self.parts()[0].data_ptr()] = self  # the compiled op finds its layer by where its first part lives
        return moved

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if torch.compiler.is_compiling():
            y = torch.ops.secateurs.sparse_linear(x2, self.parts(), self.kind, self.out_features, self.in_features)
        else:
            y = self.matmul(x2)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` for a 2-D ``x`` through the cached plan of its bucket (tuned on first sight)."""
        fmt = self.format()
        if x.shape[0] == 0:
            return x.new_zeros(0, self.out_features)
        if not x.is_cuda:
            note("no CUDA device: sparse layers run the exact PyTorch reference (expand, then dense matmul)")
            return reference_matmul(x, fmt)
        if x.dtype != fmt.dtype:
            note(f"input dtype {x.dtype} differs from the sparse weight's {fmt.dtype}: "
                 "those calls run the PyTorch reference (load the model in the weight's dtype)")
            return reference_matmul(x, fmt)
        x = x.contiguous()
        m = x.shape[0]
        key = self.plan_key(fmt, x)
        plan = _PLANS.get(key)
        if plan is None:
            if torch.cuda.is_current_stream_capturing():
                note("a sparse layer met a new token count inside CUDA-graph capture: it runs untimed there "
                     "(warm up with one eager call per shape first)")
                return self._run(self._default_plan(fmt, m), x, fmt)
            _reserve_scratch(x.device, x.dtype)
            plan = self._tune(fmt, bucket(m), x) if tuning_enabled() else self._default_plan(fmt, m)
            _PLANS[key] = plan
            _drop_unused_scratch()
        return self._run(plan, x, fmt)

    def plan_key(self, fmt: SparseFormat, x: torch.Tensor) -> tuple:
        """Which tuned plan a call of ``x`` replays: every layer of one kind and shape shares it, except where the
        format offers this weight other kernels (:meth:`SparseFormat.plan_variant`) or the opt-in to unverified kernels
        changed; a plan naming a kernel this weight is not offered would otherwise run the slow reference."""
        return (self.kind, self.out_features, self.in_features, bucket(x.shape[0]), x.dtype, x.device, copy_policy(),
                fmt.plan_variant(), cuda_ops is not None and cuda_ops.unverified_offered())

    def _default_plan(self, fmt: SparseFormat, m: int) -> Plan:
        """The untimed choice: a CUDA kernel if one applies, else Triton's first configuration, else the reference."""
        found = cuda_candidates(fmt, bucket(m))  # the names a bucket's plan was chosen among
        if found:
            return (f"cuda:{next(iter(found))}", None)
        if triton_ops.HAVE_TRITON and fmt.k_blocks is not None:
            return ("triton", triton_ops.default_config(fmt.k_blocks, m))
        return ("reference", None)

    def _run(self, plan: Plan, x: torch.Tensor, fmt: SparseFormat) -> torch.Tensor:
        path, config = plan
        capturing = torch.cuda.is_current_stream_capturing()
        if path.startswith("cuda:"):
            offered = cuda_candidates(fmt, bucket(x.shape[0]))
            call = offered.get(path[5:])
            if call is not None:
                return call(x)
            if offered:  # a kernel this weight is not offered (its alignment, say): its own first, not the reference
                name, call = next(iter(offered.items()))
                note(f"sparse path {path} is not offered to every layer of its shape: those run cuda:{name}")
                return call(x)
        elif path == "triton":
            return fmt.triton_matmul(x, config)
        elif path == "dense" and (self._dense is not None or not capturing):
            return F.linear(x, self._dense_copy(x))
        elif path == "cusparselt" and capturing and self._semi is not None:
            return F.linear(x, self._semi)
        elif path == "cusparselt" and not capturing:
            return self._semi_replay(x)
        if path != "reference":
            note(f"sparse path {path} could not run for {x.shape[0]} rows here: the PyTorch reference runs instead")
        return reference_matmul(x, fmt)

    def _dense_copy(self, x: torch.Tensor) -> torch.Tensor:
        if self._dense is None or self._dense.device != x.device or self._dense.dtype != x.dtype:
            self._dense = self.dense_weight().to(device=x.device, dtype=x.dtype)
        return self._dense

    def _semi_replay(self, x: torch.Tensor) -> torch.Tensor:
        """cuSPARSELt outside a caller's graph: a CUDA graph of this layer's call, captured once per row
        bucket and replayed, so the library's per-call plan set-up (milliseconds of host time) is paid once."""
        rows = bucket(x.shape[0])
        if rows not in self._semi_graphs:
            semi = self._semi_copy(x)
            key = (x.device, x.dtype, self.in_features, self.out_features, rows)
            if key not in _STATIC:
                _STATIC[key] = (x.new_zeros(rows, self.in_features), x.new_empty(rows, self.out_features))
            x_in, y_out = _STATIC[key]
            F.linear(x_in, semi)  # set the library up outside capture
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=_graph_pool()):
                    y_out.copy_(F.linear(x_in, semi))
            except Exception as exc:  # a library build that refuses capture: plain calls, host cost included
                torch.cuda.synchronize()
                note(f"cuSPARSELt could not be captured in a CUDA graph ({str(exc).splitlines()[0]}): plain calls instead")
                graph = None
            self._semi_graphs[rows] = (graph, x_in, y_out)
        graph, x_in, y_out = self._semi_graphs[rows]
        if graph is None:
            return F.linear(x, self._semi_copy(x))
        m = x.shape[0]
        x_in[:m].copy_(x)
        graph.replay()
        return y_out[:m].clone()

    def _semi_copy(self, x: torch.Tensor) -> torch.Tensor:
        """The weight in torch's 2:4 semi-structured (cuSPARSELt) layout, packed once per layer."""
        if self._semi is None or self._semi.device != x.device or self._semi.dtype != x.dtype:
            self._semi = torch.sparse.to_sparse_semi_structured(self.dense_weight().to(device=x.device, dtype=x.dtype))
        return self._semi

    def _tune(self, fmt: SparseFormat, rows: int, x: torch.Tensor) -> Plan:
        """Time every path on ``rows`` seeded random rows, over weight copies that overflow L2; keep the fastest correct one."""
        probe = torch.randn(rows, self.in_features, device=x.device, dtype=x.dtype,
                            generator=torch.Generator(x.device).manual_seed(0))
        expected = reference_matmul(probe, fmt).float()
        dense = fmt.to_dense()
        # Each path reads one representation of the weight; calls are made from one copy of it.
        sources: dict[str, tuple[object, Callable[[], object], int]] = {"stored": (fmt, fmt.clone, fmt.nbytes())}
        options: list[tuple[Plan, str, Callable[[object], Callable[[], torch.Tensor]]]] = []
        for name in cuda_candidates(fmt, rows):
            options.append(((f"cuda:{name}", None), "stored", lambda f, n=name: (lambda: cuda_candidates(f, rows)[n](probe))))
        if triton_ops.HAVE_TRITON and fmt.k_blocks is not None:
            for config in triton_ops.candidates(fmt.k_blocks, rows):
                options.append((("triton", config), "stored", lambda f, c=config: (lambda: f.triton_matmul(probe, c))))
        policy = copy_policy()
        if policy != "none":
            if fmt.cusparselt:
                try:
                    semi = torch.sparse.to_sparse_semi_structured(dense)
                except (RuntimeError, NotImplementedError, ValueError) as exc:
                    note(f"cuSPARSELt unavailable for {self.out_features}x{self.in_features} "
                         f"({str(exc).splitlines()[0]}): not a candidate")
                else:
                    sources["semi"] = (semi, lambda: torch.sparse.to_sparse_semi_structured(dense.clone()), _semi_bytes(semi))
                    # Timed as eager calls run it (``_semi_replay``): x copied in, the product copied
                    # into a row-major buffer (torch may return it transposed), then cloned out.
                    x_in, y_out = torch.empty_like(probe), probe.new_empty(rows, self.out_features)
                    options.append((("cusparselt", None), "semi",
                                    lambda s: (lambda: y_out.copy_(F.linear(x_in.copy_(probe), s)).clone())))
        if policy == "dense":
            sources["dense"] = (dense, dense.clone, dense.numel() * dense.element_size())
            options.append((("dense", None), "dense", lambda w: (lambda: F.linear(probe, w))))
        else:
            options.append((("reference", None), "stored", lambda f: (lambda: reference_matmul(probe, f))))
        rotations: dict[str, list[object]] = {}

        def timer(plan: Plan) -> float:
            source, make = next((s, mk) for p, s, mk in options if p == plan)
            if source not in rotations:
                first, build, size = sources[source]
                with torch.inference_mode(False):  # copies as ordinary tensors, like the layer's own buffers
                    rotations[source] = [first, *(build() for _ in range(_copies(size, x.device) - 1))]
            return _graph_ms([make(w) for w in rotations[source]])

        plan, _ = choose([(p, mk(sources[s][0])) for p, s, mk in options], expected, timer)
        return plan


def _copies(size: int, device: torch.device) -> int:
    """How many copies of a ``size``-byte weight make a rotation that overflows L2 twice over."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    return max(2, min(16, math.ceil(2 * l2 / max(size, 1))))


def _semi_bytes(semi) -> int:
    return sum(t.numel() * t.element_size() for t in (getattr(semi, "packed", None), getattr(semi, "meta", None))
               if t is not None)


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def side_stream() -> torch.cuda.Stream:
    """One warm-up stream per device for every timing, reused: PyTorch keeps a cuBLAS (and cuBLASLt) workspace
    for each stream a cuBLAS call ever ran on, allocated memory for the life of the process, so a fresh stream
    per timed candidate would leave one workspace behind each time (counted in peak memory)."""
    index = torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(index)
    return _SIDE_STREAMS[index]


def _graph_ms(calls: list[Callable[[], torch.Tensor]], replays: int = 7) -> float:
    """Median ms per call of a CUDA graph that runs ``calls`` in turn (plain events if capture fails)."""
    for call in calls:
        call()
    stream = side_stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for call in calls:
                call()
        run = graph.replay
    except Exception:  # a library path that refuses capture is timed eagerly, host cost included
        torch.cuda.synchronize()

        def run() -> None:
            for call in calls:
                call()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(calls))
    return statistics.median(times[1:])


@torch.library.custom_op("secateurs::sparse_linear", mutates_args=())
def _sparse_linear_op(x: torch.Tensor, parts: list[torch.Tensor], kind: str, out_features: int,
                      in_features: int) -> torch.Tensor:
    """The dispatcher as one opaque op, so ``torch.compile`` traces a SparseLinear without graph breaks;
    parts no layer holds (copies made by a tracer) run the reference of the format they rebuild."""
    layer = _LAYERS.get(parts[0].data_ptr())
    if layer is not None and layer.parts()[0].data_ptr() == parts[0].data_ptr():
        return layer.matmul(x)
    return reference_matmul(x, format_class(kind).from_parts(parts, (out_features, in_features)))


@_sparse_linear_op.register_fake
def _(x: torch.Tensor, parts: list[torch.Tensor], kind: str, out_features: int, in_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)

"""The pipelined expand path (``cuda_ops.pipelined_candidates``, ``expand_pipelined_c<chunks>``): a side stream expands
row chunk j + 1 of a stored weight into one slot of a two-slot chunk scratch while the caller's stream multiplies chunk
j from the other slot by cuBLAS. A CPU has no streams, so the order is checked on the pure schedule (a happens-before
model of two streams and their events), the executor's wiring through a recording stand-in for the streams, and the
whole candidate through its real Python path and custom op with each format's expand kernel replaced by a PyTorch
reference that reads the row slices it is handed. The GPU test at the end (skipped here) runs it eagerly, inside a CUDA
graph and under ``torch.compile(fullgraph=True)`` in a CUDA graph."""

from __future__ import annotations

from contextlib import contextmanager
from itertools import pairwise

import pytest
import torch

from secateurs.kernels import SEGMENT, Bitmap, Nm48, Nm816, Sparse24, cuda_ops, nm48, nm816
from secateurs.kernels.cuda_ops import Step, pipeline_rows, pipeline_schedule, pipeline_slot
from secateurs.sparsity.masks import nm_mask, unstructured_mask

CLASSES = {"2:4": Sparse24, "4:8": Nm48, "8:16": Nm816, "bitmap": Bitmap}
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def own_scratch(monkeypatch):
    """Each test its own expansion scratch: one left behind would count as shared bytes in later tests' reports."""
    monkeypatch.setattr(cuda_ops, "_SCRATCH", {})


def _weight(kind: str, n: int, k: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    base = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    if kind == "bitmap":
        return (base * unstructured_mask(base.abs(), 0.7)).to(dtype)
    kept, group = map(int, kind.split(":"))
    return (base * nm_mask(base.abs(), kept, group)).to(dtype)


def _gpu_like(monkeypatch) -> None:
    """Let ``cuda_candidates`` run on a CPU weight: no source is compiled, no launch is made."""
    monkeypatch.setattr(cuda_ops, "_module", lambda *args, **kwargs: None)


def _bitmap_rows(values: torch.Tensor, bits: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """What ``expandbm`` writes for the rows of ``bits`` and ``offsets`` it is handed: each kept weight is
    ``values[offset of its segment + its rank in the segment]``, the offset an absolute index into ``values``."""
    rows, words = bits.shape
    k = 32 * words
    mask = ((bits.to(torch.int64).unsqueeze(2) >> torch.arange(32)) & 1).bool().reshape(rows, k // SEGMENT, SEGMENT)
    index = offsets.to(torch.int64).unsqueeze(2) + mask.cumsum(2) - 1
    picked = values[index.clamp(0, values.numel() - 1)]
    return torch.where(mask, picked, torch.zeros((), dtype=values.dtype)).reshape(rows, k)


def _first_row(part: torch.Tensor, whole: torch.Tensor) -> int:
    """The row of ``whole`` at which the row slice ``part`` starts."""
    return (part.data_ptr() - whole.data_ptr()) // (whole.stride(0) * whole.element_size())


def _reference_expands(monkeypatch, fmt) -> list[tuple[int, int, int]]:
    """Replace ``fmt``'s expand kernel by a PyTorch reference of what it writes for the tables it is handed; returns the
    list each call appends (first row, rows, expand variant) to, checking that every per-row table is the same row
    slice and that the bitmap gets the whole ``values``."""
    calls: list[tuple[int, int, int]] = []

    def rows_of(tables: tuple[torch.Tensor, ...], wholes: tuple[torch.Tensor, ...], variant: int) -> None:
        firsts = {_first_row(t, w) for t, w in zip(tables, wholes)}
        assert len(firsts) == 1 and all(t.is_contiguous() and t.shape[0] == tables[0].shape[0] for t in tables)
        calls.append((firsts.pop(), tables[0].shape[0], variant))

    def write(out: torch.Tensor, dense: torch.Tensor) -> None:
        out[: dense.numel()].copy_(dense.reshape(-1))

    k = fmt.shape[1]
    if isinstance(fmt, Sparse24):
        def expand24(values, meta, out):
            rows_of((values, meta), (fmt.values, fmt.meta), 0)
            write(out, Sparse24(values, meta, (values.shape[0], k)).to_dense())
        monkeypatch.setattr(cuda_ops, "sparse24_expand", expand24)
    elif isinstance(fmt, Bitmap):
        def expandbm(values, bits, offsets, out):
            assert values.data_ptr() == fmt.values.data_ptr() and values.numel() == fmt.values.numel()
            rows_of((bits, offsets), (fmt.bits, fmt.offsets), 0)
            write(out, _bitmap_rows(values, bits, offsets))
        monkeypatch.setattr(cuda_ops, "bitmap_expand", expandbm)
    elif isinstance(fmt, Nm48):
        def expand48(values, meta, high, out, chunks):
            rows_of((values, meta, high), (fmt.values, fmt.meta, fmt.high), chunks)
            write(out, Nm48(values, meta, high, (values.shape[0], k)).to_dense())
        monkeypatch.setattr(nm48, "nm48_expand", expand48)
    else:
        def expand816(values, meta, out, chunks):
            rows_of((values, meta), (fmt.values, fmt.meta), chunks)
            write(out, Nm816(values, meta, (values.shape[0], k)).to_dense())
        monkeypatch.setattr(nm816, "nm816_expand", expand816)
    return calls


# ---- the schedule ----

def _happens_before(steps: list[Step]):
    """A model of two in-order streams: program order within a lane, and an edge from each event record to every wait
    issued after it and before the event's next record (a wait binds to the last record issued before it). Node
    ``-1`` is the caller's stream before the call, ``len(steps)`` after it. Returns ``reaches(a, b)``."""
    edges: dict[int, set[int]] = {i: set() for i in range(-1, len(steps) + 1)}
    last = {"main": -1, "side": None}
    recorded: dict[str, int] = {}
    for i, step in enumerate(steps):
        if last[step.lane] is not None:
            edges[last[step.lane]].add(i)
        last[step.lane] = i
        if step.action == "record":
            recorded[step.target] = i
        elif step.action == "wait":
            assert step.target in recorded, f"a wait on {step.target} issued before any record of it waits for nothing"
            edges[recorded[step.target]].add(i)
    edges[last["main"]].add(len(steps))

    def reaches(a: int, b: int) -> bool:
        seen, todo = set(), [a]
        while todo:
            node = todo.pop()
            if node == b:
                return True
            if node not in seen:
                seen.add(node)
                todo.extend(edges[node])
        return False

    return reaches


def _hazards(steps: list[Step], chunks: int) -> list[str]:
    """What can go wrong on two streams: an expansion before the caller's earlier work (the previous layer's use of the
    scratch), a GEMM before its chunk's expansion, an expansion into a slot before the GEMMs of earlier chunks in it
    are done, side-stream work the caller's stream never waits for (left outside a captured graph's join)."""
    try:
        reaches = _happens_before(steps)
    except AssertionError as exc:
        return [str(exc)]
    at = {(s.action, s.target): i for i, s in enumerate(steps) if s.action in ("expand", "gemm")}
    found = []
    for j in range(chunks):
        if not reaches(-1, at["expand", j]):
            found.append(f"expand {j} may overlap the caller's earlier work")
        if not reaches(at["expand", j], at["gemm", j]):
            found.append(f"gemm {j} may read its slot before expand {j} wrote it")
        for i in range(j):
            if pipeline_slot(i) == pipeline_slot(j) and not reaches(at["gemm", i], at["expand", j]):
                found.append(f"expand {j} may overwrite the slot gemm {i} reads")
    found += [f"side step {i} is never joined" for i, s in enumerate(steps)
              if s.lane == "side" and not reaches(i, len(steps))]
    return found


def test_the_schedule_of_two_chunks():
    assert pipeline_schedule(2) == [
        Step("main", "record", "forked"), Step("side", "wait", "forked"),
        Step("side", "expand", 0), Step("side", "record", "expanded0"),
        Step("side", "expand", 1), Step("side", "record", "expanded1"),
        Step("main", "wait", "expanded0"), Step("main", "gemm", 0),
        Step("main", "wait", "expanded1"), Step("main", "gemm", 1)]


def test_the_schedule_of_four_chunks_reuses_each_slot_after_its_gemm():
    assert pipeline_schedule(4)[6:] == [
        Step("main", "wait", "expanded0"), Step("main", "gemm", 0), Step("main", "record", "multiplied0"),
        Step("side", "wait", "multiplied0"), Step("side", "expand", 2), Step("side", "record", "expanded2"),
        Step("main", "wait", "expanded1"), Step("main", "gemm", 1), Step("main", "record", "multiplied1"),
        Step("side", "wait", "multiplied1"), Step("side", "expand", 3), Step("side", "record", "expanded3"),
        Step("main", "wait", "expanded2"), Step("main", "gemm", 2),
        Step("main", "wait", "expanded3"), Step("main", "gemm", 3)]
    assert [pipeline_slot(j) for j in range(4)] == [0, 1, 0, 1]


@pytest.mark.parametrize("chunks", [1, 2, 3, 4, 5, 8])
def test_the_schedule_has_no_hazard_and_needs_every_wait(chunks):
    """On two streams ordered only by the schedule's events nothing can race, and dropping any one wait (or issuing
    the side stream's reuse wait before its record) opens a hazard: the model is not vacuous, no wait is spare."""
    steps = pipeline_schedule(chunks)
    assert _hazards(steps, chunks) == []
    assert sorted(s.target for s in steps if s.action == "expand") == list(range(chunks))
    assert [s.target for s in steps if s.action == "gemm"] == list(range(chunks))
    assert all(s.lane == ("side" if s.action == "expand" else "main") for s in steps if s.action in ("expand", "gemm"))
    for i, step in enumerate(steps):
        if step.action == "wait":
            assert _hazards(steps[:i] + steps[i + 1:], chunks), f"wait {step} is not needed"
    if chunks > 2:
        early = list(steps)
        record = early.index(Step("main", "record", "multiplied0"))
        early.insert(record, early.pop(early.index(Step("side", "wait", "multiplied0"))))
        assert _hazards(early, chunks)


def test_chunk_rows_cover_the_weight_on_64_row_boundaries():
    assert pipeline_rows(4096, 4) == [(0, 1024), (1024, 2048), (2048, 3072), (3072, 4096)]
    assert pipeline_rows(11008, 4) == [(0, 2752), (2752, 5504), (5504, 8256), (8256, 11008)]
    assert pipeline_rows(2100, 4) == [(0, 576), (576, 1152), (1152, 1728), (1728, 2100)]
    assert pipeline_rows(1000, 2) == [(0, 512), (512, 1000)]
    assert pipeline_rows(100, 4) == [(0, 64), (64, 100)]  # too few rows for four whole chunks of 64
    for n in (1, 63, 64, 65, 1023, 1024, 2047, 4160, 11008, 13824):
        for chunks in (1, 2, 3, 4):
            rows = pipeline_rows(n, chunks)
            assert rows[0][0] == 0 and rows[-1][1] == n and len(rows) <= chunks
            assert all(stop == start for (_, stop), (start, _) in pairwise(rows))
            assert all(start % cuda_ops.PIPELINE_ALIGN == 0 for start, _ in rows)
            assert rows[0][1] - rows[0][0] >= max(stop - start for start, stop in rows)
            if n >= chunks * cuda_ops.PIPELINE_MIN_ROWS:
                assert len(rows) == chunks


# ---- the executor ----

class Recording(cuda_ops.Lanes):
    """The streams' stand-in: logs every record, wait and switch of lane, in issue order."""

    def __init__(self) -> None:
        self.log: list[tuple] = []

    @contextmanager
    def on(self, lane: str):
        self.log.append(("on", lane))
        yield

    def record(self, lane: str, event: str) -> None:
        self.log.append(Step(lane, "record", event))

    def wait(self, lane: str, event: str) -> None:
        self.log.append(Step(lane, "wait", event))


@pytest.mark.parametrize(("n", "chunks"), [(2100, 4), (1100, 2), (130, 4)])
def test_the_executor_issues_the_schedule_into_two_slots_of_the_shared_scratch(n, chunks, monkeypatch):
    """Each step in schedule order: records and waits on their lanes, each expansion on the side lane into its
    chunk's slot (two slots of the largest chunk at the start of the shared scratch, the dispatcher's reservation
    reused), each GEMM on the caller's lane into its chunk's columns; the product is the dense one."""
    k = 64
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1))
    x = torch.randn(7, k, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(cuda_ops, "_SCRATCH", {})
    held = cuda_ops.scratch(CPU, torch.float32, n * k).fill_(float("nan"))
    rows = pipeline_rows(n, chunks)
    first, second = cuda_ops.pipeline_slot_rows(rows)
    lanes = Recording()

    def expand_rows(start: int, stop: int, out: torch.Tensor) -> None:
        lanes.log.append(("expand", start, stop, out.data_ptr(), out.numel()))
        out[: (stop - start) * k].copy_(w[start:stop].reshape(-1))

    y = cuda_ops.run_pipeline(x, (n, k), chunks, expand_rows, lanes)
    expected = []
    for step in pipeline_schedule(len(rows)):
        if step.action in ("record", "wait"):
            expected.append(step)
        elif step.action == "expand":
            start, stop = rows[step.target]
            slot = pipeline_slot(step.target)
            at = held.data_ptr() + slot * first * k * held.element_size()
            expected += [("on", "side"), ("expand", start, stop, at, (second if slot else first) * k)]
        else:
            expected.append(("on", "main"))
    assert lanes.log == expected
    torch.testing.assert_close(y, x @ w.T)
    assert cuda_ops.scratch(CPU, torch.float32, 1) is held and cuda_ops.scratch_bytes() == n * k * 4


def test_cuda_lanes_map_the_schedule_onto_two_streams_and_reuse_them(monkeypatch):
    """The GPU's lanes with torch.cuda's streams and events replaced by loggers: expansions run on one side stream made
    once per device, GEMMs on the caller's current stream, each record and wait on its lane's stream with one event
    per name, made on the first call and reused by the next (a later capture creates nothing)."""
    log: list[tuple] = []
    made: dict[str, list] = {"streams": [], "events": []}

    class FakeStream:
        def __init__(self, index: int, name: str = "side") -> None:
            self.name = name
            made["streams"].append(self)

        def wait_event(self, event) -> None:
            log.append(("wait", self.name, event))

    class FakeEvent:
        def __init__(self) -> None:
            made["events"].append(self)

        def record(self, stream) -> None:
            log.append(("record", stream.name, self))

    @contextmanager
    def stream(s):
        log.append(("on", s.name))
        yield

    caller = FakeStream(0, "main")
    monkeypatch.setattr(cuda_ops, "_PIPELINE_STREAMS", {})
    monkeypatch.setattr(cuda_ops, "_PIPELINE_EVENTS", {})
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda index=None: caller)
    monkeypatch.setattr(cuda_ops, "_SCRATCH", {})
    n, k = 2100, 16
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(3))
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(4))

    def expand_rows(start: int, stop: int, out: torch.Tensor) -> None:
        out[: (stop - start) * k].copy_(w[start:stop].reshape(-1))

    expected = [(step.action, step.lane, step.target) if step.action in ("record", "wait") else ("on", step.lane)
                for step in pipeline_schedule(4)]
    for _ in range(2):
        log.clear()
        lanes = cuda_ops.CudaLanes(torch.device("cuda", 0))
        torch.testing.assert_close(cuda_ops.run_pipeline(x, (n, k), 4, expand_rows, lanes), x @ w.T)
        names = {id(event): name for name, event in lanes.events.items()}
        assert [entry if entry[0] == "on" else (*entry[:2], names[id(entry[2])]) for entry in log] == expected
        # the caller's stream and one side stream; forked, expanded0-3, multiplied0-1: made once, kept
        assert len(made["streams"]) == 2 and len(made["events"]) == 7


def test_the_chunk_scratch_is_two_chunks_never_more_than_the_weight(monkeypatch):
    """Alone (no whole-weight expand path reserved it first), the scratch holds each slot's largest chunk: four chunks
    of 2100 rows need 2 x 576 rows, of 4096 rows 2 x 1024 (half the weight); two chunks the whole weight, the second
    slot only the shorter last chunk, so the dispatcher's whole-weight reservation is never outgrown."""
    k = 64
    x = torch.randn(3, k)
    for n, chunks, slots in ((2100, 4, (576, 576)), (2100, 2, (1088, 1012)), (4096, 4, (1024, 1024)),
                             (4096, 2, (2048, 2048)), (11008, 4, (2752, 2752)), (1, 2, (1, 0))):
        assert cuda_ops.pipeline_slot_rows(pipeline_rows(n, chunks)) == slots
        monkeypatch.setattr(cuda_ops, "_SCRATCH", {})
        cuda_ops.run_pipeline(x, (n, k), chunks, lambda start, stop, out: out.zero_(), cuda_ops.Lanes())
        assert cuda_ops.scratch_bytes() == sum(slots) * k * 4
    for n in range(cuda_ops.PIPELINE_MIN_ROWS * 2, 20000, 37):
        for chunks in cuda_ops.PIPELINE_CHUNKS:
            assert sum(cuda_ops.pipeline_slot_rows(pipeline_rows(n, chunks))) <= n


# ---- the candidates ----

@pytest.mark.parametrize("kind", list(CLASSES))
def test_offered_with_or_without_the_opt_in_at_prompt_buckets_after_the_expand_path(kind, monkeypatch):
    """Cleared on an H100: the opt-in does not change where it is offered."""
    fmt = CLASSES[kind].compress(_weight(kind, 2048, 256, 3, torch.float16))
    _gpu_like(monkeypatch)
    buckets = (1, 2, 4, 8, 16, 32, 64, 128, 512, 2048, 8192)
    for opted in (False, True):
        monkeypatch.setattr(cuda_ops, "unverified_offered", lambda opted=opted: opted)
        for m in buckets:
            names = list(fmt.cuda_candidates(m))
            pipelined = [name for name in names if name.startswith("expand_pipelined")]
            if m < cuda_ops.PIPELINE_TOKENS:
                assert pipelined == [], (opted, m)
                continue
            assert pipelined == ["expand_pipelined_c2", "expand_pipelined_c4"], m
            expands = [i for i, name in enumerate(names) if name.startswith("expand_cublas")]
            assert expands and min(names.index(name) for name in pipelined) > max(expands), names


def test_offered_where_every_chunk_keeps_512_rows(monkeypatch, opted_in):
    offered = {}
    for n in (448, 1000, 1024, 2047, 2048, 4096):
        fmt = Sparse24.compress(_weight("2:4", n, 64, 4, torch.float16))
        offered[n] = [name for name in fmt.cuda_candidates(512) if name.startswith("expand_pipelined")]
    assert offered == {448: [], 1000: [], 1024: ["expand_pipelined_c2"], 2047: ["expand_pipelined_c2"],
                       2048: ["expand_pipelined_c2", "expand_pipelined_c4"],
                       4096: ["expand_pipelined_c2", "expand_pipelined_c4"]}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", list(CLASSES))
def test_the_candidates_multiply_through_row_slices_of_the_stored_tables(kind, dtype, monkeypatch, opted_in):
    """The real candidates and custom op on a CPU, each format's expand kernel replaced by its reference: 2100 rows
    (four chunks of 576 rows, the last 372: not a multiple of the chunk or of 64; two of 1088 and 1012), each chunk
    expanded from its own row slice of the tables (the bitmap from its rows of bits and offsets and the whole values),
    N:M with four 16-input chunks per thread where the tables allow; the dispatcher's NaN-filled whole-weight
    reservation is the scratch used, and the product is the dense one within the dtype's rounding."""
    n, k, m = 2100, 256, 40
    w = _weight(kind, n, k, 5, dtype)
    fmt = CLASSES[kind].compress(w)
    _gpu_like(monkeypatch)
    calls = _reference_expands(monkeypatch, fmt)
    monkeypatch.setattr(cuda_ops, "_SCRATCH", {})
    held = cuda_ops.scratch(CPU, dtype, n * k).fill_(float("nan"))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(6)).to(dtype)
    expected = x.double() @ w.double().T
    rounding = 4 * torch.finfo(dtype).eps * float(expected.abs().max())
    offered = {name: call for name, call in fmt.cuda_candidates(64).items() if name.startswith("expand_pipelined")}
    assert list(offered) == ["expand_pipelined_c2", "expand_pipelined_c4"]
    variant = 4 if kind in ("4:8", "8:16") else 0
    for name, call in offered.items():
        calls.clear()
        y = call(x)
        assert (tuple(y.shape), y.dtype) == ((m, n), dtype)
        torch.testing.assert_close(y.double(), expected, rtol=0, atol=rounding, msg=name)
        chunks = int(name.rsplit("_c", 1)[1])
        assert sorted(calls) == [(start, stop - start, variant) for start, stop in pipeline_rows(n, chunks)]
    assert cuda_ops.scratch(CPU, dtype, 1) is held


def test_the_op_traces_whole_under_torch_compile(monkeypatch, opted_in):
    """One custom op with a fake implementation: ``torch.compile(fullgraph=True)`` keeps the streams out of the trace
    (a graph break would be an error) and the compiled call multiplies as the eager one."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    w = _weight("2:4", 1024, 64, 7, torch.float32)
    fmt = Sparse24.compress(w)
    _reference_expands(monkeypatch, fmt)
    x = torch.randn(33, 64, generator=torch.Generator().manual_seed(8))
    call = fmt.cuda_candidates(64)["expand_pipelined_c2"]
    compiled = torch.compile(lambda x: call(x) * 2, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x) / 2, x @ w.T)
    with FakeTensorMode():
        y = torch.ops.secateurs.pipelined_expand_matmul(
            torch.empty(9, 64, dtype=torch.bfloat16), [torch.empty(1024, 32, dtype=torch.bfloat16),
                                                        torch.empty(1024, 8, dtype=torch.uint8)], "2:4", 1024, 64, 2, 0)
    assert (tuple(y.shape), y.dtype) == ((9, 1024), torch.bfloat16)


# ---- on a GPU (skipped on a CPU) ----

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("kind", list(CLASSES))
def test_on_a_gpu_eagerly_in_a_cuda_graph_and_compiled(kind, opted_in):
    """The compiled kernels on real streams: every pipelined candidate against float64 eagerly, replayed from a
    captured CUDA graph (the side stream forked from and joined to the capture) with new inputs, and compiled with
    ``fullgraph=True`` inside a captured graph; 4160 x 1024 (four chunks of 1088 rows, the last 896)."""
    if cuda_ops.status() is not None:
        pytest.skip(cuda_ops.status())
    n, k, tolerance = 4160, 1024, 5e-3
    gen = torch.Generator("cuda").manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        fmt = CLASSES[kind].compress(_weight(kind, n, k, 9, dtype).cuda())
        dense = fmt.to_dense().double()
        for m in (100, 2048):
            offered = {name: call for name, call in cuda_ops.candidates(fmt, m).items()
                       if name.startswith("expand_pipelined")}
            assert list(offered) == ["expand_pipelined_c2", "expand_pipelined_c4"]
            for name, call in offered.items():
                torch.compiler.reset()  # one lambda recompiled per candidate: stay under Dynamo's recompile limit
                compiled = torch.compile(lambda x, call=call: call(x) * 2, fullgraph=True)
                for label, run in ((f"{name} eager", call), (f"{name} compiled", lambda x, c=compiled: c(x) / 2)):
                    x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
                    ref = x.double() @ dense.T
                    assert float((run(x).double() - ref).norm() / ref.norm()) <= tolerance, label
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        out = run(x)
                    x.copy_(torch.randn(m, k, device="cuda", dtype=dtype, generator=gen))
                    graph.replay()
                    torch.cuda.synchronize()
                    ref = x.double() @ dense.T
                    assert float((out.double() - ref).norm() / ref.norm()) <= tolerance, f"{label} in a CUDA graph"
        cuda_ops.release_scratch()

"""Speed and memory of a model as it will be served: prefill latency, time to first token, decode
tokens/s, peak memory and checkpoint size, measured the same way for every model so they compare.

Protocol (fixed so dense and pruned runs are comparable): seeded random token ids; ``warmup``
untimed runs, then the median of ``repeats`` timed runs; CUDA work timed with CUDA events,
CPU work with ``perf_counter``. Decode runs greedily on a static KV cache, through the loop
``secateurs generate`` runs (:class:`~secateurs.evaluate.decode.StaticDecoder`). On CUDA it is timed
with every method in ``decode_methods`` (``cuda-graph``, ``compile``: see that module) and the fastest
is reported with its name, for every model alike, so a ratio is against what a user would otherwise
run. A method that fails falls back to the next, down to eager, and the result says so.

Before timing, one untimed forward per prompt length and decode batch lets sparse layers pick
their kernels (timing happens outside graph capture), so peak memory is the steady state's, and
``extra_mib`` reports the copies (dense or cuSPARSELt, under an explicit copy policy) they chose to keep
beside their compressed weights, and once the expand path's shared scratch.

A measurement of a large model takes minutes (kernel tuning in the warm-up, compiling, eager decode of a model
a CUDA graph cannot capture); ``measure``'s ``phase`` hook wraps each phase (the warm-up, each prompt length, each
decode batch by each method) so a caller can say what runs and for how long, and save what it has, before a
time limit cuts it off.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .config import SpeedConfig
from .decode import StaticDecoder

Phase = Callable[[str], AbstractContextManager[list[str]]]
"""A phase hook: ``with phase(name) as outcome:`` wraps one phase of a measurement, which appends its result in
words to ``outcome`` (for the hook to print after the block)."""


@contextmanager
def quiet(name: str) -> Iterator[list[str]]:
    """The default phase hook: runs the phase and tells nobody."""
    yield []


def printed(label: str) -> Phase:
    """A phase hook that prints each phase of ``label``'s measurement as it starts and, after it, its outcome and
    seconds (flushed, so a log read while a long run goes on, or cut off, shows where it is)."""

    @contextmanager
    def phase(name: str) -> Iterator[list[str]]:
        print(f"{label}: {name} ...", flush=True)
        start = time.perf_counter()
        outcome: list[str] = []
        yield outcome
        print(f"{label}: {name}: {', '.join(outcome) or 'done'} in {time.perf_counter() - start:.1f}s", flush=True)

    return phase

@dataclass
class SpeedResult:
    """One model's numbers; times in milliseconds, memory in MiB."""

    label: str
    device: str
    prefill_ms: dict[int, float] = field(default_factory=dict)
    ttft_ms: dict[int, float] = field(default_factory=dict)
    decode_tokens_per_s: dict[int, float] = field(default_factory=dict)
    decode_mode: str = "eager"
    decode_by_method: dict[str, dict[int, float]] = field(default_factory=dict)
    weight_mib: float = 0.0
    extra_mib: float = 0.0
    peak_mib: float | None = None
    checkpoint_mib: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _ids(batch: int, length: int, vocab: int, seed: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=gen).to(device)


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """A function that runs ``work`` once and returns its duration in ms (events on CUDA)."""
    if device.type == "cuda":

        def timed(work: Callable[[], object]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            work()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)

        return timed

    def timed_cpu(work: Callable[[], object]) -> float:
        start = time.perf_counter()
        work()
        return (time.perf_counter() - start) * 1000

    return timed_cpu


def _median(work: Callable[[], object], timer, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        work()
    return statistics.median(timer(work) for _ in range(repeats))


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers (compressed sparse weights count as what they store)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def folder_bytes(path: Path | None) -> int | None:
    if path is None or not path.exists():
        return None
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@torch.inference_mode()
def prefill(model, config: SpeedConfig, device: torch.device, timer,
            phase: Phase = quiet) -> tuple[dict[int, float], dict[int, float]]:
    """Median forward time of one prompt per length, and time to first token (forward + argmax + copy to host)."""
    vocab = model.config.get_text_config().vocab_size
    prefill_ms, ttft_ms = {}, {}
    for length in config.prompt_lengths:
        with phase(f"prefill at {length} tokens ({2 * (config.warmup + config.repeats)} forwards)") as outcome:
            ids = _ids(1, length, vocab, config.seed, device)
            prefill_ms[length] = _median(lambda: model(ids, use_cache=False), timer, config.warmup, config.repeats)

            def first_token() -> int:
                start = time.perf_counter()
                int(model(ids, use_cache=True).logits[0, -1].argmax())
                return (time.perf_counter() - start) * 1000

            for _ in range(config.warmup):
                first_token()
            ttft_ms[length] = statistics.median(first_token() for _ in range(config.repeats))
            outcome.append(f"{prefill_ms[length]:.1f} ms, first token {ttft_ms[length]:.1f} ms")
    return prefill_ms, ttft_ms


def _decode_rate(model, batch: int, config: SpeedConfig, device: torch.device, timer, method: str) -> float | None:
    """Tokens/s of one method at one batch size, or None if the method cannot run this model."""
    if method == "compile":
        torch._dynamo.reset()
    decoder = StaticDecoder(model, batch, config.decode_prompt + config.new_tokens + 1, device, method)
    prompt = _ids(batch, config.decode_prompt, model.config.get_text_config().vocab_size, config.seed, device)
    try:
        if method != "eager" and not decoder.capture():
            return None
        times = []
        for i in range(config.warmup + config.repeats):
            decoder.start(prompt)
            ms = timer(lambda: decoder.run(config.new_tokens))
            if i >= config.warmup:
                times.append(ms)
    except Exception:  # e.g. a model torch.compile cannot trace: the other methods still report
        if method == "eager":
            raise
        return None
    finally:
        decoder = None  # its graphs and caches go before dynamo's reset drops the compiled code
        if method == "compile":
            torch._dynamo.reset()  # compiled code holds the model (and its memory) until reset
    return batch * config.new_tokens / (statistics.median(times) / 1000)


@torch.inference_mode()
def decode(model, config: SpeedConfig, device: torch.device, timer,
           phase: Phase = quiet) -> tuple[dict[int, float], str, dict[str, dict[int, float]]]:
    """Tokens/s per batch size over ``new_tokens`` greedy steps after a short prompt (the prompt is not timed),
    by the fastest of ``config.decode_methods`` (eager on CPU or when every method fails); also every method's rates."""
    methods = [m for m in config.decode_methods if device.type == "cuda" and config.cuda_graphs] or ["eager"]
    by_method: dict[str, dict[int, float]] = {}
    rates, modes = {}, {}

    def rate_of(batch: int, method: str) -> float | None:
        steps = (config.warmup + config.repeats) * config.new_tokens
        with phase(f"decode at batch {batch} by {method} ({steps} steps)") as outcome:
            rate = _decode_rate(model, batch, config, device, timer, method)
            outcome.append("could not run" if rate is None else f"{rate:.1f} tokens/s")
        return rate

    for batch in config.decode_batches:
        for method in methods:
            rate = rate_of(batch, method)
            if rate is not None:
                by_method.setdefault(method, {})[batch] = rate
        if not any(batch in r for r in by_method.values()):
            by_method.setdefault("eager", {})[batch] = rate_of(batch, "eager")
        best = max((m for m in by_method if batch in by_method[m]), key=lambda m: by_method[m][batch])
        rates[batch], modes[batch] = by_method[best][batch], best
    mode = next(iter(set(modes.values()))) if len(set(modes.values())) == 1 else ", ".join(
        f"batch {b}: {m}" for b, m in modes.items())
    return rates, mode, by_method


@torch.inference_mode()
def warm(model, config: SpeedConfig, device: torch.device) -> None:
    """One untimed forward at every row count the measurement will use, so sparse layers pick their
    kernels (and build any copy they keep) before timing, graph capture and the peak-memory reset."""
    vocab = model.config.get_text_config().vocab_size
    shapes = [(1, n) for n in config.prompt_lengths]
    shapes += [s for b in config.decode_batches for s in ((b, config.decode_prompt), (b, 1))]
    for batch, length in shapes:
        model(_ids(batch, length, vocab, config.seed, device), use_cache=False)


def extra_bytes(model: torch.nn.Module) -> int:
    """Bytes that sparse layers keep at run time beside their compressed weights (0 for a dense model): each
    layer's own copies, plus once what they share (the 2:4 expand path's scratch buffer)."""
    own = [m.extra_bytes() for m in model.modules() if hasattr(m, "extra_bytes")]
    if not own:
        return 0
    from ..kernels.linear import shared_bytes

    return sum(own) + shared_bytes()


def measure(model, label: str, device: torch.device, config: SpeedConfig, checkpoint: Path | None = None,
            phase: Phase = quiet) -> SpeedResult:
    """All speed and memory numbers of one model on ``device`` (the model is moved there and left there);
    ``phase`` wraps the warm-up, each prompt length and each decode batch by each method (:data:`Phase`)."""
    from ..kernels.linear import plans
    config.check()
    model.to(device)
    result = SpeedResult(label=label, device=str(device))
    result.weight_mib = weight_bytes(model) / 2**20
    size = folder_bytes(checkpoint)
    result.checkpoint_mib = None if size is None else size / 2**20
    with phase("warm-up forwards (each new kernel shape tuned)") as outcome:
        tuned = len(plans())
        warm(model, config, device)
        outcome.append(f"{len(plans()) - tuned} kernel plans tuned")
    if device.type == "cuda":
        gc.collect()  # what an earlier model left behind must not count in this one's peak
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(config.seed)
    timer = _timer(device)
    result.prefill_ms, result.ttft_ms = prefill(model, config, device, timer, phase)
    result.decode_tokens_per_s, result.decode_mode, result.decode_by_method = decode(model, config, device, timer, phase)
    result.extra_mib = extra_bytes(model) / 2**20
    if device.type == "cuda":
        result.peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def ratios(base: SpeedResult, other: SpeedResult) -> dict[str, dict]:
    """``other`` relative to ``base`` as speedups (>1 = faster) and memory fractions (<1 = smaller)."""
    out: dict[str, dict] = {
        "prefill_speedup": {k: base.prefill_ms[k] / v for k, v in other.prefill_ms.items() if k in base.prefill_ms},
        "ttft_speedup": {k: base.ttft_ms[k] / v for k, v in other.ttft_ms.items() if k in base.ttft_ms},
        "decode_speedup": {k: v / base.decode_tokens_per_s[k] for k, v in other.decode_tokens_per_s.items()
                           if k in base.decode_tokens_per_s},
        "weight_fraction": {"all": other.weight_mib / base.weight_mib},
    }
    if base.peak_mib and other.peak_mib:
        out["peak_fraction"] = {"all": other.peak_mib / base.peak_mib}
    if base.checkpoint_mib and other.checkpoint_mib:
        out["checkpoint_fraction"] = {"all": other.checkpoint_mib / base.checkpoint_mib}
    return out

"""The decode loop ``bench`` times and ``generate`` runs, written once so that the tokens/s a user gets
from ``secateurs generate`` are the ones ``secateurs bench`` reports.

A :class:`StaticDecoder` keeps the KV cache in a ``StaticCache`` (fixed shapes, so one step can be
replayed) and runs one token per sequence per step, by one of :data:`METHODS`: ``eager``, the
reference path (CPU, or any model a graph cannot hold); ``cuda-graph``, the one-token step captured
once as a CUDA graph and replayed (eager decode of a small batch is launch-bound and hides any
kernel's speed: FIELD.md, HF eager 22–33 tokens/s vs 108–131 with a static cache and graphs on a
Llama-2-7B shape); ``compile``, the step through ``torch.compile`` and then captured (fuses the norms,
rotary and activation ops between the matmuls). The prompt always runs eager, so sparse layers pick
their prompt-size kernels the way they do in ``bench``.

The next token is the argmax inside the step (inside the graph) unless a ``pick`` is given (sampling):
then the step leaves the last logits in a fixed buffer and ``pick`` chooses eagerly after each replay.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import StaticCache

METHODS = ("eager", "cuda-graph", "compile")
CAPTURE_STEPS = 3  # positions the capture's warm-up and recorded steps write (0, 1, 2) before a prompt

Pick = Callable[[torch.Tensor], torch.Tensor]  # last logits (batch, vocab) -> next tokens (batch, 1)


def cache_keyword(model) -> str:
    """The name the model's forward takes its KV cache by: ``cache`` since transformers 5.25 (where the
    older ``past_key_values`` warns that it is going away), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class StaticDecoder:
    """Decode ``batch`` sequences of up to ``max_len`` tokens on a StaticCache; :meth:`capture` makes
    :meth:`step` a CUDA-graph replay. State lives in fixed tensors (``token``, ``position``) so a graph
    replays against them."""

    def __init__(self, model, batch: int, max_len: int, device: torch.device, method: str = "eager",
                 pick: Pick | None = None) -> None:
        self.model = model
        self.step_model = torch.compile(model, dynamic=False) if method == "compile" else model
        self.device = device
        self.pick = pick
        self.cache = StaticCache(config=model.config, max_cache_len=max(max_len, CAPTURE_STEPS))
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.last: torch.Tensor | None = None  # the last logits, kept for ``pick``
        self.graph: torch.cuda.CUDAGraph | None = None
        self.keyword = cache_keyword(model)

    def _choose(self, logits: torch.Tensor) -> None:
        """The next token from the last position's logits: argmax here, or kept for an eager ``pick``."""
        if self.pick is None:
            self.token.copy_(logits[:, -1:].argmax(-1))
        elif self.last is None:
            self.last = logits[:, -1].clone()
        else:
            self.last.copy_(logits[:, -1])

    def start(self, prompt: torch.Tensor) -> None:
        """Reset the cache and run the prompt (eager); ``token`` holds the first new token after it."""
        self.cache.reset()
        n = prompt.shape[1]
        logits = self.model(prompt, cache_position=torch.arange(n, device=self.device), use_cache=True,
                            **{self.keyword: self.cache}).logits
        self._choose(logits)
        if self.pick is not None:
            self.token.copy_(self.pick(self.last))
        self.position.fill_(n)

    def _step(self) -> None:
        logits = self.step_model(self.token, cache_position=self.position, use_cache=True,
                                 **{self.keyword: self.cache}).logits
        self._choose(logits)
        self.position.add_(1)

    def capture(self) -> bool:
        """Record one step as a CUDA graph, at positions 0–2 of an empty cache (always inside any model's
        context; :meth:`start` resets the cache after); False (and eager steps) if this model cannot be captured.

        The two warm-up steps run eager first on a side stream, so sparse layers time their one-row
        kernels outside the capture and ``torch.compile`` compiles there."""
        self.cache.reset()
        self.token.zero_()
        self.position.zero_()
        if self.pick is not None and self.last is None:
            vocab = self.model.config.get_text_config().vocab_size
            self.last = torch.zeros(self.token.shape[0], vocab, device=self.device)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(CAPTURE_STEPS - 1):
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._step()
        except Exception:  # an op that syncs with the host or allocates oddly: fall back to eager steps
            torch.cuda.synchronize(self.device)
            return False
        finally:
            self.cache.reset()
        self.graph = graph
        return True

    def step(self) -> None:
        """One new token per sequence into ``token`` (a graph replay once captured)."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()
        if self.pick is not None:
            self.token.copy_(self.pick(self.last))

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.step()


def sampler(temperature: float, top_p: float, seed: int, device: torch.device) -> Pick | None:
    """None (greedy) at temperature 0, else a seeded temperature / nucleus sampler: the same seed gives
    the same tokens on the same device, whichever decode method runs."""
    if temperature <= 0:
        return None
    generator = torch.Generator(device=device).manual_seed(seed)

    def pick(logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        if top_p < 1.0:
            ordered, order = probs.sort(dim=-1, descending=True)
            outside = ordered.cumsum(-1) - ordered > top_p  # the most likely token always stays in
            probs = probs.scatter(-1, order, ordered.masked_fill(outside, 0.0))
        return torch.multinomial(probs, 1, generator=generator)

    return pick


@dataclass
class TokenRun:
    """What one generation produced and how long it took (prompt to first token; the rest)."""

    tokens: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    method: str = "eager"
    stopped_at_eos: bool = False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate_tokens(model, prompt: torch.Tensor, max_new_tokens: int, device: torch.device, method: str,
                    pick: Pick | None, eos: set[int], on_token: Callable[[int], None]) -> TokenRun:
    """Up to ``max_new_tokens`` new tokens after ``prompt`` (1 × n ids on ``device``), each passed to
    ``on_token`` as soon as it is known, stopping after an ``eos`` token.

    On CUDA the loop stays one step ahead of the host: step i is queued before token i−1 is read (a
    pinned copy and an event per step), so streaming costs the GPU no idle time between steps. A
    method that cannot capture this model falls back to eager steps (``TokenRun.method`` says which ran).
    """
    run = TokenRun(method=method)
    decoder = StaticDecoder(model, 1, prompt.shape[1] + max_new_tokens, device, method, pick)
    try:
        if method != "eager" and not decoder.capture():
            run.method = "eager"
        if device.type == "cuda":  # untimed: sparse layers pick their prompt-size kernels, cuBLAS warms up
            model(prompt, use_cache=False)
        _sync(device)
        begin = time.perf_counter()
        decoder.start(prompt)
        first = int(decoder.token[0, 0])
        run.prefill_s = time.perf_counter() - begin
        run.tokens.append(first)
        on_token(first)
        if first in eos:
            run.stopped_at_eos = True
            return run
        begin = time.perf_counter()
        if device.type == "cuda":
            _pipelined(decoder, max_new_tokens - 1, eos, on_token, run)
        else:
            for _ in range(max_new_tokens - 1):
                decoder.step()
                token = int(decoder.token[0, 0])
                run.tokens.append(token)
                on_token(token)
                if token in eos:
                    run.stopped_at_eos = True
                    break
        run.decode_s = time.perf_counter() - begin
    finally:
        del decoder
        if method == "compile":
            torch._dynamo.reset()  # compiled code holds the model (and its memory) until reset
    return run


def _pipelined(decoder: StaticDecoder, steps: int, eos: set[int], on_token: Callable[[int], None],
               run: TokenRun) -> None:
    """``steps`` CUDA steps, each queued before the previous one's token is read on the host."""
    host = torch.empty(max(steps, 1), dtype=torch.long, pin_memory=True)
    events: list[torch.cuda.Event] = []
    for i in range(steps + 1):
        if i < steps:
            decoder.step()
            host[i].copy_(decoder.token[0, 0], non_blocking=True)
            events.append(torch.cuda.Event())
            events[i].record()
        if i == 0:
            continue
        events[i - 1].synchronize()
        token = int(host[i - 1])
        run.tokens.append(token)
        on_token(token)
        if token in eos:
            run.stopped_at_eos = True
            break
    _sync(decoder.device)

"""Text generation on the fastest decode path: the loop ``bench`` times (:mod:`secateurs.evaluate.decode`),
with a tokenizer around it, tokens streamed as text the moment they are known, and prefill and decode
tokens/s measured on the way.

Dense and sparse models run the same code: a folder exported with ``--export sparse`` loads with its
linears on the sparse kernels (``load_model``), so the decode step runs them; width- and depth-pruned
folders are plain (or per-layer) models. On CUDA the step is a CUDA-graph replay (or ``torch.compile``
then a graph); on the CPU it is the eager reference path, whose greedy tokens are the ones
``transformers``' ``generate(do_sample=False)`` gives.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch

from ..errors import UsageError
from .decode import METHODS, generate_tokens, sampler

DECODE_METHODS = ("auto", *METHODS)
LABELS = {
    "cuda-graph": "CUDA graph on a static KV cache",
    "compile": "torch.compile + CUDA graph on a static KV cache",
    "eager": "eager on a static KV cache",
}


def check_options(max_new_tokens: int, temperature: float, top_p: float, method: str) -> None:
    """The generation options alone, before any model loads (the CLI's config and the Python verb share it)."""
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {max_new_tokens} must be at least 1")
    if temperature < 0:
        raise UsageError(f"--temperature {temperature} must be 0 (greedy) or more")
    if not 0 < top_p <= 1:
        raise UsageError(f"--top-p {top_p} must be in (0, 1]")
    if top_p < 1 and temperature == 0:
        raise UsageError("--top-p samples, so it needs a --temperature above 0 (decoding is greedy by default)")
    if method not in DECODE_METHODS:
        raise UsageError(f"--decode-method {method!r} is not one of {', '.join(DECODE_METHODS)}")


def context_of(config) -> int | None:
    """The model's context in tokens, from its (text) config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)


def prompt_ids(tokenizer, text: str, chat: bool, source: str) -> list[int]:
    """The prompt as token ids: as the tokenizer encodes text (its BOS included), or with ``chat`` as one
    user turn of its chat template followed by the assistant's header."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError(f"the tokenizer of {source} has no chat template; drop --chat to continue the prompt "
                             "as plain text")
        encoded = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True)
        ids = list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
    else:
        ids = list(tokenizer(text)["input_ids"])
    if not ids:
        raise UsageError("the prompt is empty: give some text with --prompt or --prompt-file")
    return ids


def check_fits(config, prompt_tokens: int, max_new_tokens: int) -> None:
    """The prompt and every new token must fit the model's context."""
    limit = context_of(config)
    if limit and prompt_tokens + max_new_tokens > limit:
        room = limit - prompt_tokens
        fix = f"use --max-new-tokens {room} or less" if room > 0 else "shorten the prompt"
        raise UsageError(f"the prompt ({prompt_tokens} tokens) plus --max-new-tokens {max_new_tokens} is longer than "
                         f"the model's context of {limit} tokens; {fix}")


def end_tokens(model, tokenizer) -> set[int]:
    """Where generation stops: the model's generation config's end-of-sequence ids (what
    ``transformers.generate`` stops at), else the tokenizer's."""
    config = getattr(model, "generation_config", None)
    found = getattr(config, "eos_token_id", None)
    if found is None:
        found = tokenizer.eos_token_id
    if found is None:
        return set()
    return {int(i) for i in found} if isinstance(found, (list, tuple)) else {int(found)}


class TextStream:
    """Token ids in, new text out, as soon as it is whole: a character split across tokens waits for
    its last byte, and the text since the last newline is decoded again each time, so a tokenizer that
    merges pieces (leading spaces, byte fallback) shows what decoding the whole would."""

    def __init__(self, tokenizer, emit: Callable[[str], None]) -> None:
        self.tokenizer = tokenizer
        self.emit = emit
        self.ids: list[int] = []
        self.start = 0  # first id of the current line
        self.shown = 0  # characters of the current line already emitted

    def add(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids[self.start:], skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self._show(text)

    def _show(self, text: str) -> None:
        if len(text) > self.shown:
            self.emit(text[self.shown:])
        if text.endswith("\n"):
            self.start, self.shown = len(self.ids), 0
        else:
            self.shown = max(self.shown, len(text))

    def close(self) -> None:
        """Emit whatever is still held back (a sequence that ended mid-character)."""
        self._show(self.tokenizer.decode(self.ids[self.start:], skip_special_tokens=True))


@dataclass
class Generation:
    """One generation: the new text and token ids, the timings, and the path that ran (``method``, the
    sparse layers' kinds and counts, ``notes`` on any fallback)."""

    text: str
    prompt_tokens: int
    tokens: list[int]
    prefill_s: float
    decode_s: float
    method: str
    device: str
    sparse_layers: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    stopped_at_eos: bool = False

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens per second until the first new token was known."""
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("inf")

    @property
    def decode_tokens_per_s(self) -> float | None:
        """New tokens per second after the first; None with a single new token."""
        steps = len(self.tokens) - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else None

    @property
    def decode_path(self) -> str:
        """How each step ran, e.g. ``CUDA graph on a static KV cache``."""
        return LABELS[self.method] + (" (reference path)" if self.method == "eager" else "")

    @property
    def layers(self) -> str:
        """Which linears ran on sparse kernels, e.g. ``2:4 × 84 on sparse kernels``."""
        if not self.sparse_layers:
            return "none: the model runs dense"
        return ", ".join(f"{kind} × {count}" for kind, count in self.sparse_layers.items()) + " on sparse kernels"

    @property
    def path(self) -> str:
        """The whole path in words: the decode step and the sparse layers."""
        return f"{self.decode_path}; sparse layers: {self.layers}"

    def to_dict(self) -> dict:
        return {**asdict(self), "prefill_tokens_per_s": self.prefill_tokens_per_s,
                "decode_tokens_per_s": self.decode_tokens_per_s, "path": self.path}


@contextmanager
def _notes_kept() -> Iterator[None]:
    """The kernels' fallback lines are returned with the result (:attr:`Generation.notes`, shown once with
    the timings, the CPU's folded into one) instead of logged mid-stream, where they would cut the text."""
    log = logging.getLogger("secateurs.kernels")
    before, log.disabled = log.disabled, True
    try:
        yield
    finally:
        log.disabled = before


def generate(model, tokenizer, ids: list[int], max_new_tokens: int, device: torch.device, method: str = "auto",
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             stream: Callable[[str], None] | None = None) -> Generation:
    """Up to ``max_new_tokens`` after ``ids`` on ``device`` (``model`` is moved there and left there),
    greedy unless ``temperature`` > 0, each piece of text passed to ``stream`` as it is known.

    ``method`` ``auto`` is a CUDA graph on CUDA and the eager reference path on the CPU, where the
    graph methods cannot run (a note says so)."""
    from ..kernels import sparse_layers
    from ..kernels.linear import fallback_notes

    check_options(max_new_tokens, temperature, top_p, method)
    check_fits(model.config, len(ids), max_new_tokens)
    notes = []
    if device.type != "cuda":
        why = "no CUDA GPU" if not torch.cuda.is_available() else f"--device {device}"
        if method not in ("auto", "eager"):
            why = f"--decode-method {method} needs a CUDA device ({why})"
        notes.append(f"{why}: generating on the reference path (eager decode; sparse layers expand to dense)")
        method = "eager"
    elif method == "auto":
        method = "cuda-graph"
    model.to(device)
    kinds: dict[str, int] = {}
    for layer in sparse_layers(model).values():
        kinds[layer.kind] = kinds.get(layer.kind, 0) + 1
    text = TextStream(tokenizer, stream or (lambda piece: None))
    prompt = torch.tensor([ids], dtype=torch.long, device=device)
    earlier = set(fallback_notes())
    with _notes_kept():
        run = generate_tokens(model, prompt, max_new_tokens, device, method,
                              sampler(temperature, top_p, seed, device), end_tokens(model, tokenizer), text.add)
    text.close()
    if run.method != method:
        notes.append(f"the {method} decode step could not run this model: eager steps on the static cache instead")
    notes += [n for n in fallback_notes() if n not in earlier and "no CUDA device" not in n]
    return Generation(tokenizer.decode(run.tokens, skip_special_tokens=True), len(ids), run.tokens, run.prefill_s,
                      run.decode_s, run.method, str(device), kinds, notes, run.stopped_at_eos)

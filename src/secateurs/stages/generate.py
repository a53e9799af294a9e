"""The ``generate`` stage: text from MODEL on the fastest decode path, streamed to stdout, then prefill
and decode tokens/s (:func:`secateurs.api.generate`). It reads a model and writes none; the prompt,
its length against the context and the tokenizer are checked before the weights load."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..engine.options import EngineOptions
from ..errors import UsageError
from ..schema import group, help_of, option
from .base import Outcome, Stage, StageConfig, Table
from .groups import LoadOptions

if TYPE_CHECKING:
    from ..model.load import LoadedModel


@dataclass
class GenerateRequest(StageConfig):
    """Generate text with MODEL (dense, sparse export, width- or depth-pruned) on the fastest decode path, streamed to stdout, then prefill and decode tokens/s.
    Sparse layers run from their stored format with no run-time copy by default (SECATEURS_SPARSE_COPIES=none);
    SECATEURS_SPARSE_COPIES=sparse or =dense lets them keep cuSPARSELt or dense copies where faster."""

    model: str = option(help="HF folder (e.g. a secateurs OUT or sparse export), hub id, .gguf, or smollm2-135m.",
                        argument=True)
    prompt: str | None = option(None, "The prompt text.")
    prompt_file: str | None = option(None, "Read the prompt from this UTF-8 text file.")
    max_new_tokens: int = option(256, "Stop after this many new tokens (or at the end-of-sequence token).")
    chat: bool = option(False, "Send the prompt as one user turn through the tokenizer's chat template.")
    temperature: float = option(0.0, "Sample at this temperature; 0 decodes greedily (the default).")
    top_p: float = option(1.0, "Sample only from the most likely tokens whose probabilities sum to this "
                                    "(with --temperature).")
    seed: int = option(0, "Seed of the sampling: the same seed gives the same text on the same device.")
    decode_method: str = option(
        "auto", "auto (a CUDA graph on a static KV cache on CUDA, the eager reference path on CPU), cuda-graph, "
        "compile (torch.compile, then a CUDA graph; compiles for a minute first) or eager."
    )
    device: str = option(EngineOptions.device, help_of(EngineOptions, "device"))
    load: LoadOptions = group(
        LoadOptions, exclude=("overwrite",), defaults={"dtype": "auto"},
        help={"dtype": "auto (float16 on CUDA, float32 on CPU), float32, bfloat16 or float16."},
    )
    text: str = field(default="", init=False)  # the prompt, from --prompt or --prompt-file

    def __post_init__(self) -> None:
        """One prompt source, readable, and the generation options, before anything loads."""
        from ..evaluate.generate import check_options

        if (self.prompt is None) == (self.prompt_file is None):
            raise UsageError("give the prompt once: --prompt TEXT or --prompt-file FILE" if self.prompt is None
                             else "give --prompt or --prompt-file, not both")
        if self.prompt_file is not None:
            path = Path(self.prompt_file).expanduser()
            try:
                self.text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise UsageError(f"--prompt-file {self.prompt_file} is not UTF-8 text") from None
            except OSError as exc:
                raise UsageError(f"--prompt-file {self.prompt_file} cannot be read ({exc.strerror or exc})") from None
        else:
            self.text = self.prompt
        check_options(self.max_new_tokens, self.temperature, self.top_p, self.decode_method)


class GenerateStage(Stage):
    name = "generate"
    produces_model = False
    config_class = GenerateRequest

    def needs_text(self, request: GenerateRequest) -> bool:
        return True  # the prompt is text

    def check_model(self, request: GenerateRequest, skeleton: LoadedModel | None) -> None:
        """The tokenizer, the chat template and the prompt plus new tokens against the context, from a local
        folder's config and tokenizer alone (a hub id or .gguf is checked once loaded)."""
        from ..evaluate.generate import check_fits, prompt_ids
        from ..model.load import _try_tokenizer, check_tokenizer, local_folder

        check_tokenizer(request.model, request.trust_remote_code, needed=True)
        folder = local_folder(request.model)
        if skeleton is None or folder is None:
            return
        ids = prompt_ids(_try_tokenizer(folder, request.trust_remote_code), request.text, request.chat, request.model)
        check_fits(skeleton.model.config, len(ids), request.max_new_tokens)

    def load(self, request: GenerateRequest) -> LoadedModel:
        """MODEL in the dtype ``auto`` names for the device (float16 on CUDA), sparse layers on their kernels."""
        from ..device import resolve_device
        from ..model.load import load_model

        dtype = request.dtype
        if dtype == "auto":
            dtype = "float16" if resolve_device(request.device).type == "cuda" else "float32"
        return load_model(request.model, dtype, request.trust_remote_code)

    def execute(self, request: GenerateRequest) -> Outcome:
        """The text streamed to stdout as it comes, then the timings and the path that ran."""
        from ..api import generate

        loaded = self.load(request)

        def show(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        done = generate(loaded, request.text, request.max_new_tokens, chat=request.chat,
                        temperature=request.temperature, top_p=request.top_p, seed=request.seed,
                        device=request.device, method=request.decode_method, stream=show)
        show("\n")
        decode = done.decode_tokens_per_s
        rows = [
            ["decode", done.decode_path],
            ["sparse layers", done.layers],
            ["device", done.device],
            ["prompt tokens", str(done.prompt_tokens)],
            ["new tokens", f"{len(done.tokens)}{' (end of sequence)' if done.stopped_at_eos else ''}"],
            ["prefill (tok/s)", f"{done.prefill_tokens_per_s:.1f} ({done.prefill_s * 1000:.1f} ms to the first token)"],
            ["decode (tok/s)", "n/a (one new token)" if decode is None else f"{decode:.1f}"],
        ]
        notes = [f"[yellow]note:[/] {note}" for note in done.notes]
        return Outcome([Table(f"secateurs generate {request.model}", ["", "value"], rows, notes)])

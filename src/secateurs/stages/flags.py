"""The flags every stage shares and the checks every stage runs before it loads a model.

A stage's flags are the parameters of its ``parse`` function, each ``Annotated[type, Help(...)]``:
the recipe runner reads them as a recipe's keys, the CLI turns each :class:`Help` into a typer option.
Nothing here knows about typer: the same definitions serve Python, recipes and the command line.
Nothing here imports torch or transformers at module level either: the CLI builds every command (and
``--help``) from these definitions, and must not pay seconds of imports to show them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from rich.console import Console

from ..data.sources import check_name
from ..errors import UsageError

if TYPE_CHECKING:
    from ..model.load import LoadedModel

err_console = Console(stderr=True)


@dataclass(frozen=True)
class Help:
    """What the command line shows for a flag: its help text and, where they differ from
    ``--flag-name``, its spellings (``argument``: a positional argument instead of an option)."""

    text: str
    decls: tuple[str, ...] = ()
    argument: bool = False


Model = Annotated[str, Help("HF folder, hub id, .gguf file, or smollm2-135m.", argument=True)]
Out = Annotated[str, Help("Output folder (written atomically).", ("--out",))]
DataDir = Annotated[str | None, Help("Folder with local dataset copies (default: $SECATEURS_DATA).", ("--data-dir",))]
Device = Annotated[str, Help("auto (CUDA if present), cpu, cuda, cuda:N.")]
Dtype = Annotated[str, Help("Weights dtype: float32, bfloat16 or float16.")]
BatchSize = Annotated[int, Help("Sequences per forward pass.")]
Seed = Annotated[int, Help("Seed for calibration sampling.")]
EvalPpl = Annotated[str | None, Help("After pruning, measure perplexity on these datasets (comma-separated) and record it.")]
LimitWindows = Annotated[int | None, Help("Evaluate only the first N windows.")]
EvalSeqLen = Annotated[int, Help("Window length for --ppl.")]
Overwrite = Annotated[bool, Help("Replace OUT if it exists.")]
TrustRemoteCode = Annotated[
    bool,
    Help("Let transformers run Python code shipped in the model folder or hub repo (never needed for secateurs outputs). Read that code first."),
]


def csv_list(text: str | None) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()] if text else []


def parse_sparsity(text: str | None) -> float | list[float] | None:
    """``0.5`` or a per-block schedule ``0.4,0.5,0.6,...``."""
    if text is None:
        return None
    try:
        values = [float(part) for part in csv_list(text)]
    except ValueError:
        raise UsageError(f"--sparsity {text!r} is not a number or a comma-separated list of numbers") from None
    if not values:
        raise UsageError("--sparsity is empty")
    return values[0] if len(values) == 1 else values


def parse_options(pairs: list[str] | None) -> dict[str, str]:
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--option {pair!r} must look like key=value")
        options[key.strip()] = value.strip()
    return options


def parse_floats(text: str | None, flag_name: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(part) for part in csv_list(text)]
    except ValueError:
        raise UsageError(f"{flag_name} {text!r} must be comma-separated numbers, one per --data domain") from None


def parse_ints(text: str, flag_name: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in csv_list(text))
    except ValueError:
        raise UsageError(f"{flag_name} {text!r} must be comma-separated integers, e.g. 1,8") from None


def check_at_least(minimum: int, **flags: int | None) -> None:
    """Integer flags (given as flag_name=value; None = not given) must be at least ``minimum``."""
    for name, value in flags.items():
        if value is not None and value < minimum:
            raise UsageError(f"--{name.replace('_', '-')} must be at least {minimum}, got {value}")


def check_eval_flags(datasets: list[str], limit_windows: int | None, seq_len: int, seq_flag: str = "--eval-seq-len") -> None:
    """Perplexity flags, before any work (a prune must not run only for its evaluation to fail)."""
    for name in datasets:
        check_name(name)
    check_at_least(1, limit_windows=limit_windows)
    if seq_len < 2:
        raise UsageError(f"{seq_flag} must be at least 2, got {seq_len}")


def check_json_out(path: str | None, flag_name: str = "--json") -> None:
    from ..model.save import check_output_file

    if path is not None:
        check_output_file(path, flag_name)


def preflight(model: str, trust_remote_code: bool = False, pending: frozenset[str] = frozenset()) -> LoadedModel | None:
    """MODEL with weights on the meta device (config only), to check flags against its shapes; None
    for a recipe stage whose input an earlier stage has yet to write (``pending``)."""
    from ..model.load import load_skeleton

    if model in pending:
        return None
    return load_skeleton(model, trust_remote_code)


def context_length(loaded: LoadedModel) -> int | None:
    config = loaded.model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def check_context(loaded: LoadedModel | None, **lengths: int | None) -> None:
    """Sequence lengths (flag_name=value) must fit the model's context (known from its config)."""
    limit = context_length(loaded) if loaded is not None else None
    for name, value in lengths.items():
        if limit and value is not None and value > limit:
            raise UsageError(
                f"--{name.replace('_', '-')} {value} is longer than the model's context of {limit} tokens; use at most {limit}"
            )


def calibration_seconds(loaded: LoadedModel, tokens: int, passes: int = 2) -> float:
    """A rough CPU time for ``passes`` forward passes of every block over ``tokens`` tokens: 2 FLOPs
    per block parameter per token, at the speed a short 512 × 512 matrix product runs here now
    (attention's quadratic term and the methods' own solves come on top)."""
    import torch

    blocks = loaded.spec.blocks_of(loaded.model)
    block_params = sum(p.numel() for p in blocks[0].parameters()) * len(blocks)
    a = torch.randn(512, 512)
    start = time.perf_counter()
    for _ in range(8):
        a @ a
    flops_per_s = 8 * 2 * 512**3 / (time.perf_counter() - start)
    return passes * 2 * block_params * tokens / flops_per_s


def cpu_cost_note(loaded: LoadedModel | None, device: str, n_samples: int, seq_len: int) -> None:
    """On a CPU, say up front what calibration will cost (tokens, activation memory, a rough time),
    so a paper-size default (128 × 2048) is not a silent hours-long run."""
    from ..device import resolve_device

    tokens = n_samples * seq_len
    if loaded is None or tokens < 65_536 or resolve_device(device).type != "cpu":
        return
    hidden = loaded.model.config.get_text_config().hidden_size
    err_console.print(
        f"[yellow]note:[/] calibration on the CPU: {n_samples} × {seq_len} = {tokens:,} tokens, "
        f"{tokens * hidden * 4 / 2**30:.1f} GiB of activations, roughly {calibration_seconds(loaded, tokens) / 60:.0f} min "
        f"or more of block passes on this CPU; --n-samples 32 --seq-len 512 is {tokens // 16_384}× less work",
        highlight=False, soft_wrap=True,
    )


def perplexity_rows(measured: dict, label: str = "", key_suffix: str = "") -> tuple[list[list[str]], dict]:
    """Table rows and ``secateurs.json`` results for ``evaluate_perplexity`` output (shared by every stage)."""
    rows, results = [], {}
    for name, value in measured.items():
        failed = isinstance(value, str)
        rows.append([f"{name} perplexity{label}", "unavailable" if failed else f"{value.ppl:.3f}"])
        results[f"ppl_{name}{key_suffix}"] = {"error": value} if failed else value.to_dict()
    return rows, results

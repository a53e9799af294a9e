"""Pieces every subcommand shares: option types, one-line errors, tables, and the checks every
command runs before it loads a model (flags, the output location, the model's shapes).

A command checks everything it can, then calls :func:`ready` just before the first real work. A
recipe validates a stage by calling the command itself under :func:`check_only`, where ``ready``
stops it: the checks a recipe runs are the command's own, so they cannot drift apart.
"""

from __future__ import annotations

import contextvars
import functools
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.table import Table

from ..data.sources import check_name
from ..engine.sequential import EngineOptions
from ..errors import SecateursError, UsageError
from ..model.load import LoadedModel, load_skeleton, model_bytes
from ..model.save import check_output, check_output_file

out_console = Console()
err_console = Console(stderr=True)

DataDir = Annotated[
    str | None,
    typer.Option("--data-dir", help="Folder with local dataset copies (default: $SECATEURS_DATA)."),
]
Device = Annotated[str, typer.Option(help="auto (CUDA if present), cpu, cuda, cuda:N.")]
Dtype = Annotated[str, typer.Option(help="Weights dtype: float32, bfloat16 or float16.")]
BatchSize = Annotated[int, typer.Option(help="Sequences per forward pass.")]
Seed = Annotated[int, typer.Option(help="Seed for calibration sampling.")]
EvalPpl = Annotated[
    str | None, typer.Option(help="After pruning, measure perplexity on these datasets (comma-separated) and record it.")
]
LimitWindows = Annotated[int | None, typer.Option(help="Evaluate only the first N windows.")]
EvalSeqLen = Annotated[int, typer.Option(help="Window length for --ppl.")]
Overwrite = Annotated[bool, typer.Option(help="Replace OUT if it exists.")]
TrustRemoteCode = Annotated[
    bool,
    typer.Option(help="Let transformers run Python code shipped in the model folder or hub repo (never needed for secateurs outputs). Read that code first."),
]

# Under check_only(): model paths a recipe's earlier stages will write (checked without a model).
_CHECK_ONLY: contextvars.ContextVar[frozenset[str] | None] = contextvars.ContextVar("check_only", default=None)


class Checked(Exception):
    """Raised by :func:`ready` under :func:`check_only`: every check passed and no work was done."""


@contextmanager
def check_only(pending: frozenset[str] = frozenset()) -> Iterator[None]:
    """Run commands up to :func:`ready` only; ``pending`` models do not exist yet (recipe stages)."""
    token = _CHECK_ONLY.set(frozenset(pending))
    try:
        yield
    finally:
        _CHECK_ONLY.reset(token)


def ready() -> None:
    """Every check of the command passed; under :func:`check_only` stop here, before any work."""
    if _CHECK_ONLY.get() is not None:
        raise Checked


def preflight(model: str, trust_remote_code: bool = False) -> LoadedModel | None:
    """MODEL with weights on the meta device (config only), to check flags against its shapes; None
    for a recipe stage whose input an earlier stage has yet to write."""
    pending = _CHECK_ONLY.get()
    if pending is not None and model in pending:
        return None
    return load_skeleton(model, trust_remote_code)


def check_out_folder(out: str, model: str, overwrite: bool, dtype: str = "float32") -> None:
    """OUT before any work: not over MODEL, free (or --overwrite), creatable, writable, and room for
    the model's size in ``dtype`` (an upper bound: pruned outputs are the same size or smaller)."""
    pending = _CHECK_ONLY.get()
    if pending is not None:
        overwrite = True  # the runner removes a stage's old output before it reruns the stage
    check_output(out, model, overwrite, None if pending and model in pending else model_bytes(model, dtype))


def check_json_out(path: str | None, flag: str = "--json") -> None:
    if path is not None:
        check_output_file(path, flag)


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
    tokens = n_samples * seq_len
    if loaded is None or tokens < 65_536 or EngineOptions(device=device).torch_device().type != "cpu":
        return
    hidden = loaded.model.config.get_text_config().hidden_size
    err_console.print(
        f"[yellow]note:[/] calibration on the CPU: {n_samples} × {seq_len} = {tokens:,} tokens, "
        f"{tokens * hidden * 4 / 2**30:.1f} GiB of activations, roughly {calibration_seconds(loaded, tokens) / 60:.0f} min "
        f"or more of block passes on this CPU; --n-samples 32 --seq-len 512 is {tokens // 16_384}× less work",
        highlight=False, soft_wrap=True,
    )


def friendly(command: Callable) -> Callable:
    """Turn secateurs errors into one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except SecateursError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except OSError as exc:  # a disk that filled or went read-only mid-run: one line, not a traceback
            where = f" ({exc.filename})" if exc.filename else ""
            err_console.print(f"[bold red]error:[/] {exc.strerror or exc}{where}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


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


def perplexity_rows(measured: dict, label: str = "", key_suffix: str = "") -> tuple[list[list[str]], dict]:
    """Table rows and ``secateurs.json`` results for ``evaluate_perplexity`` output (shared by every stage)."""
    rows, results = [], {}
    for name, value in measured.items():
        failed = isinstance(value, str)
        rows.append([f"{name} perplexity{label}", "unavailable" if failed else f"{value.ppl:.3f}"])
        results[f"ppl_{name}{key_suffix}"] = {"error": value} if failed else value.to_dict()
    return rows, results


def table(title: str, columns: list[str], rows: list[list[str]]) -> Table:
    t = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        t.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        t.add_row(*row)
    return t


def data_dir_or_env(data_dir: str | None) -> str | None:
    return data_dir or os.environ.get("SECATEURS_DATA")

"""Pieces every subcommand shares: option types, one-line errors, tables."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ..errors import SecateursError, UsageError

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


def friendly(command: Callable) -> Callable:
    """Turn secateurs errors into one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except SecateursError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
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

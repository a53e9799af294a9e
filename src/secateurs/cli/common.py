"""Pieces every subcommand shares: consoles, one-line errors and tables. The flag types and the
checks run before a model loads live in :mod:`secateurs.stages.flags`, shared with recipes and the
Python API.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import typer
from rich.console import Console
from rich.table import Table

from ..errors import SecateursError
from ..stages.flags import err_console

out_console = Console()


def check_out_folder(out: str, model: str, overwrite: bool, dtype: str = "float32") -> None:
    """OUT before any work: not over MODEL, free (or --overwrite), creatable, writable, and room for
    the model's size in ``dtype`` (an upper bound: pruned outputs are the same size or smaller)."""
    from ..model.load import model_bytes
    from ..model.save import check_output

    check_output(out, model, overwrite, model_bytes(model, dtype))


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


def table(title: str, columns: list[str], rows: list[list[str]]) -> Table:
    t = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        t.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        t.add_row(*row)
    return t

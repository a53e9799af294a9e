"""``secateurs report``: report.md and PNG plots from the runs given (output folders or records)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import UsageError
from .app import app
from .common import friendly, out_console


@app.command("report")
@friendly
def report_command(
    runs: Annotated[
        list[str],
        typer.Argument(help="secateurs output folders, their secateurs.json, `secateurs eval --json` files, or benchmark results files."),
    ],
    out: Annotated[
        str | None,
        typer.Option("--out", help="Folder for report.md and the plots (default: the run's folder when one is given)."),
    ] = None,
    title: Annotated[str, typer.Option(help="Heading of report.md.")] = "secateurs report",
) -> None:
    """Tabulate perplexity, zero-shot accuracy, size and speed of runs, and plot them against what was removed.

    A `secateurs run` output folder is rendered as its chain: one row per stage, with the metrics
    measured after it."""
    from ..report import results_table, write_report
    from ..runs import load_runs

    if out is None:
        if len(runs) != 1 or not Path(runs[0]).is_dir():
            raise UsageError("pass --out DIR for the report (it defaults to the run's folder only for one folder)")
        out = runs[0]
    loaded = [run for path in runs for run in load_runs(path)]
    report = write_report(loaded, out, title)
    out_console.print(results_table(loaded), markup=False, highlight=False, soft_wrap=True)
    out_console.print(f"wrote {report} (and its plots)", highlight=False)

"""The ``secateurs`` command line: the typer ``app`` (cli/app.py), one module per group of commands."""

from __future__ import annotations

from . import demo, report, run, stages
from .app import app

__all__ = ["app", "demo", "main", "report", "run", "stages"]


def main() -> None:
    app()

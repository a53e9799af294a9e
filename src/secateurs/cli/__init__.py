"""The ``secateurs`` command line: one subcommand per stage, each in its own module."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="secateurs",
    help=(
        "Prune large language models (unstructured, N:M, structured, depth) and measure what it "
        "cost in quality and what it won in speed and memory. Every command writes a normal "
        "Hugging Face folder plus secateurs.json, and never touches its input."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

from . import bench, demo, evaluate, layers, prune, recover, report, run, shear, width  # noqa: E402  (each registers its command on `app`)

__all__ = ["app", "main", "bench", "demo", "evaluate", "layers", "prune", "recover", "report", "run", "shear", "width"]


def main() -> None:
    app()

"""The typer application, and the one way a stage becomes a command: its config's fields become typer
options (:mod:`secateurs.schema`), the command builds the config from them and runs the shared stage
runner."""

from __future__ import annotations

import inspect
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated

import typer
from typer.core import TyperGroup

from ..schema import Flag, flags
from ..stages import Outcome, Stage, run_command
from .common import err_console, friendly, out_console, table


class _Commands(TyperGroup):
    """Commands listed by name, whichever module registered them."""

    def list_commands(self, ctx: typer.Context) -> list[str]:
        return sorted(self.commands)


app = typer.Typer(
    name="secateurs",
    cls=_Commands,
    help=(
        "Prune large language models (unstructured, N:M, structured, depth) and measure what it "
        "cost in quality and what it won in speed and memory. Every command writes a normal "
        "Hugging Face folder plus secateurs.json, and never touches its input."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def package_version() -> str:
    """The installed secateurs' version (what a bug report needs), or 'unknown' for a source tree run in place."""
    try:
        return version("secateurs")
    except PackageNotFoundError:
        return "unknown"


def _print_version(value: bool) -> None:
    if value:
        out_console.print(f"secateurs {package_version()}", highlight=False)
        raise typer.Exit()


@app.callback()
def _options(
    show_version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", is_eager=True, callback=_print_version)
    ] = False,
) -> None:
    """Options before the command."""


def show(outcome: Outcome | None) -> None:
    """Print a stage's tables (warnings first, on stderr) and closing lines; exit 2 if nothing was measured."""
    if outcome is None:
        return
    for shown in outcome.tables:
        for note in shown.notes:
            err_console.print(note, highlight=False, soft_wrap=True)
        out_console.print(table(shown.title, shown.columns, shown.rows))
    for line in outcome.footer:
        out_console.print(line)
    if outcome.failed:
        raise typer.Exit(2)


def schema_flag(flag: Flag) -> inspect.Parameter:
    """A config-derived flag as a typer parameter: its name, type, default and help."""
    info = typer.Argument(help=flag.help) if flag.argument else typer.Option(*flag.decls, help=flag.help)
    default = inspect.Parameter.empty if flag.required else flag.default
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD if flag.argument else inspect.Parameter.KEYWORD_ONLY
    return inspect.Parameter(flag.name, kind, default=default, annotation=Annotated[flag.annotation, info])


def stage_command(stage: Stage) -> None:
    """Register ``secateurs <stage.name>``: options from the stage's config fields (the same flags a
    recipe stage takes), help from the config's docstring; then check → load → verb → evaluate → save, or for
    ``--nproc`` > 1 the same command without it under torchrun (:func:`secateurs.stages.run_command`)."""
    parameters = [schema_flag(flag) for flag in flags(stage.config_class).values()]

    def command(**values: object) -> None:
        show(run_command(stage.parse(**values), values))

    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    command.__doc__ = (stage.config_class.__doc__ or "").split("\n\n")[0]
    command.__name__ = command.__qualname__ = f"{stage.name}_command"
    app.command(stage.name)(friendly(command))

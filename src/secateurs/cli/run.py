"""``secateurs run RECIPE.yaml``: chain stages in one validated, resumable command."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ..stages import STAGES
from .app import app, show
from .common import friendly, out_console, table


@app.command(
    "run",
    help=(
        "Run a recipe: a YAML file with `model`, optional `calib` defaults "
        "({source, n_samples, seq_len, seed, data_dir}), `stages` and `out`. Each stage is one of "
        f"{', '.join(STAGES)}, and its fields are exactly that command's flags "
        "(see `secateurs <stage> --help`; `model`, `out` and `overwrite` are set by the runner). "
        "The whole recipe is validated before any work starts. Stage outputs live in OUT/stages/NN-name "
        "and are reused when their config and input are unchanged; OUT itself holds the final model and "
        "a secateurs.json with every stage's config, timing and results."
    ),
)
@friendly
def run_command(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML file.")],
    out: Annotated[str | None, typer.Option(help="Output folder (overrides the recipe's `out`).")] = None,
    dry_run: Annotated[bool, typer.Option(help="Validate and print the plan without running anything.")] = False,
) -> None:
    """Chain depth, width, sparsity, recovery and evaluation stages from a YAML recipe."""
    from ..recipe import load_recipe, run

    parsed = load_recipe(recipe, out)
    if dry_run:
        rows = [
            [step["stage"], step["action"], json.dumps(step["fields"], default=str),
             f"{step['forward_token_equivalents']:,}" if step["forward_token_equivalents"] else "-"]
            for step in run(parsed, dry_run=True)["plan"]
        ]
        out_console.print(table(f"plan for {parsed.out}", ["stage", "action", "fields", "≈ tokens processed"], rows))
        return
    record = run(parsed, echo=lambda line: out_console.print(line, highlight=False), show=show)
    out_console.print(f"done: {parsed.out} (final model: {record['results']['final_model']})")

"""How a benchmark script saves what it measured.

One JSON file per run of a script, written atomically (a cut-off run leaves the previous file),
with the package versions beside the script's own settings and rows. Where the rows are model
variants (dense, pruned this way, pruned that way), the script also passes ``runs``: one
:func:`run_record` per variant, in the ``secateurs.json`` schema, so
``secateurs report benchmarks/results/<file>.json --out DIR`` renders the same table and plots a
user gets from their own output folders.

secateurs is imported inside the functions: the llm-compressor workers import their benchmark
script in a virtualenv that has no secateurs, and never save.
"""

from __future__ import annotations

import json
from pathlib import Path


def run_record(label: str, source: str, stages: list[dict], perplexity: dict[str, float] | None = None,
               results: dict | None = None) -> dict:
    """One variant as a run record (see ``secateurs.record.run_record``)."""
    from secateurs.record import run_record as record

    return record(label, source, stages, perplexity, results)


def save_results(path: str | Path, payload: dict, runs: list[dict] | None = None) -> Path:
    """Write ``payload`` (the script's settings, machine and rows), the versions, and ``runs``."""
    from secateurs.files import write_atomic
    from secateurs.record import versions

    document = {**payload, "versions": versions()}
    if runs is not None:
        document["runs"] = runs
    return write_atomic(Path(path), json.dumps(document, indent=2, default=str) + "\n")

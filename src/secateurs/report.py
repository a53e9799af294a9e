"""A report to look at: ``report.md`` and PNG plots from the records of saved runs.

A run is what a secateurs command left behind: a model folder with ``secateurs.json``, that file
itself, a record file in the same format (the benchmarks write these), or the ``--json`` output of
``secateurs eval`` (its scores, with the stages read from the evaluated folder's record). From the
runs given, the report tabulates perplexity, zero-shot accuracy (per task and the mean), parameter
count and speed where measured, each also as a ratio to the dense run when one is given, and
plots quality against how much was removed plus each run's per-layer sparsity or importance.

How much was removed is read from the stages: the mean achieved sparsity of the block linears for
unstructured / N:M pruning, the fraction of decoder layers removed for depth pruning, and the
fraction of parameters removed for width pruning; they share the x axis of the quality plot,
with a marker per kind, so the plot compares like with like only within a kind.
"""

from __future__ import annotations

import copy
import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import UsageError
from .files import write_atomic
from .model.save import RECORD
from .model.shards import read_header
from .record import Effect, parse_stage

MARKERS = {"dense": "*", "sparsity": "o", "layers removed": "s", "width removed": "^"}


@dataclass
class Run:
    """What the report needs from one run, normalised across the kinds of pruning."""

    label: str
    source: str
    method: str = "dense"
    kind: str = "dense"
    removed: float = 0.0
    layers: dict[str, dict[int, float]] = field(default_factory=dict)
    removed_layers: list[int] = field(default_factory=list)
    perplexity: dict[str, float] = field(default_factory=dict)
    zeroshot: dict[str, float] = field(default_factory=dict)
    mean_acc: float | None = None
    zeroshot_limit: int | None = None
    params: int | None = None
    decode_tokens_per_s: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path} is not a readable JSON file ({exc}); pass a secateurs output folder or record") from exc
    if not isinstance(data, dict):
        raise UsageError(f"{path} is not a secateurs record; pass a secateurs output folder or its secateurs.json")
    return data


def count_parameters(folder: Path) -> int | None:
    """Parameters stored in a folder's safetensors files, read from their headers (no weights loaded)."""
    total, found = 0, False
    for shard in sorted(folder.glob("*.safetensors")):
        for entry in read_header(shard, folder)[0].values():
            found = True
            count = 1
            for dim in entry["shape"]:
                count *= dim
            total += count
    return total if found else None


def _apply_stages(run: Run, stages: list[dict], before: Effect | None = None) -> Effect | None:
    """Fold the stages' typed records into ``run``: the last stage that changed the model sets the
    method, the kind of removal and how much; the dense baseline is a run whose stages changed nothing."""
    effect = before
    for data in stages:
        stage = parse_stage(data) if isinstance(data, dict) else None
        if stage is not None:
            effect = stage.effect(effect)
    if effect is not None:
        run.kind, run.method, run.removed = effect.kind, effect.method, effect.removed
        run.layers, run.removed_layers = dict(effect.profile), list(effect.removed_layers)
        if effect.params_after is not None:
            run.params = effect.params_after
    return effect


def _apply_results(run: Run, results: dict) -> None:
    for key, value in results.items():
        if key.startswith("ppl_") and isinstance(value, dict) and "ppl" in value:
            run.perplexity[key[4:]] = float(value["ppl"])
    zeroshot = results.get("zeroshot")
    if isinstance(zeroshot, dict):
        run.zeroshot = {name: float(r["acc"]) for name, r in zeroshot.get("tasks", {}).items()}
        run.mean_acc = zeroshot.get("mean_acc")
        run.zeroshot_limit = zeroshot.get("limit")
    speed = results.get("speed")
    if isinstance(speed, dict) and speed.get("decode_tokens_per_s"):
        per_batch = speed["decode_tokens_per_s"]
        run.decode_tokens_per_s = float(per_batch.get("1", per_batch.get(1, next(iter(per_batch.values())))))


def load_run(path: str | Path, label: str | None = None) -> Run:
    """Read one run: a secateurs output folder, its record file, or ``secateurs eval --json`` output."""
    path = Path(path).expanduser()
    folder = path if path.is_dir() else None
    if folder is not None:
        if not (folder / RECORD).is_file():
            raise UsageError(f"{folder} has no {RECORD}; pass a folder written by a secateurs command")
        path = folder / RECORD
    elif not path.is_file():
        raise UsageError(f"run not found: {path}; pass a secateurs output folder or a record .json")
    return _run_from(_read_json(path), path, folder, label)


def _run_from(data: dict, path: Path, folder: Path | None, label: str | None) -> Run:
    record, results = data, data.get("results", {})
    if "stages" not in data and "model" in data:  # `secateurs eval --json` output
        results = {f"ppl_{k}": v for k, v in data.get("perplexity", {}).items()}
        if "zeroshot" in data:
            results["zeroshot"] = data["zeroshot"]
        evaluated = Path(str(data["model"])).expanduser()
        folder = evaluated if evaluated.is_dir() else None
        record = _read_json(folder / RECORD) if folder is not None and (folder / RECORD).is_file() else {}
    elif "stages" not in data:
        raise UsageError(f"{path} is not a secateurs record (no 'stages'); pass an output folder or eval --json file")
    name = label or data.get("label") or (folder.name if folder is not None else path.stem)
    run = Run(label=name, source=str(path))
    _apply_stages(run, record.get("stages", []))
    _apply_results(run, results)
    if run.params is None and folder is not None:
        run.params = count_parameters(folder)
    return run


def load_runs(path: str | Path) -> list[Run]:
    """Every run a path holds: a `secateurs run` folder gives one per stage (its chain), a benchmark
    results file (``"runs": [...]`` of records, see ``record.run_record``) one per entry, anything
    else the one run of :func:`load_run`."""
    source = Path(path).expanduser()
    if source.is_dir() and (source / RECORD).is_file() and is_recipe_record(_read_json(source / RECORD)):
        return load_chain(source)
    if source.is_file() and source.suffix == ".json":
        data = _read_json(source)
        if isinstance(data.get("runs"), list) and "stages" not in data:
            return [_run_from(entry, source, None, None) for entry in data["runs"] if isinstance(entry, dict)]
    return [load_run(source)]


def is_recipe_record(data: dict) -> bool:
    """A ``secateurs run`` record: its stages carry the recipe's stage folder and content hash."""
    stages = data.get("stages") or []
    return bool(stages) and all(isinstance(s, dict) and "key" in s and "folder" in s for s in stages)


def load_chain(out: str | Path) -> list[Run]:
    """One Run per stage of a recipe output: the model's state and metrics after each stage."""
    out = Path(out).expanduser()
    data = _read_json(out / RECORD)
    if not is_recipe_record(data):
        raise UsageError(f"{out} is not a `secateurs run` output folder")
    runs: list[Run] = []
    state = Run(label="input", source=str(data.get("input", "")))
    effect: Effect | None = None
    for stage in data["stages"]:
        state = copy.deepcopy(state)
        state.label, state.source = stage["folder"], str(out / "stages" / stage["folder"])
        if stage.get("record"):
            effect = _apply_stages(state, [stage["record"]], effect)
        results = stage.get("results") or {}
        if "perplexity" in results or "zeroshot" in results:  # an eval stage's --json output
            flat = {f"ppl_{k}": v for k, v in results.get("perplexity", {}).items()}
            if "zeroshot" in results:
                flat["zeroshot"] = results["zeroshot"]
            results = flat
        _apply_results(state, results)
        model = out / "stages" / stage["folder"] / "model"
        if model.is_dir():
            state.params = count_parameters(model)
        runs.append(state)
    return runs


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise UsageError("plots need matplotlib: pip install 'secateurs[eval]' (or pip install matplotlib)") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def quality_plot(runs: list[Run]) -> bytes | None:
    """Perplexity (log scale) and mean zero-shot accuracy against the fraction removed, one series per method."""
    panels = [(title, get) for title, get in (
        ("perplexity (" + ", ".join(sorted({d for r in runs for d in r.perplexity})) + ")",
         lambda r: next(iter(r.perplexity.values()), None)),
        ("mean zero-shot accuracy", lambda r: r.mean_acc),
    ) if any(get(r) is not None for r in runs)]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    series: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        series.setdefault((run.method, run.kind), []).append(run)
    for ax, (title, get) in zip(axes[0], panels):
        for (method, kind), members in series.items():
            points = sorted((r.removed, get(r)) for r in members if get(r) is not None)
            if not points:
                continue
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker=MARKERS[kind], markersize=11 if kind == "dense" else 7,
                    linestyle="-" if len(points) > 1 else "none", label=f"{method} ({kind})" if kind != "dense" else "dense")
        if title.startswith("perplexity"):
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("fraction removed (sparsity / layers / parameters)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


def per_layer_plot(runs: list[Run]) -> bytes | None:
    """One panel per run and per-layer quantity (sparsity, importance, width); removed layers in red."""
    panels = [(run, what, values) for run in runs for what, values in run.layers.items() if values]
    if not panels:
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    n_layers = max(max(values) for _, _, values in panels) + 1
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 0.25 * n_layers), 1.9 * len(panels)), squeeze=False)
    for ax, (run, what, values) in zip(axes[:, 0], panels):
        layers = sorted(values)
        gone = set(run.removed_layers)
        ax.bar(layers, [values[i] for i in layers], color=["tab:red" if i in gone else "tab:blue" for i in layers])
        ax.set_title(f"{run.label}: {what}" + (" (red: removed)" if gone else ""), fontsize=9)
        ax.set_xlim(-0.5, n_layers - 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1, 0].set_xlabel("layer")
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


def _fmt(value: float | int | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def results_table(runs: list[Run]) -> str:
    """The Markdown table of every run: ppl, zero-shot acc per task and mean, params, speed, ratios to dense."""
    dense = next((r for r in runs if r.kind == "dense"), None)
    datasets = sorted({d for r in runs for d in r.perplexity})
    tasks = list(dict.fromkeys(t for r in runs for t in r.zeroshot))
    speed = any(r.decode_tokens_per_s for r in runs)
    columns = ["run", "method", "removed", *[f"{d} ppl" for d in datasets]]
    if dense is not None and dense.perplexity:
        columns += ["ppl / dense"]
    columns += [*tasks, *(["mean acc"] if tasks else [])]
    if dense is not None and dense.mean_acc is not None:
        columns += ["acc − dense"]
    columns += ["params"] + (["decode tok/s"] if speed else [])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in runs:
        removed = "" if r.kind == "dense" else f"{r.removed:.3f} {r.kind}"
        row = [r.label, r.method, removed, *[_fmt(r.perplexity.get(d), ".2f") for d in datasets]]
        if dense is not None and dense.perplexity:
            key = next(iter(dense.perplexity))
            row.append(_fmt(r.perplexity[key] / dense.perplexity[key], ".2f") if key in r.perplexity else "")
        row += [_fmt(r.zeroshot.get(t), ".3f") for t in tasks] + ([_fmt(r.mean_acc, ".3f")] if tasks else [])
        if dense is not None and dense.mean_acc is not None:
            row.append(_fmt(None if r.mean_acc is None else r.mean_acc - dense.mean_acc, "+.3f"))
        row.append(_fmt(None if r.params is None else r.params / 1e6, ".1f") + ("M" if r.params else ""))
        if speed:
            row.append(_fmt(r.decode_tokens_per_s, ".1f"))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_report(runs: list[Run], out: str | Path, title: str = "secateurs report") -> Path:
    """Write ``report.md``, ``quality.png`` and ``per_layer.png`` (those with data) into ``out``."""
    if not runs:
        raise UsageError("no runs given; pass secateurs output folders or record files")
    labels = [r.label for r in runs]
    if len(set(labels)) != len(labels):
        raise UsageError(f"two runs share a name ({', '.join(sorted({x for x in labels if labels.count(x) > 1}))}); "
                         "pass runs from differently named folders")
    target = Path(out).expanduser()
    if target.exists() and not target.is_dir():
        raise UsageError(f"--out {out} is not a folder; choose a folder for the report")
    target.mkdir(parents=True, exist_ok=True)
    limits = {r.zeroshot_limit for r in runs if r.zeroshot}
    lines = [f"# {title}", "", results_table(runs), ""]
    if limits:
        limit = ", ".join("all" if x is None else f"first {x}" for x in sorted(limits, key=lambda x: x or 0))
        lines += [f"Zero-shot: lm-eval acc, {limit} documents per task; mean acc = mean over the tasks shown.",
                  "ppl / dense and acc − dense compare each run with the dense run of this report.", ""]
    for name, plot in (("quality.png", quality_plot(runs)), ("per_layer.png", per_layer_plot(runs))):
        if plot is not None:
            write_atomic(target / name, plot)
            lines += [f"![{name[:-4]}]({name})", ""]
    lines += ["Runs:", *[f"- {r.label}: {os.path.relpath(r.source, target)}" for r in runs], ""]
    report = target / "report.md"
    write_atomic(report, "\n".join(lines).encode())
    return report

"""A report to look at: ``report.md`` and PNG plots from runs (see ``runs.py`` for what a run is).

From the runs given, the report tabulates perplexity, zero-shot accuracy (per task and the mean),
parameter count and speed where measured, each also as a ratio to the dense run when one is given,
and plots quality against how much was removed plus each run's per-layer sparsity or importance.
The kinds of removal share the x axis of the quality plot, with a marker per kind, so the plot
compares like with like only within a kind.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from .errors import UsageError
from .files import write_atomic
from .record import RECONSTRUCTION_PROFILE
from .runs import Run, one_line

MARKERS = {"dense": "*", "sparsity": "o", "layers removed": "s", "width removed": "^", "experts removed": "D"}


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
        ("perplexity (" + _plain(", ".join(sorted({d for r in runs for d in r.perplexity}))) + ")",
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
                    linestyle="-" if len(points) > 1 else "none", label=_plain(f"{method} ({kind})") if kind != "dense" else "dense")
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
    fig, axes = plt.subplots(len(panels), 1, figsize=(min(max(6.0, 0.25 * n_layers), 60.0), 1.9 * len(panels)), squeeze=False)
    for ax, (run, what, values) in zip(axes[:, 0], panels):
        layers = sorted(values)
        gone = set(run.removed_layers)
        ax.bar(layers, [values[i] for i in layers], color=["tab:red" if i in gone else "tab:blue" for i in layers])
        ax.set_title(_plain(f"{run.label}: {what}") + (" (red: removed)" if gone else ""), fontsize=9)
        ax.set_xlim(-0.5, n_layers - 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1, 0].set_xlabel("layer")
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


def _cell(text: str) -> str:
    """Text from a record as one Markdown table cell: a newline or other control character (which
    would end the row) becomes a space, a ``|`` (which would start a new cell) is escaped."""
    return one_line(text).replace("|", "\\|")


def _plain(text: str) -> str:
    """Text from a record as matplotlib text: one line, and a ``$`` shown as itself (not the start
    of mathtext, which fails to parse on most names)."""
    return one_line(text).replace("$", r"\$")


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
    lines = ["| " + " | ".join(map(_cell, columns)) + " |", "|" + "---|" * len(columns)]
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
        lines.append("| " + " | ".join(map(_cell, row)) + " |")
    return "\n".join(lines)


def reconstruction_lines(runs: list[Run]) -> list[str]:
    """Per run with block reconstruction: how many blocks kept trained weights, how many were left
    as the method made them (no step lowered their held-out error), and the mean error ratio."""
    lines = []
    for run in runs:
        ratios = run.layers.get(RECONSTRUCTION_PROFILE)
        if ratios:
            skipped = sorted(i for i, r in ratios.items() if r >= 1.0)
            mean = sum(ratios.values()) / len(ratios)
            lines.append(f"- {run.label}: reconstruction kept trained weights in {len(ratios) - len(skipped)} of "
                         f"{len(ratios)} blocks (held-out block error × {mean:.3f} on average)"
                         + (f"; left as the method made them: blocks {', '.join(map(str, skipped))}" if skipped else ""))
    return lines


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
    limits = {r.zeroshot_limit for r in runs if r.zeroshot}
    lines = [f"# {title}", "", results_table(runs), ""]
    if limits:
        limit = ", ".join("all" if x is None else f"first {x}" for x in sorted(limits, key=lambda x: x or 0))
        lines += [f"Zero-shot: lm-eval acc, {limit} documents per task; mean acc = mean over the tasks shown.",
                  "ppl / dense and acc − dense compare each run with the dense run of this report.", ""]
    notes = [_cell(f"- {run.label}: {note}") for run in runs for note in run.notes]
    if notes:
        lines += ["Notes:", *notes, ""]
    rebuilt = reconstruction_lines(runs)
    if rebuilt:
        lines += ["Block reconstruction (held-out calibration error; never above the method's own):", *rebuilt, ""]
    # Every plot is drawn before OUT is touched: a run that cannot be drawn leaves no half-made report.
    plots = {name: plot for name, plot in (("quality.png", quality_plot(runs)), ("per_layer.png", per_layer_plot(runs)))
             if plot is not None}
    lines += [line for name in plots for line in (f"![{name[:-4]}]({name})", "")]
    lines += ["Runs:", *[_cell(f"- {r.label}: {os.path.relpath(r.source, target)}") for r in runs], ""]
    target.mkdir(parents=True, exist_ok=True)
    for name, plot in plots.items():
        write_atomic(target / name, plot)
    report = target / "report.md"
    write_atomic(report, "\n".join(lines).encode())
    return report

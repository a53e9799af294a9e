"""The per-layer score plot written beside ``secateurs.json``: one panel per criterion."""

from __future__ import annotations

import io


def score_plot(scores: dict[str, dict[int, float]], removed: dict[str, list[int]], n_layers: int) -> bytes:
    """PNG bytes: each criterion's first-round score per layer, removed layers in red.

    Criteria have different units, so each gets its own panel and y-axis rather than a shared one.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(scores), 1, figsize=(max(6.0, n_layers * 0.25), 2.2 * len(scores)), squeeze=False)
    for ax, (method, per_layer) in zip(axes[:, 0], scores.items()):
        layers = sorted(per_layer)
        gone = set(removed.get(method, []))
        colors = ["tab:red" if i in gone else "tab:blue" for i in layers]
        ax.bar(layers, [per_layer[i] for i in layers], color=colors)
        ax.set_title(f"{method} (red: removed)", fontsize=9)
        ax.set_xlim(-0.5, n_layers - 0.5)
        ax.set_ylabel("score", fontsize=8)
    axes[-1, 0].set_xlabel("layer (span start for angular)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()

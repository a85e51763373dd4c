"""The deletion and insertion curves of an evaluation as one picture (matplotlib, headless)."""
from __future__ import annotations

from typing import BinaryIO, Mapping, Sequence

CURVE_METRICS = ("deletion", "insertion")
TITLES = {"deletion": "Deletion (lower is better)", "insertion": "Insertion (higher is better)"}


def plot_curves(curves: Mapping[str, Mapping[str, Sequence[float]]], file: BinaryIO, title: str = "") -> None:
    """Write a PNG to ``file``: one panel per metric with one line per method, the mean score at each step
    against the fraction of patches perturbed. ``curves`` maps a method's label to its mean curve per metric
    (``{"rollout": {"deletion": [...], "insertion": [...]}}``); a metric no method has is left out."""
    from matplotlib.figure import Figure  # a figure of its own, drawn by Agg: no pyplot state, no window

    metrics = [m for m in CURVE_METRICS if any(m in c for c in curves.values())]
    if not metrics:
        raise ValueError("no deletion or insertion curves to plot")
    figure = Figure(figsize=(5.2 * len(metrics), 4.0), dpi=100, layout="constrained")
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    for axis, metric in zip(axes, metrics):
        for label, by_metric in curves.items():
            points = by_metric.get(metric)
            if points is None:
                continue
            steps = len(points) - 1
            style = {"color": "0.5", "linestyle": "--"} if label == "random" else {}
            axis.plot([k / steps for k in range(steps + 1)], points, label=label, linewidth=1.6, **style)
        axis.set_title(TITLES[metric])
        axis.set_xlabel("fraction of patches " + ("removed" if metric == "deletion" else "inserted"))
        axis.set_ylabel("probability of the target class")
        axis.set_xlim(0, 1)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
    axes[-1].legend(fontsize="small", loc="best")
    if title:
        figure.suptitle(title, fontsize="medium")
    figure.savefig(file, format="png")

"""The perturbation curves of an evaluation as one picture (matplotlib, headless)."""
from __future__ import annotations

from typing import BinaryIO, Mapping, Sequence

CURVE_METRICS = ("deletion", "insertion", "positive", "negative")
TITLES = {"deletion": "Deletion (lower is better)", "insertion": "Insertion (higher is better)",
          "positive": "Positive perturbation (lower is better)", "negative": "Negative perturbation (higher is better)"}
FRACTION_STEP = {"positive": 0.1, "negative": 0.1}  # Chefer et al.'s fractions 0, 0.1, …, 0.9; the others span 0…1


def plot_curves(curves: Mapping[str, Mapping[str, Sequence[float]]], file: BinaryIO, title: str = "") -> None:
    """Write a PNG to ``file``: one panel per metric with one line per method, the mean score at each step
    against the fraction of patches perturbed. ``curves`` maps a method's label to its mean curve per metric
    (``{"rollout": {"deletion": [...], "insertion": [...]}}``); a metric no method has is left out."""
    from matplotlib.figure import Figure  # a figure of its own, drawn by Agg: no pyplot state, no window

    metrics = [m for m in CURVE_METRICS if any(m in c for c in curves.values())]
    if not metrics:
        raise ValueError("no perturbation curves to plot")
    figure = Figure(figsize=(5.2 * len(metrics), 4.0), dpi=100, layout="constrained")
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    for axis, metric in zip(axes, metrics):
        for label, by_metric in curves.items():
            points = by_metric.get(metric)
            if points is None:
                continue
            step = FRACTION_STEP.get(metric, 1 / (len(points) - 1))
            style = {"color": "0.5", "linestyle": "--"} if label == "random" else {}
            axis.plot([k * step for k in range(len(points))], points, label=label, linewidth=1.6, **style)
        axis.set_title(TITLES[metric])
        axis.set_xlabel("fraction of patches " + ("inserted" if metric == "insertion" else "removed"))
        axis.set_ylabel("top-1 is the target" if metric in FRACTION_STEP else "probability of the target class")
        axis.set_xlim(0, 1)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
    axes[-1].legend(fontsize="small", loc="best")
    if title:
        figure.suptitle(title, fontsize="medium")
    figure.savefig(file, format="png")

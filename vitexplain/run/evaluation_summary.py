"""An evaluation's answer, from its lines in ``evaluation.jsonl``: per method and metric the mean, a 95%
bootstrap interval and the count, the mean curves; written as ``summary.json``, ``summary.csv`` and
``curves.png``.

Only the current inputs count (and the grids they form); where a line was written twice (a run stopped
between an input's lines and its prediction line, then rerun), the last one counts.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ..io.inputs import input_key
from ..io.outputs import atomic_write
from ..metrics.ground_truth import SEGMENTATION_FIELDS
from ..metrics.perturbation import METRICS
from ..metrics.statistics import bootstrap_interval
from ..render.curves import plot_curves
from .evaluation import EvaluationJob, grid_work

SUMMARY_JSON, SUMMARY_CSV, SUMMARY_MD, CURVES_PNG = "summary.json", "summary.csv", "summary.md", "curves.png"
HEADINGS = {"deletion": "deletion AUC ↓", "insertion": "insertion AUC ↑", "positive": "positive AUC ↓",
            "negative": "negative AUC ↑", "grid": "grid share ↑", "grid_hit": "grid hit ↑", "grid_auroc": "grid AUROC ↑",
            "pointing": "pointing ↑", "energy": "energy ↑", "pixel_accuracy": "pixel accuracy ↑", "miou": "mIoU ↑",
            "ap": "AP ↑"}
GRID_COLUMNS = {"grid": "share", "grid_hit": "hit", "grid_auroc": "tile_auroc"}  # the table's column: the line's field


def columns(metrics: tuple[str, ...]) -> tuple[str, ...]:
    """The summary's columns for the evaluated ``metrics``: the grid game gives three (share, hit, AUROC)."""
    expanded = {"grid": tuple(GRID_COLUMNS), "segmentation": SEGMENTATION_FIELDS}
    return tuple(column for metric in metrics for column in expanded.get(metric, (metric,)))


@dataclass(frozen=True)
class MetricSummary:
    mean: float
    low: float  # the 95% percentile bootstrap interval of the mean
    high: float
    count: int  # images (deletion, insertion) or tiles (grid)

    @classmethod
    def of(cls, values: list[float]) -> "MetricSummary":
        low, high = bootstrap_interval(values)
        return cls(sum(values) / len(values), low, high, len(values))


@dataclass
class RowSummary:
    label: str
    metrics: dict[str, MetricSummary | None] = field(default_factory=dict)  # None: not applicable
    curves: dict[str, list[float]] = field(default_factory=dict)  # mean curve per metric


def mean_curve(curves: list[list[float]]) -> list[float]:
    return [sum(points) / len(curves) for points in zip(*curves)]


def summarize(job: EvaluationJob) -> list[RowSummary]:
    """Each row's summary over the current inputs' lines (metrics without a line yet are left out)."""
    evaluation = job.evaluation
    inputs = {input_key(path) for path in job.paths}
    entries = job.writer.entries()
    groups = {tuple(input_key(p) for p in group) for group, _shift in grid_work(job, entries)} \
        if "grid" in evaluation.metrics else set()
    latest: dict[tuple, dict] = {}
    for entry in entries:
        if entry["status"] != "ok":
            continue
        if isinstance(entry.get("group"), list):
            if tuple(entry["group"]) in groups:
                latest[(entry["request"]["key"], tuple(entry["group"]), entry.get("arrangement"), entry.get("tile"))] = entry
        elif entry["input"] in inputs:
            latest[(entry["request"]["key"], entry["input"], entry.get("output", 0))] = entry
    by_key: dict[str, list[dict]] = {}
    for (key, *_rest), entry in latest.items():
        by_key.setdefault(key, []).append(entry)
    summaries = []
    for row in evaluation.rows:
        summary = RowSummary(row.label)
        lines = by_key.get(evaluation.perturbation_record(row)["key"], []) if evaluation.per_image else []
        for name in evaluation.ground_truth_fields:  # images without an annotation of the target: counted apart
            values = [float(line[name]) for line in lines if isinstance(line.get(name), (int, float))]
            if values:
                summary.metrics[name] = MetricSummary.of(values)
        for metric in evaluation.perturbations:
            values = [line[metric] for line in lines if isinstance(line.get(metric), float)]
            if values:
                summary.metrics[metric] = MetricSummary.of(values)
                summary.curves[metric] = mean_curve([line["curves"][metric] for line in lines if metric in line.get("curves", {})])
        if "grid" in evaluation.metrics:
            grid_lines = by_key.get(evaluation.grid_record(row)["key"], [])
            for column, name in GRID_COLUMNS.items():
                if row not in evaluation.grid_rows:
                    summary.metrics[column] = None
                elif grid_lines:
                    summary.metrics[column] = MetricSummary.of([float(line[name]) for line in grid_lines])
        summaries.append(summary)
    return summaries


def summary_document(job: EvaluationJob, rows: list[RowSummary]) -> dict:
    evaluation = job.evaluation
    return {
        "evaluation": {"metrics": list(evaluation.metrics), "steps": evaluation.steps, "baseline": evaluation.baseline,
                       "classes": list(evaluation.classes) if evaluation.classes else None, "amp": evaluation.amp,
                       "seed": evaluation.seed, "model": evaluation.plan.source.record(),
                       "preprocessing": evaluation.plan.preprocessing.record(), "inputs": len(job.paths)},
        "methods": [{"method": row.label,
                     "metrics": {m: None if s is None else asdict(s) for m, s in row.metrics.items()},
                     "curves": row.curves} for row in rows],
    }


def table_rows(rows: list[RowSummary], metrics: tuple[str, ...], cell: Callable[[MetricSummary], str]) -> list[list[str]]:
    """The table's rows as text: the method, each metric's ``cell`` (``n/a`` where it does not apply, ``–``
    where it has no value yet), and the counts (images / grid tiles)."""
    table = []
    for row in rows:
        cells, counts = [], {}
        for metric in columns(metrics):
            summary = row.metrics.get(metric, "missing")
            if summary is None:
                cells.append("n/a")
            elif summary == "missing":
                cells.append("–")
            else:
                cells.append(cell(summary))
                counts["grid" if metric in GRID_COLUMNS else "images"] = summary.count
        table.append([row.label, *cells, "/".join(str(counts[k]) for k in ("images", "grid") if k in counts)])
    return table


def markdown_table(rows: list[RowSummary], metrics: tuple[str, ...]) -> str:
    """The method × metric table in Markdown: mean (95% bootstrap interval), see :func:`table_rows`."""
    lines = ["| method | " + " | ".join(HEADINGS[m] for m in columns(metrics)) + " | n |",
             "|---|" + "---:|" * (len(columns(metrics)) + 1)]
    for cells in table_rows(rows, metrics, lambda s: f"{s.mean:.3f} ({s.low:.2f}–{s.high:.2f})"):
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary(job: EvaluationJob, rows: list[RowSummary]) -> list[Path]:
    """``summary.json``, ``summary.csv`` (one line per method × metric; a metric not applicable to a method
    has empty values), ``summary.md`` (:func:`markdown_table`) and, with deletion or insertion curves,
    ``curves.png``; the paths written."""
    out = job.writer.out_dir
    written = [out / SUMMARY_JSON, out / SUMMARY_CSV, out / SUMMARY_MD]
    atomic_write(written[2], markdown_table(rows, job.evaluation.metrics).encode())
    atomic_write(written[0], (json.dumps(summary_document(job, rows), indent=2, allow_nan=False) + "\n").encode())
    table = io.StringIO()
    sheet = csv.writer(table, lineterminator="\n")
    sheet.writerow(["method", "metric", "mean", "ci_low", "ci_high", "n"])
    for row in rows:
        for metric, summary in row.metrics.items():
            sheet.writerow([row.label, metric] + (["", "", "", ""] if summary is None else [
                f"{summary.mean:.6f}", f"{summary.low:.6f}", f"{summary.high:.6f}", summary.count]))
    atomic_write(written[1], table.getvalue().encode())
    curves = {row.label: row.curves for row in rows if row.curves}
    if curves and any(m in c for c in curves.values() for m in METRICS):
        evaluation = job.evaluation
        title = (f"{evaluation.plan.name}, {len(job.paths)} images, {evaluation.steps} steps, "
                 f"baseline {evaluation.baseline}")
        atomic_write(out / CURVES_PNG, lambda file: plot_curves(curves, file, title))
        written.append(out / CURVES_PNG)
    return written

"""``evaluate``: how faithful each method's maps are, over a folder of images, batched on the device.

The data path is the explanation's: load → capture → method → mask, then the metrics
(:mod:`vitexplain.metrics`) instead of rendering.

1. **Per batch of inputs**: one plain forward pass gives each image's prediction and its targets (the top-1,
   or ``--class``); each method's maps come from one capture shared by the methods that record the same
   (:attr:`~vitexplain.methods.base.Explainer.capture_spec`); then the deletion and insertion curves of every
   method × target × image go through the model together in chunks of ``batch_size``.
2. **Grid pointing game**, once every input's prediction is known: groups of four images of different
   predicted classes, four arrangements each, explained per tile by the class-specific methods.

Every result is a line of ``OUT/evaluation.jsonl`` (the manifest of :class:`~vitexplain.io.outputs.OutputWriter`):
one per input × method × target, one per grid tile × method, and one prediction line per input written after
that input's other lines. Each line's ``request`` records what was computed (the method's request, the model,
the metric settings) under a key; a rerun skips every line it finds and recomputes the rest. A ``random`` map
(:mod:`vitexplain.metrics.baselines`) is always evaluated too, as the baseline row.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import numpy as np
import torch
from torch import nn

from ..capture.tokens import token_layout
from ..io.annotations import AnnotationProblem, GroundTruth, ImageBoxes, box_region
from ..io.inputs import Failure, find_images, input_key
from ..io.outputs import OutputStop, OutputWriter, encoded_array, failure_entry
from ..methods.base import Param
from ..methods.registry import get_method
from ..metrics.baselines import content_key, random_maps
from ..metrics.perturbation import (BASELINES, CHEFER_METRICS, METRICS, area_under_curve, baseline_inputs, chefer_area,
                                   fraction_counts, patch_size, perturbation_curves)
from ..metrics.ground_truth import GROUND_TRUTH_METRICS, SEGMENTATION_FIELDS, energy, pointing_hit, segmentation_scores, upsample
from ..metrics.pointing import GRID_READINGS, TILES, arrangements, check_grid, compose_grids, image_groups, tile_readings
from ..models import DEFAULT_MODEL, ModelPlan, build_model, class_names_for, labels_digest, plan_model, resolve_class
from .interrupts import StopRequests
from .loader import make_loader
from .pipeline import NOT_FINITE, Recorder, RunSummary, loader_failure, prediction_record, timed_batches
from .request import Request
from .runtime import amp_dtype, loader_workers, resolve_device

EVALUATION_NAME = "evaluation.jsonl"
ALL_METRICS = (*METRICS, "grid", *GROUND_TRUTH_METRICS)
DEFAULT_METRICS = ("deletion", "insertion", "grid")
RANDOM = "random"
METHOD_SPEC = re.compile(r"\s*([a-z][a-z0-9-]*)\s*(?:\[(.*)\])?\s*")

METHODS_HELP = ("Methods to evaluate, comma-separated; settings for one of them in brackets: "
                "'rollout[fusion=max,discard-ratio=0.95],grad-attention[layers=2],legrad'. A method may appear "
                "twice with different settings. The random baseline is always added.")


def parse_methods(text: str) -> list[tuple[str, dict[str, str]]]:
    """``"rollout[fusion=max,discard-ratio=0.95],legrad"`` → ``[("rollout", {"fusion": "max", "discard_ratio":
    "0.95"}), ("legrad", {})]``: names and their bracketed settings (option names with ``-`` or ``_``);
    ``ValueError`` saying what is malformed."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise ValueError(f"--methods {text!r}: unbalanced brackets")
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if depth:
        raise ValueError(f"--methods {text!r}: unbalanced brackets")
    parts.append(current)
    methods = []
    for part in parts:
        match = METHOD_SPEC.fullmatch(part)
        if not match:
            raise ValueError(f"--methods: cannot read {part.strip()!r}; write name or name[option=value,...]")
        settings: dict[str, str] = {}
        for item in filter(str.strip, (match.group(2) or "").split(",")):
            name, equals, value = item.partition("=")
            if not equals or not name.strip() or not value.strip():
                raise ValueError(f"--methods: {match.group(1)}[{match.group(2)}]: write option=value, got {item.strip()!r}")
            option = name.strip().replace("-", "_")
            if option in settings:
                raise ValueError(f"--methods: {match.group(1)}[{match.group(2)}]: {name.strip()} is given twice")
            settings[option] = value.strip()
        methods.append((match.group(1), settings))
    return methods


def score_problem(entry: dict[str, Any]) -> str | None:
    """What makes a parsed ``evaluation.jsonl`` line unusable: a per-image line without a finite number for each
    of its metrics (a ground-truth field may be ``null``: no annotation of the target), a grid line without its
    readings (e.g. a hand-edited ``"deletion": "abc"``). Such a line is skipped with a warning, its work redone."""
    if entry.get("status") != "ok":
        return None
    request, kind = entry["request"], entry["request"].get("kind")
    fields = request.get("metrics") if kind == "perturbation" else request.get("readings", ["share"]) if kind == "grid" else []
    optional = request.get("ground_truth", []) if kind == "perturbation" else []
    for name, may_be_null in [*((f, False) for f in fields), *((f, True) for f in optional)] \
            if isinstance(fields, list) and isinstance(optional, list) else [("metrics", False)]:
        value = entry.get(name, "missing")
        if not (value is None and may_be_null) and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
            return f"{name} is not a number"
    return None


def parsed_setting(param: Param, value: Any) -> Any:
    """A bracketed setting's text as the parameter's type (``true``/``false`` for a switch)."""
    if param.type is bool and isinstance(value, str):
        lowered = value.lower()
        if lowered not in ("true", "false", "yes", "no", "1", "0"):
            raise ValueError(f"{param.flag} must be true or false, got {value!r}")
        return lowered in ("true", "yes", "1")
    return value


def keyed(kind: str, identity: dict, shown: dict | None = None) -> dict:
    """A record for ``evaluation.jsonl``: ``kind``, the key (16 hex digits of the SHA-256 of ``identity`` as
    canonical JSON), ``identity`` and ``shown`` (recorded, not keyed: the checkpoint's path)."""
    text = json.dumps({"kind": kind, **identity}, sort_keys=True, separators=(",", ":"))
    return {"key": hashlib.sha256(text.encode()).hexdigest()[:16], "kind": kind, **identity, **(shown or {})}


@dataclass(frozen=True)
class Row:
    """One row of the table: a method with its settings (``request``), or the random baseline (``None``)."""

    label: str
    request: Request | None = None

    @property
    def class_specific(self) -> bool:
        return self.request is not None and self.request.method_class.class_specific

    def identity(self, seed: int) -> dict:
        if self.request is None:
            return {"method": RANDOM, "seed": seed}
        identity = self.request.identity()
        return {k: identity[k] for k in ("method", "method_version", "params")}


@dataclass(frozen=True)
class Evaluation:
    """What an evaluation computes: the rows, the model, and the metric settings."""

    rows: tuple[Row, ...]
    plan: ModelPlan
    metrics: tuple[str, ...] = DEFAULT_METRICS
    steps: int = 20
    baseline: str = "mean"
    classes: tuple[int, ...] | None = None  # None: each image's top-1
    amp: bool = False
    seed: int = 0
    save_raw: bool = False
    ground_truth: GroundTruth | None = field(default=None, compare=False)

    @property
    def perturbations(self) -> tuple[str, ...]:
        return tuple(m for m in self.metrics if m in METRICS)

    @property
    def ground_truth_fields(self) -> tuple[str, ...]:
        """The per-image fields of the ground-truth metrics: ``pointing``, ``energy``, and the segmentation's."""
        return tuple(f for m in self.metrics if m in GROUND_TRUTH_METRICS
                     for f in (SEGMENTATION_FIELDS if m == "segmentation" else (m,)))

    @property
    def per_image(self) -> bool:
        """Whether there are lines per input × method × target (perturbation or ground-truth metrics)."""
        return bool(self.perturbations or self.ground_truth_fields)

    @property
    def targets_per_image(self) -> int:
        return len(self.classes) if self.classes else 1

    def common(self) -> dict:
        labels = {"labels_sha256": labels_digest(self.plan.labels)} if self.plan.labels else {}  # names in the lines
        return {"model": self.plan.source.identity(), "preprocessing": self.plan.preprocessing.record(), "amp": self.amp,
                **labels}

    def shown(self) -> dict:
        return {"checkpoint": self.plan.source.record().get("checkpoint")}

    def prediction_record(self) -> dict:
        return self.records["prediction"]

    def perturbation_record(self, row: Row) -> dict:
        return self.records["perturbation", row.label]

    def grid_record(self, row: Row) -> dict:
        return self.records["grid", row.label]

    @cached_property
    def records(self) -> dict:
        """Every record this evaluation writes, built (and hashed) once: they are looked up per input × row."""
        records: dict = {"prediction": keyed("prediction", self.common(), self.shown())}
        for row in self.rows:
            records["perturbation", row.label] = keyed(
                "perturbation", {**self.common(), "label": row.label, **row.identity(self.seed),
                                 "metrics": list(self.perturbations), "steps": self.steps, "baseline": self.baseline,
                                 **({"ground_truth": list(self.ground_truth_fields), **self.ground_truth.identity()}
                                    if self.ground_truth_fields else {}),
                                 "classes": list(self.classes or []) or None, "save_raw": self.save_raw}, self.shown())
            records["grid", row.label] = keyed("grid", {**self.common(), "label": row.label, **row.identity(self.seed),
                                                        "readings": list(GRID_READINGS)}, self.shown())
        return records

    @property
    def grid_rows(self) -> list[Row]:
        """The rows the pointing game applies to: the class-specific methods and the random baseline."""
        return [row for row in self.rows if row.class_specific or row.request is None]

    def describe(self) -> str:
        methods = ", ".join(row.label for row in self.rows)
        settings = f"{self.steps} steps, baseline {self.baseline}" if self.perturbations else ""
        return (f"evaluate {', '.join(self.metrics)}{f' ({settings})' if settings else ''} of {methods} on "
                f"{self.plan.source.describe()}")


def evaluation_rows(methods: Sequence[tuple[str, dict[str, Any]]], plan: ModelPlan, shared: dict[str, Any],
                    amp: bool, param_label: Callable[[Param], str]) -> tuple[Row, ...]:
    """The rows for ``methods`` (name, settings) and the random baseline. ``shared`` settings apply to every
    listed method that declares them (a bracketed setting wins); one that applies to none is an error."""
    if not methods:
        raise ValueError("--methods: give at least one method")
    rows, used = [], set()
    for name, settings in methods:
        if name == RANDOM:
            raise ValueError("--methods: the random baseline is always evaluated; do not list it")
        method = get_method(name)
        declared = {p.name: p for p in method.params}
        unknown = sorted(set(settings) - set(declared))
        if unknown:
            offered = ", ".join(p.flag[2:] for p in method.params) or "none"
            raise ValueError(f"--methods: {name} has no option {unknown[0].replace('_', '-')!r} (its options: {offered})")
        given = {n: v for n, v in shared.items() if n in declared}
        used |= set(given)
        given.update({n: parsed_setting(declared[n], v) for n, v in settings.items()})
        request = Request.create(name, plan, None, amp=amp, param_label=param_label, **given)
        rows.append(Row(request.label(None), request))
    unused = sorted(set(shared) - used)
    if unused:
        raise ValueError(f"--{unused[0].replace('_', '-')} applies to none of the methods evaluated")
    labels = [row.label for row in rows]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise ValueError(f"--methods: {twice[0]} is listed twice with the same settings")
    return (*rows, Row(RANDOM))


@dataclass
class EvaluationJob:
    """An evaluation checked before any weights are loaded: what it computes, its inputs, what is left."""

    evaluation: Evaluation
    paths: list[Path]
    input_failures: list[Failure]
    writer: OutputWriter
    device: torch.device
    todo: list[Path] = field(default_factory=list)  # inputs with a per-image line still to write
    done: dict[str, set[tuple[str, int]]] = field(default_factory=dict)  # request key → complete (input, output)

    @property
    def skipped(self) -> int:
        return len(self.paths) - len(self.todo)


def prepare_evaluation(inputs: Sequence[str | Path], out: str | Path, methods: Sequence[tuple[str, dict[str, Any]]],
                       metrics: Sequence[str] = DEFAULT_METRICS, steps: int = 20, baseline: str = "mean",
                       model: str = DEFAULT_MODEL, checkpoint: str | Path | None = None,
                       classes: Sequence[str | int] | None = None, amp: bool = False, device: str = "auto",
                       overwrite: bool = False, seed: int = 0, save_raw: bool = False,
                       shared: dict[str, Any] | None = None, pretrained: bool = True,
                       param_label: Callable[[Param], str] = lambda p: p.name, boxes: str | Path | None = None,
                       masks: str | Path | None = None, labels: str | Path | None = None) -> EvaluationJob:
    """Check the whole evaluation and find the work; usage errors raise (``ValueError``,
    :class:`~vitexplain.models.ModelChoiceError`, :class:`~vitexplain.io.outputs.OutputError`) before any
    weights are loaded. ``methods`` are ``(name, settings)`` pairs (see :func:`parse_methods`). With ``boxes`` or
    ``masks`` (:class:`~vitexplain.io.annotations.GroundTruth`) and no ground-truth metric asked for, ``pointing``
    and ``energy`` (and ``segmentation`` with masks) are added."""
    metrics = tuple(dict.fromkeys(metrics))
    ground_truth = GroundTruth(boxes, masks) if boxes is not None or masks is not None else None
    asked = [m for m in metrics if m in GROUND_TRUTH_METRICS]
    if ground_truth is not None and not asked:
        metrics += ("pointing", "energy") + (("segmentation",) if masks is not None else ())
    elif asked and ground_truth is None:
        raise ValueError(f"--metrics {asked[0]} needs ground truth: --boxes or --masks")
    if "segmentation" in metrics and masks is None:
        raise ValueError("--metrics segmentation needs object masks: --masks DIR")
    for metric in metrics:
        if metric not in ALL_METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(ALL_METRICS)}")
    if not metrics:
        raise ValueError("--metrics: give at least one metric")
    if steps < 1:
        raise ValueError(f"--steps must be at least 1, got {steps}")
    if baseline not in BASELINES:
        raise ValueError(f"--baseline must be one of {', '.join(BASELINES)}, got {baseline!r}")
    if classes and "grid" in metrics and len(metrics) == 1:
        raise ValueError("--class does not apply to the grid pointing game (each tile's class is explained)")
    target_device = resolve_device(device)
    plan = plan_model(model, checkpoint=checkpoint, pretrained=pretrained, labels=labels)
    if not plan.num_classes:
        raise ValueError(f"evaluate scores the model's class probabilities, and {model!r} has no classifier head")
    synonyms = plan.class_synonyms
    targets = tuple(resolve_class(c, synonyms) for c in classes) if classes else None
    rows = evaluation_rows(methods, plan, dict(shared or {}), amp, param_label)
    evaluation = Evaluation(rows, plan, metrics, steps, baseline, targets, amp, seed, save_raw, ground_truth)
    if "grid" in metrics:
        check_grid(plan.grid)
    writer = OutputWriter(Path(out), EVALUATION_NAME, line_problem=score_problem)
    try:
        plan.check_weights_reachable()
        paths, input_failures = find_images(inputs, exclude=Path(out))
        if overwrite:
            for key in record_keys(evaluation):
                writer.forget(key, paths)
        done = writer.completed_by_request()
        todo = [p for p in paths if missing_lines(evaluation, done, input_key(p))]
    except BaseException:
        writer.close()
        raise
    return EvaluationJob(evaluation, paths, input_failures, writer, target_device, todo, done)


def record_keys(evaluation: Evaluation) -> list[str]:
    keys = [evaluation.prediction_record()["key"]]
    if evaluation.per_image:
        keys += [evaluation.perturbation_record(row)["key"] for row in evaluation.rows]
    if "grid" in evaluation.metrics:
        keys += [evaluation.grid_record(row)["key"] for row in evaluation.grid_rows]
    return keys


def missing_lines(evaluation: Evaluation, done: dict[str, set[tuple[str, int]]], key: str) -> bool:
    """Whether input ``key`` lacks its prediction line or a method × target line."""
    if (key, 0) not in done.get(evaluation.prediction_record()["key"], ()):
        return True
    if not evaluation.per_image:
        return False
    return any((key, t) not in done.get(evaluation.perturbation_record(row)["key"], ())
               for row in evaluation.rows for t in range(evaluation.targets_per_image))


@dataclass
class EvaluationRun(RunSummary):
    grids: int = 0  # grid arrangements evaluated now
    notes: list[str] = field(default_factory=list)  # problems with the ground-truth annotations, one line each


def execute_evaluation(job: EvaluationJob, batch_size: int = 8, num_workers: int | None = None,
                       on_notice: Callable[[str], None] = lambda text: None,
                       on_images: Callable[[int], None] = lambda n: None,
                       on_failure: Callable[[Failure], None] = lambda failure: None,
                       on_grids: Callable[[int, int], None] = lambda done, total: None,
                       on_stop_request: Callable[[], None] = lambda: None) -> EvaluationRun:
    """Record the unusable inputs, load the model, evaluate what is left of both phases; releases the output
    folder's lock when done. Ctrl-C stops after the batch in hand (a second one at once): every line written is
    complete, and the rerun does the rest."""
    summary = EvaluationRun()
    evaluation, writer = job.evaluation, job.writer
    try:
        record = evaluation.prediction_record()
        for failure in job.input_failures:
            writer.record_failure(failure.path, failure.reason, record)
        with_grid = "grid" in evaluation.metrics
        if not job.todo and not (with_grid and pending_grids(job, writer.entries())):
            return summary
        network = build_model(evaluation.plan).to(job.device).eval()
        evaluator = BatchEvaluator(evaluation, network, job.device, batch_size)
        recorder = Recorder(writer, summary, on_failure)
        with StopRequests(on_stop_request) as stop:
            try:
                if job.todo:
                    workers = loader_workers(num_workers, job.device, len(job.todo), on_notice)
                    evaluate_inputs(job, evaluator, workers, recorder, summary, on_images, stop)
                if with_grid and not summary.stopped:
                    evaluate_grids(job, evaluator, recorder, summary, on_grids, on_failure, stop)
            except KeyboardInterrupt:
                summary.interrupted = True
            except OutputStop as error:
                summary.stopped = str(error)
        summary.outputs = len(summary.records)
        summary.notes = evaluator.notes
        return summary
    finally:
        writer.close()


def evaluate_inputs(job: EvaluationJob, evaluator: BatchEvaluator, workers: int, recorder: Recorder,
                    summary: EvaluationRun, on_images: Callable[[int], None], stop: StopRequests) -> None:
    """Phase 1 over the inputs still to do."""
    evaluation = job.evaluation
    record = evaluation.prediction_record()
    batches = timed_batches(make_loader(job.todo, evaluation.plan.preprocessing, evaluator.batch_size, workers,
                                        job.device.type == "cuda"), None)
    try:
        for batch in batches:
            stop.raise_if_requested()
            recorder(failure_entry(input_key(f.path), f.reason, record) for f in batch.failures)
            if batch.paths:
                recorder(evaluator.image_lines(batch.pixels, batch.paths, job.done, job.writer,
                                               [shape[:2] for shape in batch.packed_originals.shapes]))
            summary.images += len(batch.paths) + len(batch.failures)
            on_images(len(batch.paths) + len(batch.failures))
    except RuntimeError as error:
        summary.stopped = loader_failure(error)
        if summary.stopped is None:
            raise
    finally:
        batches.close()


class BatchEvaluator:
    """The model and every row's explainer, evaluating batches of images (phase 1) and of grids (phase 2)."""

    def __init__(self, evaluation: Evaluation, model: nn.Module, device: torch.device, batch_size: int):
        self.evaluation, self.model, self.device, self.batch_size = evaluation, model, device, batch_size
        self.explainers = {row.label: row.request.explainer(model, device) for row in evaluation.rows if row.request}
        self.class_names = class_names_for(evaluation.plan.num_classes, evaluation.plan.labels)
        self.dtype = amp_dtype(device) if evaluation.amp else None
        self.labels: dict[str, int | None] = {}  # annotation labels resolved to class indices
        self.notes: list[str] = []  # problems with the annotations, one line each

    def autocast(self) -> ContextManager:
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else nullcontext()

    def maps(self, pixels: torch.Tensor, targets: torch.Tensor, rows: Sequence[Row]) -> dict[str, torch.Tensor]:
        """Each row's maps ``(B, T, gh, gw)`` for the targets ``(B, T)``: one capture per group of explainers
        with equal capture specs; the random row's seeded by each input's content (one map per image, for every
        target)."""
        groups: dict[tuple, list[Row]] = {}
        for row in rows:
            if row.request is not None:
                groups.setdefault(self.explainers[row.label].capture_spec, []).append(row)
        count = targets.shape[1]
        maps = {}
        for members in groups.values():
            capture = self.explainers[members[0].label].capture(pixels)
            for position, row in enumerate(members):
                explainer = self.explainers[row.label]
                classes = [targets[:, t] for t in range(count)] if explainer.class_specific else None
                explanation = explainer.explain_captured(capture, classes, keep_graph=position < len(members) - 1)
                masks = explanation.masks[:, :, 0].detach().float()
                maps[row.label] = masks if explainer.class_specific else masks.expand(-1, count, -1, -1)
            del capture
        if any(row.request is None for row in rows):
            grid = token_layout(self.model, tuple(pixels.shape[-2:])).grid
            keys = [content_key(image) for image in pixels]
            maps[RANDOM] = random_maps(keys, grid, self.evaluation.seed).to(pixels.device).unsqueeze(
                1).expand(-1, count, -1, -1)
        return maps

    def image_lines(self, pixels: torch.Tensor, paths: Sequence[Path], done: dict[str, set[tuple[str, int]]],
                    writer: OutputWriter, sizes: Sequence[tuple[int, int]] = ()) -> list[dict]:
        """Phase 1 for one batch: the lines of every method × target × image not in ``done``, each image's
        prediction line after them (or a failure line if its output is not finite). ``sizes``: each image's own
        ``(H, W)``, where the ground-truth metrics read the maps."""
        evaluation = self.evaluation
        pixels = pixels.to(self.device)
        keys = [input_key(path) for path in paths]
        with torch.inference_mode(), self.autocast():
            probabilities = self.model(pixels).float().softmax(dim=-1)
        if evaluation.classes:
            targets = torch.tensor(evaluation.classes, device=self.device).expand(len(paths), -1)
        else:
            targets = probabilities.argmax(dim=-1, keepdim=True)
        finite = torch.isfinite(probabilities).all(dim=1)
        lines: list[list[dict]] = [[] for _ in paths]
        if evaluation.per_image:
            maps = self.maps(pixels, targets, evaluation.rows)
            for row_maps in maps.values():
                finite &= torch.isfinite(row_maps).flatten(1).all(dim=1)
            self.perturbation_lines(pixels, paths, keys, probabilities, targets, maps, finite, done, writer, lines,
                                    sizes)
        probabilities, finite_list = probabilities.cpu().numpy(), finite.tolist()
        record = evaluation.prediction_record()
        for index, key in enumerate(keys):
            if not finite_list[index]:
                lines[index] = [failure_entry(key, NOT_FINITE, record)]
            elif (key, 0) not in done.get(record["key"], ()):
                lines[index].append({"input": key, "status": "ok", "name": "", "output": 0,
                                     **prediction_record(probabilities[index], None, self.class_names),
                                     "request": record})
        return [line for image in lines for line in image]

    def perturbation_lines(self, pixels, paths, keys, probabilities, targets, maps, finite, done, writer,
                           lines: list[list[dict]], sizes: Sequence[tuple[int, int]] = ()) -> None:
        """The line of every row × target × (finite, not done) image: its perturbation curves and AUCs (each
        protocol's runs in one stream through the model) and its ground-truth scores; appended to ``lines``."""
        evaluation = self.evaluation
        pending = []  # (image, row, target column)
        finite_list = finite.tolist()
        for row in evaluation.rows:
            record = evaluation.perturbation_record(row)
            for column in range(targets.shape[1]):
                for index, key in enumerate(keys):
                    if finite_list[index] and (key, column) not in done.get(record["key"], ()):
                        pending.append((index, row, column))
        if not pending:
            return
        runs = [(*item, metric) for item in pending for metric in evaluation.perturbations]  # + the metric
        grid = tuple(maps[RANDOM].shape[-2:])
        patch_size(pixels, grid)  # the grid divides the input, before any work
        baselines = baseline_inputs(pixels, evaluation.baseline)
        measured = []  # (run, area, curve)
        for protocol in (("deletion", "insertion"), CHEFER_METRICS):  # each protocol in one stream
            chosen = [run for run in runs if run[3] in protocol]
            if not chosen:
                continue
            images = torch.tensor([run[0] for run in chosen], device=self.device)
            columns = torch.tensor([run[2] for run in chosen], device=self.device)
            run_maps = torch.stack([maps[run[1].label][run[0], run[2]] * (-1 if run[3] == "negative" else 1)
                                    for run in chosen])
            chefer = protocol == CHEFER_METRICS
            curves = perturbation_curves(
                self.model, pixels, baselines, images, run_maps, targets[images, columns],
                torch.tensor([run[3] == "insertion" for run in chosen], device=self.device), evaluation.steps,
                self.batch_size, self.autocast, counts=fraction_counts(grid[0] * grid[1]) if chefer else None,
                top1=chefer)
            areas = chefer_area(curves) if chefer else area_under_curve(curves)
            measured += zip(chosen, areas.tolist(), curves.tolist())
        results: dict[tuple[int, str, int], dict] = {(i, row.label, c): {"curves": {}} for i, row, c in pending}
        if evaluation.ground_truth_fields:
            targets_list = targets.tolist()
            images = {index for index, _row, _column in pending}
            annotations = {index: self.annotation(paths[index], sizes[index]) for index in images}  # read once
            regions = {(index, column): self.target_regions(paths[index], sizes[index], annotations[index],
                                                            targets_list[index][column])
                       for index, _row, column in pending}
            for index, row, column in pending:
                results[index, row.label, column].update(self.ground_truth_values(
                    regions[index, column], maps[row.label][index, column], sizes[index]))
        for run, area, curve in measured:
            entry = results[run[0], run[1].label, run[2]]
            entry[run[3]] = area
            entry["curves"][run[3]] = curve
        probabilities_np = probabilities.cpu().numpy()
        targets_np = targets.cpu().numpy()
        for (index, label, column), values in results.items():
            row = next(r for r in evaluation.rows if r.label == label)
            target = int(targets_np[index, column])
            entry = {"input": keys[index], "status": "ok", "name": "", "output": column, "method": label,
                     **prediction_record(probabilities_np[index], target, self.class_names), **values,
                     "request": evaluation.perturbation_record(row)}
            if evaluation.save_raw:
                name = writer.output_name(paths[index], entry["request"]["key"], column, f"{label}_c{target}")
                mask = maps[label][index, column].cpu().numpy().astype(np.float32)
                entry = writer.write(name, {"raw": (".npy", encoded_array(mask))}, {**entry, "name": name})
            lines[index].append(entry)

    def annotation(self, path: Path, size: tuple[int, int]) -> tuple[ImageBoxes | None, np.ndarray | None] | None:
        """The boxes and the object mask of the image at ``path`` of ``size`` ``(H, W)``, each ``None`` where it
        has none; ``None`` (the problem noted in :attr:`notes`) where they cannot be used."""
        ground_truth, (height, width), stem = self.evaluation.ground_truth, size, Path(path).stem
        try:
            boxes = ground_truth.boxes_for(stem)
            if boxes is not None and boxes.size is not None and boxes.size != (width, height):
                raise AnnotationProblem(f"its boxes are for a {boxes.size[0]}×{boxes.size[1]} image, it is "
                                        f"{width}×{height}: they do not fit")
            return boxes, ground_truth.mask_for(stem, height, width)
        except AnnotationProblem as problem:
            self.note(f"{path}: {problem}")
            return None

    def target_regions(self, path: Path, size: tuple[int, int], annotation, target: int
                       ) -> tuple[np.ndarray | None, np.ndarray | None] | None:
        """``(region, object mask)`` of ``target`` from the image's ``annotation`` (:meth:`annotation`): the
        union of its boxes, else the mask; ``None`` (noted) where the image has no annotation of the target."""
        if annotation is None:
            return None
        boxes, object_mask = annotation
        region = None
        if boxes is not None:
            mine = [box for box in boxes.boxes if self.label_index(box.label, path) == target]
            region = box_region(mine, *size) if mine else None
        if region is None:
            region = object_mask
        if region is None:
            self.note(f"{path}: no annotation of class {target}")
            return None
        return region, object_mask

    def ground_truth_values(self, regions: tuple[np.ndarray, np.ndarray | None] | None, mask: torch.Tensor,
                            size: tuple[int, int]) -> dict:
        """The ground-truth fields of one map ``(gh, gw)`` upsampled to the image's ``size``, against the target's
        ``regions`` (:meth:`target_regions`); ``None`` where there are none (counted apart)."""
        values: dict[str, float | None] = dict.fromkeys(self.evaluation.ground_truth_fields)
        if regions is None:
            return values
        region, object_mask = regions
        heat = upsample(mask[None], size)[0].cpu()
        where = torch.from_numpy(region)
        if "pointing" in values:
            values["pointing"] = pointing_hit(heat, where)
        if "energy" in values:
            values["energy"] = energy(heat, where)
        if object_mask is not None and "ap" in values:
            values.update(segmentation_scores(heat, torch.from_numpy(object_mask)))
        return values

    def label_index(self, label: str, path: Path) -> int | None:
        """A box's label as a class index: an index, an ImageNet synset id (1000-class heads) or a class name;
        ``None`` (noted once) if it is none of these."""
        if label not in self.labels:
            index = None
            if label.isdigit() and int(label) < len(self.class_names):
                index = int(label)
            elif len(self.class_names) == 1000 and re.fullmatch(r"n\d{8}", label):
                from timm.data import ImageNetInfo

                synsets = ImageNetInfo().label_names()
                index = synsets.index(label) if label in synsets else None
            else:
                try:
                    index = resolve_class(label, self.evaluation.plan.class_synonyms)
                except ValueError:
                    pass
            if index is None:
                self.note(f"{path}: unknown class {label!r} in the annotation (not one of the model's classes)")
            self.labels[label] = index
        return self.labels[label]

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def grid_readings(self, grids: torch.Tensor, targets: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        """Per grid row, each reading of :func:`~vitexplain.metrics.pointing.tile_readings` ``(G, 4)`` of each
        tile's map for its own tile, for grids ``(G, 3, H, W)`` whose tiles show the classes ``targets`` ``(G, 4)``."""
        maps = self.maps(grids.to(self.device), targets.to(self.device), self.evaluation.grid_rows)
        readings = {}
        for label, row_maps in maps.items():  # (G, 4 targets, gh, gw)
            count = row_maps.shape[0]
            tiles = torch.arange(TILES, device=row_maps.device).repeat(count)
            flat = tile_readings(row_maps.flatten(0, 1), tiles)
            readings[label] = {name: values.view(count, TILES) for name, values in flat.items()}
        return readings


def predictions(job: EvaluationJob, entries: list[dict]) -> list[tuple[Path, int]]:
    """The inputs with a prediction line among ``entries`` (the lines read), in input order, and their
    predicted class."""
    record = job.evaluation.prediction_record()
    found = {}
    for entry in entries:
        if entry["status"] == "ok" and entry["request"].get("key") == record["key"] and isinstance(entry.get("predicted"), int):
            found[entry["input"]] = entry["predicted"]
    return [(path, found[input_key(path)]) for path in job.paths if input_key(path) in found]


def grid_work(job: EvaluationJob, entries: list[dict]) -> list[tuple[tuple[Path, ...], int]]:
    """Every (group of four inputs, arrangement) of the pointing game for the current inputs."""
    known = predictions(job, entries)
    groups = image_groups([cls for _path, cls in known])
    return [(tuple(known[i][0] for i in group), shift) for group in groups for shift in range(TILES)]


def grid_lines_done(entries: list[dict]) -> set[tuple[str, tuple[str, ...], int]]:
    """``(row key, group's input keys, arrangement)`` whose four tile lines are all among ``entries``."""
    tiles: dict[tuple[str, tuple[str, ...], int], set] = {}
    for entry in entries:
        group = entry.get("group")
        if entry["status"] == "ok" and isinstance(group, list) and isinstance(entry.get("arrangement"), int):
            tiles.setdefault((entry["request"]["key"], tuple(group), entry["arrangement"]), set()).add(entry.get("tile"))
    return {identity for identity, found in tiles.items() if len(found) >= TILES}


def pending_grids(job: EvaluationJob, entries: list[dict]) -> list[tuple[tuple[Path, ...], int]]:
    """The (group, arrangement) pairs with a grid row still to evaluate, by the lines read (``entries``)."""
    finished = grid_lines_done(entries)
    keys = [job.evaluation.grid_record(row)["key"] for row in job.evaluation.grid_rows]
    return [(group, shift) for group, shift in grid_work(job, entries)
            if any((key, tuple(input_key(p) for p in group), shift) not in finished for key in keys)]


def evaluate_grids(job: EvaluationJob, evaluator: BatchEvaluator, recorder: Recorder, summary: EvaluationRun,
                   on_grids: Callable[[int, int], None], on_failure: Callable[[Failure], None],
                   stop: StopRequests) -> None:
    """Phase 2: the grid pointing game over the groups still to do, ``batch_size`` grids at a time."""
    entries = job.writer.entries()
    work = pending_grids(job, entries)
    predicted = dict(predictions(job, entries))
    evaluation = job.evaluation
    on_grids(0, len(work))
    for start in range(0, len(work), evaluator.batch_size):
        stop.raise_if_requested()
        chunk = work[start:start + evaluator.batch_size]
        paths = list(dict.fromkeys(path for group, _shift in chunk for path in group))
        batch = next(iter(make_loader(paths, evaluation.plan.preprocessing, len(paths), 0, False)))
        if batch.failures:  # decoded before, unreadable now: those groups wait for the rerun
            for failure in batch.failures:
                on_failure(failure)
            chunk = [(g, s) for g, s in chunk if not set(g) & {f.path for f in batch.failures}]
            if not chunk:
                continue
        position = {path: index for index, path in enumerate(batch.paths)}
        layouts = [arrangements(group)[shift] for group, shift in chunk]
        tiles = torch.tensor([[position[path] for path in layout] for layout in layouts])
        targets = torch.tensor([[predicted[path] for path in layout] for layout in layouts])
        readings = evaluator.grid_readings(compose_grids(batch.pixels, tiles), targets)
        lines = []
        for row in evaluation.grid_rows:
            record = evaluation.grid_record(row)
            values = {name: tensor.tolist() for name, tensor in readings[row.label].items()}
            for index, ((group, shift), layout) in enumerate(zip(chunk, layouts)):
                for tile, path in enumerate(layout):
                    target = int(targets[index, tile])
                    lines.append({"input": input_key(path), "status": "ok", "name": "", "output": shift,
                                  "method": row.label, "group": [input_key(p) for p in group],
                                  "arrangement": shift, "tile": tile, "target": target,
                                  "target_name": evaluator.class_names[target],
                                  **{name: values[name][index][tile] for name in GRID_READINGS}, "request": record})
        recorder(lines)
        summary.grids += len(chunk)
        on_grids(min(start + evaluator.batch_size, len(work)), len(work))

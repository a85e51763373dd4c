"""A whole run, as the command line does it and as Python code can: check everything, then explain.

:func:`prepare` checks every option before any weights are loaded (raising ``ValueError``,
:class:`~vitexplain.models.ModelChoiceError` or :class:`~vitexplain.io.outputs.OutputError`), builds the
:class:`~vitexplain.run.request.Request`, finds the inputs and what is still to do; :func:`execute`
loads the model and streams the images through :func:`~vitexplain.run.pipeline.explain_paths`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..io.inputs import Failure, find_images
from ..io.outputs import OutputWriter, pending_outputs
from ..methods.base import Param, resolve_params
from ..methods.registry import get_method
from ..models import DEFAULT_MODEL, ModelPlan, build_model, plan_model, resolve_class
from .options import RenderOptions, SweepOptions
from .pipeline import RunSummary, explain_paths
from .request import Request
from .runtime import loader_workers, resolve_device


@dataclass
class Job:
    """A run checked before any weights are loaded: its request, inputs, and what is left to do."""

    request: Request
    plan: ModelPlan
    paths: list[Path]  # every usable input
    input_failures: list[Failure]
    writer: OutputWriter
    device: torch.device
    todo: list[Path] = field(default_factory=list)  # inputs with an output still to write
    done: set[tuple[str, int]] = field(default_factory=set)  # outputs complete already
    batch_size: int = 8
    all_paths: list[Path] = field(default_factory=list)  # every input of the run, all shards'

    @property
    def skipped(self) -> int:
        return len(self.paths) - len(self.todo)


def prepare(method: str, inputs: Sequence[str | Path], out: str | Path, model: str = DEFAULT_MODEL,
            checkpoint: str | Path | None = None, classes: Sequence[str | int] | None = None,
            render: RenderOptions | None = None, sweep: SweepOptions | None = None, stretch: bool | None = None,
            amp: bool = False, device: str = "auto", overwrite: bool = False, pretrained: bool = True,
            param_label: Callable[[Param], str] = lambda p: p.name, batch_size: int = 8,
            shard: tuple[int, int] | None = None, part: str | None = None, labels: str | Path | None = None,
            **params: Any) -> Job:
    """Check the whole request and find the work: usage errors raise before any weights are loaded.
    ``classes`` are indices or names; ``params`` the method's parameters; ``overwrite`` redoes outputs that
    are complete already. ``shard=(k, n)`` takes the k-th of n shares of the inputs (:func:`shard_of`),
    writing its own manifest part; ``part`` names the manifest part this process writes (default: the
    manifest itself, or the shard's)."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    if shard is not None:
        check_shard(shard)
        part = part or f"shard-{shard[0]}-of-{shard[1]}"
    resolve_params(get_method(method), params, param_label)  # the cheapest checks first
    target = resolve_device(device)
    out = Path(out)
    plan = plan_model(model, checkpoint=checkpoint, pretrained=pretrained, labels=labels)
    synonyms = plan.class_synonyms
    targets = tuple(resolve_class(c, synonyms) for c in classes) if classes else None
    request = Request.create(method, plan, targets, render, sweep, amp, stretch, param_label, **params)
    writer = OutputWriter(out, part=part)  # proves --out writable, and locks it for this run
    try:
        plan.check_weights_reachable()
        all_paths, input_failures = find_images(inputs, exclude=out)
        writer.expect_inputs(all_paths)
        paths = shard_of(all_paths, shard, batch_size) if shard else all_paths
        if shard:
            input_failures = input_failures[shard[0] - 1::shard[1]]
        if overwrite:
            writer.forget(request.key, paths)
        todo, done = pending_outputs(writer, request.key, request.outputs_per_image, paths)
    except BaseException:
        writer.close()
        raise
    return Job(request, plan, paths, input_failures, writer, target, todo, done, batch_size, all_paths)


def check_shard(shard: tuple[int, int]) -> None:
    index, count = shard
    if not (count >= 1 and 1 <= index <= count):
        raise ValueError(f"--shard K/N needs 1 <= K <= N, got {index}/{count}")


def parse_shard(text: str) -> tuple[int, int]:
    """``"2/8"`` → ``(2, 8)``; ``ValueError`` for anything else."""
    index, slash, count = text.partition("/")
    if not (slash and index.strip().isdigit() and count.strip().isdigit()):
        raise ValueError(f"--shard takes K/N (this process's share K of N, e.g. 2/8), got {text!r}")
    shard = (int(index), int(count))
    check_shard(shard)
    return shard


def shard_of(paths: Sequence[Path], shard: tuple[int, int], batch_size: int) -> list[Path]:
    """Share ``k`` of ``n`` of the sorted ``paths``: its batches ``k, k+n, k+2n, …`` of ``batch_size`` inputs,
    so that every batch is the one a single run would compute (the same images together: the same bytes)."""
    index, count = shard
    return [path for start in range((index - 1) * batch_size, len(paths), count * batch_size)
            for path in paths[start:start + batch_size]]


def execute(job: Job, batch_size: int | None = None, num_workers: int | None = None,
            on_notice: Callable[[str], None] = lambda text: None, **callbacks) -> RunSummary:
    """Record the inputs that could not be used, then load the model and explain what is left (callbacks:
    see :func:`~vitexplain.run.pipeline.explain_paths`; ``on_notice`` hears of settings changed to fit the
    machine; ``batch_size`` defaults to the job's). Raises :class:`~vitexplain.models.ModelLoadError` if the
    weights cannot be had. Releases the output folder's lock when done."""
    batch_size = batch_size or job.batch_size
    try:
        record = job.request.record()
        for failure in job.input_failures:
            job.writer.record_failure(failure.path, failure.reason, record)
        if not job.todo:
            return RunSummary()
        network = build_model(job.plan).to(job.device)
        workers = loader_workers(num_workers, job.device, len(job.todo), on_notice)
        return explain_paths(job.request, network, job.todo, job.writer, batch_size, workers, job.device,
                             skip=job.done, **callbacks)
    finally:
        job.writer.close()

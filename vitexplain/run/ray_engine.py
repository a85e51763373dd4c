"""``--engine ray``: the same run on a Ray cluster (or a local Ray instance), through Ray Data.

The driver checks everything and finds the work exactly as a local run does (:func:`~vitexplain.run.job.prepare`),
then cuts the inputs still to do into the batches a local run would make. Ray Data hands those batches to a
pool of actors (``map_batches`` with the callable class :class:`ExplainBatches`): each actor loads the model
once and explains, renders and writes its batches with :func:`~vitexplain.run.pipeline.explain_paths` — the
local pipeline itself — into the shared ``--out``, appending to a manifest part of its own
(``manifest.ray-{pid}-{id}.jsonl``; the driver holds the folder's lock for them all). Every reader of a manifest reads all its parts; once the run is complete the
driver folds them into ``manifest.jsonl`` (:func:`~vitexplain.io.outputs.compact_manifest`).

A worker that dies loses at most the batch in its hands: Ray Data gives that batch to a restarted actor, and
if the run stops anyway, rerunning the same command does what is left (outputs are recorded only once their
files are complete).
"""
from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..io.inputs import Failure, input_key
from ..io.outputs import ManifestTail, OutputWriter, compact_manifest
from .job import Job
from .pipeline import RunSummary
from .request import Request

MISSING_RAY = "--engine ray needs Ray: pip install 'vitexplain[ray]'"


def import_ray():
    """The ``ray`` module, or ``ValueError`` saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ValueError(MISSING_RAY) from None
    return ray


@dataclass(frozen=True)
class WorkerSpec:
    """What every actor needs: the request, how to load its model, the work, and where to write."""

    request: Request
    model: str
    checkpoint: str | None
    pretrained: bool
    model_kwargs: dict
    out: str
    batches: tuple[tuple[str, ...], ...]  # the inputs of each batch, as a local run would make them
    all_paths: tuple[str, ...]  # every input of the run (names do not depend on who writes first)
    device: str
    threads: int


class ExplainBatches:
    """A Ray Data actor: the model loaded once, then each batch explained and written by the local pipeline
    into a manifest part of this actor's own."""

    def __init__(self, spec: WorkerSpec):
        import torch

        from ..models import build_model, plan_model

        torch.set_num_threads(max(1, spec.threads))
        plan = plan_model(spec.model, checkpoint=spec.checkpoint, pretrained=spec.pretrained, **spec.model_kwargs)
        if plan.source.identity() != spec.request.model.identity():
            raise RuntimeError(f"the weights seen by a Ray worker differ from the driver's ({plan.source.describe()})")
        self.spec = spec
        self.device = torch.device(spec.device)
        self.model = build_model(plan).to(self.device)
        self.writer = OutputWriter(Path(spec.out), part=f"ray-{os.getpid()}-{uuid.uuid4().hex[:8]}",
                                   locked=False)  # the driver's
        self.writer.expect_inputs(Path(p) for p in spec.all_paths)
        self.completed = ManifestTail(self.writer, spec.request.key)
        self.warm = True

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        from .pipeline import explain_paths

        indices, explained, failures = [], [], []
        request = self.spec.request
        for index in batch["index"].tolist():
            done = self.completed.update()  # all recorded so far: for a retried batch, what the lost worker finished
            paths = [Path(p) for p in self.spec.batches[index]
                     if any((input_key(Path(p)), i) not in done for i in range(request.outputs_per_image))]
            summary = explain_paths(request, self.model, paths, self.writer, batch_size=max(1, len(paths)),
                                    num_workers=0, device=self.device, skip=done, warm=self.warm) if paths \
                else RunSummary()
            self.warm = False
            if summary.stopped:
                raise RuntimeError(f"a Ray worker stopped: {summary.stopped}")
            indices.append(index)
            explained.append(summary.outputs)
            failures.append(json.dumps([[str(f.path), f.reason] for f in summary.failures]))
        return {"index": np.array(indices), "outputs": np.array(explained), "failures": np.array(failures)}


def connect(ray, address: str | None) -> None:
    """Join the cluster at ``address``; without one, a running cluster if there is one, else a local instance
    started for the run. Ray's own progress bars and log forwarding stay quiet."""
    import logging

    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if ray.is_initialized():
        return
    quiet = {"log_to_driver": False, "logging_level": "ERROR", "include_dashboard": False}
    if address:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        return
    try:
        ray.init(address="auto", log_to_driver=False, logging_level="ERROR")
    except (ConnectionError, RuntimeError, ValueError):
        ray.init(**quiet)


def run_on_ray(job: Job, workers: int = 1, cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0,
               address: str | None = None, on_images: Callable[[int], None] = lambda n: None,
               on_failure: Callable[[Failure], None] = lambda failure: None) -> RunSummary:
    """Explain what is left of ``job`` (prepared with a manifest part for the driver, e.g. ``part="ray-driver"``)
    on ``workers`` Ray actors (``gpus_per_worker > 0``: on CUDA); record the unusable inputs; fold the manifest
    parts into one when the run is complete. Releases the driver's lock when done."""
    ray = import_ray()
    source = job.plan.source
    if source.weights == "random":
        raise ValueError("--engine ray needs weights every worker can load: a checkpoint or pretrained ones")
    summary = RunSummary()
    started = time.perf_counter()
    try:
        record = job.request.record()
        for failure in job.input_failures:
            job.writer.record_failure(failure.path, failure.reason, record)
        if job.todo:
            connect(ray, address)
            context = ray.data.DataContext.get_current()
            context.enable_progress_bars = False
            context.print_on_execution_start = False
            batches = tuple(tuple(str(p) for p in job.todo[i:i + job.batch_size])
                            for i in range(0, len(job.todo), job.batch_size))
            spec = WorkerSpec(job.request, job.plan.name, source.checkpoint, source.weights == "pretrained",
                              dict(source.model_kwargs), str(job.writer.out_dir), batches,
                              tuple(str(p) for p in job.all_paths), "cuda" if gpus_per_worker > 0 else "cpu",
                              max(1, int(cpus_per_worker)))
            dataset = ray.data.from_items([{"index": i} for i in range(len(batches))], override_num_blocks=len(batches))
            results = dataset.map_batches(ExplainBatches, fn_constructor_args=(spec,), batch_size=1,
                                          compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus_per_worker,
                                          num_gpus=gpus_per_worker, batch_format="numpy")
            for result in results.iter_batches(batch_size=None, batch_format="numpy"):
                for index, outputs, failed in zip(result["index"].tolist(), result["outputs"].tolist(),
                                                  result["failures"].tolist()):
                    summary.outputs += outputs
                    for path, reason in json.loads(failed):
                        failure = Failure(Path(path), reason)
                        summary.failures.append(failure)
                        on_failure(failure)
                    summary.images += len(batches[index])
                    on_images(len(batches[index]))
    except KeyboardInterrupt:
        summary.interrupted = True
        # the actors kept writing after the last result reached the driver: count what the manifests hold
        new = job.writer.completed(job.request.key) - job.done
        summary.outputs = len(new)
        summary.images = len({key for key, _output in new}) + len(summary.failures)
    finally:
        job.writer.close()
    summary.seconds = time.perf_counter() - started
    if not summary.interrupted:
        compact_manifest(job.writer.out_dir)
    job.writer.manifest_path = job.writer.main_manifest  # the driver's own part holds at most the failures
    return summary


"""The one data path behind every subcommand: load → capture → method → mask → render/write.

:func:`explain_paths` streams images through a DataLoader, explains each batch with the explainer that
the :class:`~vitexplain.run.request.Request` builds, and renders and writes every output in background
threads while the model works on the next batch.
"""
from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..io.codecs.gif import encode_gif
from ..io.inputs import Failure, input_key
from ..io.outputs import Content, OutputWriter, encoded_array, encoded_image
from ..methods.base import Explainer, no_timer
from ..models import class_names_for
from ..render.overlay import contact_sheet, fit_within, overlay
from ..render.sweep import sweep_frames
from .allocator import PeriodicTrim, trim_heap
from .interrupts import StopRequests
from .loader import Batch, make_loader
from .options import SWEEP_MAX_SIDE, RenderOptions, SweepOptions
from .profiling import StageTimer
from .request import Request
from .runtime import writer_threads


@dataclass
class RunSummary:
    images: int = 0  # inputs handled: explained or failed
    outputs: int = 0
    seconds: float = 0.0
    records: list[dict] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    interrupted: bool = False

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def prediction_record(probabilities: np.ndarray, target: int | None, class_names: Sequence[str]) -> dict:
    """Manifest fields for one output: the target and the model's top-1 (``None`` for a headless model)."""
    predicted = int(probabilities.argmax()) if class_names else None
    return {
        "target": target,
        "target_name": None if target is None else class_names[target],
        "target_probability": None if target is None else float(probabilities[target]),
        "predicted": predicted,
        "predicted_name": None if predicted is None else class_names[predicted],
        "probability": None if predicted is None else float(probabilities[predicted]),
    }


def single_files(image: np.ndarray, mask: np.ndarray, render: RenderOptions) -> dict[str, tuple[str, Content]]:
    """Overlay picture (PNG or JPEG) and raw ``.npy`` of a one-ratio explanation; ``mask`` is ``(gh, gw)``."""
    if render.max_side:
        image = fit_within(image, render.max_side)
    picture = overlay(image, mask, render.colormap, render.alpha, render.stretch)
    files = {"overlay": (f".{render.image_format}", encoded_image(picture, render.image_format))}
    if render.save_raw:
        files["raw"] = (".npy", encoded_array(mask))
    return files


def sweep_files(image: np.ndarray, masks: np.ndarray, render: RenderOptions,
                sweep: SweepOptions) -> dict[str, tuple[str, Content]]:
    """GIF, contact sheet and raw ``(R, gh, gw)`` ``.npy`` of a sweep; ``masks`` is ``(R, gh, gw)``."""
    frames = sweep_frames(image, masks, sweep.ratios, render.colormap, render.alpha, render.stretch,
                          render.max_side or SWEEP_MAX_SIDE)
    files = {}
    if sweep.gif:
        files["gif"] = (".gif", encode_gif(frames, 1000.0 / sweep.fps))
    if sweep.grid:
        files["grid"] = (f"_grid.{render.image_format}", encoded_image(contact_sheet(frames), render.image_format))
    if render.save_raw:
        files["raw"] = (".npy", encoded_array(masks))
    return files


def write_output(writer: OutputWriter, name: str, original: np.ndarray, masks: np.ndarray, entry: dict,
                 request: Request) -> dict:
    """Render one output (overlay, or a sweep's GIF / sheet), write its files, return its manifest entry.
    ``masks`` is ``(R, gh, gw)``."""
    if request.sweep:
        files = sweep_files(original, masks, request.render, request.sweep)
    else:
        files = single_files(original, masks[0], request.render)
    return writer.write(name, files, entry)


def timed_call(function: Callable, *args) -> tuple[object, float]:
    """``function(*args)`` and the wall seconds it took."""
    started = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - started


class OrderedBackground:
    """Runs tasks in background threads while the model works on the next batch. Results come back in
    submission order; at most ``max_pending`` tasks are in flight, so memory stays bounded however many
    images there are. The heavy parts of drawing and encoding (the compiled blend and GIF coder, Pillow's
    encoders) release the GIL. With a ``timer``, task time is added to its ``write`` stage."""

    def __init__(self, max_pending: int, workers: int | None = None, timer: StageTimer | None = None):
        self.pool = ThreadPoolExecutor(max_workers=workers or writer_threads(), thread_name_prefix="vitexplain-write")
        self.pending: deque[Future] = deque()
        self.max_pending = max_pending
        self.timer = timer

    def submit(self, function: Callable, *args) -> None:
        self.pending.append(self.pool.submit(timed_call, function, *args))

    def result(self, future: Future):
        result, seconds = future.result()
        if self.timer is not None:
            self.timer.add("write", seconds)
        return result

    def completed(self) -> list:
        """Results of the finished tasks at the head of the queue, waiting while too many are pending."""
        results = []
        while self.pending and (self.pending[0].done() or len(self.pending) > self.max_pending):
            results.append(self.result(self.pending.popleft()))
        return results

    def drain(self) -> list:
        results = [self.result(future) for future in self.pending]
        self.pending.clear()
        self.pool.shutdown()
        return results


def timed_batches(loader: Iterable[Batch], timer: StageTimer | None) -> Iterator[Batch]:
    """The loader's batches; with a ``timer``, the decode time and the main thread's wait are added to it.
    Closing the generator shuts the loader's worker processes down at once (not at garbage collection,
    when an interrupted run may already be exiting)."""
    batches = iter(loader)
    try:
        while True:
            started = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                return
            if timer is not None:
                timer.add("wait", time.perf_counter() - started)
                timer.add("decode", batch.decode_seconds)
            yield batch
    finally:
        getattr(batches, "_shutdown_workers", lambda: None)()


def explain_paths(
    request: Request,
    model: nn.Module,
    paths: Sequence[Path],
    writer: OutputWriter,
    batch_size: int = 8,
    num_workers: int = 0,
    device: torch.device = torch.device("cpu"),
    skip: frozenset[tuple[str, int]] | set[tuple[str, int]] = frozenset(),
    on_images: Callable[[int], None] = lambda n: None,
    on_failure: Callable[[Failure], None] = lambda failure: None,
    on_progress: Callable[[int, int], None] = lambda done, total: None,
    timer: StageTimer | None = None,
    on_stop_request: Callable[[], None] = lambda: None,
) -> RunSummary:
    """Explain every image in ``paths`` as ``request`` says, with ``model`` (loaded from ``request.model``
    and on ``device``); write one output per image and target (a sweep's: one per target) except those in
    ``skip`` (``(input key, output index)``, complete already).

    The explainer is built from ``request`` (:meth:`Request.explainer`), so that what is computed and how
    it is named and recorded cannot disagree. Images that cannot be decoded are reported through
    ``on_failure`` and recorded in the manifest; the rest go on. Ctrl-C stops the run before the next batch
    (a second one at once; see :mod:`.interrupts`, ``on_stop_request`` is told of the first): the outputs
    already computed are finished and recorded, and the summary says ``interrupted``: rerunning the same
    command does the rest. With a ``timer``, wall time is summed per stage (see :mod:`.profiling`).
    """
    if not isinstance(request, Request):
        raise TypeError(f"explain_paths takes a Request (which builds the explainer), not {type(request).__name__}")
    summary = RunSummary()
    started = time.perf_counter()
    explainer = request.explainer(model, device)
    explainer.on_progress = on_progress
    explainer.timer = timer or no_timer
    record = request.record()
    class_names = class_names_for(request.num_classes)
    background = OrderedBackground(max_pending=2 * batch_size, timer=timer)
    trim = PeriodicTrim()
    trim_heap()  # before the loader forks its workers: see allocator.trim_heap
    batches = timed_batches(make_loader(paths, request.preprocessing, batch_size, num_workers,
                                        device.type == "cuda"), timer)
    try:
        with StopRequests(on_stop_request) as stop:
            for batch in batches:
                stop.raise_if_requested()
                for failure in batch.failures:
                    writer.record_failure(failure.path, failure.reason, record)
                    summary.failures.append(failure)
                    on_failure(failure)
                if batch.paths:
                    submit_outputs(explainer, batch, device, class_names, request, record, writer, background, skip)
                summary.records.extend(map(writer.append_manifest, background.completed()))
                trim()
                summary.images += len(batch.paths) + len(batch.failures)
                on_images(len(batch.paths) + len(batch.failures))
                stop.raise_if_requested()
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        batches.close()  # stops the DataLoader workers now, also on Ctrl-C
        summary.records.extend(map(writer.append_manifest, background.drain()))
    summary.outputs = len(summary.records)
    summary.seconds = time.perf_counter() - started
    return summary


def submit_outputs(explainer: Explainer, batch: Batch, device: torch.device, class_names: Sequence[str],
                   request: Request, record: dict, writer: OutputWriter, background: OrderedBackground,
                   skip: frozenset[tuple[str, int]] | set[tuple[str, int]]) -> None:
    """Explain one batch and queue the rendering and writing of its outputs that are not in ``skip``."""
    sweep = request.sweep
    explanation = explainer.explain(batch.pixels.to(device, non_blocking=True), request.classes,
                                    sweep.ratios if sweep else None)
    probabilities = explanation.probabilities.cpu().numpy()  # numpy: cheap per-image indexing below
    masks = explanation.masks.cpu().numpy().astype(np.float32)
    targets = None if explanation.targets is None else explanation.targets.cpu().numpy()
    for row, (path, original) in enumerate(zip(batch.paths, batch.originals)):
        key = input_key(path)
        for column in range(masks.shape[1]):
            if (key, column) in skip:
                continue
            target = None if targets is None else int(targets[row, column])
            name = writer.output_name(path, record["key"], column, request.label(target))
            entry = {"input": key, "status": "ok", "output": column,
                     **prediction_record(probabilities[row], target, class_names), "request": record}
            background.submit(write_output, writer, name, original, masks[row, column], entry, request)

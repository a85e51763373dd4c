"""The one data path behind every subcommand: load → capture → method → mask → render/write.

:func:`explain_paths` streams images through a DataLoader, explains each batch with the explainer that
the :class:`~vitexplain.run.request.Request` builds, and renders and writes every output in background
threads while the model works on the next batch.
"""
from __future__ import annotations

import io
import time
from collections import deque
from contextlib import nullcontext
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..io.codecs.gif import encode_gif
from ..io.inputs import Failure, input_key
from ..io.outputs import Content, OutputStop, OutputWriter, encoded_array, encoded_image, failure_entry
from ..methods.base import Explainer, no_timer
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
    failures: list[Failure] = field(default_factory=list)  # one per input that failed
    interrupted: bool = False
    stopped: str | None = None  # why the run stopped early, other than Ctrl-C

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


def timed_batches(loader: Iterable[Batch], timer: StageTimer | None) -> Iterator[Batch]:
    """The loader's batches; with a ``timer``, the decode time and the main thread's wait are added to it.
    A connection to a worker that breaks (the worker died while passing a batch over) is said as torch says a
    dead worker: a ``RuntimeError`` (see :func:`loader_failure`).
    Closing the generator shuts the loader's worker processes down at once (not at garbage collection,
    when an interrupted run may already be exiting)."""
    batches = iter(loader)
    try:
        while True:
            started = time.perf_counter()
            try:
                batch = next(batches, None)
            except (ConnectionError, EOFError) as error:  # a worker died while its batch was passed over
                raise RuntimeError("DataLoader worker exited unexpectedly (its connection broke)") from error
            if batch is None:
                return
            if timer is not None:
                timer.add("wait", time.perf_counter() - started)
                timer.add("decode", batch.decode_seconds)
            yield batch
    finally:
        getattr(batches, "_shutdown_workers", lambda: None)()


class Recorder:
    """Appends finished outputs and failures to the manifest and the summary (failures once per input)."""

    def __init__(self, writer: OutputWriter, summary: RunSummary, on_failure: Callable[[Failure], None]):
        self.writer, self.summary, self.on_failure = writer, summary, on_failure
        self.failed: set[str] = set()

    def __call__(self, entries: Iterable[dict]) -> None:
        for entry in entries:
            self.writer.append_manifest(entry)
            if entry["status"] == "ok":
                self.summary.records.append(entry)
            elif entry["input"] not in self.failed:
                self.failed.add(entry["input"])
                failure = Failure(Path(entry["input"]), entry["error"])
                self.summary.failures.append(failure)
                self.on_failure(failure)


NOT_FINITE = "the model's output is not finite (NaN or inf): are the checkpoint's weights finite?"


def warm_up(explainer: Explainer, request: Request, device: torch.device) -> None:
    """Run the method and the writing of one output once, on a random image and a small picture, into memory:
    numba compiles (or loads from its cache) every kernel they use before the timed run starts."""
    height, width = request.preprocessing.size
    pixels = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0)).to(device)
    explanation = explainer.explain(pixels, request.classes, request.sweep.ratios if request.sweep else None)
    picture = np.full((24, 32, 3), 128, dtype=np.uint8)
    masks = explanation.masks[0, 0].detach().float().cpu().numpy()
    files = sweep_files(picture, masks, request.render, request.sweep) if request.sweep else single_files(
        picture, masks[0], request.render)
    for _suffix, content in files.values():
        if callable(content):  # an encoder still to run (a GIF is encoded already)
            content(io.BytesIO())


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
    warming: Callable[[], ContextManager] = nullcontext,
    warm: bool = True,
) -> RunSummary:
    """Explain every image in ``paths`` as ``request`` says, with ``model`` (loaded from ``request.model``
    and on ``device``); write one output per image and target (a sweep's: one per target) except those in
    ``skip`` (``(input key, output index)``, complete already).

    The explainer is built from ``request`` (:meth:`Request.explainer`), so that what is computed and how
    it is named and recorded cannot disagree. The kernels are compiled first, within ``warming()`` and
    outside the run's timing (:func:`warm_up`; ``warm=False`` skips that, for a process that has run the
    same request before). An image that cannot be decoded, an output whose values are
    not finite, or one whose files cannot be written (for that file alone) is reported through
    ``on_failure`` and recorded in the manifest; the rest go on. Ctrl-C stops the run before the next batch
    (a second one at once; see :mod:`.interrupts`, ``on_stop_request`` is told of the first); so does a
    disk-level write error (the summary's ``stopped`` says which) or a DataLoader worker's death. Either
    way the outputs already computed are finished and recorded: rerunning the same command does the rest.
    With a ``timer``, wall time is summed per stage (see :mod:`.profiling`).
    """
    if not isinstance(request, Request):
        raise TypeError(f"explain_paths takes a Request (which builds the explainer), not {type(request).__name__}")
    summary = RunSummary()
    explainer = request.explainer(model, device)
    if warm:
        with warming():
            warm_up(explainer, request, device)
    started = time.perf_counter()
    explainer.on_progress = on_progress
    explainer.timer = timer or no_timer
    record = request.record()
    class_names = request.class_names
    background = OrderedBackground(max_pending=2 * batch_size, timer=timer)
    recorder = Recorder(writer, summary, on_failure)
    trim = PeriodicTrim()
    trim_heap()  # before the loader forks its workers: see allocator.trim_heap
    batches = timed_batches(make_loader(paths, request.preprocessing, batch_size, num_workers,
                                        device.type == "cuda"), timer)
    try:
        with StopRequests(on_stop_request) as stop:
            for batch in batches:
                stop.raise_if_requested()
                recorder(failure_entry(input_key(f.path), f.reason, record) for f in batch.failures)
                if batch.paths:
                    submit_outputs(explainer, batch, device, class_names, request, record, writer, background, skip)
                recorder(background.completed())
                trim()
                summary.images += len(batch.paths) + len(batch.failures)
                on_images(len(batch.paths) + len(batch.failures))
                stop.raise_if_requested()
    except KeyboardInterrupt:
        summary.interrupted = True
    except OutputStop as error:
        summary.stopped = str(error)
    except RuntimeError as error:
        summary.stopped = loader_failure(error)
        if summary.stopped is None:
            raise
    finally:
        batches.close()  # stops the DataLoader workers now, also on Ctrl-C
        finish(background, recorder, summary)
    summary.outputs = len(summary.records)
    summary.seconds = time.perf_counter() - started
    return summary


def finish(background: OrderedBackground, recorder: Recorder, summary: RunSummary) -> None:
    """Record the outputs still in flight; after a disk-level stop, those that cannot be written are left
    for the rerun."""
    while background.pending:
        try:
            recorder([background.result(background.pending.popleft())])
        except OutputStop as error:
            summary.stopped = summary.stopped or str(error)
    background.pool.shutdown()


def loader_failure(error: RuntimeError) -> str | None:
    """Why the DataLoader cannot go on, if ``error`` says so: a worker died (torch raises that from its SIGCHLD
    handler, wherever the main thread is) or shared memory ran out; ``None`` for any other error."""
    text = str(error)
    if "shared memory" in text or "shm" in text:
        return ("DataLoader workers ran out of shared memory (/dev/shm): run again with -j 0, or give the container "
                "more (docker run --shm-size=1g)")
    if "DataLoader worker" in text and ("exited unexpectedly" in text or "killed by signal" in text):
        return "a DataLoader worker died (killed, or out of memory?): run the same command again to finish"
    return None


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
        finite = bool(np.isfinite(masks[row]).all() and np.isfinite(probabilities[row]).all())
        for column in range(masks.shape[1]):
            if (key, column) in skip:
                continue
            if not finite:
                background.submit(failure_entry, key, NOT_FINITE, record)
                continue
            target = None if targets is None else int(targets[row, column])
            name = writer.output_name(path, record["key"], column, request.label(target))
            entry = {"input": key, "status": "ok", "output": column,
                     **prediction_record(probabilities[row], target, class_names), "request": record}
            background.submit(write_output, writer, name, original, masks[row, column], entry, request)

"""The one data path behind every subcommand: load → capture → method → mask → render/write."""
from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from .allocator import PeriodicTrim, trim_heap
from .data import Batch, Failure, make_loader
from .explainers import EXPLAINERS, Explainer
from .interrupts import StopRequests
from .models import Preprocessing
from .profiling import StageTimer, no_timer
from .gif import encode_gif
from .render import contact_sheet, fit_within, overlay
from .sweep import ratios_tag, sweep_frames
from .writer import Content, OutputWriter, encoded_array, encoded_image, format_params


@dataclass(frozen=True)
class RenderOptions:
    colormap: str = "jet"
    alpha: float = 0.5
    save_raw: bool = False
    stretch: bool = False
    max_side: int | None = None  # downscale pictures to this longer side (None: the image's own size)
    image_format: str = "png"  # overlays and contact sheets: png or jpg


@dataclass(frozen=True)
class SweepOptions:
    """A sweep over discard ratios: an animated GIF and/or a contact sheet per image and target."""

    ratios: tuple[float, ...]
    gif: bool = True
    grid: bool = False
    fps: float = 4.0


SWEEP_MAX_SIDE = 256  # GIF frames are downscaled to this longer side unless told otherwise


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


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then CPU; an explicit device must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (try --device auto)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("--device mps: Apple MPS is not available (try --device auto)")
    return torch.device(name)


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


def single_files(image, masks, render: RenderOptions) -> dict[str, tuple[str, Content]]:
    """Overlay picture (PNG or JPEG, and raw ``.npy``) of a one-ratio explanation; ``masks`` is ``(1, gh, gw)``."""
    if render.max_side:
        image = fit_within(image, render.max_side)
    picture = overlay(image, masks[0], render.colormap, render.alpha, render.stretch)
    files = {"overlay": (f".{render.image_format}", encoded_image(picture, render.image_format))}
    if render.save_raw:
        files["raw"] = (".npy", encoded_array(masks[0]))
    return files


def sweep_files(image, masks, render: RenderOptions, sweep: SweepOptions) -> dict[str, tuple[str, Content]]:
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


@dataclass(frozen=True)
class Request:
    """What one command asks of every image: method, parameters, targets, and a sweep or not."""

    method: str
    fusion: str = "mean"
    discard_ratio: float = 0.9
    classes: tuple[int, ...] | None = None  # None: each image's top-1 (class-specific methods)
    sweep: SweepOptions | None = None

    @classmethod
    def of(cls, explainer: Explainer, classes: Sequence[int] | None = None, sweep: SweepOptions | None = None) -> "Request":
        return cls(explainer.name, explainer.fusion, explainer.discard_ratio, tuple(classes) if classes else None, sweep)

    @property
    def outputs_per_image(self) -> int:
        return len(self.classes) if self.classes else 1

    def label(self, target: int | str | None) -> str:
        """``rollout_max_d0.9``, ``grad-rollout_mean_d0.9_c243``, ``rollout-sweep_mean_r0-0.99x20``."""
        if self.sweep:
            params = {"fusion": self.fusion, "ratios": ratios_tag(self.sweep.ratios), "target": target}
            return f"{self.method}-sweep_{format_params(params)}"
        params = {"fusion": self.fusion, "discard_ratio": self.discard_ratio, "target": target}
        return f"{self.method}_{format_params(params)}"

    @property
    def key(self) -> str:
        """The request, independent of the image, as recorded in the manifest: ``grad-rollout_mean_d0.9_ctop1``."""
        targets = ",".join(map(str, self.classes)) if self.classes else ("top1" if EXPLAINERS[self.method].class_specific else None)
        return self.label(targets)

    def fields(self) -> dict:
        ratios = {"discard_ratios": list(self.sweep.ratios)} if self.sweep else {"discard_ratio": self.discard_ratio}
        return {"request": self.key, "method": self.method, "fusion": self.fusion, **ratios}


def write_output(writer: OutputWriter, path: Path, label: str, original: np.ndarray, masks: np.ndarray,
                 record: dict, render: RenderOptions, sweep: SweepOptions | None) -> dict:
    """Render one output (overlay, or a sweep's GIF / sheet), write its files, return its manifest entry."""
    files = sweep_files(original, masks, render, sweep) if sweep else single_files(original, masks, render)
    return writer.write(path, label, files, record)


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


def writer_threads() -> int:
    """Threads drawing and writing outputs: a quarter of the CPU cores, 2 to 8."""
    return max(2, min(8, (os.cpu_count() or 2) // 4))


def remaining_paths(paths: Sequence[Path], writer: OutputWriter, request: Request) -> list[Path]:
    """The paths whose outputs for ``request`` are not all complete and in the manifest already."""
    done = writer.completed_outputs(request.key)
    return [p for p in paths if done[p.resolve()] < request.outputs_per_image]


def explain_paths(
    explainer: Explainer,
    paths: Sequence[Path],
    prep: Preprocessing,
    writer: OutputWriter,
    class_names: Sequence[str],
    request: Request | None = None,
    render: RenderOptions = RenderOptions(),
    batch_size: int = 8,
    num_workers: int = 0,
    device: torch.device = torch.device("cpu"),
    on_images: Callable[[int], None] = lambda n: None,
    on_failure: Callable[[Failure], None] = lambda failure: None,
    timer: StageTimer | None = None,
    on_stop_request: Callable[[], None] = lambda: None,
) -> RunSummary:
    """Explain every image in ``paths``; write one output per image and target (a sweep's: one per ratio set).

    Images that cannot be decoded are reported through ``on_failure`` and recorded in the manifest;
    the rest go on. Ctrl-C stops the run before the next batch (a second one at once; see
    :mod:`vitexplain.interrupts`, ``on_stop_request`` is told of the first): the outputs already computed
    are finished and recorded, and the summary says ``interrupted``: rerunning the same command does the rest.
    With a ``timer``, wall time is summed per stage (see :mod:`vitexplain.profiling`).
    """
    summary = RunSummary()
    started = time.perf_counter()
    request = request or Request.of(explainer)
    background = OrderedBackground(max_pending=2 * batch_size, timer=timer)
    explainer.timer = timer or no_timer
    trim = PeriodicTrim()
    trim_heap()  # before the loader forks its workers: see allocator.trim_heap
    batches = timed_batches(make_loader(paths, prep, batch_size, num_workers, device.type == "cuda"), timer)
    try:
        with StopRequests(on_stop_request) as stop:
            for batch in batches:
                stop.raise_if_requested()
                for failure in batch.failures:
                    writer.record_failure(failure.path, failure.reason, request.key)
                    summary.failures.append(failure)
                    on_failure(failure)
                if batch.paths:
                    submit_outputs(explainer, batch, device, class_names, request, writer, render, background)
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
        explainer.timer = no_timer
    summary.outputs = len(summary.records)
    summary.seconds = time.perf_counter() - started
    return summary


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


def submit_outputs(explainer: Explainer, batch: Batch, device: torch.device, class_names: Sequence[str],
                   request: Request, writer: OutputWriter, render: RenderOptions, background: "OrderedBackground") -> None:
    """Explain one batch and queue the rendering and writing of its outputs."""
    sweep = request.sweep
    explanation = explainer.explain(batch.pixels.to(device, non_blocking=True), request.classes,
                                    sweep.ratios if sweep else None)
    probabilities = explanation.probabilities.cpu().numpy()  # numpy: cheap per-image indexing below
    masks = explanation.masks.cpu().numpy().astype(np.float32)
    targets = None if explanation.targets is None else explanation.targets.cpu().numpy()
    fields = request.fields()
    for row, (path, original) in enumerate(zip(batch.paths, batch.originals)):
        for column in range(masks.shape[1]):
            target = None if targets is None else int(targets[row, column])
            record = {**fields, **prediction_record(probabilities[row], target, class_names)}
            background.submit(write_output, writer, path, request.label(target), original, masks[row, column], record,
                              render, sweep)

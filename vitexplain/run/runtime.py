"""The process a run lives in: the device, worker and thread counts, and the process-wide settings that
only the command line's entry point applies (:func:`configure_process`); the library alone changes
nothing process-wide."""
from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch


def configure_process() -> None:
    """For a command-line run, at its start: shorter OpenMP spin-waits (before torch loads, :mod:`.openmp`).
    The heap setting (:func:`.allocator.keep_heap_memory`) comes later, just before the weights load: set
    earlier, the blocks freed while torch imports and a checkpoint is read would stay on the heap too."""
    from .openmp import shorten_spin_wait

    shorten_spin_wait()


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then CPU; an explicit device must be available."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (try --device auto)")
    if name == "mps" and not (mps is not None and mps.is_available()):
        raise ValueError("--device mps: Apple MPS is not available (try --device auto)")
    return torch.device(name)


def writer_threads() -> int:
    """Threads drawing and writing outputs: a quarter of the CPU cores, 2 to 8."""
    return max(2, min(8, (os.cpu_count() or 2) // 4))


def default_workers(device: torch.device | None = None) -> int:
    """On CPU half the cores (the model's threads need the rest), at most 4; with a GPU doing the model,
    the cores left after the main thread and the writer threads, at most 12."""
    cores = os.cpu_count() or 2
    if device is None or device.type == "cpu":
        return min(4, cores // 2)
    return max(1, min(12, cores - 1 - writer_threads()))


SHARED_MEMORY = "/dev/shm"
SHARED_MEMORY_NEEDED = 256 << 20  # a few batches of decoded full-size photos in flight


def loader_workers(asked: int | None, device: torch.device, images: int,
                   on_notice: Callable[[str], None] = lambda text: None) -> int:
    """DataLoader workers for a run: as asked (or :func:`default_workers`), at most the cores and one fewer
    than the images; none where shared memory is too small to pass batches through (Docker's default
    64 MB ``/dev/shm``), with a notice saying what to do."""
    workers = default_workers(device) if asked is None else asked
    workers = max(0, min(workers, os.cpu_count() or 1, images - 1))
    if workers and os.path.isdir(SHARED_MEMORY):
        free = shutil.disk_usage(SHARED_MEMORY).free
        if free < SHARED_MEMORY_NEEDED:
            on_notice(f"only {free >> 20} MiB free in {SHARED_MEMORY}: decoding in the main process (-j 0); "
                      "for parallel decoding give the container more (docker run --shm-size=1g)")
            return 0
    return workers


def amp_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where supported (CPU, recent GPUs), float16 otherwise."""
    import torch

    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.float16 if device.type == "mps" else torch.bfloat16

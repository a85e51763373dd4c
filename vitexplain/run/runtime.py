"""The process a run lives in: the device, worker and thread counts, and the process-wide settings that
only the command line's entry point applies (:func:`configure_process`); the library alone changes
nothing process-wide."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def configure_process() -> None:
    """For a command-line run: shorter OpenMP spin-waits (before torch loads, :mod:`.openmp`) and a heap
    that keeps freed blocks for the next batch (:mod:`.allocator`)."""
    from .allocator import keep_heap_memory
    from .openmp import shorten_spin_wait

    shorten_spin_wait()
    keep_heap_memory()


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


def amp_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where supported (CPU, recent GPUs), float16 otherwise."""
    import torch

    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.float16 if device.type == "mps" else torch.bfloat16

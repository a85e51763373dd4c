"""Where the time goes: wall seconds per pipeline stage (decode, model, method, write)."""
from __future__ import annotations

import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

import torch

STAGES = ("decode", "wait", "model", "method", "write")
STAGE_HELP = {
    "decode": "reading and resizing images (DataLoader workers, summed over workers)",
    "wait": "main thread waiting for the next decoded batch",
    "model": "forward pass with attention capture (+ backward for grad-rollout)",
    "method": "head fusion, discard, rollout / flow",
    "write": "overlays, encoding and files (background threads, summed)",
}


class StageTimer:
    """Sums wall seconds per stage across threads; synchronises CUDA around each timed block."""

    def __init__(self, device: torch.device | None = None):
        self.seconds: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()
        self._cuda = device is not None and device.type == "cuda"

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] += seconds

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        if self._cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        try:
            yield
        finally:
            if self._cuda:
                torch.cuda.synchronize()
            self.add(stage, time.perf_counter() - started)

"""Streaming decoded images through a torch DataLoader: model input plus the original pixels."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from ..io.inputs import Failure, ImageDecodeError, load_image
from ..io.preprocess import Preprocessing, to_model_input
from .allocator import PeriodicTrim
from .interrupts import ignore_interrupts

@dataclass
class Batch:
    """Model input ``(B, 3, H, W)`` and, per decoded image, its index, path and original RGB pixels;
    plus the images of this batch that could not be decoded."""

    pixels: torch.Tensor
    indices: list[int]
    paths: list[Path]
    packed_originals: "PackedImages"
    failures: list[Failure] = field(default_factory=list)
    decode_seconds: float = 0.0  # summed over the batch's images

    @property
    def originals(self) -> list[np.ndarray]:
        """The decoded images at their own size, ``(H, W, 3)`` uint8 each."""
        return self.packed_originals.images()

    def pin_memory(self) -> "Batch":
        self.pixels = self.pixels.pin_memory()
        return self


@dataclass
class PackedImages:
    """Images of different sizes in one flat uint8 tensor: in a DataLoader worker it is allocated in
    shared memory, so a batch of full-size originals reaches the main process without being pickled
    through a pipe (tens of MB per batch)."""

    flat: torch.Tensor
    shapes: list[tuple[int, ...]]

    @classmethod
    def of(cls, images: Sequence[np.ndarray]) -> "PackedImages":
        sizes = [image.size for image in images]
        flat = torch.empty(sum(sizes), dtype=torch.uint8)
        if get_worker_info() is not None:
            flat.share_memory_()
        target, offset = flat.numpy(), 0
        for image, size in zip(images, sizes):
            target[offset:offset + size] = image.reshape(-1)
            offset += size
        return cls(flat, [image.shape for image in images])

    def images(self) -> list[np.ndarray]:
        flat, offset, views = self.flat.numpy(), 0, []
        for shape in self.shapes:
            size = int(np.prod(shape))
            views.append(flat[offset:offset + size].reshape(shape))
            offset += size
        return views


class ImageDataset(Dataset):
    """Decodes image ``i`` into model input plus its original pixels (for full-size overlays).

    A file that cannot be decoded yields its reason instead of raising, so that one bad file
    never stops a DataLoader (or its worker processes).
    """

    def __init__(self, paths: Sequence[Path], prep: Preprocessing):
        self.paths = list(paths)
        self.prep = prep

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, np.ndarray | None, str | None, float]:
        started = time.perf_counter()
        try:
            image = load_image(self.paths[index])
        except ImageDecodeError as error:
            return index, None, None, str(error), time.perf_counter() - started
        # the original as a read-only view of the decoded pixels: the collate copies it into the batch
        return index, to_model_input(image, self.prep), np.asarray(image), None, time.perf_counter() - started


class CollateBatch:
    """Stacks dataset items into a :class:`Batch` (a class, so spawned workers can pickle it)."""

    def __init__(self, paths: Sequence[Path], prep: Preprocessing):
        self.paths = list(paths)
        self.empty = torch.zeros(0, 3, *prep.size)
        self.trim = PeriodicTrim()  # each worker process trims its own heap

    def __call__(self, items: list[tuple[int, torch.Tensor | None, np.ndarray | None, str | None, float]]) -> Batch:
        good = [item for item in items if item[3] is None]
        failures = [Failure(self.paths[item[0]], item[3]) for item in items if item[3] is not None]
        pixels = torch.stack([item[1] for item in good]) if good else self.empty
        self.trim()
        return Batch(pixels, [item[0] for item in good], [self.paths[item[0]] for item in good],
                     PackedImages.of([item[2] for item in good]), failures, sum(item[4] for item in items))


def make_loader(paths: Sequence[Path], prep: Preprocessing, batch_size: int, num_workers: int, pin_memory: bool) -> DataLoader:
    """An ordered DataLoader of :class:`Batch` over ``paths``; its workers ignore Ctrl-C (see :mod:`.interrupts`)."""
    return DataLoader(
        ImageDataset(paths, prep),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=CollateBatch(paths, prep),
        pin_memory=pin_memory,
        persistent_workers=False,
        worker_init_fn=ignore_interrupts,
    )

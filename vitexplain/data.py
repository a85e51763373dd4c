"""Finding images and streaming them through a torch DataLoader."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from .models import Preprocessing

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
RESAMPLING = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


class InputError(ValueError):
    """An input path that names no image."""


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def find_images(inputs: Iterable[str | Path]) -> list[Path]:
    """Image files named by ``inputs`` (files, or folders searched recursively), each once, in order.

    Files given explicitly are kept whatever their extension; folders contribute
    files with a common image extension, sorted by path.
    """
    found: dict[Path, None] = {}
    for entry in map(Path, inputs):
        if entry.is_dir():
            found.update((p, None) for p in sorted(entry.rglob("*")) if p.is_file() and is_image_file(p))
        elif entry.is_file():
            found[entry] = None
        else:
            raise InputError(f"{str(entry)!r} does not exist")
    return list(found)


def load_rgb(path: Path) -> np.ndarray:
    """Decode ``path`` as an ``(H, W, 3)`` uint8 RGB array, honouring EXIF orientation."""
    with Image.open(path) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def to_model_input(rgb: np.ndarray, prep: Preprocessing) -> torch.Tensor:
    """Resize the whole image to the model's input size (no crop) and normalise: ``(3, H, W)`` float32."""
    height, width = prep.size
    resized = Image.fromarray(rgb).resize((width, height), RESAMPLING.get(prep.interpolation, Image.Resampling.BICUBIC))
    pixels = torch.from_numpy(np.array(resized, dtype=np.float32)).permute(2, 0, 1) / 255.0
    mean = torch.tensor(prep.mean).view(3, 1, 1)
    std = torch.tensor(prep.std).view(3, 1, 1)
    return (pixels - mean) / std


@dataclass
class Batch:
    """Model input ``(B, 3, H, W)`` and, per image, its index, path and original RGB pixels."""

    pixels: torch.Tensor
    indices: list[int]
    paths: list[Path]
    originals: list[np.ndarray]

    def pin_memory(self) -> "Batch":
        self.pixels = self.pixels.pin_memory()
        return self


class ImageDataset(Dataset):
    """Decodes image ``i`` into model input plus its original pixels (for full-size overlays)."""

    def __init__(self, paths: Sequence[Path], prep: Preprocessing):
        self.paths = list(paths)
        self.prep = prep

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, np.ndarray]:
        rgb = load_rgb(self.paths[index])
        return index, to_model_input(rgb, self.prep), rgb


class CollateBatch:
    """Stacks dataset items into a :class:`Batch` (a class, so spawned workers can pickle it)."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = list(paths)

    def __call__(self, items: list[tuple[int, torch.Tensor, np.ndarray]]) -> Batch:
        indices = [i for i, _, _ in items]
        pixels = torch.stack([x for _, x, _ in items])
        return Batch(pixels, indices, [self.paths[i] for i in indices], [rgb for _, _, rgb in items])


def make_loader(paths: Sequence[Path], prep: Preprocessing, batch_size: int, num_workers: int, pin_memory: bool) -> DataLoader:
    """An ordered DataLoader of :class:`Batch` over ``paths``."""
    return DataLoader(
        ImageDataset(paths, prep),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=CollateBatch(paths),
        pin_memory=pin_memory,
        persistent_workers=False,
    )

"""From a picture to model input: resize the whole image to the model's size (no crop), normalise."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image

from .inputs import load_image, to_rgb_image

RESAMPLING = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}

DOWNSCALE_GAP = 3.0  # Pillow's reducing_gap: images over 6× the input size are box-reduced first


def to_model_input(rgb: np.ndarray | Image.Image, prep: Preprocessing) -> torch.Tensor:
    """Resize the whole image to the model's input size (no crop) and normalise: ``(3, H, W)`` float32.

    An image more than ``2·DOWNSCALE_GAP`` times the input size along an axis is first reduced by an
    integer factor (a box filter), so that the resampling filter reads at least ``DOWNSCALE_GAP`` pixels
    per output pixel, within a level or two of a direct resize (a few levels at hard edges; tested).
    Smaller images are resized directly."""
    image = Image.fromarray(rgb) if isinstance(rgb, np.ndarray) else rgb
    height, width = prep.size
    resample = RESAMPLING.get(prep.interpolation, Image.Resampling.BICUBIC)
    resized = image.resize((width, height), resample, reducing_gap=DOWNSCALE_GAP)
    pixels = torch.from_numpy(np.array(resized, dtype=np.float32)).permute(2, 0, 1) / 255.0
    mean = torch.tensor(prep.mean).view(3, 1, 1)
    std = torch.tensor(prep.std).view(3, 1, 1)
    return (pixels - mean) / std



@dataclass(frozen=True)
class Preprocessing:
    """How to turn a picture into model input: resize the whole image, then normalise."""

    size: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    def __call__(self, image: str | Path | np.ndarray | Image.Image) -> torch.Tensor:
        """The model input ``(3, H, W)`` of an image: a file (decoded by :func:`~vitexplain.io.inputs.load_image`),
        an ``(H, W, 3)`` uint8 array or a Pillow image."""
        if isinstance(image, (str, Path)):
            image = load_image(image)
        elif isinstance(image, Image.Image):
            image = to_rgb_image(image)
        return to_model_input(image, self)

    def record(self) -> dict:
        return {"size": list(self.size), "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation}



class Images(NamedTuple):
    """A batch of model inputs ``(B, 3, H, W)`` and the decoded originals, ``(H_i, W_i, 3)`` uint8 each."""

    pixels: torch.Tensor
    originals: list[np.ndarray]


def load_images(paths: Sequence[str | Path], preprocessing: Preprocessing) -> Images:
    """Decode ``paths`` (raising :class:`~vitexplain.io.inputs.ImageDecodeError` saying why a file cannot be
    used) into ``(pixels, originals)``: the batch the explainers take and the pictures overlays are drawn on."""
    decoded = [load_image(path) for path in paths]
    return Images(torch.stack([to_model_input(image, preprocessing) for image in decoded]),
                  [np.array(image) for image in decoded])

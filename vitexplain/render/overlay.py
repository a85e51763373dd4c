"""Heatmap overlays, contact sheets and labels: numpy, Pillow and the compiled blend
(:mod:`vitexplain.kernels.blend`)."""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..kernels.blend import blend_heat
from .colormaps import colormap_table

def bilinear_taps(source: int, target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each of ``target`` samples, the two source samples and the weight of the second: bilinear
    resampling with pixel centres aligned and edges clamped (``align_corners=False``)."""
    centres = np.clip((np.arange(target) + 0.5) * source / target - 0.5, 0, source - 1)
    low = np.floor(centres).astype(np.int64)
    return low, np.minimum(low + 1, source - 1), (centres - low).astype(np.float32)


def upsample_masks(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of ``(R, gh, gw)`` masks to ``size`` (H, W), clipped to [0, 1] (float32, two taps
    per axis, rows first: the same arithmetic as the compiled overlay)."""
    masks = np.asarray(masks, dtype=np.float32)
    (y0, y1, fy), (x0, x1, fx) = bilinear_taps(masks.shape[-2], size[0]), bilinear_taps(masks.shape[-1], size[1])
    rows = masks[:, y0, :] * (1 - fy)[:, None] + masks[:, y1, :] * fy[:, None]
    return np.clip(rows[:, :, x0] * (1 - fx) + rows[:, :, x1] * fx, 0.0, 1.0)


def stretch_contrast(mask: np.ndarray) -> np.ndarray:
    """Rescale ``mask`` linearly so its minimum maps to 0 and its maximum to 1 (a constant mask maps to 0)."""
    low, high = float(mask.min()), float(mask.max())
    return (mask - low) / (high - low) if high > low else np.zeros_like(mask)


def overlays(image: np.ndarray, masks: np.ndarray, colormap: str = "jet", alpha: float = 0.5,
             stretch: bool = False) -> np.ndarray:
    """``(1 − alpha)·image + alpha·colormap(mask)`` at the image's own size for each of ``(R, gh, gw)``
    masks: uint8 ``(R, H, W, 3)``.

    Masks are upsampled bilinearly; with ``stretch`` the colours span each mask's own range (min → first
    colour) instead of [0, 1]. ``alpha`` is applied in steps of 1/256, results rounded to the nearest level.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    values = np.asarray(masks, dtype=np.float32)
    if stretch:
        values = np.stack([stretch_contrast(mask) for mask in values])
    height, width = image.shape[:2]
    taps = bilinear_taps(values.shape[-2], height), bilinear_taps(values.shape[-1], width)
    return blend_heat(np.ascontiguousarray(image), np.ascontiguousarray(values), *taps,
                       colormap_table(colormap).astype(np.int32), round(alpha * 256))


def blend_reference(image: np.ndarray, masks: np.ndarray, colormap: str = "jet", alpha: float = 0.5) -> np.ndarray:
    """What :func:`overlays` computes (without ``stretch``), in plain numpy: per frame and pixel
    ``⌊((256 − w)·image + w·table[⌊255·v + ½⌋] + 128) / 256⌋`` with ``w = round(256·alpha)`` and ``v`` the
    mask upsampled by :func:`upsample_masks`."""
    weight = round(alpha * 256)
    values = upsample_masks(masks, image.shape[:2])
    levels = (values * np.float32(255.0) + np.float32(0.5)).astype(np.int64)
    colours = colormap_table(colormap).astype(np.int64)[levels]
    return (((256 - weight) * image.astype(np.int64)[None] + weight * colours + 128) >> 8).astype(np.uint8)


def overlay(image: np.ndarray, mask: np.ndarray, colormap: str = "jet", alpha: float = 0.5,
            stretch: bool = False) -> np.ndarray:
    """:func:`overlays` for one ``(gh, gw)`` mask: uint8 ``(H, W, 3)``."""
    return overlays(image, np.asarray(mask, dtype=np.float32)[None], colormap, alpha, stretch)[0]


def overlay_image(image: np.ndarray | Image.Image, mask, colormap: str = "jet", alpha: float = 0.5,
                  stretch: bool = False) -> Image.Image:
    """:func:`overlay` as a Pillow image: ``image`` an ``(H, W, 3)`` uint8 array or a Pillow image, ``mask`` a
    ``(gh, gw)`` array or tensor (an explainer's mask)."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.uint8)
    return Image.fromarray(overlay(pixels, np.asarray(mask, dtype=np.float32), colormap, alpha, stretch))


def save_overlay(path, image: np.ndarray | Image.Image, mask, colormap: str = "jet", alpha: float = 0.5,
                 stretch: bool = False) -> Path:
    """Write :func:`overlay_image` to ``path`` (``.png`` or ``.jpg``/``.jpeg``, by its suffix), atomically,
    creating its folder; returns the path."""
    from ..io.outputs import atomic_write, encoded_image

    path = Path(path)
    formats = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg"}
    if path.suffix.lower() not in formats:
        raise ValueError(f"save_overlay writes .png or .jpg files, not {path.suffix or 'no suffix'!r}")
    picture = np.asarray(overlay_image(image, mask, colormap, alpha, stretch))
    atomic_write(path, encoded_image(picture, formats[path.suffix.lower()]))
    return path


def fit_within(image: np.ndarray, max_side: int, resample: Image.Resampling = Image.Resampling.LANCZOS,
               reducing_gap: float = 2.0) -> np.ndarray:
    """Downscale ``image`` so that its longer side is at most ``max_side`` (never upscales). Pillow's
    filters widen with the scale, so every filter averages over the pixels it reduces (no aliasing);
    ``BILINEAR`` (a triangle) is softer than ``LANCZOS`` and half its cost. The image is first box-reduced
    by the largest integer factor that leaves it at least ``reducing_gap`` times the target size (1: the
    cheapest, a 2.5× reduction becomes a 2×2 box and a 1.25× filter)."""
    height, width = image.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(size, resample, reducing_gap=reducing_gap))


@lru_cache(maxsize=256)
def label_tile(text: str, size: int) -> np.ndarray:
    """``text`` in white on a dark box, font ``size`` px (drawn once per text and size, then reused)."""
    font = ImageFont.load_default(size=size)
    _, _, right, bottom = font.getbbox(text)
    tag = Image.new("RGB", (right + 8, bottom + 6))
    ImageDraw.Draw(tag).text((4, 2), text, fill=(255, 255, 255), font=font)
    return np.asarray(tag)


def stamp_label(image: np.ndarray, text: str) -> np.ndarray:
    """Draw ``text`` in white on a dark box into ``image``'s top-left corner (in place); returns ``image``."""
    tile = label_tile(text, max(10, min(image.shape[:2]) // 14))
    height, width = min(tile.shape[0], image.shape[0]), min(tile.shape[1], image.shape[1])
    image[:height, :width] = tile[:height, :width]
    return image


def contact_sheet(frames: np.ndarray | list[np.ndarray], columns: int | None = None, gap: int = 4) -> np.ndarray:
    """Frames of equal size tiled row by row (``columns`` default ⌈√n⌉) on a white background."""
    columns = columns or math.ceil(math.sqrt(len(frames)))
    rows = math.ceil(len(frames) / columns)
    height, width = frames[0].shape[:2]
    sheet = np.full((rows * height + (rows - 1) * gap, columns * width + (columns - 1) * gap, 3), 255, dtype=np.uint8)
    for index, frame in enumerate(frames):
        top, left = (index // columns) * (height + gap), (index % columns) * (width + gap)
        sheet[top:top + height, left:left + width] = frame
    return sheet

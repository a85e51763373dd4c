"""Colormaps and heatmap overlays, in numpy and a small compiled blend (no matplotlib or OpenCV)."""
from __future__ import annotations

import math
from functools import lru_cache

import numba
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


# Anchor colours, evenly spaced over [0, 1]; values in between are interpolated linearly.
# viridis / inferno / turbo anchors are sampled from the published colormaps.
COLORMAP_ANCHORS: dict[str, tuple[str, ...]] = {
    "jet": ("#00007f", "#0000ff", "#007fff", "#00ffff", "#7fff7f", "#ffff00", "#ff7f00", "#ff0000", "#7f0000"),
    "viridis": ("#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b", "#fde725"),
    "inferno": ("#000004", "#1b0c41", "#4a0c6b", "#781c6d", "#a52c60", "#cf4446", "#ed6925", "#fb9b06", "#f7d13d", "#fcffa4"),
    "turbo": ("#30123b", "#4145ab", "#4675ed", "#39a2fc", "#1bcfd4", "#24eca6", "#61fc6c", "#a4fc3b", "#d1e834",
              "#f3c63a", "#fe9b2d", "#f36315", "#d93806", "#b11901", "#7a0403"),
    "gray": ("#000000", "#ffffff"),
}
COLORMAPS: tuple[str, ...] = tuple(COLORMAP_ANCHORS)


@lru_cache(maxsize=16)
def colormap_table(name: str, size: int = 256) -> np.ndarray:
    """A ``(size, 3)`` uint8 lookup table for colormap ``name`` (read-only, computed once)."""
    if name not in COLORMAP_ANCHORS:
        raise ValueError(f"unknown colormap {name!r}; choose one of {', '.join(COLORMAPS)}")
    anchors = np.array([[int(h[i:i + 2], 16) for i in (1, 3, 5)] for h in COLORMAP_ANCHORS[name]], dtype=np.float64)
    stops = np.linspace(0.0, 1.0, len(anchors))
    levels = np.linspace(0.0, 1.0, size)
    table = np.stack([np.interp(levels, stops, anchors[:, c]) for c in range(3)], axis=1)
    table = np.round(table).astype(np.uint8)
    table.setflags(write=False)
    return table


def bilinear_taps(source: int, target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each of ``target`` samples, the two source samples and the weight of the second: bilinear
    resampling with pixel centres aligned and edges clamped (``align_corners=False``)."""
    centres = np.clip((np.arange(target) + 0.5) * source / target - 0.5, 0, source - 1)
    low = np.floor(centres).astype(np.int64)
    return low, np.minimum(low + 1, source - 1), (centres - low).astype(np.float32)


def upsample_masks(masks: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of ``(R, gh, gw)`` masks to ``size`` (H, W), clipped to [0, 1] (float32, two taps
    per axis, rows first: the same arithmetic as the compiled overlay)."""
    masks = np.asarray(masks, dtype=np.float32)
    (y0, y1, fy), (x0, x1, fx) = bilinear_taps(masks.shape[-2], size[0]), bilinear_taps(masks.shape[-1], size[1])
    rows = masks[:, y0, :] * (1 - fy)[:, None] + masks[:, y1, :] * fy[:, None]
    return np.clip(rows[:, :, x0] * (1 - fx) + rows[:, :, x1] * fx, 0.0, 1.0)


@numba.njit(nogil=True, cache=True)
def _packed_rgb(red, green, blue):
    """Three 16-bit lanes of one uint64: ``red | green << 16 | blue << 32``."""
    return np.uint64(red) | (np.uint64(green) << np.uint64(16)) | (np.uint64(blue) << np.uint64(32))


@numba.njit(nogil=True, cache=True)
def _blend_heat(image, masks, y_taps, x_taps, table, weight):
    """``(R, H, W, 3)``: ``round(((256 − w)·image + w·table[round(255·v)]) / 256)`` per frame and pixel,
    ``v`` the mask upsampled as in :func:`upsample_masks`.

    Row by row: the image's share ``(256 − w)·image`` once for all frames, then per frame the row's colour
    levels (float arithmetic alone, vectorised) and the blend. Both shares are packed as three 16-bit lanes
    of a uint64 (each lane's sum is at most 255·256 + 128 < 2¹⁶, so one addition blends all three
    channels without carries)."""
    (y0, y1, fy), (x0, x1, fx) = y_taps, x_taps
    height, width = image.shape[:2]
    frames, _, columns = masks.shape
    out = np.empty((frames, height, width, 3), dtype=np.uint8)
    keep = 256 - weight
    heat = np.empty(256, dtype=np.uint64)  # the colour's share of each level, rounding included
    for level in range(256):
        heat[level] = _packed_rgb(table[level, 0] * weight + 128, table[level, 1] * weight + 128,
                                  table[level, 2] * weight + 128)
    shares = np.empty(width, dtype=np.uint64)
    row = np.empty(columns, dtype=np.float32)
    levels = np.empty(width, dtype=np.int32)
    one, eight = np.float32(1.0), np.uint64(8)
    for y in range(height):
        for x in range(width):
            shares[x] = _packed_rgb(image[y, x, 0] * keep, image[y, x, 1] * keep, image[y, x, 2] * keep)
        for r in range(frames):
            for j in range(columns):
                row[j] = masks[r, y0[y], j] * (one - fy[y]) + masks[r, y1[y], j] * fy[y]
            for x in range(width):
                value = row[x0[x]] * (one - fx[x]) + row[x1[x]] * fx[x]
                value = min(one, max(np.float32(0.0), value))
                levels[x] = int(value * np.float32(255.0) + np.float32(0.5))
            for x in range(width):
                blended = (shares[x] + heat[levels[x]]) >> eight
                out[r, y, x, 0] = blended & 0xFF
                out[r, y, x, 1] = (blended >> np.uint64(16)) & 0xFF
                out[r, y, x, 2] = (blended >> np.uint64(32)) & 0xFF
    return out


def stretch_contrast(mask: np.ndarray) -> np.ndarray:
    """Rescale ``mask`` linearly so its minimum maps to 0 and its maximum to 1 (a constant mask maps to 0)."""
    low, high = float(mask.min()), float(mask.max())
    return (mask - low) / (high - low) if high > low else np.zeros_like(mask)


def overlays(image: np.ndarray, masks: np.ndarray | torch.Tensor, colormap: str = "jet", alpha: float = 0.5,
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
    return _blend_heat(np.ascontiguousarray(image), np.ascontiguousarray(values), *taps,
                       colormap_table(colormap).astype(np.int32), round(alpha * 256))


def overlay(image: np.ndarray, mask: np.ndarray | torch.Tensor, colormap: str = "jet", alpha: float = 0.5,
            stretch: bool = False) -> np.ndarray:
    """:func:`overlays` for one ``(gh, gw)`` mask: uint8 ``(H, W, 3)``."""
    return overlays(image, np.asarray(mask, dtype=np.float32)[None], colormap, alpha, stretch)[0]


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

"""Colormaps and heatmap overlays, in numpy/torch only (no matplotlib or OpenCV)."""
from __future__ import annotations

import io
import math
from functools import lru_cache

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


def colormap_table(name: str, size: int = 256) -> np.ndarray:
    """A ``(size, 3)`` uint8 lookup table for colormap ``name``."""
    if name not in COLORMAP_ANCHORS:
        raise ValueError(f"unknown colormap {name!r}; choose one of {', '.join(COLORMAPS)}")
    anchors = np.array([[int(h[i:i + 2], 16) for i in (1, 3, 5)] for h in COLORMAP_ANCHORS[name]], dtype=np.float64)
    stops = np.linspace(0.0, 1.0, len(anchors))
    levels = np.linspace(0.0, 1.0, size)
    table = np.stack([np.interp(levels, stops, anchors[:, c]) for c in range(3)], axis=1)
    return np.round(table).astype(np.uint8)


def upsample_mask(mask: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a ``(gh, gw)`` mask to ``size`` (H, W), clipped to [0, 1] (Pillow, float32)."""
    grid = Image.fromarray(np.ascontiguousarray(np.asarray(mask, dtype=np.float32)))
    return np.clip(np.asarray(grid.resize((size[1], size[0]), Image.Resampling.BILINEAR)), 0.0, 1.0)


def heat_image(values: np.ndarray, colormap: str) -> Image.Image:
    """An RGB picture of ``values`` in [0, 1] through ``colormap`` (a palette lookup in Pillow)."""
    heat = Image.fromarray(np.rint(values * 255).astype(np.uint8), "L")
    heat.putpalette(colormap_table(colormap).tobytes())
    return heat.convert("RGB")


def stretch_contrast(mask: np.ndarray) -> np.ndarray:
    """Rescale ``mask`` linearly so its minimum maps to 0 and its maximum to 1 (a constant mask maps to 0)."""
    low, high = float(mask.min()), float(mask.max())
    return (mask - low) / (high - low) if high > low else np.zeros_like(mask)


def overlay(image: np.ndarray, mask: np.ndarray | torch.Tensor, colormap: str = "jet", alpha: float = 0.5,
            stretch: bool = False) -> np.ndarray:
    """Blend ``(1 - alpha)·image + alpha·colormap(mask)`` at the image's own size; uint8 ``(H, W, 3)``.

    The ``(gh, gw)`` mask is upsampled bilinearly; with ``stretch`` the colours span the mask's own range
    (min → first colour) instead of [0, 1]. Blending is Pillow's (values truncated to integers).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    values = np.asarray(mask, dtype=np.float32)
    if stretch:
        values = stretch_contrast(values)
    heat = heat_image(upsample_mask(values, image.shape[:2]), colormap)
    return np.asarray(Image.blend(Image.fromarray(np.ascontiguousarray(image)), heat, alpha))


def overlays(image: np.ndarray, masks: np.ndarray | torch.Tensor, colormap: str = "jet", alpha: float = 0.5,
             stretch: bool = False) -> np.ndarray:
    """:func:`overlay` for each of ``(R, gh, gw)`` masks: uint8 ``(R, H, W, 3)``."""
    return np.stack([overlay(image, mask, colormap, alpha, stretch) for mask in np.asarray(masks)])


def fit_within(image: np.ndarray, max_side: int) -> np.ndarray:
    """Downscale ``image`` so that its longer side is at most ``max_side`` (never upscales)."""
    height, width = image.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # box-reduce by an integer factor first, then Lanczos: the same look at half the cost
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0))


@lru_cache(maxsize=8)
def label_font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def label(image: np.ndarray, text: str) -> np.ndarray:
    """``image`` with ``text`` in white on a dark box in its top-left corner."""
    font = label_font(max(10, min(image.shape[:2]) // 14))
    left, top, right, bottom = font.getbbox(text)
    box_height, box_width = min(bottom + 6, image.shape[0]), min(right + 8, image.shape[1])
    tag = Image.new("RGB", (box_width, box_height))
    ImageDraw.Draw(tag).text((4, 2), text, fill=(255, 255, 255), font=font)
    labelled = image.copy()
    labelled[:box_height, :box_width] = np.asarray(tag)
    return labelled


def contact_sheet(frames: list[np.ndarray], columns: int | None = None, gap: int = 4) -> np.ndarray:
    """Frames of equal size tiled row by row (``columns`` default ⌈√n⌉) on a white background."""
    columns = columns or math.ceil(math.sqrt(len(frames)))
    rows = math.ceil(len(frames) / columns)
    height, width = frames[0].shape[:2]
    sheet = np.full((rows * height + (rows - 1) * gap, columns * width + (columns - 1) * gap, 3), 255, dtype=np.uint8)
    for index, frame in enumerate(frames):
        top, left = (index // columns) * (height + gap), (index % columns) * (width + gap)
        sheet[top:top + height, left:left + width] = frame
    return sheet


def gif_bytes(frames: list[np.ndarray] | np.ndarray, fps: float) -> bytes:
    """An endlessly looping animated GIF, ``fps`` frames per second.

    All frames share one 256-colour palette (fast octree over a sample of the frames), so the
    colours stay put from frame to frame and encoding is quick.
    """
    frames = np.asarray(frames)
    sample = frames[:: max(1, len(frames) // 4)]
    palette = Image.fromarray(sample.reshape(-1, *frames.shape[2:])).quantize(
        256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    indexed = [Image.fromarray(f).quantize(palette=palette, dither=Image.Dither.NONE) for f in frames]
    buffer = io.BytesIO()
    indexed[0].save(buffer, format="GIF", save_all=True, append_images=indexed[1:], duration=1000.0 / fps, loop=0,
                    optimize=False)
    return buffer.getvalue()

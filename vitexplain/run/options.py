"""How masks become files: render and sweep options, checked on construction (no torch: the command line
reads them for ``--help``)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

IMAGE_FORMATS = ("png", "jpg")
SWEEP_MAX_SIDE = 256  # GIF frames are downscaled to this longer side unless told otherwise


@dataclass(frozen=True)
class RenderOptions:
    """How each mask becomes files: overlay colours, size and format, and whether the raw mask is saved."""

    colormap: str = "jet"
    alpha: float = 0.5
    save_raw: bool = False
    stretch: bool = False
    max_side: int | None = None  # downscale pictures to this longer side (None: the image's own size)
    image_format: str = "png"  # overlays and contact sheets: png or jpg

    def __post_init__(self):
        from ..render.colormaps import COLORMAPS

        if self.colormap not in COLORMAPS:
            raise ValueError(f"unknown colormap {self.colormap!r}; choose one of {', '.join(COLORMAPS)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"unknown image format {self.image_format!r}; choose one of {', '.join(IMAGE_FORMATS)}")
        if self.max_side is not None and self.max_side < 1:
            raise ValueError(f"max side must be at least 1 pixel, got {self.max_side}")


@dataclass(frozen=True)
class SweepOptions:
    """A sweep over discard ratios: an animated GIF and/or a contact sheet per image and target."""

    ratios: tuple[float, ...]
    gif: bool = True
    grid: bool = False
    fps: float = 4.0

    def __post_init__(self):
        if not self.ratios:
            raise ValueError("a sweep needs at least one discard ratio")
        if not all(0.0 <= r < 1.0 for r in self.ratios):
            raise ValueError(f"every discard ratio must be in [0, 1), got {list(self.ratios)}")
        if not (math.isfinite(self.fps) and self.fps > 0):
            raise ValueError(f"frames per second must be positive, got {self.fps}")


RATIOS_HELP = "a list like 0,0.5,0.9 or a range START:STOP:COUNT like 0:0.99:20 (COUNT values, both ends included)"
NUMBER = r"\s*-?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?\s*"


def parse_ratios(text: str) -> tuple[float, ...]:
    """``"0,0.5,0.9"`` → ``(0.0, 0.5, 0.9)``; ``"0:0.9:4"`` → ``(0.0, 0.3, 0.6, 0.9)``; each in [0, 1)."""
    if re.fullmatch(f"{NUMBER}:{NUMBER}:\\s*[0-9]+\\s*", text):
        start, stop, count = text.split(":")
        if int(count) < 1:
            raise ValueError(f"bad ratios {text!r}: COUNT must be at least 1")
        first, last, count = float(start), float(stop), int(count)
        steps = [first + (last - first) * i / (count - 1) for i in range(count)] if count > 1 else [first]
        ratios = tuple(round(r, 6) for r in steps)
    elif re.fullmatch(f"{NUMBER}(?:,{NUMBER})*", text):
        ratios = tuple(float(r) for r in text.split(","))
    else:
        raise ValueError(f"bad ratios {text!r}: expected {RATIOS_HELP}")
    outside = [r for r in ratios if not 0.0 <= r < 1.0]
    if outside:
        raise ValueError(f"bad ratios {text!r}: every discard ratio must be in [0, 1), got {outside[0]:g}")
    return ratios


def ratios_tag(ratios: Sequence[float]) -> str:
    """Short file-name tag: ``r0-0.99x20`` (first, last, count)."""
    return f"r{ratios[0]:g}-{ratios[-1]:g}x{len(ratios)}"



"""Discard-ratio sweeps: parsing ratio lists and ranges, and the frames of one image's sweep."""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np
from PIL import Image

from .render import fit_within, overlays, stamp_label

RATIOS_HELP = "a list like 0,0.5,0.9 or a range START:STOP:COUNT like 0:0.99:20 (COUNT values, both ends included)"
NUMBER = r"\s*-?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?\s*"


def parse_ratios(text: str) -> tuple[float, ...]:
    """``"0,0.5,0.9"`` → ``(0.0, 0.5, 0.9)``; ``"0:0.9:4"`` → ``(0.0, 0.3, 0.6, 0.9)``; each in [0, 1)."""
    if re.fullmatch(f"{NUMBER}:{NUMBER}:\\s*[0-9]+\\s*", text):
        start, stop, count = text.split(":")
        if int(count) < 1:
            raise ValueError(f"bad ratios {text!r}: COUNT must be at least 1")
        ratios = tuple(round(float(r), 6) for r in np.linspace(float(start), float(stop), int(count)))
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


def sweep_frames(image: np.ndarray, masks: np.ndarray, ratios: Sequence[float], colormap: str, alpha: float,
                 stretch: bool, max_side: int) -> np.ndarray:
    """``(R, H, W, 3)``: one overlay per ratio (``masks`` is ``(R, gh, gw)``), downscaled to ``max_side``
    (a box reduction, then bilinear: frames end up as 256-colour GIF frames, where Lanczos's extra
    sharpness is lost), labelled with its ratio."""
    frames = overlays(fit_within(image, max_side, Image.Resampling.BILINEAR, reducing_gap=1.0), masks, colormap,
                      alpha, stretch)
    for frame, ratio in zip(frames, ratios):
        stamp_label(frame, f"discard {ratio:.2f}")
    return frames

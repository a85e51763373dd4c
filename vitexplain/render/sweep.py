"""The frames of one image's discard-ratio sweep: one labelled overlay per ratio."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from .overlay import fit_within, overlays, stamp_label


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

"""Colormaps as lookup tables, from anchor colours. The names import nothing (``--help`` lists them); numpy
is imported when a table is first made."""
from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

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
    import numpy as np

    if name not in COLORMAP_ANCHORS:
        raise ValueError(f"unknown colormap {name!r}; choose one of {', '.join(COLORMAPS)}")
    anchors = np.array([[int(h[i:i + 2], 16) for i in (1, 3, 5)] for h in COLORMAP_ANCHORS[name]], dtype=np.float64)
    stops = np.linspace(0.0, 1.0, len(anchors))
    levels = np.linspace(0.0, 1.0, size)
    table = np.stack([np.interp(levels, stops, anchors[:, c]) for c in range(3)], axis=1)
    table = np.round(table).astype(np.uint8)
    table.setflags(write=False)
    return table

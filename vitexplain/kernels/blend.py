"""The heatmap blend, compiled: every frame of an overlay in one pass over the image.

A leaf below :func:`vitexplain.render.overlay.blend_reference` (numpy), which it equals exactly (tested).
"""
from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True)
def packed_rgb(red, green, blue):
    """Three 16-bit lanes of one uint64: ``red | green << 16 | blue << 32``."""
    return np.uint64(red) | (np.uint64(green) << np.uint64(16)) | (np.uint64(blue) << np.uint64(32))


@numba.njit(nogil=True, cache=True)
def blend_heat(image, masks, y_taps, x_taps, table, weight):
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
        heat[level] = packed_rgb(table[level, 0] * weight + 128, table[level, 1] * weight + 128,
                                  table[level, 2] * weight + 128)
    shares = np.empty(width, dtype=np.uint64)
    row = np.empty(columns, dtype=np.float32)
    levels = np.empty(width, dtype=np.int32)
    one, eight = np.float32(1.0), np.uint64(8)
    for y in range(height):
        for x in range(width):
            shares[x] = packed_rgb(image[y, x, 0] * keep, image[y, x, 1] * keep, image[y, x, 2] * keep)
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

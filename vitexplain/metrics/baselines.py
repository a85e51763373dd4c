"""The ``random`` map: the baseline every method is compared with.

Each value is uniform in [0, 1), drawn from a generator seeded by the SHA-256 of ``(seed, key)``, the key
being the model input's own content (:func:`content_key`): the map of one image (or one grid) is the same in
every run, batch and folder, whatever else is evaluated and wherever the file lies.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch
from torch import Tensor


def content_key(pixels: Tensor) -> str:
    """The SHA-256 of a model input's values (float32, row-major)."""
    return hashlib.sha256(pixels.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()


def random_maps(keys: Sequence[str], grid: tuple[int, int], seed: int = 0) -> Tensor:
    """``(n, gh, gw)`` random maps, one for each of the ``n`` ``keys``."""
    maps = []
    for key in keys:
        generator = torch.Generator().manual_seed(
            int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little"))
        maps.append(torch.rand(grid, generator=generator))
    return torch.stack(maps) if maps else torch.empty(0, *grid)

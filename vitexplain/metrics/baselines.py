"""The ``random`` map: the baseline every method is compared with.

Each value is uniform in [0, 1), drawn from a generator seeded by the SHA-256 of ``(seed, key)``: the map
of one input (or one grid) is the same in every run and every batch, whatever else is evaluated.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch
from torch import Tensor


def random_maps(keys: Sequence[str], grid: tuple[int, int], seed: int = 0) -> Tensor:
    """``(n, gh, gw)`` random maps, one for each of the ``n`` ``keys``."""
    maps = []
    for key in keys:
        generator = torch.Generator().manual_seed(
            int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little"))
        maps.append(torch.rand(grid, generator=generator))
    return torch.stack(maps) if maps else torch.empty(0, *grid)

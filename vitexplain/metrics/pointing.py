"""Grid pointing game (Böhle et al., "B-cos Networks", 2022).

Four images whose predicted classes differ are tiled into a 2×2 grid at the model's input size, each tile
the image's model input downscaled 2× (bilinear, antialiased). For each tile, a class-specific method
explains that tile's class; the score is the share of the map's non-negative mass inside that tile.
Chance is 0.25. Each group of four is shown in 4 arrangements, each image once in every corner.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

TILES = 4
GRID_READINGS = ("share", "hit", "tile_auroc")


def image_groups(classes: Sequence[int]) -> list[tuple[int, ...]]:
    """Groups of four images (their indices) whose ``classes`` differ: each image, in order, joins the first
    open group that lacks its class (else opens one); groups in the order they fill up; groups left short are
    dropped."""
    open_groups: list[list[int]] = []
    full: list[tuple[int, ...]] = []
    for index, cls in enumerate(classes):
        group = next((g for g in open_groups if all(classes[i] != cls for i in g)), None)
        if group is None:
            group = []
            open_groups.append(group)
        group.append(index)
        if len(group) == TILES:
            open_groups.remove(group)
            full.append(tuple(group))
    return full


def arrangements(group: Sequence[int]) -> list[tuple[int, ...]]:
    """The 4 arrangements of a group: arrangement ``a`` puts image ``group[(t + a) % 4]`` in tile ``t``
    (tiles in row-major order: top left, top right, bottom left, bottom right)."""
    return [tuple(group[(tile + shift) % TILES] for tile in range(TILES)) for shift in range(TILES)]


def check_grid(grid: tuple[int, int]) -> None:
    if grid[0] % 2 or grid[1] % 2:
        raise ValueError(f"the grid pointing game needs an even patch grid to tile, the model's is {grid[0]}×{grid[1]}")


def compose_grids(pixels: Tensor, tiles: Tensor) -> Tensor:
    """Grids ``(G, C, H, W)``: grid ``g`` shows image ``tiles[g, t]`` of ``pixels`` ``(m, C, H, W)`` in tile
    ``t``, downscaled to ``(H/2, W/2)``."""
    height, width = pixels.shape[-2:]
    small = F.interpolate(pixels, size=(height // 2, width // 2), mode="bilinear", antialias=True,
                          align_corners=False)
    chosen = small[tiles.flatten()].view(tiles.shape[0], 2, 2, pixels.shape[1], height // 2, width // 2)
    return chosen.permute(0, 3, 1, 4, 2, 5).reshape(tiles.shape[0], pixels.shape[1], height, width)


def tile_shares(masks: Tensor) -> Tensor:
    """``(n, 4)``: each map's ``(n, gh, gw)`` share of its non-negative mass in each tile (0 for a map with
    none)."""
    count, gh, gw = masks.shape
    mass = masks.clamp_min(0).reshape(count, 2, gh // 2, 2, gw // 2).sum(dim=(2, 4)).reshape(count, TILES)
    total = mass.sum(dim=1, keepdim=True)
    return torch.where(total > 0, mass / total.clamp_min(torch.finfo(mass.dtype).tiny), torch.zeros_like(mass))


def tile_blocks(masks: Tensor) -> Tensor:
    """``(n, 4, Q)``: each map's ``(n, gh, gw)`` patch values tile by tile (row-major tiles, ``Q = gh·gw/4``)."""
    count, gh, gw = masks.shape
    return masks.reshape(count, 2, gh // 2, 2, gw // 2).permute(0, 1, 3, 2, 4).reshape(count, TILES, -1)


def tile_readings(masks: Tensor, tiles: Tensor) -> dict[str, Tensor]:
    """``share``, ``hit`` and ``tile_auroc`` ``(n,)`` of maps ``(n, gh, gw)`` for their target tiles ``(n,)``
    (see the module's docstring); float32."""
    count, gh, gw = masks.shape
    tiles = tiles.to(masks.device)
    rows = torch.arange(count, device=masks.device)
    share = tile_shares(masks)[rows, tiles]
    peak = masks.reshape(count, -1).argmax(dim=1)  # the first of equal maxima: the lowest index
    peak_tile = (peak // gw >= gh // 2).long() * 2 + (peak % gw >= gw // 2).long()
    blocks = tile_blocks(masks.float())
    inside = blocks[rows, tiles]  # (n, Q)
    others = blocks[torch.arange(TILES, device=masks.device) != tiles.unsqueeze(1)].view(count, -1)  # (n, 3Q)
    above = (inside.unsqueeze(2) > others.unsqueeze(1)).float() + 0.5 * (inside.unsqueeze(2) == others.unsqueeze(1)).float()
    return {"share": share.float(), "hit": (peak_tile == tiles).float(), "tile_auroc": above.mean(dim=(1, 2))}
